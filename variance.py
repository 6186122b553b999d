"""
The paper's central claim, measured directly: how noisy and how biased each mode's policy-gradient
estimator is, at fixed weights. For each mode, K independent rollout batches (the training batch size) at
the same weights give K estimates g_k of the policy gradient: the GRPO term only (no distillation, no
reference KL), at the first update of a batch, where the ratio is 1 and the clip is inactive. We report
  rel. variance   sum_k ||g_k - g_bar||^2 / ((K - 1) ||g_bar||^2)   (per batch, relative to the signal)
  cos compressed  cos(g_bar, gradient of the compressed policy's objective): the policy that samples,
                  estimated by SMD's on-policy estimator averaged over n_ref independent batches
  cos full-cache  cos(g_bar, gradient of the full-cache policy's objective): full mode's estimator, likewise
at the warm-up weights and at the weights of an smd run halfway through (train.py's defaults otherwise).
An unbiased estimator's cosine with its target is below 1 only by noise: about
1 / sqrt((1 + v / K)(1 + v_ref / n_ref)), printed as "(unbiased ~)"; a biased one stays below that for any
K. (v is measured against ||g_bar||^2, which noise inflates, so it understates the variance when v / K is
not small.)

    python variance.py                        # ~5 min on one CPU core
    python variance.py --K=32 --budget=32     # any train.py --key=value sets the weights' and batches' config
    python variance.py --help                 # these settings; train.py's: python train.py --help

Not here: training (train.py), the table of final accuracies (compare.py).
"""

import os
import time

import torch

import configurator
import objectives
import smd
import train

# -----------------------------------------------------------------------------
# config: overridable as --key=value; every other --key=value goes to train.py
K = 32                          # independent batches per mode
n_ref = 128                     # batches averaged into each reference gradient
modes = "full,naive,tis,sparse_rl,smd"  # the modes measured, in order
CONFIG = configurator.knobs(globals())
EPILOG = ("and any train.py --key=value (python train.py --help): the config of the weights and batches;\n"
          "variance.py sets --mode, --run_name and --resume itself")
# -----------------------------------------------------------------------------


def flat_gradient(model, cfg, generator, problems):
    """One batch's policy-gradient estimate, flattened (n_params,): the same sampling, advantages, learner
    pass and correction (tis, sparse_rl) as train.grpo_step, with lp_old = lp so the ratio is exactly 1."""
    ro, _, adv = train.sample_batch(model, problems, cfg, generator)
    logits = train.policy_pass(model, ro, cfg)
    lp = smd.token_logprobs(logits, ro.tokens, cfg["temperature"])         # (B, T)
    weights, loss_mask, _ = objectives.correction(cfg, lp.detach(), ro.logprobs, ro.response_mask)
    loss, _ = objectives.grpo_loss(lp, lp.detach(), adv, loss_mask, cfg["clip_eps"], weights)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def relative_variance(grads):
    """grads (K, n) -> sum_k ||g_k - g_bar||^2 / ((K - 1) ||g_bar||^2): per-batch noise over the signal."""
    mean = grads.mean(0)
    return ((grads - mean) ** 2).sum().item() / ((grads.shape[0] - 1) * (mean ** 2).sum().item())


def cosine(a, b):
    return (torch.dot(a, b) / (a.norm() * b.norm())).item()


def estimates(model, cfg, mode, n, seed, train_problems):
    """n independent batches' gradients (n, n_params) for `mode`, batches and samples from `seed`."""
    cfg = dict(cfg, mode=mode)
    generator = torch.Generator(device=cfg["device"]).manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(len(train_problems), (cfg["prompts_per_step"],), generator=generator,
                            device=generator.device)
        out.append(flat_gradient(model, cfg, generator, [train_problems[i] for i in idx.tolist()]))
    return torch.stack(out)


def measure(model, cfg, own, train_problems, label):
    t0 = time.time()
    K, n_ref, modes = own["K"], own["n_ref"], own["modes"].split(",")
    ref_batches = {"smd": estimates(model, cfg, "smd", n_ref, 10_000, train_problems),
                   "full": estimates(model, cfg, "full", n_ref, 20_000, train_problems)}
    refs = {name: grads.mean(0) for name, grads in ref_batches.items()}
    ref_var = {name: relative_variance(grads) for name, grads in ref_batches.items()}
    lines = [f"\n{label}: K={K} batches of {cfg['prompts_per_step']}x{cfg['group_size']} per mode, "
             f"references from {n_ref} other batches each; policy={cfg['policy']} budget={cfg['budget']}",
             f"{'mode':9s}  {'rel. variance':>13s}  {'cos compressed':>14s}  {'(unbiased ~)':>12s}  "
             f"{'cos full-cache':>14s}  {'(unbiased ~)':>12s}"]
    for i, mode in enumerate(modes):
        grads = estimates(model, cfg, mode, K, 100 * (i + 1), train_problems)
        v, mean = relative_variance(grads), grads.mean(0)
        # what an unbiased estimator of that target with this noise would reach: its own K-average and the
        # reference's n_ref-average are both noisy, cos ~ 1 / sqrt((1 + v / K) (1 + v_ref / n_ref))
        ceiling = {name: ((1 + v / K) * (1 + ref_var[name] / n_ref)) ** -0.5 for name in refs}
        lines.append(f"{mode:9s}  {v:13.2f}  {cosine(mean, refs['smd']):14.3f}  {ceiling['smd']:12.2f}  "
                     f"{cosine(mean, refs['full']):14.3f}  {ceiling['full']:12.2f}")
    lines.append(f"cos(compressed ref, full-cache ref) = {cosine(refs['smd'], refs['full']):.3f}; "
                 f"{time.time() - t0:.0f}s")
    print("\n".join(lines), flush=True)


def configure(argv):
    """-> (variance's settings, the flags it passes to train.py, their config), checked before any work."""
    overrides, passed = configurator.parse_known(argv, CONFIG, reserved=("mode", "run_name", "resume"))
    own = dict(CONFIG, **overrides)
    if own["K"] < 2 or own["n_ref"] < 1 or any(m not in train.MODES for m in own["modes"].split(",")):
        raise ValueError(f"need K >= 2, n_ref >= 1 and modes from {train.MODES}, got K={own['K']}, "
                         f"n_ref={own['n_ref']}, modes={own['modes']!r}")
    cfg = train.make_config(passed + ["--mode=smd"])
    if cfg["n_steps"] < 2:
        raise ValueError(f"variance.py also measures at step n_steps // 2: need n_steps >= 2, "
                         f"got {cfg['n_steps']}")
    return own, passed, cfg


def main(argv):
    own, passed, cfg = configure(argv)
    torch.set_num_threads(cfg["cpu_threads"])
    os.makedirs(cfg["out_dir"], exist_ok=True)
    train_problems, _ = train.problem_splits(cfg)
    model = train.build_model(cfg)
    train.warm_up(model, cfg)
    measure(model, cfg, own, train_problems, "warm-up weights")
    mid = cfg["n_steps"] // 2  # an smd run, stopped halfway: weights the method itself visits
    train.main(passed + ["--mode=smd", f"--n_steps={mid}", "--run_name=variance_mid", "--log_interval=1000"])
    ckpt = torch.load(os.path.join(cfg["out_dir"], "variance_mid.pt"), map_location=cfg["device"],
                      weights_only=False)
    model.load_state_dict(ckpt["model"])
    measure(model, cfg, own, train_problems, f"smd run at step {mid}")


if __name__ == "__main__":
    configurator.cli(main, CONFIG, __file__, check=configure, epilog=EPILOG)
