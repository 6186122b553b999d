"""
The experiment: every mode, and any SMD ablation or setting, trained from several warm-ups with several RL
seeds each, on the test split. Runs that share a warm-up and an RL seed are paired: the verdicts are the
paired table's (each row minus full, and minus smd, with a 95% t interval over the pairs); the first table
gives each row's mean ± sample std over all its runs pooled, which the warm-up dominates. First it prints
how each warm-up fares under each eviction policy and budget, before any RL; last, how each row's weights
fare under policies and budgets they did not train under (transfer, train.py --eval_also), and optionally
a budget sweep. It only launches train.py (`jobs` runs at a time, one thread each) and reads their logs;
what each column measures is computed in train.py. Each run's log is out/cmp_<row>_b<budget>_w<sft_seed>_
s<seed>.log, its JSONL next to it, and out/compare.json lists this comparison's runs (plot.py draws those).
A run that fails is reported with its log, the tables keep the others (a row or cell says how many runs it
averages when some are missing), and compare.py exits with status 1 at the end.
A row may carry train.py settings: smd@distill_coef=0.3@ref_kl_coef=0 is the smd row with those two.

    python -m experiments.compare            # the core rows, 4 warm-ups x 3 RL seeds, transfer
    python -m experiments.compare --sft_seeds=0,1,2,3,4,5  # the README's table: 6 warm-ups (~70 min here)
    python -m experiments.compare --sweep=True --rows=full --sft_seeds=0,1  # and the budget sweep
    python -m experiments.compare --rows=full,smd,smd@distill_coef=0.3 --sft_seeds=0,1
    python -m experiments.compare --budget=32 --lr=3e-5  # any train.py --key=value reaches every run
    python -m experiments.compare --rows= --sweep=False  # the warm-up tables alone
    python -m experiments.compare --design=experiments/design.toml --stage=tuning  # the design: settings
    python -m experiments.compare --design=experiments/design.toml  # the design's runs, claims and verdicts
    python -m experiments.compare --help     # these settings; train.py's: python train.py --help

With --design, the file fixes the rows (with the settings chosen on validation), budgets, warm-ups, seeds and
the family of claims before any run; the tables are then per budget: final accuracy and the stability of
each run (experiments/stats.py defines both), as means over warm-ups with 95% t intervals over the warm-ups'
means, and the claims with Holm's correction: a verdict only where the corrected interval excludes 0.

Not here: any training logic, plotting.
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import time

import tomllib

import numpy as np
import torch

import configurator
import objectives
from experiments import stats
import policies
import smd
import train
import warmup
from data.arithmetic import EOS_ID, encode, format_prompt, max_lengths

# -----------------------------------------------------------------------------
# config: overridable as --key=value; every other --key=value goes to train.py, for every run
seeds = 3                          # RL seeds 0 .. seeds-1 from each warm-up
sft_seeds = (0, 1, 2, 3)           # warm-ups (train.py's sft_seed); (warm-up, RL seed) pairs the rows' runs
rows = "full,naive,tis,sparse_rl,smd,mask_only"  # table rows, in order; row@key=value adds train.py settings
sweep = False                      # also run the budget sweep
sweep_budgets = (26, 42, 46)       # KV budgets of the sweep besides the table's (49%, 79%, 87% of 53 tokens)
sweep_rows = "naive,tis,sparse_rl,smd"  # trained at each sweep budget; full's checkpoints are evaluated there
jobs = 2                           # train.py processes at a time
warmup_policies = "rkv,snapkv,h2o,streaming"  # the warm-up's accuracy under each, every budget
transfer = "streaming@26,snapkv@26,h2o@26,streaming@42,snapkv@42,h2o@42"  # train.py --eval_also of every run
reuse = True                       # read, not rerun, a finished run whose checkpoint holds exactly its config
design = ""                        # a design file (experiments/design.toml); it sets rows, seeds and budgets
stage = "main"                     # with --design: "tuning" (validation, its settings grid) or "main" (test)
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
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo's root, where train.py is
EPILOG = ("and any train.py --key=value, for every run (python train.py --help); compare.py sets --seed,\n"
          f"--mode, --run_name, --resume and --eval_also itself.\nrows: {', '.join(ROWS)}, each with any "
          f"@key=value")

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


def paired_difference(a, b):
    """a, b: one number per pair for two rows (the same warm-up and RL seed at each index) -> the mean paired
    difference a - b and the half-width of its 95% t interval (nan below two pairs)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2:
        return d.mean(), float("nan")
    return d.mean(), stats.t_quantile(len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))


def over_warm_ups(a, b, warm_ups):
    """The paired difference a - b with each warm-up one observation (its seeds' mean difference): the
    interval when the warm-ups, not the runs, are taken as the independent units -> (mean, half-width)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    means = [d[[i for i, w in enumerate(warm_ups) if w == u]].mean() for u in dict.fromkeys(warm_ups)]
    return paired_difference(means, np.zeros(len(means)))


def verdict(mean, half, n):
    """'higher' or 'lower' where the interval excludes 0, else the words a reader must see."""
    if not abs(mean) > half:  # nan (one pair) included
        return f"not resolved at n = {n}"
    return "higher" if mean > 0 else "lower"


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
    """One `python train.py` in its own process (one thread), its output in out_dir/name.log -> its summary,
    with "transfer_start" and "transfer" (its eval_also accuracies at the first and last eval); a RuntimeError
    naming the log if it fails."""
    path = os.path.join(out_dir, name + ".log")
    with open(path, "w") as log:
        done = subprocess.run([sys.executable, "train.py", *argv, f"--run_name={name}"], stdout=log,
                              stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"train.py exited with status {done.returncode}; its log: {path}")
    return read_summary(out_dir, name)


def read_summary(out_dir, name):
    """A finished run's summary from its JSONL, with its eval_also accuracies at the first and last eval,
    and every record of the run (records), which the stability measures read."""
    with open(os.path.join(out_dir, name + ".jsonl")) as f:
        records = [json.loads(line) for line in f]
    also = [r["acc"] for r in records if r["kind"] == "eval_also"]
    return dict(records[-1], transfer_start=also[0] if also else {}, transfer=also[-1] if also else {},
                records=records)


def finished(argv, out_dir, name):
    """The summary of a run already made with exactly this config (its final checkpoint says so, and its log
    ends with the summary), else None: a comparison that shares runs with an earlier one (a λ grid next to
    the core rows, say) pairs with them instead of training them again. Same config, not same code: after
    changing train.py, run with --reuse=False."""
    ckpt, log = os.path.join(out_dir, name + ".pt"), os.path.join(out_dir, name + ".jsonl")
    if not (os.path.exists(ckpt) and os.path.exists(log)):
        return None
    cfg = train.make_config(argv + [f"--run_name={name}"])
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    with open(log) as f:
        last = json.loads(f.readlines()[-1])
    where = ("out_dir", "run_name")  # a folder of runs moved elsewhere still holds the same runs
    same = {k: v for k, v in saved["config"].items() if k not in where} == \
        {k: v for k, v in cfg.items() if k not in where}
    if not same or saved["step"] != cfg["n_steps"] or last["kind"] != "summary":
        return None
    return read_summary(out_dir, name)


@torch.no_grad()
def evaluate_checkpoint(cfg, name, budget):
    """Compressed accuracy of a finished run's weights at another budget (full runs in the sweep)."""
    model = warmup.build_model(cfg)
    model.load_state_dict(torch.load(os.path.join(cfg["out_dir"], name + ".pt"), map_location=cfg["device"],
                                     weights_only=False)["model"])
    _, held_out = warmup.problem_splits(cfg)
    settings = warmup.policy_kwargs(dict(cfg, budget=budget))
    return train.evaluate(model, held_out, cfg["policy"], budget, **settings)


def prepare_warm_up(cfg):
    """Train (or find) a warm-up once, before the runs start in parallel and would all train it; with
    train.py's thread count, so it is bit for bit the warm-up `python train.py` would train."""
    torch.set_num_threads(cfg["cpu_threads"])
    model = warmup.build_model(cfg)
    warmup.warm_up(model, cfg)
    return model


@torch.no_grad()
def sampled_k3(model, problems, policy, budget, **settings):
    """Per-token KL(compressed sampler || full-cache learner), the k3 estimate on one rollout of the problems
    sampled at temperature 1: how far compression moves the policy, on the compressed policy's own samples."""
    _, R = max_lengths()
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
    _, held_out = warmup.problem_splits(cfg)
    P, R = max_lengths()
    cells = [["policy"] + [f"{b} ({b / (P + R):.0%})" for b in budgets]]  # slots, of P + R positions
    for policy in policy_names:
        for keep_prompt in (False, True):
            row = [policy + (", prompt kept" if keep_prompt else "")]
            for budget in budgets:
                setting = dict(cfg, policy=policy, budget=budget, keep_prompt=keep_prompt)
                settings = warmup.policy_kwargs(setting)
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
    reserved = ("seed", "sft_seed", "mode", "run_name", "resume", "eval_also")
    overrides, passed = configurator.parse_known(argv, CONFIG, reserved)
    own = dict(CONFIG, **overrides)
    own["rows"] = [n for n in own["rows"].split(",") if n]  # --rows= (empty): the warm-up table alone
    own["sweep_rows"] = [n for n in own["sweep_rows"].split(",") if n] if own["sweep"] else []
    own["budgets"], own["claims"], own["labels"] = None, [], {}
    if own["design"]:
        extra = sorted(overrides.keys() - {"design", "stage", "jobs", "reuse"}) + passed
        if extra:
            raise ValueError(f"with --design the file sets the runs (only --stage, --jobs, --reuse beside "
                             f"it); got also {extra}")
        passed = apply_design(own)
    unknown = [n for n in own["rows"] + own["sweep_rows"] if n.split("@")[0] not in ROWS]
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
    passed.append(f"--eval_also={own['transfer']}")
    # the runs start in the repo (train.py's folder), the caller may be elsewhere: one absolute out_dir, so
    # both read and write the same warm-up and logs
    out_dir = os.path.abspath(train.make_config(passed)["out_dir"])
    passed = [a for a in passed if not a.startswith("--out_dir=")] + [f"--out_dir={out_dir}"]
    cfg = train.make_config(passed)
    runs = [(n, b) for b in own["budgets"] or [cfg["budget"]] for n in own["rows"]]
    runs += [(n, b) for b in own["sweep_budgets"] for n in own["sweep_rows"]]
    plan = {}  # a sweep run the table already has (same row and budget) is not run twice
    for name, budget in runs:
        for w, s in own["runs"]:
            plan.setdefault((name, budget, w, s), passed + row_flags(name)
                            + [f"--budget={budget}", f"--sft_seed={w}", f"--seed={s}"])
    for argv_run in plan.values():
        train.make_config(argv_run)
    return own, cfg, plan


def apply_design(own):
    """Fill compare's settings from the design file own["design"] at stage own["stage"] -> the train.py flags
    the design passes to every run. A tuning stage's rows are its rows x its lr grid."""
    if own["stage"] not in ("tuning", "main"):
        raise ValueError(f"stage must be 'tuning' or 'main', got {own['stage']!r}")
    with open(own["design"], "rb") as f:
        design = tomllib.load(f)[own["stage"]]
    keys = {"sft_seeds", "seeds", "budgets", "flags", "rows"} | (
        {"lr", "steps"} if own["stage"] == "tuning" else {"claims", "report_steps"})
    if set(design) != keys:
        raise ValueError(f"{own['design']} [{own['stage']}] needs exactly the keys {sorted(keys)}, got "
                         f"{sorted(design)}")
    labels = {}  # row spec -> the name the design gives it
    for label, spec in design["rows"].items():
        row_flags(spec)  # an unknown row or a malformed setting fails here
        for lr in design.get("lr", [None]):
            labels[spec if lr is None else f"{spec}@lr={lr}"] = label if lr is None else f"{label}@lr={lr}"
    own.update(rows=list(labels), labels=labels, sft_seeds=tuple(design["sft_seeds"]), seeds=design["seeds"],
               budgets=list(design["budgets"]), sweep=False, sweep_rows=[], transfer="",
               warmup_policies="", steps=design.get("steps", []),
               report_steps=design.get("report_steps", {}))
    if own["stage"] == "main" and set(own["report_steps"]) != set(design["rows"]):
        raise ValueError(f"report_steps needs one step for each row, {sorted(design['rows'])}; got "
                         f"{sorted(own['report_steps'])}")
    for claim in design.get("claims", []):
        metrics = ("acc_full", "acc_compressed") + stats.STABILITY
        if (not {"a", "b", "metric", "budget"} <= claim.keys() <= {"a", "b", "metric", "budget", "margin"}
                or {claim["a"], claim["b"]} - set(design["rows"]) or claim["metric"] not in metrics
                or claim["budget"] not in own["budgets"] or not claim.get("margin", 1) > 0):
            raise ValueError(f"a claim needs a, b (rows of the design), metric (one of {metrics}) and budget "
                             f"(one of {own['budgets']}), and may have a margin > 0 (a claim of equivalence "
                             f"within it); got {claim}")
        own["claims"].append(claim)
    return list(design["flags"])


def row_flags(row):
    """'smd' -> ROWS['smd']; 'smd@distill_coef=0.3@ref_kl_coef=0' -> ROWS['smd'] + those settings."""
    name, *settings = row.split("@")
    if any("=" not in s for s in settings):
        raise ValueError(f"row {row!r}: each setting after @ is key=value")
    return ROWS[name] + [f"--{s}" for s in settings]


def main(argv):
    own, cfg, plan = configure(argv)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    with open(os.path.join(cfg["out_dir"], "compare.json"), "w") as f:  # which logs are this comparison's
        json.dump(dict(budget=cfg["budget"], runs=[[n, b, w, s, run_name(n, b, w, s)]
                                                   for n, b, w, s in plan]), f)
    t0 = time.time()
    if own["design"]:
        print(design_header(own, cfg), flush=True)
    for w in own["sft_seeds"]:
        model = prepare_warm_up(dict(cfg, sft_seed=w))
        if own["warmup_policies"]:
            table_budgets = sorted(set(own["sweep_budgets"]) | {cfg["budget"]})
            print(f"\nwarm-up sft_seed={w}:" + warmup_table(model, dict(cfg, sft_seed=w),
                                                          own["warmup_policies"].split(","), table_budgets),
                  flush=True)
    summaries, failed = {}, []
    def run_or_reuse(argv, name):
        return (own["reuse"] and finished(argv, cfg["out_dir"], name)) or run(argv, cfg["out_dir"], name)

    with concurrent.futures.ThreadPoolExecutor(own["jobs"]) as pool:
        futures = {pool.submit(run_or_reuse, a, run_name(*key)): key for key, a in plan.items()}
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

    if own["design"]:
        tables = tuning_table if own["stage"] == "tuning" else design_tables
        print(tables(own, cfg, summaries))
        finish(t0, failed, plan)
        return summaries
    results = [(n, [summaries.get((n, cfg["budget"], w, s)) for w, s in own["runs"]]) for n in own["rows"]]
    if not plan:
        return results
    print(f"\n{len(own['runs'])} runs per row ({own['seeds']} RL seeds on each of the warm-ups sft_seed="
          f"{','.join(map(str, own['sft_seeds']))}, pooled), policy={cfg['policy']} budget={cfg['budget']} "
          f"keep_prompt={cfg['keep_prompt']} (full: full-cache rollouts), {cfg['n_steps']} GRPO steps; "
          f"accuracy: greedy exact match on {cfg['eval_problems']} {cfg['eval_split']} problems, "
          f"start -> end; mean ± sample std over runs")
    print(table(results))
    print(paired_table(results, own["runs"]))
    if own["transfer"]:
        print(transfer_table(results, own["transfer"].split(",")))
    if own["sweep"]:
        print(sweep_table(cfg, own, summaries))
    finish(t0, failed, plan)
    return results


def finish(t0, failed, plan):
    """The last line, and exit status 1 naming the failed runs if any (the tables above keep the others)."""
    print(f"total {time.time() - t0:.0f}s")
    if failed:
        sys.exit(f"{len(failed)} of {len(plan)} runs failed, the tables above are without them:\n"
                 + "\n".join(failed))


def paired_table(results, pairs):
    """Each row minus full, minus smd and (a row with @settings) minus its own row, on the pairs where both
    finished: the final full-cache and compressed accuracy (row / reference, then the mean paired difference
    [95% t interval], with the verdict only where that interval excludes 0; then the interval over warm-ups,
    each warm-up's mean difference one observation, which does not take a row's runs from one warm-up for
    independent evidence), and the gap closed:
    (compressed end - start) / (full-cache start - compressed start), the share of the warm-up's compression
    gap RL closed, of the row and of the reference."""
    by_row = dict(results)
    cells = [["row - reference", "pairs", "full-cache acc", "difference [95% CI]", "verdict", "over warm-ups",
              "compressed acc", "difference [95% CI]", "verdict", "over warm-ups", "gap closed"]]
    gap = lambda s: (s["acc_compressed"] - s["acc_compressed_start"]) / max(
        s["acc_full_start"] - s["acc_compressed_start"], 1e-9)
    for name, summaries in results:
        base = name.split("@")[0]  # a row with settings is paired with its own row too, its neighbour
        for reference in dict.fromkeys(["full", "smd"] + ([base] if base != name else [])):
            if name == reference or reference not in by_row:
                continue
            kept = [i for i, (s, r) in enumerate(zip(summaries, by_row[reference]))
                    if s is not None and r is not None]
            both = [(summaries[i], by_row[reference][i]) for i in kept]
            if not both:
                continue
            row = [f"{name} - {reference}", str(len(both))]
            for key in ("acc_full", "acc_compressed"):
                a, b = [s[key] for s, _ in both], [r[key] for _, r in both]
                mean, half = paired_difference(a, b)
                interval = f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"
                m, h = over_warm_ups(a, b, [pairs[i][0] for i in kept])
                row += [f"{np.mean(a):.3f} / {np.mean(b):.3f}", interval, verdict(mean, half, len(both)),
                        f"[{m - h:+.3f}, {m + h:+.3f}]"]
            row.append(f"{np.mean([gap(s) for s, _ in both]):.2f} / {np.mean([gap(r) for _, r in both]):.2f}")
            cells.append(row)
    return (f"\npaired over (warm-up, RL seed), {len(pairs)} pairs a row; a verdict only where the 95% t "
            f"interval excludes 0; 'over warm-ups': its 95% t interval with each warm-up's mean difference "
            f"as one observation\n" + aligned(cells))


def transfer_table(results, settings):
    """Each row's final accuracy under policies and budgets it did not train under, and its gain over its own
    warm-up there (end - start of the same run, paired, with a 95% t interval): does the compressed gain
    transfer?"""
    cells = [["row"] + settings]
    for name, summaries in results:
        done = [s for s in summaries if s is not None and s.get("transfer")]
        if not done:
            continue
        row = [name]
        for setting in settings:
            end, start = [s["transfer"][setting] for s in done], [s["transfer_start"][setting] for s in done]
            gain, half = paired_difference(end, start)
            row.append(f"{np.mean(end):.3f} ({gain:+.3f} ± {half:.3f})")
        cells.append(row)
    if len(cells) == 1:
        return ""
    return ("\ntransfer: final greedy accuracy under each policy@budget (prompt kept as the runs'), and in "
            "brackets the gain over the warm-up there, ± its 95% t half-width over the runs\n"
            + aligned(cells))


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
    seq_len = sum(max_lengths())
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


# -----------------------------------------------------------------------------
# the committed design's tables


def design_header(own, cfg):
    """What the design fixed before its runs: printed first, so every table below reads against it."""
    warm_ups = ",".join(map(str, own["sft_seeds"]))
    lines = [f"design {own['design']} [{own['stage']}]: warm-ups sft_seed={warm_ups} x {own['seeds']} RL "
             f"seed(s), budgets {own['budgets']} ({cfg['policy']}, keep_prompt={cfg['keep_prompt']}), "
             f"{cfg['eval_split']} split, evaluations every {cfg['eval_interval']} steps",
             "rows: " + "; ".join(label if label == spec else f"{label} = {spec}"
                                  for spec, label in own["labels"].items())]
    if own["claims"]:
        lines.append(f"the family of {len(own['claims'])} claims (Holm over all of them): " + "; ".join(
            f"{c['a']} - {c['b']} {c['metric']} @{c['budget']}" + (f" within +-{c['margin']}" if "margin" in c
                                                                   else "") for c in own["claims"]))
    return "\n".join(lines)


def run_values(own, cfg, summaries, label, budget, metric):
    """metric (an accuracy, read at the row's report step, or a stats.STABILITY measure, over the whole run)
    of every run of a design row at a budget, with its warm-up -> (values, warm-ups), the runs that finished."""
    spec = next(spec for spec, name in own["labels"].items() if name == label)
    values, warm_ups = [], []
    for w, s in own["runs"]:
        summary = summaries.get((spec, budget, w, s))
        if summary is None:
            continue
        if metric in stats.STABILITY:
            values.append(stats.stability(summary["records"], cfg["grad_clip"])[metric])
        else:
            step = own["report_steps"].get(label)
            at = [r[metric] for r in summary["records"] if r["kind"] == "eval" and r["step"] == step]
            if step is not None and not at:
                raise ValueError(f"run {spec} (warm-up {w}) has no evaluation at its report step {step}")
            values.append(at[0] if at else summary[metric])
        warm_ups.append(w)
    return values, warm_ups


def over_warm_ups_cell(values, warm_ups, fmt="{:.3f}"):
    """'mean [low, high]': the mean over warm-ups of their runs' mean, 95% t interval over the warm-ups."""
    if not values:
        return "-"
    mean, low, high, _ = stats.t_interval(stats.warm_up_means(values, warm_ups))
    return f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}]"


def design_tables(own, cfg, summaries):
    """Per budget, each row's accuracies at its report step and its stability over the whole run (over
    warm-ups, 95% t), then the claims."""
    out = []
    metrics = [("acc_full", "{:.3f}"), ("acc_compressed", "{:.3f}")] + [
        (m, "{:.2f}" if m == "grad_norm_p95" else "{:.1e}" if m == "ref_kl_p95" else "{:.3f}")
        for m in stats.STABILITY]
    for budget in own["budgets"]:
        for title, chosen in (("accuracy at the report step", metrics[:2]), ("stability", metrics[2:])):
            cells = [["row", "runs"] + [m for m, _ in chosen]]
            for label in dict.fromkeys(own["labels"].values()):
                row = [label, str(len(run_values(own, cfg, summaries, label, budget, "acc_full")[0]))]
                row += [over_warm_ups_cell(*run_values(own, cfg, summaries, label, budget, m), fmt)
                        for m, fmt in chosen]
                cells.append(row)
            out.append(f"\n{title} at budget {budget}: mean over warm-ups [95% t interval, each warm-up's "
                       f"mean one observation]\n" + aligned(cells))
    out.append(cost_table(own, summaries))
    claims = []
    for claim in own["claims"]:
        a, wa = run_values(own, cfg, summaries, claim["a"], claim["budget"], claim["metric"])
        b, wb = run_values(own, cfg, summaries, claim["b"], claim["budget"], claim["metric"])
        pairs = {w: [] for w in dict.fromkeys(wa)}  # a - b per warm-up, over the seeds both finished
        for (va, w), (vb, w_b) in zip(zip(a, wa), zip(b, wb)):
            if w == w_b:
                pairs[w].append(va - vb)
        claims.append(dict(claim, observations=[np.mean(d) for d in pairs.values() if d]))
    if claims:
        stats.holm(claims)
        cells = [["claim", "warm-ups", "difference", "Holm level", "interval at that level", "p", "p Holm",
                  "verdict"]]
        for c in claims:
            name = f"{c['a']} - {c['b']}: {c['metric']} @{c['budget']}" + (
                f" within +-{c['margin']}" if "margin" in c else "")
            cells.append([name, str(len(c["observations"])),
                          f"{c['mean']:+.3f}", f"{c['level']:.4f}", f"[{c['low']:+.3f}, {c['high']:+.3f}]",
                          f"{c['p']:.2g}", f"{c['p_holm']:.2g}", c["verdict"]])
        resolved = sum(c["verdict"] != "not resolved" for c in claims)
        out.append(f"\nthe claims, each warm-up's mean paired difference one observation (a claim within "
                   f"+-margin: equivalence, two one-sided tests, its interval at 1 - 2 (1 - level)); Holm over "
                   f"the {len(claims)}: {resolved} resolved, {len(claims) - resolved} not\n" + aligned(cells))
    return "\n".join(out)


def cost_table(own, summaries):
    """What the compressed cache saved, from the same runs' per-step records: each row's KV bytes (the cache's
    buffers, as rollout() counts them) and rollout seconds per step, means over its runs at each budget, and
    both as a share of the full row's (its full-cache rollouts: the bytes a full cache holds and the time it
    takes). The times are those of runs sharing the CPU, two at a time: ratios, not speeds, are the result."""
    cells = [["row", "budget", "KV KiB", "of full's", "rollout s/step", "of full's"]]
    per_step = lambda spec, b, key: np.mean([np.mean([r[key] for r in s["records"] if r["kind"] == "train"])
                                             for (n, bb, _, _), s in summaries.items() if n == spec and bb == b])
    full_spec = next((spec for spec, name in own["labels"].items() if name == "full"), None)
    for budget in own["budgets"]:
        full_kv, full_s = (per_step(full_spec, budget, "kv_bytes"), per_step(full_spec, budget, "rollout_s")) \
            if full_spec and any(n == full_spec and b == budget for n, b, _, _ in summaries) else (np.nan, np.nan)
        for spec, label in own["labels"].items():
            if not any(n == spec and b == budget for n, b, _, _ in summaries):
                continue
            kv, seconds = per_step(spec, budget, "kv_bytes"), per_step(spec, budget, "rollout_s")
            cells.append([label, str(budget), f"{kv / 1024:.0f}", f"{kv / full_kv:.3f}", f"{seconds:.2f}",
                          f"{seconds / full_s:.2f}"])
    return "\ncost of the rollouts (means over each row's runs and steps; full: full-cache rollouts)\n" + \
        aligned(cells)


def tuning_table(own, cfg, summaries):
    """Validation: each row x lr, the criterion (mean of full-cache and compressed greedy accuracy, averaged
    over the tuning runs) at each candidate run length; per row, the (lr, length) that maximises it."""
    cells = [["row @ lr"] + [f"criterion at step {n}" for n in own["steps"]]]
    best = {}
    for spec, label in own["labels"].items():
        row = [label]
        for n in own["steps"]:
            runs = [summaries.get((spec, b, w, s)) for b in own["budgets"] for w, s in own["runs"]]
            at_n = [[(r["acc_full"] + r["acc_compressed"]) / 2 for r in run["records"]
                     if r["kind"] == "eval" and r["step"] == n] for run in runs if run is not None]
            value = np.mean([v[0] for v in at_n if v]) if any(at_n) else float("nan")
            row.append(f"{value:.3f}")
            base, _, lr = label.rpartition("@lr=")
            if not np.isnan(value) and value > best.get(base, (-1.0,))[0]:
                best[base] = (value, lr, n)
        cells.append(row)
    choice = "; ".join(f"{base}: lr={lr} n_steps={n} ({v:.3f})" for base, (v, lr, n) in best.items())
    return (f"\ntuning on {cfg['eval_split']}: (full-cache + compressed accuracy) / 2, mean over the runs\n"
            + aligned(cells) + f"\nchosen: {choice}")


if __name__ == "__main__":
    configurator.cli(main, CONFIG, __file__, check=configure, epilog=EPILOG)
