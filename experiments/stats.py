"""
The experiment's statistics, defined here before any run measures them, so a table can only report what was
decided in advance: the stability of one training run from its JSONL log, and the inference over runs that
share warm-ups (each warm-up one observation) with a family-wise correction (Holm) across a stated family of
claims, where "no difference" is a claim of its own (equivalence within a stated margin, two one-sided
tests). The quantiles, tests and the correction come from scipy and statsmodels (optional dependencies of
the experiment, not of the core: `pip install -r requirements-extra.txt`). Not here: running anything
(compare.py).

Stability of one run (Chan et al. 2020's "during training" measures, in the simple forms a 2-core CPU can
afford), from its evaluations every eval_interval steps, step 0 included, and its per-step log:
  drawdown_full, drawdown_compressed  the largest drop of greedy accuracy below its running maximum,
                                      max_t (max_{s <= t} acc_s - acc_t), in accuracy (0.10 = 10 points);
  sd_full, sd_compressed              the standard deviation of accuracy across the evaluations (trend
                                      included: a run that improves steadily has a positive one too);
  grad_norm_p95                       the 95th percentile over steps of the gradient norm before clipping
                                      (of each step's last update);
  ref_kl_p95                          the 95th percentile over steps of the mean per-token KL of the
                                      full-cache policy to the frozen warm-up (the logged ref_kl);
  clipped_share                       the share of steps whose gradient norm exceeded grad_clip;
  collapsed                           1 if any evaluation's accuracy, full-cache or compressed, fell more
                                      than COLLAPSE (20 points) below that accuracy's running maximum, else 0.
"""

import importlib
import sys

import numpy as np

COLLAPSE = 0.20  # a drop this far below the running maximum of an accuracy counts as a collapse
STABILITY = ("drawdown_full", "drawdown_compressed", "sd_full", "sd_compressed", "grad_norm_p95",
             "ref_kl_p95", "clipped_share", "collapsed")


def needs(module):
    """Import one of the experiment's optional packages, or stop with the line that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        sys.exit(f"the experiment's statistics need {module.split('.')[0]}: pip install -r "
                 f"requirements-extra.txt")


def drawdown(curve):
    """The largest drop below the running maximum of a curve (evaluations in step order)."""
    curve = np.asarray(curve, dtype=float)
    return float((np.maximum.accumulate(curve) - curve).max())


def stability(records, grad_clip):
    """A run's JSONL records (dicts of kind 'train' and 'eval') -> {name: value} for every STABILITY name."""
    evals = sorted((r for r in records if r["kind"] == "eval"), key=lambda r: r["step"])
    steps = [r for r in records if r["kind"] == "train"]
    if len(evals) < 2 or not steps:
        raise ValueError(f"stability needs at least two evaluations and one step, got {len(evals)} and "
                         f"{len(steps)}")
    full = [r["acc_full"] for r in evals]
    compressed = [r["acc_compressed"] for r in evals]
    grad = np.array([r["grad_norm"] for r in steps])
    return dict(drawdown_full=drawdown(full), drawdown_compressed=drawdown(compressed),
                sd_full=float(np.std(full, ddof=1)), sd_compressed=float(np.std(compressed, ddof=1)),
                grad_norm_p95=float(np.percentile(grad, 95)),
                ref_kl_p95=float(np.percentile([r["ref_kl"] for r in steps], 95)),
                clipped_share=float((grad > grad_clip).mean()),
                collapsed=float(max(drawdown(full), drawdown(compressed)) > COLLAPSE))


def warm_up_means(values, warm_ups):
    """One number per run, and each run's warm-up -> one mean per warm-up (in first-seen order): the
    observations when the warm-up, not the run, is the unit of replication."""
    values = np.asarray(values, dtype=float)
    warm_ups = np.asarray(warm_ups)
    return np.array([values[warm_ups == w].mean() for w in dict.fromkeys(warm_ups.tolist())])


def t_quantile(df, level=0.95):
    """The two-sided t quantile: t_interval's half-width is t_quantile(n - 1) * sample std / sqrt(n)."""
    return float(needs("scipy.stats").t.ppf(0.5 + level / 2, df))


def t_interval(observations, level=0.95):
    """Mean, its two-sided t interval at `level` and the p-value of mean = 0, from independent observations
    (scipy's one-sample t test): -> (mean, low, high, p). nan below two observations."""
    stats = needs("scipy.stats")
    x = np.asarray(observations, dtype=float)
    if len(x) < 2:
        return float(x.mean()) if len(x) else float("nan"), float("nan"), float("nan"), float("nan")
    if np.ptp(x) <= 1e-12 * max(1.0, np.abs(x).max()):  # no spread (to rounding): no t test, no verdict
        return float(x[0]), float(x[0]), float(x[0]), float("nan")
    test = stats.ttest_1samp(x, 0.0)
    low, high = test.confidence_interval(confidence_level=level)
    return float(x.mean()), float(low), float(high), float(test.pvalue)


def tost_p(observations, margin):
    """The p-value of equivalence within +-margin (two one-sided t tests, statsmodels' ttost_paired on the
    differences against 0): small when the mean difference is surely inside (-margin, margin). nan below two
    observations or with no spread."""
    x = np.asarray(observations, dtype=float)
    if len(x) < 2 or np.ptp(x) <= 1e-12 * max(1.0, np.abs(x).max()):
        return float("nan")
    ttost_paired = needs("statsmodels.stats.weightstats").ttost_paired
    return float(ttost_paired(x, np.zeros_like(x), -margin, margin)[0])


def holm(claims, alpha=0.05):
    """Holm's step-down correction over a family of claims, each {"observations": per-warm-up differences,
    ...}; a claim with a "margin" is one of equivalence: that the difference lies within +-margin (tost_p).
    Adds to each: mean, p, p_holm (statsmodels' adjusted p-value), level (the confidence level Holm tests it
    at: 1 - alpha / (m - rank), rank 0 for the smallest p), low and high (its t interval at that level; for an
    equivalence claim at 1 - 2 (1 - level), the interval whose lying inside +-margin is the test), and verdict:
    'higher' / 'lower' (a difference) or 'equivalent' (within the margin) where Holm rejects, that is where
    the interval excludes 0 (or lies inside the margin) and so did every claim of smaller p; else 'not
    resolved'. Returns the claims, in their given order."""
    multipletests = needs("statsmodels.stats.multitest").multipletests
    for claim in claims:
        claim["mean"], _, _, claim["p"] = t_interval(claim["observations"])
        if "margin" in claim:
            claim["p"] = tost_p(claim["observations"], claim["margin"])
    ps = np.array([c["p"] for c in claims])
    testable = ~np.isnan(ps)
    reject = np.zeros(len(claims), dtype=bool)
    adjusted = np.full(len(claims), np.nan)
    if testable.any():
        reject[testable], adjusted[testable], _, _ = multipletests(ps[testable], alpha=alpha, method="holm")
    order = np.argsort(np.where(testable, ps, np.inf), kind="stable")
    m = int(testable.sum())
    for rank, i in enumerate(order):
        claim = claims[i]
        claim["level"] = 1 - alpha / max(m - rank, 1)
        level = 1 - 2 * (1 - claim["level"]) if "margin" in claim else claim["level"]
        claim["mean"], claim["low"], claim["high"], _ = t_interval(claim["observations"], level)
        claim["p_holm"] = float(adjusted[i])
        effect = "equivalent" if "margin" in claim else "higher" if claim["mean"] > 0 else "lower"
        claim["verdict"] = effect if reject[i] else "not resolved"
    return claims
