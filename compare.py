"""
The experiment: every mode, and each SMD ablation, trained from several warm-ups with several RL seeds each,
reported on the test split as mean ± sample std over all those runs pooled (the warm-up moves a row more than
the RL seed does); then a budget sweep. First it prints how each warm-up fares under each eviction policy
and budget, before any RL. Then it only launches train.py (`jobs` runs at a time, one thread each) and reads
their summaries; what each column measures is computed in train.py. Each run's log is
out/cmp_<row>_b<budget>_w<sft_seed>_s<seed>.log, its JSONL next to it. A run that fails is reported with its
log, the tables keep the others (a row or cell says how many runs it averages when some are missing), and
compare.py exits with status 1 at the end.

    python compare.py                        # the table and the sweep
    python compare.py --sweep=False --rows=full,smd --seeds=5 --sft_seeds=0
    python compare.py --budget=32 --lr=3e-5  # any train.py --key=value reaches every run
    python compare.py --rows= --sweep=False  # the warm-up tables alone
    python compare.py --help                 # these settings; train.py's: python train.py --help

Not here: any training logic, plotting.
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

import configurator
import objectives
import policies
import smd
import train
from data.arithmetic import EOS_ID, encode, format_prompt

# -----------------------------------------------------------------------------
# config: overridable as --key=value; every other --key=value goes to train.py, for every run
seeds = 3                          # RL seeds 0 .. seeds-1 from each warm-up
sft_seeds = (0, 1)                 # warm-ups (train.py's sft_seed); a row pools every warm-up x RL seed
rows = "full,naive,tis,sparse_rl,smd,smd_no_ref_kl,mask_only,distill_only"  # table rows, in order
sweep = True                       # also run the budget sweep
sweep_budgets = (23, 32, 42)       # KV budgets of the sweep besides the table's (43%, 60%, 79% of 53 tokens)
sweep_rows = "naive,tis,sparse_rl,smd"  # trained at each sweep budget; full's checkpoints are evaluated there
jobs = 2                           # train.py processes at a time
warmup_policies = "h2o,streaming,tova,snapkv,rkv,random"  # the warm-up's accuracy under each, every budget
CONFIG = configurator.knobs(globals())
# -----------------------------------------------------------------------------

ROWS = {  # row name -> the train.py flags that make it; every other setting (ref_kl_coef too) is shared
    "full": ["--mode=full"],                                  # full-cache rollouts: the on-policy ceiling
    "naive": ["--mode=naive"],                                # compressed rollouts, unmasked learner
    "tis": ["--mode=tis"],                                    # naive + truncated importance weights
    "sparse_rl": ["--mode=sparse_rl"],                        # naive + Sparse-RL's rejection sampling
    "smd": ["--mode=smd"],                                    # GRPO(masked) + 0.1 KL(unmasked || sg(masked))
    "smd_no_ref_kl": ["--mode=smd", "--ref_kl_coef=0.0"],     # the paper's objective alone
    "mask_only": ["--mode=smd", "--distill_coef=0.0"],        # on-policy GRPO under the mask alone
    "distill_only": ["--mode=smd", "--policy_gradient=False"],  # the distillation KL alone
    # an older default: the masked pass learns from the warm-up's unmasked pass
    "warmup_teacher": ["--mode=smd", "--distill=masked_from_warmup_unmasked", "--distill_coef=1.0"],
}
EPILOG = ("and any train.py --key=value, for every run (python train.py --help); compare.py sets --seed,\n"
          f"--mode, --run_name and --resume itself.\nrows: {', '.join(ROWS)}")

COLUMNS = [  # (header, summary key, format); start -> end columns show both
    ("full-cache acc", ("acc_full_start", "acc_full"), "{:.3f}"),              # greedy exact match, full KV
    ("compressed acc", ("acc_compressed_start", "acc_compressed"), "{:.3f}"),  # greedy, policy@budget
    ("reward", ("reward_start", "reward_end"), "{:.3f}"),                      # training, first/last 10 steps
    ("mismatch k3", "mismatch_k3_mean", "{:.1e}"),                             # KL(sampler || learner)/token
    ("TIS ESS", "tis_ess_mean", "{:.2f}"),                                     # effective sample size, tis
    ("rejected", "sparse_rl_rejected_mean", "{:.2f}"),                         # sequences, sparse_rl
    ("KV frac", "kv_frac", "{:.2f}"),                                          # rollout KV bytes / full's
    ("RL s", "rl_s", "{:.0f}"),                                                # phase 2 wall time per run
]


def mean_std(values, fmt):
    """'mean ± sample std' (n - 1 in the denominator); '-' where a row has no such number."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    values = np.array(values, dtype=float)
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{fmt.format(values.mean())} ± {fmt.format(std)}"


def of_runs(n_done, n_runs):
    """'' when every run finished, else how many the numbers average: ' (2 of 3 runs)'."""
    return "" if n_done == n_runs else f" ({n_done} of {n_runs} runs)"


def cell(summaries, key, fmt):
    if isinstance(key, tuple):  # start -> end
        return " -> ".join(mean_std([s[k] for s in summaries], fmt) for k in key)
    return mean_std([s.get(key) for s in summaries], fmt)


def aligned(cells):
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def table(results):
    """results: [(row name, [summary per seed, None where that run failed])] -> one aligned line per row."""
    cells = [["row"] + [h for h, _, _ in COLUMNS]]
    for name, summaries in results:
        done = [s for s in summaries if s is not None]
        cells.append([name + of_runs(len(done), len(summaries))]
                     + [cell(done, key, fmt) for _, key, fmt in COLUMNS])
    return aligned(cells)


def run(argv, out_dir, name):
    """One `python train.py` in its own process (one thread), its output in out_dir/name.log -> its summary;
    a RuntimeError naming the log if it fails."""
    path = os.path.join(out_dir, name + ".log")
    with open(path, "w") as log:
        done = subprocess.run([sys.executable, "train.py", *argv, f"--run_name={name}"], stdout=log,
                              stderr=subprocess.STDOUT, cwd=os.path.dirname(os.path.abspath(__file__)))
    if done.returncode != 0:
        raise RuntimeError(f"train.py exited with status {done.returncode}; its log: {path}")
    with open(os.path.join(out_dir, name + ".jsonl")) as f:
        return json.loads(f.readlines()[-1])


@torch.no_grad()
def evaluate_checkpoint(cfg, name, budget):
    """Compressed accuracy of a finished run's weights at another budget (full runs in the sweep)."""
    model = train.build_model(cfg)
    model.load_state_dict(torch.load(os.path.join(cfg["out_dir"], name + ".pt"), map_location=cfg["device"],
                                     weights_only=False)["model"])
    _, held_out = train.problem_splits(cfg)
    settings = train.policy_kwargs(dict(cfg, budget=budget))
    return train.evaluate(model, held_out, cfg["policy"], budget, **settings)


def prepare_warm_up(cfg):
    """Train (or find) a warm-up once, before the runs start in parallel and would all train it; with
    train.py's thread count, so it is bit for bit the warm-up `python train.py` would train."""
    torch.set_num_threads(cfg["cpu_threads"])
    model = train.build_model(cfg)
    train.warm_up(model, cfg)
    return model


@torch.no_grad()
def sampled_k3(model, problems, policy, budget, **settings):
    """Per-token KL(compressed sampler || full-cache learner), the k3 estimate on one rollout of the problems
    sampled at temperature 1: how far compression moves the policy, on the compressed policy's own samples."""
    _, R = train.max_lengths()
    ro = smd.rollout(model, [encode(format_prompt(p)) for p in problems], policy=policy, budget=budget,
                     max_new_tokens=R, eos_id=EOS_ID,
                     generator=torch.Generator(next(model.parameters()).device).manual_seed(0), **settings)
    return objectives.mismatch(smd.learner_logprobs(model, ro.tokens), ro.logprobs, ro.response_mask)[1]


@torch.no_grad()
def warmup_table(model, cfg, policy_names, budgets, n_k3=128):
    """How hard compression bites before any RL: the warm-up's greedy accuracy with a full cache and under
    each policy at each budget, the prompt evictable or kept, on the same held-out problems as the runs, and
    in brackets the k3 KL of the sampler from the full-cache learner (sampled_k3, on n_k3 of them); n/a where
    the setting cannot run (a budget below the prompt + 1 when it is kept, say)."""
    _, held_out = train.problem_splits(cfg)
    P, R = train.max_lengths()
    cells = [["policy"] + [f"{b} ({b / (P + R):.0%})" for b in budgets]]  # slots, of P + R positions
    for policy in policy_names:
        for keep_prompt in (False, True):
            row = [policy + (", prompt kept" if keep_prompt else "")]
            for budget in budgets:
                setting = dict(cfg, policy=policy, budget=budget, keep_prompt=keep_prompt)
                settings = train.policy_kwargs(setting)
                try:
                    accuracy = train.evaluate(model, held_out, policy, budget, **settings)
                    k3 = sampled_k3(model, held_out[:n_k3], policy, budget, **settings)
                    row.append(f"{accuracy:.3f} ({k3:.0e})")
                except ValueError:  # checked before any decoding
                    row.append("n/a")
            cells.append(row)
    full = train.evaluate(model, held_out, "full", P + R)
    return (f"\nwarm-up greedy accuracy: full cache {full:.3f}; compressed (k3 KL from the full cache), by "
            f"budget (its share of the {P + R} positions):\n" + aligned(cells))


def configure(argv):
    """-> (compare's settings, rows and sweep_rows as lists, sweep_rows [] without the sweep; the table's
    train.py config; the plan, (row, budget, sft_seed, seed) -> that run's train.py flags). Every run's
    config is checked here, before any work, so a typo costs a second, not a warm-up."""
    reserved = ("seed", "sft_seed", "mode", "run_name", "resume")
    overrides, passed = configurator.parse_known(argv, CONFIG, reserved)
    own = dict(CONFIG, **overrides)
    own["rows"] = [n for n in own["rows"].split(",") if n]  # --rows= (empty): the warm-up table alone
    own["sweep_rows"] = [n for n in own["sweep_rows"].split(",") if n] if own["sweep"] else []
    unknown = [n for n in own["rows"] + own["sweep_rows"] if n not in ROWS]
    if unknown or own["seeds"] < 1 or own["jobs"] < 1 or len(set(own["sft_seeds"])) != len(own["sft_seeds"]):
        raise ValueError(f"need rows from {list(ROWS)}, seeds >= 1, jobs >= 1, distinct sft_seeds; got "
                         f"unknown rows {unknown}, seeds={own['seeds']}, jobs={own['jobs']}, "
                         f"sft_seeds={own['sft_seeds']}")
    unknown = [p for p in own["warmup_policies"].split(",") if p and p not in policies.POLICIES]
    if unknown:
        raise ValueError(f"unknown warmup_policies {unknown}; choose from {sorted(policies.POLICIES)}")
    own["runs"] = [(w, s) for w in own["sft_seeds"] for s in range(own["seeds"])]  # (warm-up, RL seed)
    if not any(a.startswith("--eval_split=") for a in passed):
        passed.append("--eval_split=test")  # report on test; choosing settings on val is train.py's default
    if not any(a.startswith("--eval_interval=") for a in passed):
        passed.append("--eval_interval=1000")  # the tables need start and end only
    # the runs start in the repo (train.py's folder), the caller may be elsewhere: one absolute out_dir, so
    # both read and write the same warm-up and logs
    out_dir = os.path.abspath(train.make_config(passed)["out_dir"])
    passed = [a for a in passed if not a.startswith("--out_dir=")] + [f"--out_dir={out_dir}"]
    cfg = train.make_config(passed)
    runs = [(n, cfg["budget"]) for n in own["rows"]]
    runs += [(n, b) for b in own["sweep_budgets"] for n in own["sweep_rows"]]
    plan = {}  # a sweep run the table already has (same row and budget) is not run twice
    for name, budget in runs:
        for w, s in own["runs"]:
            plan.setdefault((name, budget, w, s),
                            passed + ROWS[name] + [f"--budget={budget}", f"--sft_seed={w}", f"--seed={s}"])
    for argv_run in plan.values():
        train.make_config(argv_run)
    return own, cfg, plan


def main(argv):
    own, cfg, plan = configure(argv)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    t0 = time.time()
    for w in own["sft_seeds"]:
        model = prepare_warm_up(dict(cfg, sft_seed=w))
        if own["warmup_policies"]:
            table_budgets = sorted(set(own["sweep_budgets"]) | {cfg["budget"]})
            print(f"\nwarm-up sft_seed={w}:" + warmup_table(model, dict(cfg, sft_seed=w),
                                                          own["warmup_policies"].split(","), table_budgets),
                  flush=True)
    summaries, failed = {}, []
    with concurrent.futures.ThreadPoolExecutor(own["jobs"]) as pool:
        futures = {pool.submit(run, a, cfg["out_dir"], run_name(n, b, w, s)): (n, b, w, s)
                   for (n, b, w, s), a in plan.items()}
        for future in concurrent.futures.as_completed(futures):
            n, b, w, s = futures[future]
            try:
                r = summaries[n, b, w, s] = future.result()
            except Exception as e:  # reported; the tables keep every other run, one crash must not lose them
                failed.append(f"{n} budget {b} warm-up {w} seed {s}: {type(e).__name__}: {e}")
                print(f"{n:14s} budget {b:2d} warm-up {w} seed {s} | failed: {type(e).__name__}: {e}",
                      flush=True)
                continue
            print(f"{n:14s} budget {b:2d} warm-up {w} seed {s} | full-cache acc {r['acc_full_start']:.3f} -> "
                  f"{r['acc_full']:.3f} | compressed {r['acc_compressed_start']:.3f} -> "
                  f"{r['acc_compressed']:.3f} | {time.time() - t0:.0f}s", flush=True)

    results = [(n, [summaries.get((n, cfg["budget"], w, s)) for w, s in own["runs"]]) for n in own["rows"]]
    if not plan:
        return results
    print(f"\n{len(own['runs'])} runs per row ({own['seeds']} RL seeds on each of the warm-ups sft_seed="
          f"{','.join(map(str, own['sft_seeds']))}, pooled), policy={cfg['policy']} budget={cfg['budget']} "
          f"keep_prompt={cfg['keep_prompt']} (full: full-cache rollouts), {cfg['n_steps']} GRPO steps; "
          f"accuracy: greedy exact match on {cfg['eval_problems']} {cfg['eval_split']} problems, "
          f"start -> end; mean ± sample std over runs")
    print(table(results))
    if own["sweep"]:
        print(sweep_table(cfg, own, summaries))
    print(f"total {time.time() - t0:.0f}s")
    if failed:
        sys.exit(f"{len(failed)} of {len(plan)} runs failed, the tables above are without them:\n"
                 + "\n".join(failed))
    return results


def run_name(row, budget, sft_seed, seed):
    return f"cmp_{row}_b{budget}_w{sft_seed}_s{seed}"


def final_accuracy(runs, n_runs):
    """'full-cache / compressed' final accuracy over the runs that finished; '-' where none did."""
    if not runs:
        return "-"
    return (f"{mean_std([r['acc_full'] for r in runs], '{:.3f}')} / "
            f"{mean_std([r['acc_compressed'] for r in runs], '{:.3f}')}{of_runs(len(runs), n_runs)}")


def sweep_table(cfg, own, summaries):
    """Final full-cache / compressed accuracy per budget, the table's own budget included from its runs ('-'
    for a row that did not run there); full's weights do not depend on the budget, so its finished
    checkpoints are evaluated at each one."""
    full = [(w, s) for w, s in own["runs"] if ("full", cfg["budget"], w, s) in summaries]
    cells = [["budget (share of positions)", "full (ceiling)"] + own["sweep_rows"]]
    seq_len = sum(train.max_lengths())
    for budget in sorted(set(own["sweep_budgets"]) | {cfg["budget"]}):
        row = [f"{budget} ({budget / seq_len:.0%})"]
        full_runs = [dict(acc_full=summaries["full", cfg["budget"], w, s]["acc_full"],
                          acc_compressed=evaluate_checkpoint(dict(cfg, sft_seed=w),
                                                             run_name("full", cfg["budget"], w, s), budget))
                     for w, s in full]
        row.append(final_accuracy(full_runs, len(own["runs"])))
        for name in own["sweep_rows"]:
            runs = [summaries[name, budget, w, s] for w, s in own["runs"]
                    if (name, budget, w, s) in summaries]
            row.append(final_accuracy(runs, len(own["runs"])))
        cells.append(row)
    return f"\nbudget sweep: final full-cache / compressed accuracy ({cfg['policy']})\n" + aligned(cells)


if __name__ == "__main__":
    configurator.cli(main, CONFIG, __file__, check=configure, epilog=EPILOG)
