"""
The experiment: every mode, and each SMD ablation, trained from one shared warm-up with several RL seeds,
reported on the test split as mean ± sample std over seeds; then a budget sweep. First it prints how the
warm-up fares under each eviction policy and budget, before any RL. Then it only launches train.py
(`jobs` runs at a time, one thread each) and reads their summaries; what each column measures is computed
in train.py. Each run's log is out/cmp_<row>_b<budget>_s<seed>.log, its JSONL next to it.

    python compare.py                              # the table and the sweep, ~40 min on 2 CPU cores
    python compare.py --sweep=False --rows=dense,smd --seeds=5
    python compare.py --budget=21 --lr=3e-5        # any train.py --key=value reaches every run
    python compare.py --rows= --sweep=False        # the warm-up table alone

Not here: any training logic, plotting.
"""

import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import train

seeds = 3                          # RL seeds 0 .. seeds-1, all from one warm-up (train.py's sft_seed)
rows = "dense,naive,tis,smd,smd_no_ref_kl,mask_only,distill_only,warmup_teacher"  # table rows, in order
sweep = True                       # also run the budget sweep
sweep_budgets = (13, 21, 32, 42)   # KV budgets of the sweep (25%, 40%, 60%, 80% of the 53-token sequence)
sweep_rows = "naive,tis,smd"       # trained at every sweep budget; dense (full-cache rollouts) is evaluated there
jobs = 2                           # train.py processes at a time
warmup_policies = "h2o,streaming,tova,snapkv"  # the warm-up's greedy accuracy under each, at every sweep budget

ROWS = {  # row name -> the train.py flags that make it; every other setting (ref_kl_coef too) is shared
    "dense": ["--mode=dense"],                                   # full-cache rollouts: the on-policy ceiling
    "naive": ["--mode=naive"],                                   # compressed rollouts, dense learner
    "tis": ["--mode=tis"],                                       # naive + truncated importance weights
    "smd": ["--mode=smd"],                                       # GRPO(masked) + 0.1 KL(dense || sg(masked))
    "smd_no_ref_kl": ["--mode=smd", "--ref_kl_coef=0.0"],        # the paper's objective alone, no reference KL
    "mask_only": ["--mode=smd", "--distill_coef=0.0"],           # on-policy GRPO under the mask, no distillation
    "distill_only": ["--mode=smd", "--policy_gradient=False"],   # the distillation KL alone, no policy gradient
    "warmup_teacher": ["--mode=smd", "--distill=masked_from_warmup_dense", "--distill_coef=1.0"],  # the old default
}

COLUMNS = [  # (header, summary key, format); start -> end columns show both
    ("full-cache acc", ("acc_dense_start", "acc_dense"), "{:.3f}"),        # greedy exact match, full KV cache
    ("compressed acc", ("acc_compressed_start", "acc_compressed"), "{:.3f}"),  # greedy, policy@budget
    ("reward", ("reward_start", "reward_end"), "{:.3f}"),                  # training reward, first/last 10 steps
    ("mismatch k3", "mismatch_k3_mean", "{:.1e}"),                         # KL(sampler || learner) per token
    ("TIS ESS", "tis_ess_mean", "{:.2f}"),                                 # effective sample size, tis only
    ("KV frac", "kv_frac", "{:.2f}"),                                      # rollout KV bytes / full cache's
    ("RL s", "rl_s", "{:.0f}"),                                            # phase 2 wall time per run
]


def mean_std(values, fmt):
    """'mean ± sample std' (n - 1 in the denominator); '-' where a row has no such number."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(std)}"


def cell(summaries, key, fmt):
    if isinstance(key, tuple):  # start -> end
        return " -> ".join(mean_std([s[k] for s in summaries], fmt) for k in key)
    return mean_std([s.get(key) for s in summaries], fmt)


def aligned(cells):
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def table(results):
    """results: [(row name, [summary per seed])] -> one aligned line per row."""
    cells = [["row"] + [h for h, _, _ in COLUMNS]]
    cells += [[name] + [cell(summaries, key, fmt) for _, key, fmt in COLUMNS] for name, summaries in results]
    return aligned(cells)


def run(argv, out_dir, name):
    """One `python train.py` in its own process (one thread), its output in out_dir/name.log -> its summary."""
    with open(os.path.join(out_dir, name + ".log"), "w") as log:
        done = subprocess.run([sys.executable, "train.py", *argv, f"--run_name={name}"], stdout=log,
                              stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.abspath(__file__)))
    if done.returncode != 0:
        raise RuntimeError(f"run {name} failed; see {os.path.join(out_dir, name + '.log')}")
    with open(os.path.join(out_dir, name + ".jsonl")) as f:
        return json.loads(f.readlines()[-1])


@torch.no_grad()
def evaluate_checkpoint(cfg, name, budget):
    """Compressed accuracy of a finished run's weights at another budget (dense runs in the sweep)."""
    model = train.build_model(cfg)
    model.load_state_dict(torch.load(os.path.join(cfg["out_dir"], name + ".pt"), map_location=cfg["device"],
                                     weights_only=False)["model"])
    _, held_out = train.problem_splits(cfg)
    return train.evaluate(model, held_out, cfg["policy"], budget, **train.policy_kwargs(dict(cfg, budget=budget)))


def prepare_warm_up(cfg):
    """Train (or find) the shared warm-up once, before the runs start in parallel and would all train it;
    with train.py's thread count, so it is bit for bit the warm-up `python train.py` would train."""
    torch.set_num_threads(cfg["cpu_threads"])
    model = train.build_model(cfg)
    train.warm_up(model, cfg)
    return model


@torch.no_grad()
def warmup_table(model, cfg, policies, budgets):
    """How hard compression bites before any RL: the warm-up's greedy accuracy with a full cache and under each
    policy at each budget, on the same held-out problems as the runs."""
    _, held_out = train.problem_splits(cfg)
    P, R = train.max_lengths()
    cells = [["policy"] + [f"{b} ({b / (P + R):.0%})" for b in budgets]]
    for policy in policies:
        settings = [train.policy_kwargs(dict(cfg, policy=policy, budget=b)) for b in budgets]
        cells.append([policy] + [f"{train.evaluate(model, held_out, policy, b, **kw):.3f}"
                                 for b, kw in zip(budgets, settings)])
    full = train.evaluate(model, held_out, "full", P + R)
    return f"\nwarm-up greedy accuracy: full cache {full:.3f}; compressed, by budget (KV frac):\n" + aligned(cells)


def parse(argv):
    own = {"seeds": seeds, "rows": rows, "sweep": sweep, "sweep_budgets": sweep_budgets, "sweep_rows": sweep_rows,
           "jobs": jobs, "warmup_policies": warmup_policies}
    is_own = lambda arg: arg[2:].split("=", 1)[0] in own
    own_argv = [a.replace("=", "=(", 1) + ",)" if a.startswith("--sweep_budgets=") else a for a in argv if is_own(a)]
    own.update(train.parse_overrides(own_argv, own))  # --sweep_budgets=16 or =16,24: a tuple either way
    passed = [a for a in argv if not is_own(a)] + ["--eval_split=test"] * (not any("--eval_split=" in a for a in argv))
    names = [n for n in own["rows"].split(",") if n] + (own["sweep_rows"].split(",") if own["sweep"] else [])
    unknown = [n for n in names if n not in ROWS]
    if unknown or own["seeds"] < 1 or own["jobs"] < 1:
        raise ValueError(f"need rows from {sorted(ROWS)}, seeds >= 1, jobs >= 1; got unknown rows {unknown}, "
                         f"seeds={own['seeds']}, jobs={own['jobs']}")
    for key in ("seed", "mode", "run_name", "resume"):
        if any(a.startswith(f"--{key}=") for a in passed):
            raise ValueError(f"compare.py sets --{key} itself for every run")
    budgets = [int(b) for b in own["sweep_budgets"]] if own["sweep"] else []
    return own, passed, budgets


def main(argv):
    own, passed, budgets = parse(argv)
    cfg = train.make_config(passed)
    plan = []  # (row, budget, seed, argv), each checked before anything runs
    for name in [n for n in own["rows"].split(",") if n]:  # --rows= (empty): the warm-up table alone
        plan += [(name, cfg["budget"], s, passed + ROWS[name] + [f"--budget={cfg['budget']}", f"--seed={s}"])
                 for s in range(own["seeds"])]
    for budget in budgets:
        for name in [n for n in own["sweep_rows"].split(",") if budget != cfg["budget"] or n not in own["rows"]]:
            plan += [(name, budget, s, passed + ROWS[name] + [f"--budget={budget}", f"--seed={s}"])
                     for s in range(own["seeds"])]
    for _, _, _, argv_run in plan:
        train.make_config(argv_run)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    t0 = time.time()
    model = prepare_warm_up(cfg)
    if own["warmup_policies"]:
        table_budgets = sorted({int(b) for b in own["sweep_budgets"]} | {cfg["budget"]})
        print(warmup_table(model, cfg, own["warmup_policies"].split(","), table_budgets), flush=True)
    summaries = {}
    with concurrent.futures.ThreadPoolExecutor(own["jobs"]) as pool:
        futures = {pool.submit(run, a, cfg["out_dir"], f"cmp_{n}_b{b}_s{s}"): (n, b, s) for n, b, s, a in plan}
        for future in concurrent.futures.as_completed(futures):
            n, b, s = futures[future]
            summaries[n, b, s] = future.result()
            r = summaries[n, b, s]
            print(f"{n:14s} budget {b:2d} seed {s} | full-cache acc {r['acc_dense_start']:.3f} -> "
                  f"{r['acc_dense']:.3f} | "
                  f"compressed {r['acc_compressed_start']:.3f} -> {r['acc_compressed']:.3f} | {time.time() - t0:.0f}s",
                  flush=True)

    results = [(n, [summaries[n, cfg["budget"], s] for s in range(own["seeds"])]) for n in own["rows"].split(",") if n]
    if not plan:
        return results
    print(f"\n{own['seeds']} RL seeds per row, one warm-up (sft_seed={cfg['sft_seed']}), policy={cfg['policy']} "
          f"budget={cfg['budget']} (dense: full-cache rollouts), {cfg['n_steps']} GRPO steps; accuracy: greedy exact "
          f"match on {cfg['eval_problems']} {cfg['eval_split']} problems, start -> end; mean ± sample std")
    print(table(results))
    if budgets:
        print(sweep_table(cfg, own, budgets, summaries))
    print(f"total {time.time() - t0:.0f}s")
    return results


def sweep_table(cfg, own, budgets, summaries):
    """Final full-cache / compressed accuracy per budget (the table's own budget included, from its runs);
    dense's weights do not depend on the budget, so its final checkpoints are evaluated at each one."""
    names = own["sweep_rows"].split(",")
    cells = [["budget (KV frac)", "dense (ceiling)"] + names]
    seq_len = sum(train.max_lengths())
    for budget in sorted(set(budgets) | {cfg["budget"]}):
        row = [f"{budget} ({budget / seq_len:.0%})"]
        if ("dense", cfg["budget"], 0) in summaries:
            dense = [summaries["dense", cfg["budget"], s] for s in range(own["seeds"])]
            comp = [evaluate_checkpoint(cfg, f"cmp_dense_b{cfg['budget']}_s{s}", budget) for s in range(own["seeds"])]
            row.append(f"{mean_std([d['acc_dense'] for d in dense], '{:.3f}')} / {mean_std(comp, '{:.3f}')}")
        else:
            row.append("-")
        for name in names:
            runs = [summaries[name, budget, s] for s in range(own["seeds"])]
            row.append(f"{mean_std([r['acc_dense'] for r in runs], '{:.3f}')} / "
                       f"{mean_std([r['acc_compressed'] for r in runs], '{:.3f}')}")
        cells.append(row)
    return f"\nbudget sweep: final full-cache / compressed accuracy ({cfg['policy']})\n" + aligned(cells)


if __name__ == "__main__":
    main(sys.argv[1:])
