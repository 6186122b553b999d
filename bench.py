"""
Benchmark of what SMD saves and what it costs, several sequence lengths and budgets side by side in one run:
  sampler  KV-cache bytes and decode speed of a compressed rollout vs a full one, shadow-mask bytes vs a
           dense T x T mask, and the sampler/learner log-prob mismatch;
  learner  forward+backward time and memory with the shadow mask (dense-masked and gather paths) vs plain
           causal attention, and where the gather path's memory (O(T * S), plus a fixed per-chunk transient of
           O(GATHER_CHUNK * S * hs)) drops below the dense-masked path's O(T^2).
Random-init model, random prompts, no training. `python bench.py` (CPU) or `python bench.py --device=cuda`.
"""

import ast
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from model import GPT, GPTConfig
from smd import learner_logprobs, rollout

# -----------------------------------------------------------------------------
# config, overridable as --key=value; --device=cuda first switches to the one-GPU preset below
device = "cpu"
lengths = (128, 256, 512)  # total sequence lengths T (prompt + response)
budgets = (32, 64)         # KV-cache slots S of the compressed rollouts; the baseline is 'full' with S = T
policy = "h2o"
batch_size = 4
prompt_len = 16
n_layer, n_head, n_embd, vocab_size = 4, 4, 128, 64
init_std = 0.1             # larger than GPT-2's 0.02 so attention is peaked and eviction scores differ
exact = False              # batch-invariant linears: bitwise sampler == gather learner on CPU, but slow
repeats = 3                # timed repeats after one warm-up; we report the fastest, the least disturbed
seed = 1337
threads = 1                # CPU threads: with more, a busy machine stalls the threads' barriers and times explode
CUDA_PRESET = dict(lengths=(256, 512, 1024, 2048), budgets=(64, 256), batch_size=4,
                   n_layer=8, n_head=8, n_embd=512, vocab_size=256)

config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str, tuple))]
overrides = {}
for arg in sys.argv[1:]:
    key, eq, value = arg.removeprefix("--").partition("=")
    if not arg.startswith("--") or not eq or key not in config_keys:
        sys.exit(f"bad argument {arg!r}: use --key=value with key one of {', '.join(config_keys)}")
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass  # a bare word such as cuda or h2o stays a string
    overrides[key] = (value,) if isinstance(globals()[key], tuple) and isinstance(value, int) else value
if str(overrides.get("device", device)).startswith("cuda"):
    globals().update(CUDA_PRESET)
for key, value in overrides.items():
    if type(value) is not type(globals()[key]) and not (type(value) is int and type(globals()[key]) is float):
        sys.exit(f"--{key} must be a {type(globals()[key]).__name__}, got {value!r}")
    globals()[key] = value
if any(S >= min(lengths) for S in budgets) or prompt_len >= min(lengths):
    sys.exit(f"every budget {budgets} and prompt_len {prompt_len} must be below the shortest length {min(lengths)}")
cuda = device.startswith("cuda")
torch.set_num_threads(threads)
# -----------------------------------------------------------------------------

torch.manual_seed(seed)
model = GPT(GPTConfig(block_size=max(lengths), vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                      n_embd=n_embd, dropout=0.0)).to(device)
with torch.no_grad():
    for p in model.parameters():
        if p.dim() >= 2:
            p.normal_(0.0, init_std)
model.set_exact(exact)
prompts = torch.randint(vocab_size, (batch_size, prompt_len), generator=torch.Generator().manual_seed(seed))
sync = torch.cuda.synchronize if cuda else (lambda: None)


def best_time(fn):
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


def sample(T, S, name):
    generator = torch.Generator(device).manual_seed(seed)  # same samples in every timed repeat
    return rollout(model, prompts, policy=name, budget=S, max_new_tokens=T - prompt_len, generator=generator)


def learner_loss(tokens, response_mask, shadow_mask, attention):
    logp = learner_logprobs(model, tokens, shadow_mask, attention=attention)          # (B, T)
    return -(logp * response_mask).sum() / response_mask.sum()


def learner_memory(loss_fn):
    """Peak bytes one forward+backward allocates beyond what was allocated before it. On CUDA: the allocator's
    peak. On CPU there is no allocator peak to read, so we replay the profiler's memory record: every op's own
    allocations and every free, in time order; the running total's maximum is the peak. Counting only the
    tensors saved for backward would miss the temporaries, and on the gather path those dominate: each
    checkpointed chunk rebuilds (B, nh, GATHER_CHUNK, S, hs) keys and values, in forward and again in backward."""
    model.zero_grad(set_to_none=True)
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss_fn().backward()
        sync()
        return torch.cuda.max_memory_allocated() - before
    stderr = os.dup(2)  # the profiler's C++ side logs two lines per run to fd 2, and no setting stops it
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss_fn().backward()
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
    total = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        total += event.self_cpu_memory_usage  # self: an op's allocations not already counted in the ops it calls
        peak = max(peak, total)
    return peak


def fwd_bwd(loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn().backward()


rows_sampler, rows_learner, rows_paths = [], [], []
for T in lengths:
    n_new = batch_size * (T - prompt_len)
    full_s, full = best_time(lambda: sample(T, T, "full"))
    causal_batch = full.tokens, full.response_mask.float(), None
    causal_s, _ = best_time(lambda: fwd_bwd(lambda: learner_loss(*causal_batch, "dense")))
    causal_mem = learner_memory(lambda: learner_loss(*causal_batch, "dense"))
    for S in budgets:
        comp_s, r = best_time(lambda: sample(T, S, policy))
        with torch.no_grad():
            delta = {a: (learner_logprobs(model, r.tokens, r.shadow_mask, attention=a) - r.logprobs)
                     [r.response_mask].abs().max().item() for a in ("dense", "gather")}
        dense_mask_bytes = n_layer * batch_size * n_head * T * T  # one bool byte per (query, key) pair
        rows_sampler.append((T, S, r.kv_bytes / 2**10, full.kv_bytes / 2**10, r.kv_bytes / full.kv_bytes,
                             n_new / comp_s, n_new / full_s, full_s / comp_s, r.shadow_mask.written.nbytes / 2**10,
                             dense_mask_bytes / 2**10, r.shadow_mask.written.nbytes / dense_mask_bytes,
                             delta["dense"], delta["gather"]))
        batch = r.tokens, r.response_mask.float(), r.shadow_mask
        t = {a: best_time(lambda: fwd_bwd(lambda: learner_loss(*batch, a)))[0] for a in ("dense", "gather")}
        mem = {a: learner_memory(lambda: learner_loss(*batch, a)) for a in ("dense", "gather")}
        rows_learner.append((T, S, causal_s * 1e3, t["dense"] / causal_s, t["gather"] / causal_s,
                             causal_mem / 2**20, mem["dense"] / causal_mem, mem["gather"] / causal_mem))
        rows_paths.append((T, S, t["dense"] * 1e3, t["gather"] * 1e3, t["gather"] / t["dense"],
                           mem["dense"] / 2**20, mem["gather"] / 2**20, mem["gather"] / mem["dense"]))
        print(f"measured T={T} S={S}", file=sys.stderr)


def table(title, header, fmts, rows):
    cells = [[f.format(v) for f, v in zip(fmts, row)] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for c in cells:
        print("  ".join(x.rjust(w) for x, w in zip(c, widths)))


print(f"device={device} policy={policy} B={batch_size} prompt={prompt_len} L={n_layer} nh={n_head} C={n_embd} "
      f"vocab={vocab_size} exact={exact}; times are the best of {repeats}; full = no eviction (S = T); "
      f"learner memory = peak allocated during forward+backward ({'CUDA allocator' if cuda else 'CPU profiler'})")
table("(a) sampler: compressed (S slots) vs full KV cache; shadow mask vs a dense T x T bool mask; "
      "max |sampler - learner| log-prob on response tokens",
      ["T", "S", "KV KiB", "full KiB", "KV ratio", "tok/s", "full tok/s", "speed ratio",
       "mask KiB", "dense KiB", "mask ratio", "|d| dense", "|d| gather"],
      ["{}", "{}", "{:.0f}", "{:.0f}", "{:.3f}", "{:.0f}", "{:.0f}", "{:.2f}x", "{:.0f}", "{:.0f}", "{:.3f}",
       "{:.1e}", "{:.1e}"], rows_sampler)
table("(a) learner forward+backward with the shadow mask, as ratios to plain causal attention",
      ["T", "S", "causal ms", "dense/causal", "gather/causal", "causal MiB", "dense/causal", "gather/causal"],
      ["{}", "{}", "{:.1f}", "{:.2f}x", "{:.2f}x", "{:.1f}", "{:.2f}x", "{:.2f}x"], rows_learner)
table("(b) learner forward+backward with the shadow mask: gather path vs dense-masked path as T grows",
      ["T", "S", "dense ms", "gather ms", "gather/dense", "dense MiB", "gather MiB", "gather/dense"],
      ["{}", "{}", "{:.1f}", "{:.1f}", "{:.2f}x", "{:.1f}", "{:.1f}", "{:.2f}x"], rows_paths)
