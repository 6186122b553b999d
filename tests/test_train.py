"""
Specification of train.py on tiny configs (CPU, seconds): one GRPO step runs in every mode, SMD's learner
sees exactly what the sampler saw while the naive learner does not, the GRPO pieces (advantages, TIS
weights) keep their promises, bad config is rejected before any work, and runs are reproducible and
resumable. The tokenizer and reward are specified in test_data.py.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import configurator
import objectives
import runlog
import train
import warmup
from conftest import DEVICE, EXTRA
from experiments import warmups
from data import arithmetic
from data.arithmetic import VOCAB_SIZE, decode, make_splits, max_lengths
from model import GPT, GPTConfig

TINY = dict(train.CONFIG, n_layer=1, n_head=2, n_embd=16, prompts_per_step=2, group_size=4, budget=16,
            policy="h2o", keep_prompt=False, sft_mask_frac=0.0, sft_steps=3, sft_batch_size=8, n_steps=2,
            n_train=50, eval_problems=4,
            eval_interval=1, ckpt_interval=1, lr=1e-3, ref_kl_coef=0.0, cpu_threads=1, device=DEVICE)


def tiny_model(seed=0, std=0.5):
    """A random model with large weights, so attention is peaked and evicting a key changes the output."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=64, vocab_size=VOCAB_SIZE, n_layer=1, n_head=2, n_embd=16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.to(DEVICE)


def one_step(mode, seed=0, reference=None, **overrides):
    """One GRPO step of a tiny random model; the reference defaults to a copy of the starting weights."""
    cfg = dict(TINY, mode=mode, **overrides)
    reference = tiny_model(seed) if reference is None else reference
    torch.set_num_threads(cfg["cpu_threads"])  # as train.main does: a busy second core slows 2 threads 50x
    model = tiny_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)  # as train.py's
    problems, _, _ = make_splits(seed, 2, 0, 0)
    stats = train.grpo_step(model, optimizer, problems, cfg, torch.Generator(DEVICE).manual_seed(seed),
                            reference)
    return stats, model


@pytest.mark.device
@pytest.mark.parametrize("mode", train.MODES)
def test_one_grpo_step_runs_and_moves_the_weights_in_every_mode(mode, monkeypatch):
    # a random model solves nothing, so the task's reward is 0 everywhere and every advantage 0: reward the
    # response's length instead, which differs between samples, so every mode has a policy gradient
    monkeypatch.setattr(arithmetic, train.REWARDS[TINY["reward"]], lambda problem, text: len(text) / 40)
    before = tiny_model(0).state_dict()
    stats, model = one_step(mode)
    assert all(v is None or torch.isfinite(torch.tensor(float(v))) for v in stats.values())
    assert stats["grad_norm"] > 0.1                     # measured 1.1-1.9 (either kernel setting): a gradient
    moved = max((p - before[n]).abs().max().item() for n, p in model.state_dict().items())
    # each Adam step moves a weight with a real gradient by about lr (measured 2.0e-3 after the two updates at
    # lr 1e-3); a zero gradient moves nothing, rounding noise (|g| << Adam's eps 1e-8) under lr / 10
    assert moved > 0.5 * TINY["lr"]
    assert (stats["kv_bytes"] < stats["full_kv_bytes"]) == (mode != "full")


@pytest.mark.device
def test_smd_learner_matches_the_sampler_to_float32_rounding_and_naive_does_not():
    smd_stats, _ = one_step("smd")
    naive_stats, _ = one_step("naive")
    assert smd_stats["mismatch_max"] <= 1e-5       # same samples, same mask: only summation order differs
    assert naive_stats["mismatch_max"] > 1e-2      # the unmasked learner sees keys the sampler had evicted
    assert naive_stats["mismatch_k3"] > 1e3 * max(smd_stats["mismatch_k3"], 1e-12)


@pytest.mark.device
def test_smd_gather_learner_is_on_policy_too():
    stats, _ = one_step("smd", learner_attention="gather")
    assert stats["mismatch_max"] <= 1e-5


def step_gradient(monkeypatch, mode, **overrides):
    """The gradient one update of grpo_step applies (clipping off), the rollout it used, and the starting
    weights, so a test can rebuild the intended loss by hand and compare gradients."""
    rollouts = []
    rollout = train.smd.rollout
    monkeypatch.setattr(train.smd, "rollout",
                        lambda *a, **k: rollouts.append(rollout(*a, **k)) or rollouts[-1])
    # advantages != 0
    monkeypatch.setattr(arithmetic, "partial_reward", lambda problem, text: float(len(text) % 3))
    cfg = dict(updates_per_batch=1, grad_clip=1e9, **overrides)
    stats, model = one_step(mode, **cfg)
    return {n: p.grad for n, p in model.named_parameters()}, rollouts[0], stats


def gradient_of(loss_fn):
    model = tiny_model(0)
    loss_fn(model).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def assert_same_gradient(got, want, tol=1e-5):
    """float32's tolerance per unit of the largest gradient entry. Measured with either kernel setting: the
    gradients these tests expect to match differ by <= 0.034 tol, those they expect to differ (the ablation
    and sparse_rl checks) by >= 130 tol."""
    scale = max(g.abs().max().item() for g in want.values())
    assert scale > 0
    for name in want:
        assert (got[name] - want[name]).abs().max().item() <= tol * scale, name


def pg_surrogate(model, ro, mask, cfg=TINY):
    """At the first update the ratio is 1, so the clipped GRPO loss has the gradient of -mean(A * log pi)."""
    rewards = torch.tensor([float(len(decode(t[max_lengths()[0]:].tolist())) % 3)
                            for t in ro.tokens])
    adv = objectives.group_advantages(rewards, cfg["group_size"])
    lp = train.smd.learner_logprobs(model, ro.tokens, mask)
    m = ro.response_mask.float()
    return -(lp * adv[:, None] * m).sum() / m.sum()


def test_smd_paper_objective_policy_gradient_on_the_masked_pass_and_kl_into_the_unmasked_pass(monkeypatch):
    # GRPO(pi_masked) + lambda KL(pi_unmasked || sg(pi_masked)): the policy gradient flows through the masked
    # pass only, the KL through the unmasked pass only, in that direction
    lam = 0.5
    got, ro, _ = step_gradient(monkeypatch, "smd", distill="unmasked_from_masked", distill_coef=lam)
    kl = lambda model: train.smd.kl_divergence(
        train.smd.learner_logits(model, ro.tokens),
        train.smd.learner_logits(model, ro.tokens, ro.shadow_mask).detach(), ro.response_mask)
    assert_same_gradient(got, gradient_of(
        lambda model: pg_surrogate(model, ro, ro.shadow_mask) + lam * kl(model)))
    # the KL reversed, the stop-gradient on the unmasked side, the policy gradient on the unmasked pass
    wrong = [
        lambda model: pg_surrogate(model, ro, ro.shadow_mask) + lam * train.smd.kl_divergence(
            train.smd.learner_logits(model, ro.tokens, ro.shadow_mask).detach(),
            train.smd.learner_logits(model, ro.tokens), ro.response_mask),
        lambda model: pg_surrogate(model, ro, ro.shadow_mask) + lam * train.smd.kl_divergence(
            train.smd.learner_logits(model, ro.tokens).detach(),
            train.smd.learner_logits(model, ro.tokens, ro.shadow_mask), ro.response_mask),
        lambda model: pg_surrogate(model, ro, None) + lam * kl(model)]
    for loss_fn in wrong:
        with pytest.raises(AssertionError):
            assert_same_gradient(got, gradient_of(loss_fn))


def test_ablation_switches_do_what_their_names_say(monkeypatch):
    got, ro, stats = step_gradient(monkeypatch, "smd", distill_coef=0.0)           # mask only
    assert_same_gradient(got, gradient_of(lambda model: pg_surrogate(model, ro, ro.shadow_mask)))
    assert stats["distill_kl"] == 0.0
    # distillation only
    got, ro, _ = step_gradient(monkeypatch, "smd", distill_coef=0.5, policy_gradient=False)
    assert_same_gradient(got, gradient_of(lambda model: 0.5 * train.smd.kl_divergence(
        train.smd.learner_logits(model, ro.tokens),
        train.smd.learner_logits(model, ro.tokens, ro.shadow_mask).detach(), ro.response_mask)))
    reference = tiny_model(seed=1)                                                  # frozen teacher
    got, ro, _ = step_gradient(monkeypatch, "smd", distill="masked_from_warmup_unmasked", distill_coef=0.5,
                               reference=reference)
    with torch.no_grad():
        teacher = train.smd.learner_logits(reference, ro.tokens)
    masked = lambda model: train.smd.learner_logits(model, ro.tokens, ro.shadow_mask)
    assert_same_gradient(got, gradient_of(
        lambda model: pg_surrogate(model, ro, ro.shadow_mask)
        + 0.5 * train.smd.kl_divergence(teacher, masked(model), ro.response_mask)))


@pytest.mark.parametrize("mode", ["full", "smd"])
def test_reference_kl_pulls_the_full_cache_pass_toward_the_warm_up_in_every_mode(monkeypatch, mode):
    reference = tiny_model(seed=1)
    got, ro, stats = step_gradient(monkeypatch, mode, distill_coef=0.0, ref_kl_coef=0.5, reference=reference)
    mask = ro.shadow_mask if mode == "smd" else None
    with torch.no_grad():
        ref_logits = train.smd.learner_logits(reference, ro.tokens)
    assert stats["ref_kl"] > 0
    assert_same_gradient(got, gradient_of(
        lambda model: pg_surrogate(model, ro, mask) + 0.5 * train.smd.kl_divergence(
            train.smd.learner_logits(model, ro.tokens), ref_logits, ro.response_mask)))


def test_tis_diagnostics_on_a_constructed_batch():
    lp_sampler = torch.zeros(1, 4)
    lp_learner = torch.log(torch.tensor([[1.0, 1.0, 0.5, 3.0]]))      # ratios 1, 1, 0.5, 3 -> capped at 2
    ess, capped = objectives.tis_diagnostics(lp_learner, lp_sampler, torch.ones(1, 4, dtype=torch.bool),
                                             cap=2.0)
    assert ess == pytest.approx(4.5 ** 2 / (4 * 6.25), rel=1e-6)      # (sum w)^2 / (n sum w^2), w = 1 1 .5 2
    assert capped == 0.25


def test_advantages_are_zero_mean_per_group_and_zero_for_a_uniform_group():
    rewards = torch.tensor([1., 0., 0., 1., 1., 1., 1., 1., 0., 0., 0., 1.])
    adv = objectives.group_advantages(rewards, 4).view(3, 4)
    assert adv.mean(-1).abs().max().item() < 1e-6
    assert adv[1].abs().max().item() == 0.0                     # all four scored 1: no signal
    # eight samples of 7/11: their float32 mean differs from them in the last bit, and dividing by the tiny
    # std would turn that into advantages of +-0.056; they must be exactly 0
    uniform = torch.full((8,), 7 / 11)
    assert (uniform - uniform.mean()).abs().max().item() > 0    # the case is not vacuous
    assert objectives.group_advantages(uniform, 8).abs().max().item() == 0.0
    assert adv[0, 0].item() == pytest.approx(1.0, abs=1e-5)     # normalized: unit std within the group


def test_tis_weights_never_exceed_the_cap_and_equal_the_ratio_below_it():
    g = torch.Generator().manual_seed(0)
    lp_learner, lp_sampler = -3 * torch.rand(4, 30, generator=g), -3 * torch.rand(4, 30, generator=g)
    w = objectives.tis_weights(lp_learner, lp_sampler, cap=2.0)
    ratio = torch.exp(lp_learner - lp_sampler)
    assert w.max().item() <= 2.0
    assert (ratio > 2.0).any()                                  # the cap was actually exercised
    below = ratio <= 2.0
    assert torch.allclose(w[below], ratio[below], atol=0, rtol=1e-6)


def test_grpo_loss_is_clipped_outside_the_trust_region():
    lp_old, adv, mask = torch.zeros(1, 3), torch.ones(1), torch.ones(1, 3, dtype=torch.bool)
    lp = torch.log(torch.tensor([[1.5, 1.0, 0.5]])).requires_grad_()
    loss, clip_frac = objectives.grpo_loss(lp, lp_old, adv, mask, clip_eps=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-(1.2 + 1.0 + 0.5) / 3, abs=1e-6)   # min(r A, clip(r) A), A = 1
    assert lp.grad[0, 0].item() == 0.0                           # above 1 + eps: no push further up
    assert clip_frac == pytest.approx(2 / 3, abs=1e-6)


def test_a_non_finite_loss_stops_before_the_weights_change(monkeypatch):
    monkeypatch.setattr(train.smd, "kl_divergence", lambda *a, **k: torch.tensor(float("nan")))
    model, untouched = tiny_model(0), tiny_model(0)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        train.grpo_step(model, torch.optim.AdamW(model.parameters()), make_splits(0, 2, 0, 0)[0],
                        dict(TINY, mode="smd"), torch.Generator().manual_seed(0), reference=tiny_model(0))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), untouched.parameters()))


@pytest.mark.parametrize("overrides, message", [
    (dict(mode="ppo"), "mode must be one of"),
    (dict(policy="lru"), "unknown policy"),
    (dict(budget=65), "larger than block_size"),
    (dict(policy="h2o", n_recent=33), "n_recent"),    # more recent tokens than the budget holds
    (dict(n_recent=-1), "n_recent"),
    (dict(policy="snapkv", snap_window=32), "window"),  # the observation window must leave room in the cache
    (dict(policy="snapkv", snap_kernel=2), "odd kernel"),
    (dict(policy="streaming", n_sink=32), "n_sink"),
    (dict(eval_problems=warmup.EVAL_POOL + 1), "eval_problems"),
    (dict(eval_split="train"), "eval_split"),
    (dict(policy="full", budget=32), "never evicts"),
    (dict(group_size=1), "group_size"),
    (dict(n_layer=0), "n_layer"),
    (dict(lr=0.0), "lr"),
    (dict(distill="both"), "distill"),
    (dict(distill_coef=-0.1), "distill_coef"),
    (dict(ref_kl_coef=-1.0), "ref_kl_coef"),
    (dict(lr_warmup=-1), "lr_warmup"),
    (dict(policy_gradient=False, mode="tis"), "policy_gradient"),
    (dict(policy_gradient=False, distill_coef=0.0), "policy_gradient"),
    (dict(preset="tpu"), "preset"),
    (dict(reward="shaped"), "reward"),
    (dict(learner_attention="dense"), "learner attention"),
    (dict(sft_mask_recipe="random", sft_min_budget=52), "sft_min_budget"),  # budgets are drawn below T-1
    (dict(sft_mask_recipe="random", sft_min_budget=15), "prompt"),          # keep_prompt: 20 prompt + 1
    (dict(eval_also="h2o"), "policy@budget"),
    (dict(eval_also="lru@32"), "policy@budget"),
    (dict(eval_also="streaming@13"), "prompt"),                              # keep_prompt: 20 prompt + 1
])
def test_bad_config_is_rejected_with_a_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        train.validate_config(dict(train.CONFIG, **overrides))


def test_bad_config_fails_before_any_work(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="mode must be one of"):
        train.main(["--mode=ppo", f"--out_dir={out}"])
    assert not out.exists()                             # no warm-up, no checkpoint, no log


def test_overrides_keep_their_types_and_reject_unknown_keys():
    got = configurator.parse(["--budget=8", "--mode=tis", "--lr=1", "--resume=True"], train.CONFIG)
    assert got == dict(budget=8, mode="tis", lr=1.0, resume=True) and type(got["lr"]) is float
    # a task constant is not config: it would be ignored
    for typo in ("--bugdet=8", "--N_OPERANDS=5", "--MODES=x"):
        with pytest.raises(ValueError, match="unknown config key"):
            configurator.parse([typo], train.CONFIG)
    with pytest.raises(ValueError, match="wants a int"):
        configurator.parse(["--budget=8.5"], train.CONFIG)


def test_same_seed_gives_the_same_step_bit_for_bit():
    a, model_a = one_step("tis", seed=3)
    b, model_b = one_step("tis", seed=3)
    clock = ("tok_per_s", "rollout_s", "learner_s")  # wall-clock times, the only numbers allowed to differ
    assert {k: v for k, v in a.items() if k not in clock} == {k: v for k, v in b.items() if k not in clock}
    assert all(torch.equal(p, q) for p, q in zip(model_a.parameters(), model_b.parameters()))


def args(cfg, **overrides):
    return [f"--{k}={v}" for k, v in dict(cfg, **overrides).items() if k != "device"]


def test_resume_continues_to_the_same_weights_as_an_uninterrupted_run(tmp_path):
    cfg = {k: TINY[k] for k in ("n_layer", "n_head", "n_embd", "prompts_per_step", "group_size", "sft_steps",
                                "sft_batch_size", "n_train", "eval_problems", "eval_interval", "lr")}
    cfg.update(out_dir=str(tmp_path), mode="smd", distill_coef=0.1)
    straight = train.main(args(cfg, n_steps=3, run_name="straight"))
    train.main(args(cfg, n_steps=2, run_name="resumed"))
    resumed = train.main(args(cfg, n_steps=3, run_name="resumed", resume=True))
    a = torch.load(tmp_path / "straight.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert straight["mismatch_max_mean"] == resumed["mismatch_max_mean"]
    records = [json.loads(line) for line in open(tmp_path / "resumed.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert records[-1]["kind"] == "summary"
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))  # checkpoints written atomically


def test_resume_after_a_crash_logs_each_step_once(tmp_path, monkeypatch):
    cfg = {k: TINY[k] for k in ("n_layer", "n_head", "n_embd", "prompts_per_step", "group_size", "sft_steps",
                                "sft_batch_size", "n_train", "eval_problems", "lr")}
    cfg.update(out_dir=str(tmp_path), mode="naive", eval_interval=1, ckpt_interval=2, n_steps=4,
               run_name="crash")
    grpo_step, calls = train.grpo_step, []

    def crash_at_step_4(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # after steps 1-3 were logged, the last checkpoint at step 2
        return grpo_step(*a, **k)
    monkeypatch.setattr(train, "grpo_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(cfg))
    monkeypatch.setattr(train, "grpo_step", grpo_step)
    train.main(args(cfg, resume=True))                                     # steps 3 and 4 run again
    records = [json.loads(line) for line in open(tmp_path / "crash.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 1, 2, 3, 4]
    assert [r["kind"] for r in records].count("summary") == 1
    summary = records[-1]
    train.main(args(cfg, resume=True))                                     # a finished run: nothing runs
    records = [json.loads(line) for line in open(tmp_path / "crash.jsonl")]
    assert [r["kind"] for r in records][-2:] == ["eval", "summary"]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 1, 2, 3, 4]
    assert records[-1]["acc_full"] == summary["acc_full"]


def test_rl_seeds_share_one_warm_up_and_one_held_out_set(tmp_path):
    cfg = {k: TINY[k] for k in ("n_layer", "n_head", "n_embd", "prompts_per_step", "group_size", "sft_steps",
                                "sft_batch_size", "n_train", "eval_problems", "eval_interval", "lr",
                                "n_steps")}
    cfg.update(out_dir=str(tmp_path), mode="tis")
    runs = [train.main(args(cfg, seed=seed, run_name=f"seed{seed}")) for seed in (0, 1)]
    # the RL seed is not in the key
    assert len([f for f in os.listdir(tmp_path) if f.startswith("sft_")]) == 1
    logs = [[json.loads(line) for line in open(tmp_path / f"seed{seed}.jsonl")] for seed in (0, 1)]
    assert logs[0][0] == logs[1][0] and logs[0][0]["kind"] == "eval"              # same base, same problems
    k3 = [[r["mismatch_k3"] for r in log if r["kind"] == "train"] for log in logs]
    assert k3[0] != k3[1]                                                         # but different RL samples
    for run, values in zip(runs, k3):
        assert run["mismatch_k3_mean"] == pytest.approx(sum(values) / len(values), rel=1e-12)
    train.main(args(cfg, sft_seed=1, run_name="other_base"))
    # another sft_seed: another base
    assert len([f for f in os.listdir(tmp_path) if f.startswith("sft_")]) == 2


@pytest.mark.device
@pytest.mark.parametrize("mode", train.MODES)
def test_first_update_scores_the_batch_with_its_old_logprobs_in_every_mode(mode):
    # full, smd: the learner (under the shadow mask for smd) reproduces the sampler's log-probs; naive, tis:
    # the old log-probs are the unmasked learner's own. An smd update on the unmasked pass, or naive/tis
    # taking the sampler's log-probs as old, would start with a ratio far from 1
    stats, _ = one_step(mode, distill_coef=0.0)
    assert stats["old_gap"] <= 1e-5
    if mode in ("naive", "tis"):
        assert stats["mismatch_max"] > 1e-2                     # while the sampler did differ


def test_tis_weights_scale_the_policy_gradient_loss(monkeypatch):
    # a reward that varies within a group (the random model scores 0 everywhere), so advantages are not all 0
    monkeypatch.setattr(arithmetic, "partial_reward", lambda problem, text: float(len(text) % 3))
    naive, _ = one_step("naive", updates_per_batch=1)
    monkeypatch.setattr(objectives, "tis_weights", lambda lp, lp_s, cap: torch.full_like(lp, 0.5))
    tis, _ = one_step("tis", updates_per_batch=1)
    assert naive["loss"] != 0.0
    # same rollouts, every token weighted 0.5
    assert tis["loss"] == pytest.approx(0.5 * naive["loss"], rel=1e-6)


def test_sparse_rl_weights_mask_and_rejection_on_hand_made_logprobs():
    ratio = torch.tensor([[1.0, 0.4, 1.6, 1.2],     # two tokens outside [0.5, 1.5]
                          [1.0, 5e-5, 1.0, 1.0],    # one token below the veto 1e-4: the sequence is rejected
                          [2.0, 0.9, 1e-6, 1.0]])   # a response of 2 tokens: the 1e-6 after it vetoes nothing
    response_mask = torch.tensor([[True] * 4, [True] * 4, [True, True, False, False]])
    weights, keep, outside, rejected = objectives.sparse_rl_weights(ratio.log(), torch.zeros(3, 4),
                                                                    response_mask, 0.5, 1.5, 1e-4)
    # min(ratio, 1.5)
    capped = torch.tensor([[1.0, 0.4, 1.5, 1.2], [1.0, 5e-5, 1.0, 1.0], [1.5, 0.9, 0.0, 0.0]])
    # mean 1 over the 10 response tokens
    assert torch.allclose(weights, capped / (capped.sum() / 10), rtol=1e-6)
    assert keep.tolist() == [[True, False, False, True], [False] * 4, [False, True, False, False]]
    assert outside == pytest.approx(4 / 10) and rejected == pytest.approx(1 / 3)


def test_sparse_rl_loss_is_the_weighted_mean_over_kept_tokens(monkeypatch):
    made = {}

    # any weights, half the tokens
    def some_weights_and_tokens(lp_learner, lp_sampler, response_mask, low, high, veto):
        g = torch.Generator().manual_seed(0)
        made["weights"] = torch.rand(lp_learner.shape, generator=g) + 0.5
        made["keep"] = response_mask & (torch.rand(lp_learner.shape, generator=g) < 0.5)
        return made["weights"], made["keep"], 0.25, 0.5
    monkeypatch.setattr(objectives, "sparse_rl_weights", some_weights_and_tokens)
    got, ro, stats = step_gradient(monkeypatch, "sparse_rl")
    weights, keep = made["weights"], made["keep"]
    assert (0 < keep.sum() < ro.response_mask.sum()
            and (stats["sparse_rl_outside"], stats["sparse_rl_rejected"]) == (0.25, 0.5))

    def surrogate(model):  # at the first update the ratio is 1: the gradient of -mean_kept(w * A * log pi)
        rewards = torch.tensor([float(len(decode(t[max_lengths()[0]:].tolist())) % 3)
                                for t in ro.tokens])
        adv = objectives.group_advantages(rewards, TINY["group_size"])
        lp = train.smd.learner_logprobs(model, ro.tokens)               # the full-cache learner, as naive's
        return -(lp * adv[:, None] * weights * keep).sum() / keep.sum()
    assert_same_gradient(got, gradient_of(surrogate))
    with pytest.raises(AssertionError):  # averaged over every response token instead: a different gradient
        assert_same_gradient(got, gradient_of(lambda m: surrogate(m) * keep.sum() / ro.response_mask.sum()))


def test_kl_divergence_is_kl_of_first_from_second_and_follows_the_temperature():
    p_logits = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]])      # (B, T, vocab); row 1 predicts token 1
    q_logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    response = torch.tensor([[False, True]])
    for t in (1.0, 0.5):
        p, q = F.softmax(p_logits[0, 0] / t, -1), F.softmax(q_logits[0, 0] / t, -1)
        got = train.smd.kl_divergence(p_logits, q_logits, response, temperature=t).item()
        assert got == pytest.approx((p * (p.log() - q.log())).sum().item(), rel=1e-6)    # KL(p || q)
        assert abs(got - (q * (q.log() - p.log())).sum().item()) > 1e-3                  # not KL(q || p)


def test_no_training_problem_is_ever_evaluated_and_eval_size_does_not_move_train():
    base = dict(train.CONFIG, n_train=3000)
    first_train = None
    for eval_problems in (1, 200, warmup.EVAL_POOL):
        for split in ("val", "test"):
            problems, held_out = warmup.problem_splits(dict(base, eval_problems=eval_problems,
                                                           eval_split=split))
            assert len(held_out) == eval_problems and not set(problems) & set(held_out)
            first_train = first_train or problems
            assert problems == first_train
    val = warmup.problem_splits(dict(base, eval_problems=warmup.EVAL_POOL))[1]
    test = warmup.problem_splits(dict(base, eval_problems=warmup.EVAL_POOL, eval_split="test"))[1]
    assert not set(val) & set(test)


def test_warm_up_key_ignores_rl_settings_and_names_what_shapes_the_weights(tmp_path):
    cfg = {k: TINY[k] for k in ("n_layer", "n_head", "n_embd", "prompts_per_step", "group_size", "sft_steps",
                                "sft_batch_size", "n_train", "eval_interval", "lr")}
    cfg.update(out_dir=str(tmp_path), mode="full", n_steps=1, eval_problems=2)
    for i, extra in enumerate([{}, dict(grad_clip=0.5), dict(eval_problems=3), dict(eval_split="test"),
                               dict(lr=1e-4)]):
        train.main(args(cfg, run_name=f"r{i}", **extra))
    # RL and eval knobs: same base
    assert len([f for f in os.listdir(tmp_path) if f.startswith("sft_")]) == 1
    train.main(args(cfg, run_name="clip", sft_grad_clip=0.5))
    # the warm-up's own clip: new base
    assert len([f for f in os.listdir(tmp_path) if f.startswith("sft_")]) == 2


def test_a_shipped_base_is_loaded_only_after_its_sha256_is_checked(tmp_path, monkeypatch, capsys):
    """experiments/warmups.py trains a warm-up and ships it into bases/ (here a folder of the test's);
    train.py's warm-up then loads that file bit for bit, refuses it once a byte changes, and --base=trained
    ignores it."""
    monkeypatch.setattr(warmup, "BASES", str(tmp_path / "bases"))
    cfg = {k: TINY[k] for k in ("n_layer", "n_head", "n_embd", "sft_steps", "sft_batch_size", "n_train",
                                "eval_problems")}
    argv = args(cfg, out_dir=str(tmp_path / "trained"))
    warmups.main(argv + ["--ship=True"])
    assert "shipped as" in capsys.readouterr().out
    shipped = tmp_path / "bases" / os.path.basename(warmup.warmup_path(train.make_config(argv)))
    sums = (tmp_path / "bases" / "SHA256SUMS").read_text().split()
    assert sums == [warmup.sha256(shipped), shipped.name]              # `sha256sum -c` reads it too
    here = train.make_config(args(cfg, out_dir=str(tmp_path / "elsewhere")))
    model = warmup.build_model(here)
    assert warmup.warm_up(model, here) == {}                            # loaded, not trained
    assert "the shipped base" in capsys.readouterr().out
    saved = torch.load(shipped)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert not os.path.exists(tmp_path / "elsewhere")                   # nothing trained, nothing cached
    warmups.main(argv)                                                  # trained again: same CPU, same bits
    assert "bit for bit the shipped" in capsys.readouterr().out
    damaged = bytearray(shipped.read_bytes())
    damaged[-100] ^= 1
    shipped.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        warmup.warm_up(warmup.build_model(here), here)
    trained = dict(here, base="trained")                                # ignores bases/: trains in out/
    assert "warmup_s" in warmup.warm_up(warmup.build_model(trained), trained)


def test_the_shipped_bases_are_the_ones_their_sums_name():
    """bases/ holds exactly the files bases/SHA256SUMS lists, each with its recorded SHA-256; and each is a
    warm-up of train.py's default config or of --preset=long's (its file name is that config's hash for some
    sft_seed), among them the ones those two configs load by default."""
    sums = warmup.shipped_sums()
    files = sorted(f for f in os.listdir(warmup.BASES) if f.endswith(".pt"))
    assert files and sorted(sums) == files
    assert all(warmup.sha256(os.path.join(warmup.BASES, f)) == sums[f] for f in files)
    configs = [train.make_config([]), train.make_config(["--preset=long"])]
    names = {os.path.basename(warmup.warmup_path(dict(cfg, sft_seed=w))) for cfg in configs for w in range(16)}
    assert set(files) <= names
    assert all(os.path.basename(warmup.warmup_path(cfg)) in files for cfg in configs)


def test_warm_up_key_changes_with_the_robust_recipe_and_only_with_what_shapes_it():
    plain = dict(TINY, sft_mask_frac=0.0)
    robust = dict(TINY, sft_mask_frac=0.5, sft_mask_recipe="policy", policy="rkv", keep_prompt=True)
    path = warmup.warmup_path
    # no masks: the policy is RL-only
    assert path(plain) == path(dict(plain, policy="tova", sft_mask_recipe="policy"))
    assert len({path(plain), path(dict(plain, sft_mask_frac=0.5)), path(robust)}) == 3
    for change in (dict(sft_mask_frac=0.25), dict(sft_mask_recipe="streaming"), dict(policy="h2o"),
                   dict(keep_prompt=False), dict(rkv_window=3), dict(sft_min_budget=30)):
        assert path(dict(robust, **change)) != path(robust), change
    streaming = dict(TINY, sft_mask_frac=0.5, sft_mask_recipe="streaming")
    # content-blind masks: RL-only again
    assert path(streaming) == path(dict(streaming, policy="rkv", budget=30))


@pytest.mark.parametrize("recipe", [dict(sft_mask_recipe="streaming"),
                                    dict(sft_mask_recipe="random", keep_prompt=True),
                                    dict(sft_mask_recipe="policy", policy="h2o"),
                                    dict(sft_mask_recipe="policy", policy="rkv", keep_prompt=True)])
def test_warm_up_masks_are_causal_see_themselves_and_keep_the_prompt_where_the_recipe_says(recipe):
    cfg = dict(TINY, sft_mask_frac=0.5, **recipe)
    problems, _, _ = make_splits(0, 32, 0, 0)
    x, _ = warmup.sft_batch(problems, DEVICE)                               # (B, T) = (32, 52)
    masks = warmup.eviction_masks(tiny_model(0), x, cfg, torch.Generator(DEVICE).manual_seed(0))
    L, B, nh, T, _ = masks.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril()
    # causal; a query sees itself
    assert not (masks & ~causal).any() and masks.diagonal(dim1=-2, dim2=-1).all()
    evicts = (masks != causal).flatten(2).any(-1).any(0)                   # (B,) rows that lose some key
    # wide windows keep all
    assert evicts.all() if recipe["sft_mask_recipe"] != "streaming" else evicts.float().mean() > 0.5
    P, _ = max_lengths()
    # response queries see the whole prompt
    assert masks[..., P:, :P].all() == recipe.get("keep_prompt", False)
    # recorded at one budget per batch, drawn from sft_min_budget .. T-1
    if recipe["sft_mask_recipe"] != "streaming":
        budgets = masks.sum(-1).amax(dim=(0, 2, 3))                        # (B,) most keys any query saw
        assert (budgets == budgets[0]).all() and cfg["sft_min_budget"] <= budgets[0] < T


def test_warm_up_trains_about_sft_mask_frac_of_its_rows_under_eviction_masks():
    problems, _, _ = make_splits(0, 64, 0, 0)
    x, _ = warmup.sft_batch(problems, DEVICE)                               # (64, 52)
    cfg = dict(TINY, sft_mask_frac=0.25, sft_mask_recipe="policy", policy="rkv", keep_prompt=True)
    masks = warmup.warmup_masks(tiny_model(0), x, cfg, torch.Generator(DEVICE).manual_seed(0))
    causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=DEVICE).tril()
    masked = (masks != causal).flatten(2).any(-1).any(0)                   # (B,) rows under an eviction mask
    # 16 expected of 64; the rest see all
    assert 8 <= masked.sum() <= 24


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, capsys):
    import sys
    from experiments import plot
    monkeypatch.setitem(sys.modules, "matplotlib", None)                  # as if it were not installed
    with pytest.raises(SystemExit, match="matplotlib, .*pip install -r requirements-extra.txt"):
        plot.main([])


def test_the_reference_stays_the_warm_up_while_the_weights_move(tmp_path, monkeypatch):
    # by construction, not by a KL's size: every step is handed the same reference object, in storage of its
    # own, holding the saved warm-up's weights bit for bit, while the trained weights move by about lr. The
    # move is real, not rounding: SMD's distillation KL has a gradient on this model (its masked and unmasked
    # passes differ by > 1e-2 per token, test above), and Adam's first step moves every weight whose gradient
    # is nonzero by about lr = 1e-2 (measured: 2.0e-2 after 2 steps, with either kernel setting)
    handed = []
    grpo_step = train.grpo_step
    monkeypatch.setattr(train, "grpo_step", lambda *a: handed.append((a[0], a[-1])) or grpo_step(*a))
    cfg = {k: TINY[k] for k in ("n_layer", "n_head", "n_embd", "prompts_per_step", "group_size", "sft_steps",
                                "sft_batch_size", "n_train", "eval_problems", "eval_interval", "budget",
                                "policy", "keep_prompt", "sft_mask_frac")}
    cfg.update(out_dir=str(tmp_path), mode="smd", n_steps=2, distill_coef=1.0, ref_kl_coef=0.1, lr=1e-2,
               lr_warmup=0, updates_per_batch=1, run_name="ref")
    train.main(args(cfg))
    warm = torch.load(warmup.warmup_path(train.make_config(args(cfg))), weights_only=True)
    final = torch.load(tmp_path / "ref.pt", weights_only=False)["model"]
    model, reference = handed[0]
    assert len(handed) == 2 and all(m is model and r is reference for m, r in handed)
    assert all(torch.equal(reference.state_dict()[k], warm[k]) for k in warm)   # still the warm-up
    assert all(torch.equal(p, final[k]) for k, p in model.state_dict().items())  # the trained weights
    assert not {p.data_ptr() for p in model.parameters()} & {p.data_ptr() for p in reference.parameters()}
    assert max((final[k] - warm[k]).abs().max().item() for k in warm) > 5e-3    # moved, by about lr
    steps = [json.loads(line) for line in open(tmp_path / "ref.jsonl") if '"train"' in line]
    assert steps[0]["ref_kl"] == 0 < steps[1]["ref_kl"]  # step 1 scores the warm-up's own weights: the same
    #                                                      logits exactly; step 2 scores moved weights


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")  # meta: a no-op
def test_resume_restores_the_rng_states_on_the_cpu_whatever_the_device(tmp_path):
    # torch.load(map_location=device) would move the saved RNG states to the GPU, and Generator.set_state /
    # torch.set_rng_state take CPU byte tensors only (TypeError). The meta device stands in for a GPU here
    cfg = {k: TINY[k] for k in ("n_layer", "n_head", "n_embd", "prompts_per_step", "group_size", "sft_steps",
                                "sft_batch_size", "n_train", "eval_problems", "eval_interval", "lr")}
    cfg.update(out_dir=str(tmp_path), mode="full", n_steps=1, run_name="gpu")
    train.main(args(cfg))
    config = train.make_config(args(cfg, resume=True))
    with torch.device("meta"):  # built there, so the tied embedding stays tied
        model = GPT(warmup.model_config(config))
    optimizer = torch.optim.AdamW(model.parameters())
    generator = torch.Generator()
    state = torch.get_rng_state()
    step, _ = runlog.load_checkpoint(dict(config, device="meta"), model, optimizer, generator)
    saved = torch.load(tmp_path / "gpu.pt", weights_only=False)
    assert step == 1 and torch.equal(generator.get_state(), saved["generator"])
    assert torch.equal(torch.get_rng_state(), saved["torch_rng"])
    torch.set_rng_state(state)


def test_evaluation_is_reproducible_under_the_random_policy_whatever_the_global_rng(monkeypatch):
    # greedy decoding draws nothing, but the random policy draws its victims: from a seeded generator of the
    # evaluation's own, so a warm-up table or a run's eval gives the same answer for the same weights
    generators = []
    rollout = train.smd.rollout
    monkeypatch.setattr(train.smd, "rollout",
                        lambda *a, **k: generators.append(k["generator"]) or rollout(*a, **k))
    model, problems = tiny_model(0), make_splits(0, 16, 0, 0)[0]
    torch.manual_seed(1)
    first = train.solved(model, problems, "random", 24)
    torch.manual_seed(2)
    second = train.solved(model, problems, "random", 24)
    assert all(isinstance(g, torch.Generator) for g in generators)  # never torch's global generator
    assert first == second
    assert runlog.unpack(runlog.pack(first), len(first)) == first
    bits = [True, False, False, True, True]
    assert runlog.pack(bits) == "98" and runlog.unpack("98", 5) == bits  # 1001, 1000


def test_plot_draws_the_curves_and_the_frontier_of_a_comparison(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib", reason=f"the picture needs matplotlib: {EXTRA}")
    from experiments import plot
    runs = []
    for row, acc in (("full", 0.9), ("smd", 0.8), ("smd@distill_coef=0.3", 0.7)):
        for seed in range(3):
            name = f"cmp_{row}_b28_w0_s{seed}"
            runs.append([row, 28, 0, seed, name])
            records = [dict(kind="train", step=s, reward=acc, mismatch_k3=1e-3) for s in (1, 2)]
            records += [dict(kind="eval", step=s, acc_full=acc + 0.01 * seed, acc_compressed=acc / 2)
                        for s in (0, 2)]
            (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "compare.json").write_text(json.dumps(dict(budget=28, runs=runs)))
    assert plot.manifest_rows(str(tmp_path), 28) == ["full", "smd", "smd@distill_coef=0.3"]
    compressed, full = plot.final_accuracies(plot.load(str(tmp_path), "smd", 28))
    assert compressed == [0.4] * 3 and full == pytest.approx([0.8, 0.81, 0.82])      # the step-2 evals
    assert plot.half_width([0.8, 0.81, 0.82]) == pytest.approx(4.302653 * 0.01 / 3 ** 0.5)  # t(2)
    plot.main([f"--out_dir={tmp_path}", f"--file={tmp_path / 'run.png'}", "--rows=full,smd"])
    assert (tmp_path / "run.png").stat().st_size > 10_000
    plot.main([f"--out_dir={tmp_path}", f"--file={tmp_path / 'all.png'}"])  # every row the comparison ran
    assert "smd@distill_coef=0.3 (3 runs)" in capsys.readouterr().out
