"""
One picture of a comparison: per row of compare.py (mean over its runs), the training reward, the
full-cache and the compressed greedy accuracy, and the sampler/learner mismatch (log scale) over GRPO steps;
then the frontier a reader decides from: every row and setting of the comparison at its final step (with
--design, at the report step the design chose for it on validation, where compare.py reads its accuracy),
full-cache against compressed accuracy, each with its 95% t interval over the runs. Read from the JSONL logs
of the runs out/compare.json lists; the accuracy curves are the runs' evaluations (every eval_interval steps:
10 in the committed design), the reward is each row's own rollouts' (full mode's from the full cache, dashed).
Needs matplotlib and scipy, which the core does not: `pip install -r requirements-extra.txt`.

    python -m experiments.plot                      # compare.py's runs at the default budget
    python -m experiments.plot --out_dir=out --budget=28 --rows=full,naive,tis,smd --file=out/run.png
    python -m experiments.plot --design=experiments/design.toml --budget=46  # the design's report steps
    python -m experiments.plot --help               # the settings
"""

import json
import os
import sys
import tomllib
from collections import defaultdict

import configurator
from experiments.stats import t_quantile

# -----------------------------------------------------------------------------
# config, overridable as --key=value
out_dir = "out"                             # where compare.py left its logs
budget = 28                                 # the compare.py budget whose runs to draw
rows = ""                                   # compare.py rows whose curves to draw, in order ("": all)
file = "experiments/run.png"                # the picture written (the results page shows this one)
smooth = 10                                 # moving average over this many steps for the per-step curves
design = ""                                 # a design file: the frontier at its [main] report steps
CONFIG = configurator.knobs(globals())
# -----------------------------------------------------------------------------


def manifest_rows(out_dir, budget):
    """Every row (and setting) of the last comparison at this budget, in its order."""
    with open(os.path.join(out_dir, "compare.json")) as f:
        return list(dict.fromkeys(r for r, b, _, _, _ in json.load(f)["runs"] if b == budget))


def load(out_dir, row, budget):
    """Per-run records of one row at one budget, of the runs out_dir/compare.json lists (the last
    comparison's; logs an earlier one left there are not its runs): [{"train": [...], "eval": [...]}]."""
    manifest = os.path.join(out_dir, "compare.json")
    if not os.path.exists(manifest):
        raise FileNotFoundError(f"no {manifest}: run compare.py first (it lists the runs it made there)")
    with open(manifest) as f:
        names = [name for r, b, _, _, name in json.load(f)["runs"] if r == row and b == budget]
    runs = []
    for path in [os.path.join(out_dir, name + ".jsonl") for name in names]:
        if not os.path.exists(path):  # a run that failed or has not finished
            continue
        with open(path) as f:
            records = [json.loads(line) for line in f]
        runs.append({kind: [r for r in records if r["kind"] == kind] for kind in ("train", "eval")})
    return runs


def final_accuracies(runs, step=None):
    """(compressed, full-cache) greedy accuracy of each run at `step` (None: its last evaluation), as two
    lists."""
    at = [[r for r in run["eval"] if r["step"] == step] if step is not None else run["eval"][-1:]
          for run in runs]
    if any(not a for a in at):
        raise ValueError(f"a run has no evaluation at step {step}")
    return [a[0]["acc_compressed"] for a in at], [a[0]["acc_full"] for a in at]


def report_steps(path):
    """The design file's row spec (as compare.json names it) -> its report step."""
    with open(path, "rb") as f:
        main = tomllib.load(f)["main"]
    return {spec: main["report_steps"][label] for label, spec in main["rows"].items()}


def half_width(values):
    """95% t half-width of the mean (0 for a single run)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return t_quantile(n - 1) * std / n ** 0.5


def mean_curve(runs, kind, key):
    """Steps and the mean over runs of `key` in their `kind` ("train" or "eval") records."""
    by_step = defaultdict(list)
    for run in runs:
        for r in run[kind]:
            by_step[r["step"]].append(r[key])
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def moving_average(values, width):
    return [sum(values[max(0, i - width + 1):i + 1]) / len(values[max(0, i - width + 1):i + 1])
            for i in range(len(values))]


def make_config(argv):
    """The defaults and the overrides, checked."""
    cfg = dict(CONFIG, **configurator.parse(argv, CONFIG))
    if cfg["smooth"] < 1:
        raise ValueError(f"smooth must be >= 1 (1: no smoothing), got {cfg['smooth']}")
    if cfg["design"] and not os.path.exists(cfg["design"]):
        raise ValueError(f"no design file {cfg['design']!r}")
    return cfg


def main(argv):
    cfg = make_config(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot.py needs matplotlib, which the core does not: pip install -r requirements-extra.txt")
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))
    panels = [("train", "reward", "training reward on the row's own rollouts (moving avg)"),
              ("eval", "acc_full", "full-cache greedy accuracy"),
              ("eval", "acc_compressed", f"compressed greedy accuracy (budget {cfg['budget']})"),
              ("train", "mismatch_k3", "mismatch KL(sampler || learner), k3")]
    if not os.path.exists(os.path.join(cfg["out_dir"], "compare.json")):
        sys.exit(f"nothing to draw: no {cfg['out_dir']}/compare.json, run compare.py first")
    drawn = []  # the curves' labels
    for row in cfg["rows"].split(",") if cfg["rows"] else manifest_rows(cfg["out_dir"], cfg["budget"]):
        runs = load(cfg["out_dir"], row, cfg["budget"])
        if not runs:
            print(f"no logs for row {row!r} at budget {cfg['budget']} in {cfg['out_dir']}: skipped")
            continue
        drawn.append(f"{row} ({len(runs)} runs)")
        for ax, (kind, key, title) in zip(axes, panels):
            steps, values = mean_curve(runs, kind, key)
            if kind == "train":
                values = moving_average(values, cfg["smooth"])
            # full mode's rollouts use the full cache, the others' the compressed one: a dashed reward line
            style = "--" if kind == "train" and key == "reward" and row.split("@")[0] == "full" else "-"
            ax.plot(steps, values, style, label=drawn[-1],
                    marker="o" if kind == "eval" else None, ms=3)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("GRPO step", fontsize=8)
    if not drawn:
        sys.exit(f"nothing to draw: {cfg['out_dir']}/compare.json lists no finished run of these rows at "
                 f"budget {cfg['budget']}")
    axes[3].set_yscale("log")
    axes[0].legend(fontsize=7)
    steps = report_steps(cfg["design"]) if cfg["design"] else {}
    for row in manifest_rows(cfg["out_dir"], cfg["budget"]):  # the frontier: every row and setting
        compressed, full = final_accuracies(load(cfg["out_dir"], row, cfg["budget"]), steps.get(row))
        if compressed:
            axes[4].errorbar(sum(compressed) / len(compressed), sum(full) / len(full), fmt="o", ms=4,
                             xerr=half_width(compressed), yerr=half_width(full), capsize=2, label=row)
    axes[4].set_title(("accuracy at the design's report step" if steps else "final accuracy")
                      + ", mean and 95% t interval over runs", fontsize=9)
    axes[4].set_xlabel(f"compressed (budget {cfg['budget']})", fontsize=8)
    axes[4].set_ylabel("full cache", fontsize=8)
    axes[4].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(cfg["file"], dpi=80)
    print(f"wrote {cfg['file']}: {', '.join(drawn)}")


if __name__ == "__main__":
    configurator.cli(main, CONFIG, __file__, check=make_config)
