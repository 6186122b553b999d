"""
Benchmark of what SMD saves and what it costs, at the lengths where compression pays (T up to 2048 on a
CPU, 4096 on one GPU), every length, budget and policy side by side in one run:
  sampler  per policy: KV-cache bytes and decode speed of a compressed rollout vs a full one, each ratio
           beside its bound (S/T for the bytes; for the speed, the ratio of the decode FLOPs, what a
           compute-bound decoder would gain), shadow-mask bytes vs a full T x T bool mask, and the
           sampler/learner log-prob mismatch;
  learner  forward+backward time and memory with the shadow mask (mask and gather paths) vs plain
           causal attention, and where the gather path's memory (O(T * S), plus a fixed per-chunk transient of
           O(GATHER_CHUNK * S * hs)) drops below the mask path's O(T^2).
Random-init model, random prompts, no training; --trained=True adds the sampler/learner gap of the model
train.py trains (its default warm-up), rolled out as train.py does.

    python -m experiments.bench                # CPU, one thread, ~35 minutes
    python -m experiments.bench --device=cuda  # one GPU: CUDA_PRESET's model and lengths, then other flags
    python -m experiments.bench --help         # the settings
"""

import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import configurator
from model import GPT, GPTConfig
from policies import make_policy
from smd import learner_logprobs, rollout

# -----------------------------------------------------------------------------
# config, overridable as --key=value; --device=cuda first switches to the one-GPU preset below
device = "cpu"             # "cuda" (or "cuda:1") applies CUDA_PRESET first, then the other overrides
lengths = (512, 1024, 2048)  # total sequence lengths T (prompt + response)
budgets = (128, 256)       # KV-cache slots S of the compressed rollouts; the baseline is 'full' with S = T
policies = "streaming,h2o,tova,snapkv,rkv"  # eviction policies, one row each; the learner's tables use the first
batch_size = 4             # rollouts per batch (B)
prompt_len = 16            # random prompt tokens per rollout
n_layer = 4                # model size (L)
n_head = 4                 # attention heads (nh)
n_embd = 128               # width (C)
vocab_size = 64            # random tokens are drawn from this many
init_std = 0.1             # larger than GPT-2's 0.02 so attention is peaked and eviction scores differ
exact = False              # batch-invariant linears: bitwise sampler == gather learner on CPU, but slow
repeats = 2                # timed repeats after one warm-up; we report the fastest, the least disturbed
seed = 1337                # model weights, prompts and sampling
threads = 1                # CPU threads: with more, a busy machine stalls their barriers and times explode
trained = False            # also measure the gap on train.py's default warm-up (the shipped base)
CONFIG = configurator.knobs(globals())
CUDA_PRESET = dict(lengths=(1024, 2048, 4096), budgets=(128, 512), batch_size=4,
                   n_layer=8, n_head=8, n_embd=512, vocab_size=256)
EPILOG = "--device=cuda first sets " + " ".join(f"--{k}={configurator.show(v)}"
                                                 for k, v in CUDA_PRESET.items())
# -----------------------------------------------------------------------------


def make_config(argv):
    """The defaults, then CUDA_PRESET if --device names a GPU, then the other overrides; checked."""
    overrides = configurator.parse(argv, CONFIG)
    preset = CUDA_PRESET if overrides.get("device", device).startswith("cuda") else {}
    cfg = {**CONFIG, **preset, **overrides}
    if cfg["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg['device']!r} but no GPU is visible")
    for key in ("batch_size", "prompt_len", "repeats", "threads"):
        if cfg[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    model_config(cfg)  # the model's sizes, checked by GPTConfig
    shortest = min(cfg["lengths"])
    if not all(0 < S < shortest for S in cfg["budgets"]) or cfg["prompt_len"] >= shortest:
        raise ValueError(f"every budget ({configurator.show(cfg['budgets'])}) and prompt_len "
                         f"({cfg['prompt_len']}) must be below the shortest length {shortest}")
    cfg["policies"] = tuple(name for name in cfg["policies"].split(",") if name)
    if not cfg["policies"] or "full" in cfg["policies"]:
        raise ValueError(f"policies must name at least one evicting policy (the full cache is every row's "
                         f"baseline), got {','.join(cfg['policies'])!r}")
    for name in cfg["policies"]:
        make_policy(name)  # an unknown name raises, listing the known ones
    return cfg


def model_config(cfg):
    return GPTConfig(block_size=max(cfg["lengths"]), vocab_size=cfg["vocab_size"], n_layer=cfg["n_layer"],
                     n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=0.0)


def decode_flops(cfg, slots):
    """Multiply-adds x 2 of one decode step, whose attention runs over `slots` cache slots (every slot of the
    static buffer, filled or not, as KVCache computes it; full: S = T): per layer the q, k, v, output and MLP
    projections (12 C^2 weights) and the scores and weighted values (2 x C per slot), then the logits."""
    C, L, V = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"]
    return 2 * (L * (12 * C * C + 2 * C * slots) + C * V)


def best_time(fn, repeats, sync):
    """Seconds of the fastest of `repeats` calls after one warm-up call, and the last call's result."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times), out


def learner_loss(model, tokens, response_mask, shadow_mask, attention):
    logp = learner_logprobs(model, tokens, shadow_mask, attention=attention)          # (B, T)
    return -(logp * response_mask).sum() / response_mask.sum()


def fwd_bwd(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn().backward()


def learner_memory(model, loss_fn, cuda):
    """Peak bytes one forward+backward allocates beyond what was allocated before it. On CUDA: the allocator's
    peak. On CPU there is no allocator peak to read, so we replay the profiler's memory record: every single
    allocation and free, in time order; the running total's maximum is the peak. Per-op totals would not do:
    an op's net allocation, booked at its start, lets memory it frees at its end cancel what the ops it calls
    allocated while it was still alive. Counting only the tensors saved for backward would miss the
    temporaries, and on the gather path those dominate: each chunk gathers (B, nh, GATHER_CHUNK, S, hs) keys
    and values, in forward and again in its written-out backward."""
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss_fn().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    stderr = os.dup(2)  # the profiler's C++ side logs two lines per run to fd 2, and no setting stops it
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss_fn().backward()
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]  # +bytes, -bytes
    total = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        total += record.nbytes()
        peak = max(peak, total)
    return peak


def trained_gap():
    """The sampler/learner log-prob gap on the model train.py's defaults make, rolled out as train.py does
    (its policy and budget, temperature 1) on 64 test problems: rows (dtype, path, max, mean over response
    tokens), the mask and gather paths as train.py runs them, then the gather path after model.set_exact()
    (the sampler's rollout in that mode too): the bitwise one."""
    import train
    import warmup
    from data.arithmetic import EOS_ID, encode, format_prompt, max_lengths
    cfg = train.make_config(["--eval_split=test"])
    model = warmup.build_model(cfg)
    warmup.warm_up(model, cfg)  # the shipped base (trained here, once, where bases/ lacks it)
    _, problems = warmup.problem_splits(cfg)
    prompts = [encode(format_prompt(p)) for p in problems[:64]]
    _, R = max_lengths()
    rows = []
    for dtype in (torch.float32, torch.float64):
        model.to(dtype)
        for exact, paths in ((False, ("mask", "gather")), (True, ("gather",))):
            model.set_exact(exact)
            r = rollout(model, prompts, policy=cfg["policy"], budget=cfg["budget"], max_new_tokens=R,
                        eos_id=EOS_ID, generator=torch.Generator(cfg["device"]).manual_seed(0),
                        **warmup.policy_kwargs(cfg))
            for attention in paths:
                with torch.no_grad():
                    gap = (learner_logprobs(model, r.tokens, r.shadow_mask, attention=attention) - r.logprobs)
                gap = gap[r.response_mask].abs()
                rows.append((str(dtype).removeprefix("torch."), attention + ", set_exact" * exact,
                             gap.max().item(), gap.mean().item()))
    model.set_exact(False)
    return rows


def table(title, header, fmts, rows):
    cells = [[f.format(v) for f, v in zip(fmts, row)] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for c in cells:
        print("  ".join(x.rjust(w) for x, w in zip(c, widths)))


def main(argv):
    cfg = make_config(argv)
    cuda = cfg["device"].startswith("cuda")
    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    model = GPT(model_config(cfg))
    model.to(cfg["device"])
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, cfg["init_std"])
    model.set_exact(cfg["exact"])
    B, P = cfg["batch_size"], cfg["prompt_len"]
    prompts = torch.randint(cfg["vocab_size"], (B, P), generator=torch.Generator().manual_seed(cfg["seed"]))
    timed = lambda fn: best_time(fn, cfg["repeats"], torch.cuda.synchronize if cuda else (lambda: None))

    def sample(T, S, name):
        generator = torch.Generator(cfg["device"]).manual_seed(cfg["seed"])  # the same samples every repeat
        return rollout(model, prompts, policy=name, budget=S, max_new_tokens=T - P, generator=generator)

    rows_sampler, rows_learner, rows_paths = [], [], []
    for T in cfg["lengths"]:
        n_new = B * (T - P)
        full_s, full = timed(lambda: sample(T, T, "full"))
        causal_batch = model, full.tokens, full.response_mask.float(), None
        causal_s, _ = timed(lambda: fwd_bwd(model, lambda: learner_loss(*causal_batch, "mask")))
        causal_mem = learner_memory(model, lambda: learner_loss(*causal_batch, "mask"), cuda)
        for S in cfg["budgets"]:
            for name in cfg["policies"]:
                comp_s, r = timed(lambda: sample(T, S, name))
                with torch.no_grad():
                    delta = {a: (learner_logprobs(model, r.tokens, r.shadow_mask, attention=a) - r.logprobs)
                             [r.response_mask].abs().max().item() for a in ("mask", "gather")}
                full_mask_bytes = cfg["n_layer"] * B * cfg["n_head"] * T * T  # a bool byte per (query, key)
                mask_bytes = r.shadow_mask.slot_of.nbytes
                rows_sampler.append((T, S, name, r.kv_bytes / 2**10, full.kv_bytes / 2**10,
                                     r.kv_bytes / full.kv_bytes, S / T, n_new / comp_s, n_new / full_s,
                                     full_s / comp_s, decode_flops(cfg, T) / decode_flops(cfg, S),
                                     mask_bytes / 2**10, mask_bytes / full_mask_bytes,
                                     delta["mask"], delta["gather"]))
                print(f"measured T={T} S={S} {name}", file=sys.stderr)
                if name != cfg["policies"][0]:
                    continue
                # the learner's cost depends on T and S, not on which slots the policy chose: once per (T, S)
                batch = model, r.tokens, r.response_mask.float(), r.shadow_mask
                paths = ("mask", "gather")
                t = {a: timed(lambda: fwd_bwd(model, lambda: learner_loss(*batch, a)))[0] for a in paths}
                mem = {a: learner_memory(model, lambda: learner_loss(*batch, a), cuda) for a in paths}
                rows_learner.append((T, S, causal_s * 1e3, t["mask"] / causal_s, t["gather"] / causal_s,
                                     causal_mem / 2**20, mem["mask"] / causal_mem, mem["gather"] / causal_mem))
                rows_paths.append((T, S, t["mask"] * 1e3, t["gather"] * 1e3, t["gather"] / t["mask"],
                                   mem["mask"] / 2**20, mem["gather"] / 2**20, mem["gather"] / mem["mask"]))

    print(f"device={cfg['device']} policies={','.join(cfg['policies'])} B={B} prompt={P} L={cfg['n_layer']} "
          f"nh={cfg['n_head']} C={cfg['n_embd']} vocab={cfg['vocab_size']} exact={cfg['exact']}; times are "
          f"the best of {cfg['repeats']}; full = no eviction (S = T); learner memory = peak allocated during "
          f"forward+backward "
          f"({'CUDA allocator' if cuda else 'CPU profiler'})")
    table("(a) sampler, per policy: compressed (S slots) vs full KV cache, each ratio beside its bound (S/T: "
          "keys and values alone; FLOP bound: full / compressed decode FLOPs); shadow mask vs a full T x T "
          "bool mask; max |sampler - learner| log-prob on response tokens",
          ["T", "S", "policy", "KV KiB", "full KiB", "KV ratio", "S/T", "tok/s", "full tok/s", "speed ratio",
           "FLOP bound", "mask KiB", "mask ratio", "|d| mask", "|d| gather"],
          ["{}", "{}", "{}", "{:.0f}", "{:.0f}", "{:.3f}", "{:.3f}", "{:.0f}", "{:.0f}", "{:.2f}x", "{:.2f}x",
           "{:.0f}", "{:.4f}", "{:.1e}", "{:.1e}"], rows_sampler)
    table(f"(b) learner forward+backward with the shadow mask ({cfg['policies'][0]}'s), as ratios to plain "
          f"causal attention",
          ["T", "S", "causal ms", "mask/causal", "gather/causal", "causal MiB", "mask/causal",
           "gather/causal"],
          ["{}", "{}", "{:.1f}", "{:.2f}x", "{:.2f}x", "{:.1f}", "{:.2f}x", "{:.2f}x"], rows_learner)
    table(f"(c) learner forward+backward with the shadow mask ({cfg['policies'][0]}'s): gather path vs mask "
          f"path as T grows",
          ["T", "S", "mask ms", "gather ms", "gather/mask", "mask MiB", "gather MiB", "gather/mask"],
          ["{}", "{}", "{:.1f}", "{:.1f}", "{:.2f}x", "{:.1f}", "{:.1f}", "{:.2f}x"], rows_paths)
    if cfg["trained"]:
        table("(d) the trained model (train.py's default warm-up and rollouts, 64 test problems): |sampler - "
              "learner| log-prob on response tokens",
              ["dtype", "path", "max", "mean"], ["{}", "{}", "{:.1e}", "{:.1e}"], trained_gap())


if __name__ == "__main__":
    configurator.cli(main, CONFIG, __file__, check=make_config, epilog=EPILOG)
