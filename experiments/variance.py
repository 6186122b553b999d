"""
The paper's central claim, measured directly: how noisy each mode's policy-gradient estimator is, and where
it points, at fixed weights, at three points of training: the start (the warm-up, where every run begins),
the middle (step n_steps // 2) and the end (step n_steps). Each estimator is judged at weights its own kind
of run visits: full at a full run's, the compressed modes (naive, tis, sparse_rl, smd) at an smd run's. The
two runs are trained here by train.main (out_dir/variance_<mode>.pt, copied to variance_<mode>_step<step>.pt
at the middle and the end; both copies are reused when they hold a run of the same config and warm-up). K
batches (the training batch size) give K estimates g_k of the policy gradient: the GRPO term only (no
distillation, no reference KL), at the first update of a batch, where the ratio is 1 and the clip is
inactive. naive, tis, sparse_rl and smd share the compressed sampler, so they are scored on the same K
rollouts: their differences are the estimators', not the draws'. full samples its own.

The quantities. The g_k are independent with mean mu and trace variance s2 = E||g_k - mu||^2 (the variance
summed over every weight); g_bar is their mean. Two facts give both columns from the K draws:
  E sum_k ||g_k - g_bar||^2 / (K - 1) = s2                 (the sample variance is unbiased)
  E ||g_bar||^2 = ||mu||^2 + s2 / K                         (the mean's norm is inflated by its own noise)
  "trace var."    s2_hat = sum_k ||g_k - g_bar||^2 / (K - 1): one batch's noise, unnormalised, so on one
                  scale for every mode at the same weights (every row at the start, the compressed rows of
                  the middle and of the end; the shared rollouts pair the compressed ones);
  "noise/signal"  v = s2_hat / (||g_bar||^2 - s2_hat / K), the noise-to-signal ratio s2 / ||mu||^2 debiased
                  (the raw ratio s2_hat / ||g_bar||^2 is about v / (1 + v / K): it hides most of v near K).
Each mode's v is normalised by its own signal, so two rows can order one way by v and the other by s2 (a
small mean gradient makes a large v from little noise); and at the middle and the end full and smd are at
different weights, so neither column pairs them there: read them as two runs, each at its own weights.

The reference, and why this one. "cos X J" is the cosine of g_bar with r_bar, the gradient of J_X, the
expected training reward of the policy that samples with the X cache (compressed: cfg's policy and budget;
full-cache), estimated by an estimator no row uses: REINFORCE, the reward minus the mean reward of the other
samples of the same prompt (a leave-one-out baseline, unbiased: it does not depend on the sample it
multiplies) times the sequence's sum_t grad log pi(y_t), under the recorded shadow mask for the compressed
cache (the masks are piecewise constant in the weights, so that is grad log pi_compressed(y)), averaged over
n_ref batches of its own (other seeds). The reference used to be smd's estimator averaged over other batches,
which made "smd is closest to the compressed gradient" hold partly by construction; this one judges smd and
full like every other row. The price: GRPO divides each group's advantages by its reward std and averages its
loss over tokens, so even an on-policy GRPO estimator (smd for compressed J, full for full-cache J) aims at a
reweighted gradient, not at grad J: its cosine measures that target mismatch as well as any bias.
If an estimator is unbiased for grad J, then in high dimension with noise spread over many directions
g_bar . r_bar ~ ||mu||^2 and so
  cos(g_bar, r_bar) ~ ||mu|| / ||g_bar|| * ||mu|| / ||r_bar|| = sqrt((1 - s2_hat / (K ||g_bar||^2)) *
                                                                     (1 - s2_ref / (n_ref ||r_bar||^2)))
("ceiling"): what noise alone leaves of a perfect 1. Below it by more than the interval: target mismatch or
bias; the paired differences (mode - smd, the same rollouts and reference) cancel the mismatch they share.
At the full run's weights only the full-cache reference is built ("-" in the compressed columns).
Intervals are 95% bootstraps over the K batches, centred on the value (see bootstrap), with the same resampled
batches for every mode that shares them, so mode differences are paired; the reference held fixed.
tests/test_variance.py checks the formulas on synthetic gradients of known mean and variance.

    python -m experiments.variance                     # ~20-40 min on one CPU core, warm-up and runs included
    python -m experiments.variance --K=64 --budget=32  # any train.py --key=value: the runs', batches' config
    python -m experiments.variance --help              # these settings; train.py's: python train.py --help

Not here: training (train.py), the table of final accuracies (compare.py).
"""

import hashlib
import os
import time

import torch

import configurator
import objectives
import runlog
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
EPILOG = ("and any train.py --key=value (python train.py --help): the config of the runs and batches;\n"
          "variance.py sets --mode, --run_name and --resume itself")
# -----------------------------------------------------------------------------
COMPRESSED = ("naive", "tis", "sparse_rl", "smd")  # the modes whose rollouts come from the compressed cache
# reference -> (the mode whose cache samples it and whose pass scores it, the seed of its batches)
TARGETS = {"compressed J": ("smd", 10_000), "full-cache J": ("full", 20_000)}
# train.py knobs that leave a run's weights as they are: a saved run that differs only in these is reused
BOOKKEEPING = ("n_steps", "resume", "run_name", "out_dir", "log_interval", "eval_interval", "ckpt_interval",
               "eval_also", "eval_problems", "eval_split", "cpu_threads")


def flat_gradient(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def gradient_on(model, cfg, ro, adv):
    """One batch's policy-gradient estimate under cfg's mode, flattened (n_params,), on a given rollout: the
    same learner pass and correction (tis, sparse_rl) as train.grpo_step, with lp_old = lp so the ratio is
    exactly 1."""
    logits = train.policy_pass(model, ro, cfg)
    lp = smd.token_logprobs(logits, ro.tokens, cfg["temperature"])         # (B, T)
    weights, loss_mask, _ = objectives.correction(cfg, lp.detach(), ro.logprobs, ro.response_mask)
    loss, _ = objectives.grpo_loss(lp, lp.detach(), adv, loss_mask, cfg["clip_eps"], weights)
    return flat_gradient(model, loss)


def leave_one_out(rewards, group_size):
    """rewards (B,), group-major -> (B,): each reward minus the mean of the other rewards of its group."""
    r = rewards.view(-1, group_size)                                       # (n_prompts, G)
    return (r - (r.sum(-1, keepdim=True) - r) / (group_size - 1)).view(-1)


def reinforce_gradient(model, cfg, ro, rewards):
    """REINFORCE's estimate of -grad J (the sign of a loss's gradient, as gradient_on's), J the expected
    reward of the policy that sampled ro with cfg's mode (the shadow mask's pass for smd, the unmasked one for
    full), flattened (n_params,): the gradient of -mean_b leave_one_out(r)_b * sum_t log pi(y_bt)."""
    lp = smd.token_logprobs(train.policy_pass(model, ro, cfg), ro.tokens, cfg["temperature"])  # (B, T)
    sequence_lp = lp.masked_fill(~ro.response_mask, 0.0).sum(-1)          # (B,)
    return flat_gradient(model, -(leave_one_out(rewards, cfg["group_size"]) * sequence_lp).mean())


def estimates(model, cfg, sampler, n, seed, train_problems, score):
    """n batches, each sampled once as mode `sampler` samples (the compressed cache unless "full") and scored
    by score(rollout, rewards, advantages) -> {name: gradient (n_params,)} -> {name: (n, n_params)}."""
    generator = torch.Generator(device=cfg["device"]).manual_seed(seed)
    out = {}
    for _ in range(n):
        idx = torch.randint(len(train_problems), (cfg["prompts_per_step"],), generator=generator,
                            device=generator.device)
        ro, rewards, adv = train.sample_batch(model, [train_problems[i] for i in idx.tolist()],
                                              dict(cfg, mode=sampler), generator)
        for name, grad in score(ro, rewards, adv).items():
            out.setdefault(name, []).append(grad)
    return {name: torch.stack(grads) for name, grads in out.items()}


def mode_gradients(model, cfg, modes, n, seed, train_problems):
    """n batches sampled as modes[0] samples (every mode in `modes` samples alike), each scored by every mode
    in `modes` -> {mode: (n, n_params)}."""
    score = lambda ro, rewards, adv: {m: gradient_on(model, dict(cfg, mode=m), ro, adv) for m in modes}
    return estimates(model, cfg, modes[0], n, seed, train_problems, score)


def reference_gradients(model, cfg, target, n, train_problems):
    """n REINFORCE estimates of target's -grad J (see TARGETS), on batches of their own -> (n, n_params)."""
    sampler, seed = TARGETS[target]
    score = lambda ro, rewards, adv: {target: reinforce_gradient(model, dict(cfg, mode=sampler), ro, rewards)}
    return estimates(model, cfg, sampler, n, seed, train_problems, score)[target]


def trace_variance(grads):
    """grads (K, n) -> s2_hat = sum_k ||g_k - g_bar||^2 / (K - 1), unbiased for s2 = E||g_k - mu||^2."""
    return ((grads - grads.mean(0)) ** 2).sum().item() / (grads.shape[0] - 1)


def noise_to_signal(grads):
    """grads (K, n) -> the debiased v = s2_hat / (||g_bar||^2 - s2_hat / K) (see the docstring); inf where
    the noise leaves no measurable signal (and nan for K zero gradients)."""
    s2 = trace_variance(grads)
    signal = (grads.mean(0) ** 2).sum().item() - s2 / grads.shape[0]
    return s2 / signal if signal > 0 else float("inf") if s2 > 0 else float("nan")


def signal_share(grads):
    """||mu||^2 / ||g_bar||^2 estimated as 1 - s2_hat / (K ||g_bar||^2): the part of g_bar's squared norm
    that is signal, the factor noise leaves in a cosine."""
    norm2 = (grads.mean(0) ** 2).sum().item()
    return 1 - trace_variance(grads) / (grads.shape[0] * norm2) if norm2 > 0 else float("nan")


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


def interval(stat, n_batches, n_boot):
    """stat(all batches) with its 95% bootstrap interval, as the table prints it."""
    low, high = bootstrap(stat, n_batches, n_boot)
    return f"{stat(torch.arange(n_batches)):.3g} [{low:.3g}, {high:.3g}]"


# -----------------------------------------------------------------------------
# the runs, the measurement at one set of weights, the table


def digest(state_dict):
    """A short hash of weights: which warm-up a saved run started from (a base can change, its config not)."""
    h = hashlib.sha1()
    for key, tensor in state_dict.items():
        h.update(key.encode() + tensor.cpu().numpy().tobytes())
    return h.hexdigest()[:10]


def reusable(ckpt, step, cfg, base):
    """Does a saved copy hold a run of config cfg at `step`, started from the warm-up whose digest is base?"""
    return (ckpt["step"] == step and ckpt.get("base") == base
            and all(ckpt["config"].get(key) == value for key, value in cfg.items() if key not in BOOKKEEPING))


def run_weights(passed, mode, mid, end, base):
    """{step: the weights (a state dict) of a `mode` run at mid and at end}, from out_dir's
    variance_<mode>_step<step>.pt: trained by train.main from the warm-up whose digest is base (to mid,
    copied, resumed to end, copied), unless both copies are there from a run of this config and base."""
    args = passed + [f"--mode={mode}", f"--run_name=variance_{mode}", "--log_interval=1000"]
    cfg = train.make_config(args)
    paths = {step: runlog.run_path(cfg, f"_step{step}.pt") for step in (mid, end)}
    load = lambda path: torch.load(path, map_location="cpu", weights_only=False)
    saved = {step: load(path) for step, path in paths.items() if os.path.exists(path)}
    if all(step in saved and reusable(saved[step], step, cfg, base) for step in paths):
        print(f"variance: reusing {paths[mid]} and {paths[end]}")
        return {step: ckpt["model"] for step, ckpt in saved.items()}
    for step, resume in ((mid, False), (end, True)):  # resuming continues as one run would (test_train.py)
        train.main(args + [f"--n_steps={step}", f"--resume={resume}"])
        runlog.save_atomic(dict(load(runlog.run_path(cfg, ".pt")), base=base), paths[step])
    return {step: load(path)["model"] for step, path in paths.items()}


def judge(model, cfg, own, train_problems, modes, targets):
    """At the model's weights: K gradients of each mode in `modes` (the compressed ones on shared rollouts)
    and n_ref reference gradients of each target in `targets` -> {mode: (K, n)}, {target: (n_ref, n)}."""
    refs = {target: reference_gradients(model, cfg, target, own["n_ref"], train_problems)
            for target in targets}
    grads = {}
    shared = [m for m in modes if m in COMPRESSED]
    for group, seed in ((shared, 100), (["full"] if "full" in modes else [], 200)):
        if group:
            grads.update(mode_gradients(model, cfg, group, own["K"], seed, train_problems))
    return {mode: grads[mode] for mode in modes}, refs


COLUMNS = (("point", 5), ("step", 4), ("weights", 8), ("mode", 9), ("noise/signal", 24), ("trace var.", 28),
           ("cos compressed J", 24), ("ceiling", 7), ("cos full-cache J", 24), ("ceiling", 7))


def line(cells):
    return "  ".join(f"{cell:{'<' if i < 4 else '>'}{width}s}" for i, (cell, (_, width)) in
                     enumerate(zip(cells, COLUMNS)))


def rows(point, step, weights, grads, refs, n_boot):
    """The table's rows of one set of weights (one a mode), and the notes below the table: each shared mode
    minus smd (paired), and the references' own noise/signal and cosine."""
    K = len(next(iter(grads.values())))
    ref_mean = {target: ref.mean(0) for target, ref in refs.items()}
    table = []
    for mode, g in grads.items():
        cells = [point, str(step), weights, mode, interval(lambda i: noise_to_signal(g[i]), K, n_boot),
                 interval(lambda i: trace_variance(g[i]), K, n_boot)]
        for target in TARGETS:
            cells += ([interval(lambda i: cosine(g[i].mean(0), ref_mean[target]), K, n_boot),
                       f"{ceiling(g, refs[target]):.3f}"] if target in refs else ["-", "-"])
        table.append(line(cells))
    notes = []
    for mode in [m for m in grads if m in COMPRESSED and m != "smd" and "smd" in grads]:
        var = lambda i, m=mode: trace_variance(grads[m][i]) - trace_variance(grads["smd"][i])
        cos = lambda i, m=mode: (cosine(grads[m][i].mean(0), ref_mean["compressed J"])
                                 - cosine(grads["smd"][i].mean(0), ref_mean["compressed J"]))
        notes.append(f"  {point:5s} {mode:9s} - smd: trace var. {interval(var, K, n_boot)}"
                     + (f", cos compressed J {interval(cos, K, n_boot)}" if "compressed J" in refs else ""))
    agree = f", their cosine {cosine(*ref_mean.values()):.3f}" if len(refs) == 2 else ""
    notes.append(f"  {point:5s} {weights:8s} references' noise/signal: "
                 + ", ".join(f"{target} {noise_to_signal(ref):.3g}" for target, ref in refs.items()) + agree)
    return table, notes


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
    t0 = time.time()
    torch.set_num_threads(cfg["cpu_threads"])
    os.makedirs(cfg["out_dir"], exist_ok=True)
    train_problems, _ = warmup.problem_splits(cfg)
    model = warmup.build_model(cfg)
    warmup.warm_up(model, cfg)
    modes = own["modes"].split(",")
    compressed = [m for m in modes if m in COMPRESSED]
    mid, end = cfg["n_steps"] // 2, cfg["n_steps"]
    # the runs whose weights are judged, and what is judged there: (weights, modes, references)
    runs = ([("full run", "full", ["full"], ["full-cache J"])] if "full" in modes else []) + \
           ([("smd run", "smd", compressed, list(TARGETS))] if compressed else [])
    base = digest(model.state_dict())
    weights = {name: run_weights(passed, mode, mid, end, base) for name, mode, _, _ in runs}
    t_train = time.time() - t0
    print(f"\nvariance at the start, middle and end of a full and an smd run: K={own['K']} batches of "
          f"{cfg['prompts_per_step']}x{cfg['group_size']} per mode (the compressed modes score the same K "
          f"rollouts); policy={cfg['policy']} budget={cfg['budget']}; [95% bootstrap over the K batches]\n"
          f"noise/signal = s2 / ||mu||^2 (debiased), trace var. = s2 = E||g_k - mu||^2 (one batch's, "
          f"unnormalised); cos X J: with REINFORCE's grad J of the X cache's policy (leave-one-out baseline, "
          f"{own['n_ref']} other batches),\nno row's estimator: GRPO's std-normalised, token-mean target is "
          f"another, so a gap below the ceiling is that mismatch or bias")
    print(line([name for name, _ in COLUMNS]), flush=True)
    points = [("start", 0, [("warm-up", modes, list(TARGETS))])]
    points += [(point, step, [(name, judged, targets) for name, _, judged, targets in runs])
               for point, step in (("mid", mid), ("end", end))]
    notes = []
    for point, step, judged_at in points:
        for name, judged, targets in judged_at:
            if step:
                model.load_state_dict(weights[name][step])
            table, more = rows(point, step, name, *judge(model, cfg, own, train_problems, judged, targets),
                               own["n_boot"])
            print("\n".join(table), flush=True)
            notes += more
    print("mode - smd, paired on the shared rollouts [95% bootstrap]; the references (n_ref batches each)\n"
          + "\n".join(notes))
    print(f"time: runs {t_train:.0f}s (warm-up included), measurement {time.time() - t0 - t_train:.0f}s")


if __name__ == "__main__":
    configurator.cli(main, CONFIG, __file__, check=configure, epilog=EPILOG)
