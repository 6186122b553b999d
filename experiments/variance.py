"""
The paper's central claim, measured directly: how noisy and how biased each mode's policy-gradient
estimator is, at fixed weights. K batches (the training batch size) give K estimates g_k of the policy
gradient: the GRPO term only (no distillation, no reference KL), at the first update of a batch, where the
ratio is 1 and the clip is inactive. naive, tis, sparse_rl and smd share the compressed sampler, so they are
scored on the same K rollouts: their differences are the estimators', not the draws'. full samples its own.

Estimators and formulas. The g_k are independent with mean mu and total variance s2 = E||g_k - mu||^2; g_bar
is their mean. What a batch-level estimate can be trusted for is its noise relative to its signal,
v = s2 / ||mu||^2. Two facts give it from the K draws:
  E sum_k ||g_k - g_bar||^2 / (K - 1) = s2                 (the sample variance is unbiased)
  E ||g_bar||^2 = ||mu||^2 + s2 / K                         (the mean's norm is inflated by its own noise)
so  v = s2_hat / (||g_bar||^2 - s2_hat / K)  ("rel. variance", debiased; the raw ratio s2_hat / ||g_bar||^2
is v / (1 + v / K), which hides most of v once v is near K).
The target of an estimator is the expected on-policy estimator of a policy: the compressed policy's (smd's,
which samples and scores with the same mask) and the full-cache policy's (full mode's). Each reference r_bar
is that estimator averaged over n_ref batches of its own, disjoint from the K batches judged (other seeds), so
no estimator is compared with its own draws. If an estimator is unbiased for a target, then in high dimension
with noise spread over many directions g_bar . r_bar ~ ||mu||^2 and so
  cos(g_bar, r_bar) ~ ||mu|| / ||g_bar|| * ||mu|| / ||r_bar|| = sqrt((1 - s2_hat / (K ||g_bar||^2)) *
                                                                     (1 - s2_ref / (n_ref ||r_bar||^2)))
("ceiling"): what noise alone leaves of a perfect 1. A biased estimator falls below it by more than its
interval. Intervals are 95% bootstraps over the K batches, centred on the value (see bootstrap), with the
same resampled batches for every mode that shares them, so mode differences are paired; the reference held
fixed.
test_train.py checks both formulas on synthetic gradients of known mean and variance.

    python -m experiments.variance                     # ~6 min on one CPU core
    python -m experiments.variance --K=64 --budget=32  # any train.py --key=value: the weights', batches' config
    python -m experiments.variance --help              # these settings; train.py's: python train.py --help

Not here: training (train.py), the table of final accuracies (compare.py).
"""

import os
import time

import torch

import configurator
import objectives
import smd
import train
import warmup

# -----------------------------------------------------------------------------
# config: overridable as --key=value; every other --key=value goes to train.py
K = 32                          # batches judged per mode (the compressed modes share them)
n_ref = 128                     # batches averaged into each reference gradient, disjoint from those
modes = "full,naive,tis,sparse_rl,smd"  # the modes measured, in order
n_boot = 400                    # bootstrap resamples of the K batches for the 95% intervals
CONFIG = configurator.knobs(globals())
EPILOG = ("and any train.py --key=value (python train.py --help): the config of the weights and batches;\n"
          "variance.py sets --mode, --run_name and --resume itself")
# -----------------------------------------------------------------------------
COMPRESSED = ("naive", "tis", "sparse_rl", "smd")  # the modes whose rollouts come from the compressed cache


def gradient_on(model, cfg, ro, adv):
    """One batch's policy-gradient estimate under cfg's mode, flattened (n_params,), on a given rollout: the
    same learner pass and correction (tis, sparse_rl) as train.grpo_step, with lp_old = lp so the ratio is
    exactly 1."""
    logits = train.policy_pass(model, ro, cfg)
    lp = smd.token_logprobs(logits, ro.tokens, cfg["temperature"])         # (B, T)
    weights, loss_mask, _ = objectives.correction(cfg, lp.detach(), ro.logprobs, ro.response_mask)
    loss, _ = objectives.grpo_loss(lp, lp.detach(), adv, loss_mask, cfg["clip_eps"], weights)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def estimates(model, cfg, modes, n, seed, train_problems):
    """n batches, each sampled once (compressed cache unless modes is ("full",)) and scored by every mode
    in `modes` -> {mode: (n, n_params)}."""
    generator = torch.Generator(device=cfg["device"]).manual_seed(seed)
    sampler = dict(cfg, mode=modes[0])  # every mode in `modes` samples alike
    out = {mode: [] for mode in modes}
    for _ in range(n):
        idx = torch.randint(len(train_problems), (cfg["prompts_per_step"],), generator=generator,
                            device=generator.device)
        ro, _, adv = train.sample_batch(model, [train_problems[i] for i in idx.tolist()], sampler, generator)
        for mode in modes:
            out[mode].append(gradient_on(model, dict(cfg, mode=mode), ro, adv))
    return {mode: torch.stack(grads) for mode, grads in out.items()}


def relative_variance(grads):
    """grads (K, n) -> the debiased v = s2_hat / (||g_bar||^2 - s2_hat / K) (see the docstring); inf where
    the noise leaves no measurable signal (and nan for K zero gradients)."""
    K = grads.shape[0]
    mean = grads.mean(0)
    s2 = ((grads - mean) ** 2).sum().item() / (K - 1)
    signal = (mean ** 2).sum().item() - s2 / K
    return s2 / signal if signal > 0 else float("inf") if s2 > 0 else float("nan")


def signal_share(grads):
    """||mu||^2 / ||g_bar||^2 estimated as 1 - s2_hat / (K ||g_bar||^2): the part of g_bar's squared norm
    that is signal, the factor noise leaves in a cosine."""
    K = grads.shape[0]
    mean = grads.mean(0)
    s2 = ((grads - mean) ** 2).sum().item() / (K - 1)
    norm2 = (mean ** 2).sum().item()
    return 1 - s2 / (K * norm2) if norm2 > 0 else float("nan")


def ceiling(grads, ref_grads):
    """What an unbiased estimator's cosine with the reference reaches through noise alone."""
    return (max(signal_share(grads), 0.0) * max(signal_share(ref_grads), 0.0)) ** 0.5


def cosine(a, b):
    return (torch.dot(a, b) / (a.norm() * b.norm())).item()


def bootstrap(stat, n_batches, n_boot, seed=0):
    """A 95% interval of stat(all batches) from n_boot resamples of the batch indices: the spread of the
    resampled values around their median, placed around the value itself. Not their plain percentiles: a
    resample repeats batches, which adds noise to its mean and so shifts a cosine of the mean (and the
    variance around it) systematically; the spread is what resampling estimates well, not the centre."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor([stat(torch.randint(n_batches, (n_batches,), generator=generator))
                           for _ in range(n_boot)])
    shift = stat(torch.arange(n_batches)) - values.median().item()
    return values.quantile(0.025).item() + shift, values.quantile(0.975).item() + shift


def interval(value, bounds):
    return f"{value:.3g} [{bounds[0]:.3g}, {bounds[1]:.3g}]"


def measure(model, cfg, own, train_problems, label):
    t0 = time.time()
    K, n_ref, n_boot = own["K"], own["n_ref"], own["n_boot"]
    modes = own["modes"].split(",")
    refs = {"compressed": estimates(model, cfg, ("smd",), n_ref, 10_000, train_problems)["smd"],
            "full-cache": estimates(model, cfg, ("full",), n_ref, 20_000, train_problems)["full"]}
    ref_mean = {name: grads.mean(0) for name, grads in refs.items()}
    grads = estimates(model, cfg, [m for m in modes if m in COMPRESSED] or ["smd"], K, 100, train_problems)
    if "full" in modes:
        grads.update(estimates(model, cfg, ("full",), K, 200, train_problems))
    lines = [f"\n{label}: K={K} batches of {cfg['prompts_per_step']}x{cfg['group_size']} (the compressed "
             f"modes score the same K rollouts), references from {n_ref} other batches each; "
             f"policy={cfg['policy']} budget={cfg['budget']}; [95% bootstrap over the K batches]",
             f"{'mode':9s}  {'rel. variance':>24s}  {'cos compressed':>24s}  {'ceiling':>7s}  "
             f"{'cos full-cache':>24s}  {'ceiling':>7s}"]
    for mode in modes:
        g = grads[mode]
        cells = [interval(relative_variance(g), bootstrap(lambda i: relative_variance(g[i]), K, n_boot))]
        for name, ref in ref_mean.items():
            cos = bootstrap(lambda i: cosine(g[i].mean(0), ref), K, n_boot)
            cells += [interval(cosine(g.mean(0), ref), cos), f"{ceiling(g, refs[name]):.3f}"]
        lines.append(f"{mode:9s}  {cells[0]:>24s}  {cells[1]:>24s}  {cells[2]:>7s}  {cells[3]:>24s}  "
                     f"{cells[4]:>7s}")
    shared = [m for m in modes if m in COMPRESSED and m != "smd"]
    if "smd" in modes and shared:  # paired: the same resampled batches for both modes
        lines.append("paired on the shared rollouts, mode - smd: cos compressed [95% bootstrap]")
        for mode in shared:
            diff = lambda i, m=mode: (cosine(grads[m][i].mean(0), ref_mean["compressed"])
                                      - cosine(grads["smd"][i].mean(0), ref_mean["compressed"]))
            lines.append(f"  {mode:9s}  {interval(diff(torch.arange(K)), bootstrap(diff, K, n_boot))}")
    lines.append(f"cos(compressed ref, full-cache ref) = {cosine(*ref_mean.values()):.3f}; "
                 f"{time.time() - t0:.0f}s")
    print("\n".join(lines), flush=True)


def configure(argv):
    """-> (variance's settings, the flags it passes to train.py, their config), checked before any work."""
    overrides, passed = configurator.parse_known(argv, CONFIG, reserved=("mode", "run_name", "resume"))
    own = dict(CONFIG, **overrides)
    if (own["K"] < 2 or own["n_ref"] < 2 or own["n_boot"] < 1
            or any(m not in train.MODES for m in own["modes"].split(","))):
        raise ValueError(f"need K >= 2, n_ref >= 2, n_boot >= 1 and modes from {train.MODES}, got "
                         f"K={own['K']}, n_ref={own['n_ref']}, n_boot={own['n_boot']}, "
                         f"modes={own['modes']!r}")
    cfg = train.make_config(passed + ["--mode=smd"])
    if cfg["n_steps"] < 2:
        raise ValueError(f"variance.py also measures at step n_steps // 2: need n_steps >= 2, "
                         f"got {cfg['n_steps']}")
    return own, passed, cfg


def main(argv):
    own, passed, cfg = configure(argv)
    torch.set_num_threads(cfg["cpu_threads"])
    os.makedirs(cfg["out_dir"], exist_ok=True)
    train_problems, _ = warmup.problem_splits(cfg)
    model = warmup.build_model(cfg)
    warmup.warm_up(model, cfg)
    measure(model, cfg, own, train_problems, "warm-up weights")
    mid = cfg["n_steps"] // 2  # an smd run, stopped halfway: weights the method itself visits
    train.main(passed + ["--mode=smd", f"--n_steps={mid}", "--run_name=variance_mid", "--log_interval=1000"])
    ckpt = torch.load(os.path.join(cfg["out_dir"], "variance_mid.pt"), map_location=cfg["device"],
                      weights_only=False)
    model.load_state_dict(ckpt["model"])
    measure(model, cfg, own, train_problems, f"smd run at step {mid}")


if __name__ == "__main__":
    configurator.cli(main, CONFIG, __file__, check=configure, epilog=EPILOG)
