"""
Specification of experiments/variance.py: its formulas on synthetic gradients of known mean and variance (the
trace variance, the debiased noise-to-signal ratio, the noise ceiling, the bootstrap), each mode's estimate
is the gradient grpo_step applies, the reference is REINFORCE with a leave-one-out baseline (unbiased for the
gradient of the expected reward, on a policy whose gradient is known exactly) under the shadow mask, and a
run on a tiny config prints a row per mode at the start, the middle and the end of a full and an smd run,
then reuses those runs.
"""
import pytest
import torch

import smd
import train
from data import arithmetic
from data.arithmetic import make_splits
from experiments import variance
from tests.test_train import TINY, step_gradient, tiny_model


def test_variance_formulas_recover_known_noise_and_the_noise_ceiling_on_synthetic_gradients():
    # K = 32 draws with trace variance 40 (so v = 40: ||mu|| = 1); the reference: 128 draws with 4. By the
    # docstring's formulas the cosine of two unbiased means is sqrt(1 / (1 + 40 / 32) * 1 / (1 + 4 / 128)) =
    # 0.6565. Sampling spread at this size: 0.2% on s2 (sqrt(2 / (n (K - 1)))), ~2% on v, ~0.005 on the
    # cosines (the asserts leave 4-5 of those)
    g = torch.Generator().manual_seed(0)
    n, K, n_ref = 20_000, 32, 128
    mu = torch.randn(n, generator=g)
    mu /= mu.norm()
    draws = mu + torch.randn(K, n, generator=g) * (40 / n) ** 0.5
    ref = mu + torch.randn(n_ref, n, generator=g) * (4 / n) ** 0.5
    assert variance.trace_variance(draws) == pytest.approx(40, rel=0.01)  # / K instead of / (K - 1): -3%
    assert variance.noise_to_signal(draws) == pytest.approx(40, rel=0.1)
    raw = variance.trace_variance(draws) / (draws.mean(0) ** 2).sum().item()
    assert raw < 20                                      # around the noisy mean: 40 / (1 + 40 / 32) = 17.8
    want = (1 / (1 + 40 / K) / (1 + 4 / n_ref)) ** 0.5
    assert variance.cosine(draws.mean(0), ref.mean(0)) == pytest.approx(want, abs=0.02)
    assert variance.ceiling(draws, ref) == pytest.approx(want, abs=0.02)
    # the bootstrap interval covers it; plain percentiles would not: a resample repeats draws, its mean is
    # noisier, and its cosines sit near sqrt(1 / (1 + 2 * 40 / 32)) * 0.98 = 0.52
    low, high = variance.bootstrap(lambda i: variance.cosine(draws[i].mean(0), ref.mean(0)), K, 200)
    assert low < want < high and high - low < 0.2
    # the trace variance's interval covers 40 and scales with the noise, whatever the signal: v does not
    low, high = variance.bootstrap(lambda i: variance.trace_variance(draws[i]), K, 200)
    assert low < 40 < high
    assert variance.trace_variance(draws * 3) == pytest.approx(9 * variance.trace_variance(draws))
    assert variance.noise_to_signal(draws * 3) == pytest.approx(variance.noise_to_signal(draws))
    # a biased estimator (its mean turned 45 degrees away) falls below the ceiling by more than noise
    away = torch.randn(n, generator=g)
    away = away - (away @ mu) * mu
    biased = draws - mu + (mu + away / away.norm()) / 2 ** 0.5
    assert variance.cosine(biased.mean(0), ref.mean(0)) < variance.ceiling(biased, ref) - 0.15


@pytest.mark.parametrize("mode", train.MODES)
def test_variance_estimates_are_the_training_policy_gradient(mode, monkeypatch):
    # one batch: the estimator's gradient is the gradient grpo_step's first update applies (clip off)
    got, ro, _ = step_gradient(monkeypatch, mode, distill_coef=0.0)
    model = tiny_model(0)
    cfg = dict(TINY, mode=mode)
    problems, _, _ = make_splits(0, 2, 0, 0)
    ro, _, adv = train.sample_batch(model, problems, cfg, torch.Generator().manual_seed(0))  # its batch
    flat = variance.gradient_on(model, cfg, ro, adv)
    want = torch.cat([got[n].flatten() for n, _ in model.named_parameters()])
    assert (flat - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_leave_one_out_reinforce_is_unbiased_for_the_gradient_of_the_expected_reward():
    # a softmax policy over 3 answers, logits theta, rewards R: grad J = p * (R - p . R) exactly. 20000 groups
    # of G = 4 draws: the mean of -leave_one_out(r) * grad log p(a) matches it to ~1% of its norm; GRPO's own
    # baseline (the group mean, the sample included) would give (G - 1) / G of it, 25% short
    theta, R, G, n = torch.tensor([0.3, -0.5, 0.1]), torch.tensor([1.0, 0.2, -0.4]), 4, 20_000
    p = theta.softmax(0)
    exact = p * (R - p @ R)
    a = torch.multinomial(p, n * G, replacement=True, generator=torch.Generator().manual_seed(0))
    score = torch.eye(3)[a] - p                                            # grad_theta log p(a), (n G, 3)
    estimate = (variance.leave_one_out(R[a], G)[:, None] * score).mean(0)
    assert (estimate - exact).norm() < 0.03 * exact.norm()
    assert variance.leave_one_out(torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0]), 3).tolist() == \
        pytest.approx([1.0, -0.5, -0.5, -2.0, 1.0, 1.0])


def test_the_reference_scores_the_compressed_cache_under_its_shadow_mask(monkeypatch):
    # REINFORCE on sequence log-probs: smd's masked pass for the compressed target, the unmasked pass for the
    # full-cache one; on this peaked model the two differ, so scoring the compressed batch unmasked fails here
    monkeypatch.setattr(arithmetic, "partial_reward", lambda problem, text: float(len(text) % 3))
    model = tiny_model(0)
    problems, _, _ = make_splits(0, 2, 0, 0)
    generator = torch.Generator().manual_seed(0)
    ro, rewards, _ = train.sample_batch(model, problems, dict(TINY, mode="smd"), generator)
    adv = variance.leave_one_out(rewards, TINY["group_size"])
    assert adv.abs().sum() > 0

    def by_hand(mask):
        logits = smd.learner_logits(model, ro.tokens, mask)
        lp = smd.token_logprobs(logits, ro.tokens, TINY["temperature"]) * ro.response_mask
        return variance.flat_gradient(model, -(adv * lp.sum(-1)).mean())

    got = variance.reinforce_gradient(model, dict(TINY, mode="smd"), ro, rewards)
    masked, unmasked = by_hand(ro.shadow_mask), by_hand(None)
    assert (got - masked).abs().max() <= 1e-5 * masked.abs().max()
    assert (masked - unmasked).abs().max() > 1e-2 * masked.abs().max()
    full = variance.reinforce_gradient(model, dict(TINY, mode="full"), ro, rewards)
    assert (full - unmasked).abs().max() <= 1e-5 * unmasked.abs().max()


TINY_ARGS = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--prompts_per_step=2", "--group_size=4",
             "--budget=16", "--policy=h2o", "--keep_prompt=False", "--sft_mask_frac=0.0", "--sft_steps=3",
             "--sft_batch_size=8", "--n_steps=2", "--n_train=50", "--eval_problems=4", "--lr=1e-2",
             "--K=3", "--n_ref=3", "--n_boot=5"]


def table_rows(out):
    """The printed table's rows -> {(point, step, weights, mode): its cells after the mode}."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("point  step  weights"))
    rows = {}
    for line in lines[start + 1:]:
        if not line.startswith(("start", "mid", "end")):
            break
        cells = line.split()
        weights = " ".join(cells[2:4]) if cells[3] == "run" else cells[2]
        rest = cells[4:] if cells[3] == "run" else cells[3:]
        rows[(cells[0], int(cells[1]), weights, rest[0])] = " ".join(rest[1:])
    return rows


def test_variance_runs_full_and_smd_and_measures_them_at_the_start_middle_and_end(tmp_path, monkeypatch,
                                                                                    capsys):
    monkeypatch.setattr(arithmetic, "partial_reward", lambda problem, text: len(text) / 40)  # advantages != 0
    argv = TINY_ARGS + [f"--out_dir={tmp_path}"]
    variance.main(argv)
    out = capsys.readouterr().out
    rows = table_rows(out)
    compressed = ["naive", "tis", "sparse_rl", "smd"]
    want = [("start", 0, "warm-up", m) for m in ["full"] + compressed]
    for point, step in (("mid", 1), ("end", 2)):
        want += [(point, step, "full run", "full")] + [(point, step, "smd run", m) for m in compressed]
    assert list(rows) == want
    for key, cells in rows.items():
        trace_var = float(cells.split()[3])                                # after noise/signal's 3 cells
        assert trace_var > 0, key                                          # real gradients, noisy ones
        assert (" - - " in cells) == (key[2] == "full run")  # no compressed reference at the full run's
    assert "noise/signal" in out and "trace var." in out and "REINFORCE" in out
    assert out.count("- smd: trace var.") == 9                             # 3 modes at 3 points
    assert out.count("references' noise/signal") == 5                      # one per set of weights
    mid = torch.load(tmp_path / "variance_smd_step1.pt", weights_only=False)
    end = torch.load(tmp_path / "variance_smd_step2.pt", weights_only=False)
    assert (mid["step"], end["step"]) == (1, 2)
    assert any(not torch.equal(mid["model"][k], end["model"][k]) for k in mid["model"])
    # again: the runs are reused and the table is the same; another lr or another warm-up would train them
    # again, another evaluation size would not
    variance.main(argv)
    again = capsys.readouterr().out
    assert again.count("variance: reusing") == 2 and "grpo:" not in again
    assert table_rows(again) == rows
    _, passed, _ = variance.configure(argv)
    config = lambda *flags: train.make_config(passed + ["--mode=smd", *flags])
    assert variance.reusable(end, 2, config("--eval_problems=3"), end["base"])
    assert not variance.reusable(end, 2, config("--lr=2e-2"), end["base"])
    assert not variance.reusable(end, 2, config(), "another base")
