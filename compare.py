"""
The comparison: every GRPO mode (dense, naive, tis, smd) trained from one shared warm-up with several RL
seeds, then one table of mean ± std over seeds (population std). It only calls train.main and reads its summaries; the
training itself, and what each column measures, is in train.py. Each run's full log goes to
out/compare_<mode>_s<seed>.log (its JSONL next to it), so the terminal shows one line per run.

    python compare.py                        # 4 modes x 3 seeds on train.py's defaults
    python compare.py --budget=24 --seeds=5  # any train.py --key=value is passed to every run

Not here: any training logic, plotting.
"""

import contextlib
import os
import statistics
import sys
import time

import train

seeds = 3                   # RL seeds 0 .. seeds-1; the warm-up (train.py's sft_seed) is the same for all
modes = "dense,naive,tis,smd"  # comma-separated subset, in table order

COLUMNS = [  # (header, summary key, format)
    ("dense acc", "acc_dense", "{:.3f}"),             # final greedy accuracy, full KV cache
    ("compr. acc", "acc_compressed", "{:.3f}"),       # final greedy accuracy, policy@budget (dense mode too)
    ("mismatch k3", "mismatch_k3_mean", "{:.1e}"),    # KL(sampler || learner) per response token, mean over steps
    ("mismatch max", "mismatch_max_mean", "{:.1e}"),  # max |log-prob difference| in a batch, mean over steps
    ("grad-norm std", "grad_norm_std", "{:.3f}"),     # std over steps of the pre-clip gradient norm
    ("KV frac", "kv_frac", "{:.3f}"),                 # rollout KV cache bytes / full-cache bytes
    ("RL time s", "rl_s", "{:.0f}"),                  # phase 2 only: the shared warm-up is not counted
]


def mean_std(values, fmt):
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(std)}"


def table(rows):
    """rows: [(mode, [summary per seed])] -> aligned text, one line per mode."""
    cells = [["mode"] + [h for h, _, _ in COLUMNS]]
    for mode, summaries in rows:
        cells.append([mode] + [mean_std([s[key] for s in summaries], fmt) for _, key, fmt in COLUMNS])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])


def main(argv):
    own = {"seeds": seeds, "modes": modes}  # compare.py's settings; everything else goes to train.py
    is_own = lambda arg: arg[2:].split("=", 1)[0] in own
    own.update(train.parse_overrides([a for a in argv if is_own(a)], own))
    passed = [a for a in argv if not is_own(a)]
    mode_list = own["modes"].split(",")
    if own["seeds"] < 1:
        raise ValueError(f"--seeds must be >= 1, got {own['seeds']}")
    for key in ("seed", "mode", "run_name"):
        if any(a.startswith(f"--{key}=") for a in passed):
            raise ValueError(f"compare.py sets --{key} itself for every run")
    for mode in mode_list:  # every run's config, checked before the first one starts
        train.validate_config(dict(train.CONFIG, **train.parse_overrides(passed + [f"--mode={mode}"])))
    cfg = dict(train.CONFIG, **train.parse_overrides(passed))
    os.makedirs(cfg["out_dir"], exist_ok=True)
    t0, rows = time.time(), []
    for mode in mode_list:
        summaries = []
        for seed in range(own["seeds"]):
            name = f"compare_{mode}_s{seed}"
            with open(os.path.join(cfg["out_dir"], name + ".log"), "w") as log, contextlib.redirect_stdout(log):
                s = train.main(passed + [f"--mode={mode}", f"--seed={seed}", f"--run_name={name}"])
            summaries.append(s)
            print(f"{mode:5s} seed {seed} | dense acc {s['acc_dense']:.3f} | {cfg['policy']}@{cfg['budget']} acc "
                  f"{s['acc_compressed']:.3f} | mismatch k3 {s['mismatch_k3_mean']:.1e} | {time.time() - t0:.0f}s",
                  flush=True)
        rows.append((mode, summaries))
    print(f"\n{own['seeds']} RL seeds per mode, one warm-up (sft_seed={cfg['sft_seed']}), policy={cfg['policy']} "
          f"budget={cfg['budget']} (dense mode: full cache), n_steps={cfg['n_steps']}, reward={cfg['reward']}; "
          f"accuracy: greedy exact match on {cfg['eval_problems']} held-out problems; total {time.time() - t0:.0f}s")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
