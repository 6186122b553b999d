"""The committed design's statistics and its path through compare.py, on hand-made numbers whose answers are
known: stability measures on hand-written curves, intervals with the warm-up as the unit, Holm's step-down and
the interval at each claim's level, and a design file driving compare.py's runs (faked) to its claims table.
Needs scipy and statsmodels (the experiment's optional dependencies); skipped without them."""
import os

import numpy as np
import pytest

from conftest import EXTRA

pytest.importorskip("scipy", reason=f"the experiment's statistics need scipy: {EXTRA}")
pytest.importorskip("statsmodels", reason=f"the experiment's statistics need statsmodels: {EXTRA}")
from scipy import stats as scipy_stats  # noqa: E402

from experiments import stats  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records(full, compressed, grad_norms, ref_kls, interval=10, kv_bytes=1024, rollout_s=1.0):
    """A run's JSONL records: evaluations every `interval` steps from step 0, and one train record a step."""
    out = [dict(kind="eval", step=i * interval, acc_full=f, acc_compressed=c)
           for i, (f, c) in enumerate(zip(full, compressed))]
    out += [dict(kind="train", step=i + 1, grad_norm=g, ref_kl=k, kv_bytes=kv_bytes, rollout_s=rollout_s)
            for i, (g, k) in enumerate(zip(grad_norms, ref_kls))]
    return out


def test_drawdown_is_the_largest_drop_below_the_running_maximum():
    assert stats.drawdown([0.5, 0.7, 0.6, 0.8, 0.55, 0.9]) == pytest.approx(0.25)  # 0.8 -> 0.55
    assert stats.drawdown([0.1, 0.2, 0.3]) == 0.0                                 # only ever up


def test_stability_measures_of_a_hand_made_run():
    grad = [0.5] * 18 + [3.0, 4.0]                                        # two steps above grad_clip 1
    got = stats.stability(records([0.5, 0.7, 0.45, 0.8], [0.3, 0.3, 0.35, 0.2], grad, np.linspace(0, 1, 20)),
                          grad_clip=1.0)
    assert got["drawdown_full"] == pytest.approx(0.25) and got["drawdown_compressed"] == pytest.approx(0.15)
    assert got["sd_full"] == pytest.approx(np.std([0.5, 0.7, 0.45, 0.8], ddof=1))
    assert got["grad_norm_p95"] == pytest.approx(np.percentile(grad, 95))   # 3.05
    assert got["ref_kl_p95"] == pytest.approx(0.95)                       # 19 * 0.05 of 0 .. 1
    assert got["clipped_share"] == pytest.approx(0.1)
    assert got["collapsed"] == 1.0                                        # 0.25 below the maximum > 0.20
    calm = stats.stability(records([0.5, 0.6], [0.3, 0.25], [0.5], [0.0]), grad_clip=1.0)
    assert calm["collapsed"] == 0.0 and calm["clipped_share"] == 0.0
    with pytest.raises(ValueError, match="two evaluations"):
        stats.stability(records([0.5], [0.3], [0.5], [0.0]), grad_clip=1.0)


def test_the_warm_up_is_the_unit_each_warm_ups_mean_one_observation():
    values = [1.0, 3.0, 10.0, 10.0, 4.0]
    assert stats.warm_up_means(values, [0, 0, 1, 1, 2]).tolist() == [2.0, 10.0, 4.0]
    mean, low, high, p = stats.t_interval([2.0, 10.0, 4.0])
    half = scipy_stats.t.ppf(0.975, 2) * np.std([2.0, 10.0, 4.0], ddof=1) / np.sqrt(3)  # by hand
    assert (mean, low, high) == pytest.approx((16 / 3, 16 / 3 - half, 16 / 3 + half))
    assert p == pytest.approx(scipy_stats.ttest_1samp([2.0, 10.0, 4.0], 0).pvalue)


def test_holm_tests_claims_in_order_of_p_at_shrinking_levels_and_stops_at_the_first_failure():
    spread = np.array([-1.5, -1, -0.5, 0, 0, 0.5, 1, 1.5])
    spread = spread / spread.std(ddof=1)               # 8 warm-ups, sample std 1
    clear = list(5.0 + spread)                         # p 2e-6: resolved at level 1 - 0.05 / 3
    medium = list(0.92 + spread)                       # p 0.035: not at level 1 - 0.05 / 2
    noise = list(0.1 + spread)                         # p 0.79
    claims = stats.holm([dict(observations=noise), dict(observations=clear), dict(observations=medium)])
    p = [scipy_stats.ttest_1samp(c["observations"], 0).pvalue for c in claims]
    assert 0.025 < p[2] < 0.05 < p[0]                 # the case this test is about
    assert [c["verdict"] for c in claims] == ["not resolved", "higher", "not resolved"]
    assert [c["level"] for c in claims] == pytest.approx([1 - 0.05, 1 - 0.05 / 3, 1 - 0.05 / 2])
    assert claims[2]["low"] < 0 < claims[2]["high"]    # resolved uncorrected, not at its Holm level
    assert claims[1]["low"] > 0
    assert [c["p_holm"] for c in claims] == pytest.approx([p[0], 3 * p[1], max(2 * p[2], 3 * p[1])])



def test_an_equivalence_claim_is_two_one_sided_tests_inside_its_margin_and_joins_holm():
    spread = np.array([-1.5, -1, -0.5, 0, 0, 0.5, 1, 1.5])
    spread = spread / spread.std(ddof=1) * 0.01          # 8 warm-ups, sample std 0.01
    tight = list(0.005 + spread)                         # surely inside +-0.05
    loose = list(0.005 + 10 * spread)                    # std 0.1: could be anywhere in +-0.1
    claims = stats.holm([dict(observations=tight, margin=0.05), dict(observations=loose, margin=0.05)])
    for c, x in zip(claims, (tight, loose)):             # TOST by hand: the larger of the two one-sided p's
        p = max(scipy_stats.ttest_1samp(x, -0.05, alternative="greater").pvalue,
                scipy_stats.ttest_1samp(x, 0.05, alternative="less").pvalue)
        assert c["p"] == pytest.approx(p)
    assert [c["verdict"] for c in claims] == ["equivalent", "not resolved"]
    assert -0.05 < claims[0]["low"] < claims[0]["high"] < 0.05            # its 1 - 2 alpha / 2 interval
    assert claims[1]["low"] < -0.05 or claims[1]["high"] > 0.05

DESIGN = """
[tuning]
sft_seeds = [0, 1]
seeds = 1
budgets = [26]
flags = ["--eval_split=val", "--eval_interval=10", "--n_steps=20", "--keep_prompt=False"]
lr = [1e-5, 3e-5]
steps = [10, 20]

[tuning.rows]
full = "full"
smd = "smd"

[main]
sft_seeds = [0, 1, 2, 3]
seeds = 2
budgets = [26, 42]
flags = ["--eval_split=test", "--eval_interval=10", "--n_steps=20", "--keep_prompt=False"]

[main.rows]
full = "full@lr=3e-05"
smd = "smd"

[main.report_steps]
full = 20
smd = 10

[[main.claims]]
a = "smd"
b = "full"
metric = "acc_compressed"
budget = 26

[[main.claims]]
a = "smd"
b = "full"
metric = "drawdown_full"
budget = 42
"""


@pytest.fixture
def design_compare(monkeypatch, tmp_path):
    """compare.py with its runs faked: smd's compressed accuracy beats full's by 0.1 + 0.01 * warm-up at every
    evaluation; full-cache curves identical but for smd's dip at step 10 at budget 42 on even warm-ups (a
    drawdown of 0.05 there, 0 elsewhere). runs: name -> argv."""
    from experiments import compare
    import train
    runs = {}

    def fake_run(argv, out_dir, name):
        runs[name] = argv
        cfg = train.make_config(argv)
        gain = (0.1 + 0.01 * cfg["sft_seed"]) if cfg["mode"] == "smd" else 0.0
        dip = 0.15 if cfg["mode"] == "smd" and cfg["budget"] == 42 and cfg["sft_seed"] % 2 == 0 else 0.0
        lr_bonus = 0.1 if cfg["lr"] == 3e-5 else 0.0
        full = [0.5, 0.6 - dip, 0.7 + lr_bonus]
        compressed = [0.3 + gain, 0.35 + gain, 0.4 + gain]
        cost = dict(kv_bytes=64 * 1024, rollout_s=2.0) if cfg["mode"] == "full" else \
            dict(kv_bytes=cfg["budget"] * 1024, rollout_s=1.0)            # KiB = slots, full's 64
        recs = records(full, compressed, [0.5] * 20, [0.01] * 20, **cost)
        return dict(acc_full_start=full[0], acc_full=full[-1], acc_compressed_start=compressed[0],
                    acc_compressed=compressed[-1], records=recs)
    monkeypatch.setattr(compare, "run", fake_run)
    monkeypatch.setattr(compare, "prepare_warm_up", lambda cfg: None)
    path = tmp_path / "design.toml"
    path.write_text(DESIGN)
    return compare, runs, str(path)


def test_a_design_file_fixes_the_runs_and_nothing_else_may_be_added(design_compare, tmp_path):
    compare, runs, path = design_compare
    own, cfg, plan = compare.configure([f"--design={path}"])
    assert len(plan) == 2 * 2 * 4 * 2                    # rows x budgets x warm-ups x seeds
    assert {argv[-3] for argv in plan.values()} == {"--budget=26", "--budget=42"}
    assert all("--eval_split=test" in argv and "--eval_interval=10" in argv for argv in plan.values())
    assert all("--lr=3e-05" in argv for (row, *_), argv in plan.items() if row.startswith("full"))
    own, _, plan = compare.configure([f"--design={path}", "--stage=tuning"])
    assert sorted(own["labels"].values()) == ["full@lr=1e-05", "full@lr=3e-05", "smd@lr=1e-05",
                                              "smd@lr=3e-05"]
    assert len(plan) == 4 * 2 and all("--eval_split=val" in argv for argv in plan.values())
    for extra in (["--lr=1e-4"], ["--seeds=5"], ["--stage=final"]):
        with pytest.raises(ValueError, match="design|stage"):
            compare.configure([f"--design={path}", *extra])
    bad = tmp_path / "bad.toml"
    bad.write_text(DESIGN.replace('metric = "drawdown_full"', 'metric = "luck"'))
    with pytest.raises(ValueError, match="a claim needs"):
        compare.configure([f"--design={bad}"])


def test_the_design_prints_itself_its_tables_and_holm_verdicts(design_compare, capsys):
    compare, runs, path = design_compare
    compare.main([f"--design={path}"])
    out = capsys.readouterr().out
    assert out.startswith(f"design {path} [main]: warm-ups sft_seed=0,1,2,3 x 2 RL seed(s)")
    assert "the family of 2 claims (Holm over all of them)" in out
    lines = out.split("1 resolved, 1 not\n")[1].splitlines()[2:]
    claims = {line.split("  ")[0]: line.split() for line in lines}
    gain = claims["smd - full: acc_compressed @26"]     # smd at step 10, full at 20: 0.05 .. 0.08, resolved
    assert gain[-1] == "higher" and gain[-8] == "4" and float(gain[-7]) == pytest.approx(0.065)
    assert gain[-6] == f"{1 - 0.05 / 2:.4f}"            # the smaller p, tested first
    dip = claims["smd - full: drawdown_full @42"]        # 0.05, 0, 0.05, 0 over the warm-ups: mean 0.025
    assert dip[-2:] == ["not", "resolved"] and float(dip[-8]) == pytest.approx(0.025)
    assert dip[-7] == f"{1 - 0.05:.4f}"
    assert "stability at budget 42" in out and "accuracy at the report step at budget 26" in out
    cost = out.split("cost of the rollouts")[1].split("the claims")[0].splitlines()
    assert [line.split() for line in cost if line.startswith("smd ")] == [
        ["smd", "26", "26", "0.406", "1.00", "0.50"], ["smd", "42", "42", "0.656", "1.00", "0.50"]]
    # smd's accuracies are read at its report step 10 (full's at 20): compressed 0.35 + gain at step 10
    table = out.split("accuracy at the report step at budget 26")[1].splitlines()
    smd_row = next(line for line in table if line.startswith("smd "))
    assert smd_row.split()[2:4] == ["0.600", "[0.600,"]                  # full-cache 0.6 at step 10, every run


def test_tuning_chooses_each_rows_lr_and_length_by_the_stated_rule(design_compare, capsys):
    compare, runs, path = design_compare
    compare.main([f"--design={path}", "--stage=tuning"])
    out = capsys.readouterr().out
    # full-cache accuracy 0.7 + 0.1 at lr 3e-5 by step 20: each row's best is lr 3e-5 at 20 steps, full's
    # (0.8 + 0.4) / 2, smd's (0.8 + 0.4 + 0.105) / 2 (its gain 0.10, 0.11 on the two warm-ups)
    assert "chosen: full: lr=3e-05 n_steps=20 (0.600); smd: lr=3e-05 n_steps=20 (0.652)" in out


@pytest.mark.parametrize("name, n_claims, warm_ups", [("design.toml", 10, 8), ("design_long.toml", 8, 4)])
def test_the_committed_design_files_are_well_formed(name, n_claims, warm_ups):
    from experiments import compare
    path = os.path.join(ROOT, "experiments", name)
    for stage in ("tuning", "main"):
        own, cfg, plan = compare.configure([f"--design={path}", f"--stage={stage}"])
        assert plan and own["budgets"]
    own, _, _ = compare.configure([f"--design={path}"])
    assert len(own["claims"]) == n_claims and own["sft_seeds"] == tuple(range(warm_ups))
