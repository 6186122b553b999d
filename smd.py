"""
Shadow Mask Distillation, the SMD-specific parts, read top to bottom:
  1. eviction policies: which cache slot to overwrite when the cache is full;
  2. KVCache: `budget` preallocated slots per layer and head, which records the shadow mask as it goes;
  3. ShadowMask: for every layer, row, head and query, the positions that query could see;
  4. rollout(): a real incremental sampler (prefill, then one-token decode steps) under the compressed cache;
  5. learner_logprobs(): teacher-forced log-probs, with the shadow mask injected into attention;
  6. kl_divergence(): the KL between two passes (SMD: the unmasked and the masked pass of the same weights).
The model itself (and the attention arithmetic) lives in model.py; training lives in train.py.
"""

from dataclasses import dataclass

import torch
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# 1. Eviction policies. The budget S counts the keys a query attends over, its own included. Once the cache
#    is full, each new token is written into the slot of a victim that the policy picks per (row, head)
#    from the keys the previous query saw, using what that query's attention showed. So a query never sees
#    more than S keys, and this is the published rules' "add the new token, attend, drop one" with the drop
#    taken after each query (the published codes hold S - 1 keys between steps plus the incoming one).
#    A policy has check(budget, seq_len) (ValueError for settings that cannot work), observe(cache, layer,
#    att) (update cache.attn_mass from the new queries' attention) and victim(cache, layer) -> (B, nh) slots.

NEVER = torch.iinfo(torch.long).max  # a "position" so large argmin never picks it


class Policy:
    """Defaults: keeps no attention statistic (no attn_mass buffer is allocated), works with any budget."""
    uses_attn_mass = False

    def check(self, budget, seq_len):
        pass

    def observe(self, cache, layer, att):
        pass


class Full(Policy):
    """No eviction: the dense reference. The budget must hold the whole sequence."""

    def check(self, budget, seq_len):
        if budget < seq_len:
            raise ValueError(f"policy 'full' never evicts: budget {budget} must be >= sequence length {seq_len}")

    def victim(self, cache, layer):
        raise AssertionError("a full-budget cache is never full")


class Streaming(Policy):
    """StreamingLLM (Xiao et al. 2024): keep the first n_sink tokens (attention sinks) and a window of the
    most recent ones; the victim is the oldest non-sink."""

    def __init__(self, n_sink=4):
        self.n_sink = n_sink

    def check(self, budget, seq_len):
        if not isinstance(self.n_sink, int) or not 0 <= self.n_sink < budget:
            raise ValueError(f"policy 'streaming' needs 0 <= n_sink < budget, got n_sink={self.n_sink!r}, "
                             f"budget {budget}")

    def victim(self, cache, layer):
        pos = cache.positions[layer]                                       # (B, nh, S)
        return pos.masked_fill(pos < self.n_sink, NEVER).argmin(-1)


class H2O(Policy):
    """Heavy-Hitter Oracle (Zhang et al. 2023): n_recent newest tokens (the incoming one included) plus
    the n_heavy older ones that received the most attention so far, per head; n_heavy + n_recent = budget.
    Default: the paper's even split, n_heavy = budget // 2. Its code sizes the two separately
    (hh_size, recent_size); ours are the same with recent_size = n_recent - 1 plus the incoming token."""
    uses_attn_mass = True  # attention mass each key received since it was written

    def __init__(self, n_heavy=None, n_recent=None):
        self.n_heavy, self.n_recent = n_heavy, n_recent

    def sizes(self, budget):
        n_heavy, n_recent = self.n_heavy, self.n_recent
        if n_heavy is None and n_recent is None:
            n_heavy = budget // 2
        n_heavy = budget - n_recent if n_heavy is None else n_heavy
        n_recent = budget - n_heavy if n_recent is None else n_recent
        return n_heavy, n_recent

    def check(self, budget, seq_len):
        n_heavy, n_recent = self.sizes(budget)
        if n_heavy < 0 or n_recent < 1 or n_heavy + n_recent != budget:
            raise ValueError(f"policy 'h2o' needs n_heavy >= 0, n_recent >= 1 and n_heavy + n_recent = budget "
                             f"{budget}, got n_heavy={self.n_heavy}, n_recent={self.n_recent}")

    def observe(self, cache, layer, att):
        cache.attn_mass[layer] += att.sum(2)                               # (B, nh, S)

    def victim(self, cache, layer):
        _, n_recent = self.sizes(cache.budget)
        recent = cache.positions[layer] > cache.length - n_recent          # with the incoming token: n_recent
        return cache.attn_mass[layer].masked_fill(recent, float("inf")).argmin(-1)


class TOVA(Policy):
    """Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs"): after each
    query attends, drop the key it attended to least, its own key a candidate too. head_average=True
    (default, as the reference code does) averages that attention over the layer's heads, so every head
    drops the same token; False decides per head."""
    uses_attn_mass = True  # the newest query's attention

    def __init__(self, head_average=True):
        self.head_average = head_average

    def check(self, budget, seq_len):
        if not isinstance(self.head_average, bool):
            raise ValueError(f"policy 'tova' needs head_average True or False, got {self.head_average!r}")

    def observe(self, cache, layer, att):
        cache.attn_mass[layer] = att[:, :, -1]                                 # (B, nh, S)

    def victim(self, cache, layer):
        att = cache.attn_mass[layer]                                           # (B, nh, S)
        if self.head_average:  # heads hold the same positions in the same slots, having dropped the same ones
            att = att.mean(1, keepdim=True).expand_as(att)
        return att.argmin(-1)


class SnapKV(Policy):
    """SnapKV (Li et al. 2024) for the prompt, a sliding window for the rest. When a row's prompt has been
    read, each prompt key is scored by the attention it received from the last `window` prompt queries (the
    observation window), smoothed by an average pool of width `kernel` over neighbouring positions; the
    window's own keys are always kept. SnapKV then decodes with what it selected, but our cache is capped
    during decoding too, so a decode-time rule is needed: the victim is the remaining prompt key SnapKV
    ranked lowest, and once only the window is left of the prompt, the oldest token (a sliding window, as
    in StreamingLLM). So the prompt gives up what SnapKV judged least useful before the response loses its
    own recent context. A prompt longer than the budget slides (oldest out) until it has been read.
    Scaled to our 20-token prompts: window 4 (the published 32-64 are for prompts of thousands of tokens),
    kernel 3 (a token and its two neighbours; published 5-7)."""
    uses_attn_mass = True  # attention from the observation window, then the pooled score

    def __init__(self, window=4, kernel=3):
        self.window, self.kernel = window, kernel

    def check(self, budget, seq_len):
        if not isinstance(self.window, int) or not 1 <= self.window < budget:
            raise ValueError(f"policy 'snapkv' needs 1 <= window < budget, got window={self.window!r}, budget {budget}")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"policy 'snapkv' needs an odd kernel >= 1, got kernel={self.kernel!r}")

    def observe(self, cache, layer, att):
        B, nh, T, S = att.shape
        P = cache.prompt_lengths[:, None]                                  # (B, 1)
        query_pos = cache.length + torch.arange(T, device=att.device)      # (T,)
        in_window = (query_pos >= P - self.window) & (query_pos < P)       # (B, T)
        cache.attn_mass[layer] += (att * in_window[:, None, :, None]).sum(2)   # (B, nh, S)
        read = (query_pos == P - 1).any(-1)                                # (B,) rows whose prompt ends here
        if read.any():  # freeze their scores: the pooled window attention of the prompt keys
            pooled = self.pool(cache.positions[layer], cache.attn_mass[layer], P[:, :, None])
            cache.attn_mass[layer] = torch.where(read[:, None, None], pooled, cache.attn_mass[layer])

    def pool(self, pos, mass, P):
        """Average-pool the window attention of the prompt keys before the window, in position order, zero-padded."""
        B, nh, S = pos.shape
        body = (pos >= 0) & (pos < P - self.window)                        # (B, nh, S)
        order = pos.argsort(-1)                                            # slots by position: body keys are contiguous
        ranked = mass.masked_fill(~body, 0.0).gather(-1, order)            # (B, nh, S)
        pooled = F.avg_pool1d(ranked.reshape(B * nh, 1, S), self.kernel, stride=1, padding=self.kernel // 2)
        return torch.empty_like(mass).scatter_(-1, order, pooled.view(B, nh, S))

    def victim(self, cache, layer):
        pos = cache.positions[layer]                                       # (B, nh, S), full: no empty slot
        P = cache.prompt_lengths[:, None, None]                            # (B, 1, 1)
        body = (pos < P - self.window) & (cache.length >= P)               # prompt keys, once scored
        lowest = cache.attn_mass[layer].masked_fill(~body, float("inf")).argmin(-1)
        return torch.where(body.any(-1), lowest, pos.argmin(-1))


class Random(Policy):
    """Evict a uniformly random slot, drawn from the rollout's generator (torch's global one without it):
    reproducible for a seed, and different from one rollout to the next. A baseline with no signal."""

    def victim(self, cache, layer):
        pos, g = cache.positions[layer], cache.generator
        slot = torch.randint(pos.shape[-1], pos.shape[:-1], generator=g, device=g.device if g else pos.device)
        return slot.to(pos.device)


POLICIES = {"full": Full, "streaming": Streaming, "h2o": H2O, "tova": TOVA, "snapkv": SnapKV, "random": Random}


def make_policy(name, **policy_kwargs):
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    try:
        return POLICIES[name](**policy_kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments {policy_kwargs} for policy {name!r}: {e}") from None

# -----------------------------------------------------------------------------
# 2-3. The shadow mask and the cache that records it


class ShadowMask:
    """What every query could see, stored as the cache's write log: written (L, B, nh, T) int16 is the slot
    that position t's key/value went into (each token is written once, evicting whatever held the slot).
    Query t therefore saw, in each slot, the latest position <= t written there. That is O(T) per layer and
    head, less than the KV cache itself, and the learner expands it one layer at a time:
    shadow_mask.slot_positions(l) (B, nh, T, S) lists those positions in slot order (-1 = empty), for the
    gather path; shadow_mask[l] is the (B, nh, T, T) bool attn_mask, so GPT.forward(attn_mask=shadow_mask)
    works as is."""

    def __init__(self, written, budget):
        self.written = written
        self.budget = budget

    def __len__(self):
        return self.written.shape[0]

    def slot_positions(self, layer):
        written = self.written[layer]                                      # (B, nh, T)
        T, S = written.shape[-1], self.budget
        positions = torch.arange(T, device=written.device, dtype=written.dtype)
        went_there = written[..., None] == torch.arange(S, device=written.device, dtype=written.dtype)  # (B, nh, T, S)
        table = torch.where(went_there, positions[:, None], -1)            # position t, in the slot it filled
        return table.cummax(dim=2).values                                  # (B, nh, T, S): latest write <= t

    def __getitem__(self, layer):
        positions = self.slot_positions(layer).long()                      # (B, nh, T, S)
        T = positions.shape[2]
        dense = torch.zeros(*positions.shape[:3], T + 1, dtype=torch.bool, device=positions.device)
        dense.scatter_(-1, torch.where(positions < 0, T, positions), True)  # empty slots land in a spare column
        return dense[..., :T]                                              # (B, nh, T, T)

    def to_dense(self):
        return torch.stack([self[layer] for layer in range(len(self))])    # (L, B, nh, T, T)

    def truncate(self, T):
        return ShadowMask(self.written[..., :T], self.budget)


class KVCache:
    """A KV cache with a hard capacity of `budget` slots per layer, row and head, preallocated so memory is
    O(budget) whatever the sequence length. All rows advance in lockstep (one position per decode step),
    so `length` is the position of the next token for every row; GPT.forward advances it once per call, after
    every layer has written (advance). Records the shadow mask of every query.
    prompt_lengths (B,) tells prompt-aware policies (SnapKV) where each row's prompt ends; generator feeds
    the random policy."""

    def __init__(self, config, batch_size, budget, seq_len, policy, device, dtype, prompt_lengths=None,
                 generator=None):
        L, B, nh, S = config.n_layer, batch_size, config.n_head, budget
        hs = config.n_embd // config.n_head
        self.policy, self.budget, self.generator = policy, budget, generator
        self.prompt_lengths = torch.zeros(B, dtype=torch.long, device=device) if prompt_lengths is None \
            else prompt_lengths.to(device)
        self.k = torch.zeros(L, B, nh, S, hs, device=device, dtype=dtype)
        self.v = torch.zeros(L, B, nh, S, hs, device=device, dtype=dtype)
        self.positions = torch.full((L, B, nh, S), -1, device=device, dtype=torch.long)  # -1 = empty slot
        # the policy's per-slot attention statistic (H2O: mass received, TOVA: newest query's attention, ...)
        self.attn_mass = torch.zeros(L, B, nh, S, device=device, dtype=dtype) if policy.uses_attn_mass else None
        log_dtype = torch.int16 if seq_len <= torch.iinfo(torch.int16).max else torch.int32  # holds positions too
        self.shadow_mask = ShadowMask(torch.zeros(L, B, nh, seq_len, device=device, dtype=log_dtype), budget)
        self.length = 0

    def nbytes(self):
        """Every per-slot buffer the cache holds: keys, values, positions and the policy's attn_mass, if any.
        (The shadow mask's write log is O(T), not O(budget), and is counted separately.)"""
        return sum(t.nbytes for t in (self.k, self.v, self.positions, self.attn_mass) if t is not None)

    def update(self, layer, k, v):
        """Store the keys/values k, v (B, nh, T, hs) of the next T tokens, then return this layer's cache
        k, v (B, nh, S, hs) and which slots each new query may see, visible (B, nh, T, S)."""
        T, S, t0 = k.shape[2], self.budget, self.length
        if T > 1:  # prefill: the first tokens go into empty slots 0..T-1, no eviction
            assert t0 == 0 and T <= S, "prefill must start an empty cache and fit in it"
            self.k[layer, :, :, :T] = k
            self.v[layer, :, :, :T] = v
            self.positions[layer, :, :, :T] = torch.arange(T, device=k.device)
            self.shadow_mask.written[layer, :, :, :T] = torch.arange(T, device=k.device)
        else:
            if t0 < S:  # not full yet: every row and head fills slot t0
                slot = torch.full(self.positions.shape[1:3], t0, device=k.device, dtype=torch.long)  # (B, nh)
            else:
                slot = self.policy.victim(self, layer)
            index = slot[:, :, None, None]                                 # (B, nh, 1, 1)
            hs_index = index.expand(-1, -1, 1, k.shape[-1])
            self.k[layer].scatter_(2, hs_index, k)
            self.v[layer].scatter_(2, hs_index, v)
            self.positions[layer].scatter_(2, index[..., 0], t0)
            if self.attn_mass is not None:
                self.attn_mass[layer].scatter_(2, index[..., 0], 0.0)          # a new token starts with no mass
            self.shadow_mask.written[layer, :, :, t0] = slot               # the shadow mask is this log
        pos = self.positions[layer][:, :, None, :]                         # (B, nh, 1, S)
        query_pos = torch.arange(t0, t0 + T, device=k.device)[:, None]     # (T, 1)
        visible = (pos >= 0) & (pos <= query_pos)                          # (B, nh, T, S)
        return self.k[layer], self.v[layer], visible

    def observe(self, layer, att):
        """att (B, nh, T, S): attention probabilities of the new queries, for content-based eviction."""
        self.policy.observe(self, layer, att)

    def advance(self, T):
        """The next T positions have been written in every layer: the clock moves on."""
        self.length += T

# -----------------------------------------------------------------------------
# 4. The sampler


@dataclass
class Rollout:
    tokens: torch.Tensor         # (B, T) long: prompt, response, then padding (eos_id, or 0 without one)
    logprobs: torch.Tensor       # (B, T) float: sampler log-prob of each generated token, 0 elsewhere
    response_mask: torch.Tensor  # (B, T) bool: True on generated tokens (up to and including EOS)
    shadow_mask: ShadowMask      # what every query could see: the cache's write log, (L, B, nh, T)
    kv_bytes: int                # bytes of the cache's per-slot buffers: K, V, positions, policy attn_mass
    full_kv_bytes: int           # the same for a full cache of prompt + max_new_tokens slots (built, not derived)


def pad_prompts(prompts, pad_id, device):
    """A (B, P) tensor or a list of token lists -> right-padded (B, P) long tensor and lengths (B,)."""
    if torch.is_tensor(prompts):
        if prompts.dim() != 2 or prompts.shape[1] == 0:
            raise ValueError(f"prompts tensor must be (B, P) with P >= 1, got shape {tuple(prompts.shape)}")
        lengths = torch.full((prompts.shape[0],), prompts.shape[1], dtype=torch.long)
        return prompts.long().to(device), lengths.to(device)
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("need at least one prompt, and every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    padded = torch.tensor([list(p) + [pad_id] * (P - len(p)) for p in prompts], dtype=torch.long)
    return padded.to(device), torch.tensor([len(p) for p in prompts], device=device)


@torch.no_grad()
def rollout(model, prompts, *, policy, budget, max_new_tokens, temperature=1.0, eos_id=None,
            generator=None, **policy_kwargs):
    """Sample continuations of `prompts` with a KV cache of `budget` slots evicted by `policy`, recording
    the shadow mask. Prompts of different lengths share one layout: row b's prompt is at 0..P_b-1 and its
    response starts right after, so all rows advance one position per step: the tail of a longer prompt is
    fed token by token while shorter rows already sample, and a finished row is fed padding (never scored).
    temperature=0 samples greedily (log-probs are then those of temperature 1)."""
    if isinstance(policy, str):
        policy = make_policy(policy, **policy_kwargs)
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = next(model.parameters()).device
    pad_id = 0 if eos_id is None else eos_id
    prompts, lengths = pad_prompts(prompts, pad_id, device)               # (B, P), (B,)
    B, P = prompts.shape
    T = P + max_new_tokens
    if T > model.config.block_size:
        raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} = {T} exceeds "
                         f"block_size {model.config.block_size}")
    policy.check(budget, T)
    vocab_size = model.config.vocab_size
    if prompts.min() < 0 or prompts.max() >= vocab_size or (eos_id is not None and not 0 <= eos_id < vocab_size):
        raise ValueError(f"prompt tokens and eos_id must lie in [0, vocab_size={vocab_size})")

    tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    tokens[:, :P] = prompts
    logprobs = torch.zeros(B, T, dtype=next(model.parameters()).dtype, device=device)
    response_mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache(model.config, B, budget, T, policy, device, logprobs.dtype, lengths, generator)

    # prefill: the prefix every row shares as prompt, in one parallel pass, as far as the cache holds it
    n_prefill = min(int(lengths.min()), budget)
    logits, _ = model(tokens[:, :n_prefill], cache=cache)
    logits = logits[:, -1]                                                 # (B, vocab): predicts position n_prefill
    for t in range(n_prefill, T):
        logp = F.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)  # (B, vocab)
        if temperature == 0:
            sampled = logp.argmax(-1)                                      # (B,)
        else:
            sampled = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        generating = (t >= lengths) & (t < lengths + max_new_tokens) & ~done  # each row: its own max_new_tokens
        in_prompt = t < lengths
        tokens[:, t] = torch.where(in_prompt, tokens[:, t], torch.where(generating, sampled, pad_id))
        logprobs[:, t] = torch.where(generating, logp.gather(-1, tokens[:, t:t + 1]).squeeze(-1), 0.0)
        response_mask[:, t] = generating
        if eos_id is not None:
            done |= generating & (tokens[:, t] == eos_id)
        # feed token t (even the last one: every position then has a recorded mask row)
        logits, _ = model(tokens[:, t:t + 1], cache=cache)
        logits = logits[:, -1]
        if bool((done | (t + 1 >= lengths + max_new_tokens)).all()):
            T = t + 1                                                      # every row has finished
            break

    # a full cache of the same shapes, built on the meta device: its real byte count, nothing allocated
    full = KVCache(model.config, B, P + max_new_tokens, P + max_new_tokens, Full(), "meta", logprobs.dtype)
    return Rollout(tokens[:, :T], logprobs[:, :T], response_mask[:, :T], cache.shadow_mask.truncate(T), cache.nbytes(),
                   full.nbytes())

# -----------------------------------------------------------------------------
# 5-6. The learner


def learner_logits(model, tokens, shadow_mask=None, *, attention="dense"):
    """(B, T, vocab) teacher-forced logits. shadow_mask=None: plain causal attention (the dense learner).
    A ShadowMask: every query sees exactly what the sampler saw, via attention="dense" (a T x T boolean
    attn_mask per layer) or "gather" (each query gathers its S slots: O(T * S) scores, and after
    model.set_exact() bitwise equal to the sampler on CPU)."""
    if attention not in ("dense", "gather"):
        raise ValueError(f"attention must be 'dense' or 'gather', got {attention!r}")
    if attention == "gather" and shadow_mask is None:
        raise ValueError("attention='gather' needs a ShadowMask")
    if shadow_mask is not None and shadow_mask.written.shape[-1] != tokens.shape[1]:
        raise ValueError(f"shadow_mask covers {shadow_mask.written.shape[-1]} positions, tokens have {tokens.shape[1]}")
    if attention == "gather":
        positions = [shadow_mask.slot_positions(layer) for layer in range(len(shadow_mask))]  # L x (B, nh, T, S)
        logits, _ = model(tokens, slot_positions=positions)
    else:
        logits, _ = model(tokens, attn_mask=shadow_mask)
    return logits


def token_logprobs(logits, tokens, temperature=1.0):
    """logits (B, T, vocab) -> (B, T) log-prob of each token given its prefix; 0 at position 0, which has
    none. Divides by the temperature exactly as rollout() does, so the bits agree."""
    if temperature > 0:
        logits = logits / temperature
    logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return F.pad(logp, (1, 0))


def learner_logprobs(model, tokens, shadow_mask=None, *, attention="dense", temperature=1.0):
    """(B, T) differentiable log-probs of `tokens` (see learner_logits); with rollout.shadow_mask they
    reproduce rollout.logprobs on response tokens."""
    logits = learner_logits(model, tokens, shadow_mask, attention=attention)
    return token_logprobs(logits, tokens, temperature)


def kl_divergence(p_logits, q_logits, response_mask, temperature=1.0):
    """Mean over response positions of KL(p || q) = sum_v p (log p - log q), p and q the next-token
    distributions two passes give (logits (B, T, vocab); the logits at t-1 predict token t, so response
    position t weighs the prediction made at t-1). Gradients reach both arguments: detach the one that is
    a fixed target. SMD's distillation, as its authors state it, is KL(pi_dense || sg(pi_masked)):
    kl_divergence(dense_logits, masked_logits.detach(), response_mask)."""
    t = temperature if temperature > 0 else 1.0
    log_p = F.log_softmax(p_logits[:, :-1] / t, dim=-1)                   # (B, T-1, vocab)
    log_q = F.log_softmax(q_logits[:, :-1] / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)                           # (B, T-1)
    weights = response_mask[:, 1:].to(kl.dtype)
    return (kl * weights).sum() / weights.sum().clamp(min=1)
