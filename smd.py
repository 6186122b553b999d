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

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# 1. Eviction policies. The budget S counts the keys a query attends over, its own included. Once the cache
#    is full, each new token is written into the slot of a victim that the policy picks per (row, head)
#    from the keys the previous query saw, using what that query's attention showed. So a query never sees
#    more than S keys, and this is the published rules' "add the new token, attend, drop one" with the drop
#    taken after each query (the published codes hold S - 1 keys between steps plus the incoming one).
#    A policy has check(budget, seq_len, prompt_len) (ValueError for settings that cannot work),
#    observe(cache, layer, q, att) (update its statistic from the new queries) and victim(cache, layer) ->
#    (B, nh) slots. Two rules hold for every policy:
#    - keep_prompt=True: no prompt position of a row is ever a victim; the rule chooses among that row's
#      generated tokens only (reasoning RL compresses the trace and keeps the question, as Sparse-RL does).
#    - ties in a score go to the oldest position, so the victim never depends on which slot a key is in.

NEVER = torch.iinfo(torch.long).max  # a "position" so large argmin never picks it


def oldest(pos, allowed):
    """(B, nh, S) -> (B, nh): the slot holding the oldest allowed position."""
    return pos.masked_fill(~allowed, NEVER).argmin(-1)


def lowest(score, pos, allowed):
    """(B, nh, S) -> (B, nh): the slot of the allowed key with the lowest score, the oldest of any tie."""
    score = score.masked_fill(~allowed, float("inf"))
    tied = score == score.min(-1, keepdim=True).values                    # (B, nh, S)
    return oldest(pos, tied & allowed)


def in_position_order(pool, values, pos, kernel):
    """Pool values (B, nh, S) over neighbouring keys in position order, not slot order; back in slot order."""
    B, nh, S = values.shape
    order = pos.argsort(-1)                                                # slots by position
    ranked = values.gather(-1, order).reshape(B * nh, 1, S)
    pooled = pool(ranked, kernel, stride=1, padding=kernel // 2).view(B, nh, S)
    return torch.empty_like(values).scatter_(-1, order, pooled)


def window_importance(cache, layer, window):
    """The attention the last `window` queries give each cached key older than them: a softmax over those
    keys alone, averaged over the window queries (R-KV's and decode-time SnapKV's importance).
    -> importance (B, nh, S), 0 for keys in the window; older (B, nh, S) bool, the keys scored."""
    pos, k = cache.held[layer], cache.k[layer]                        # (B, nh, S), (B, nh, S, hs)
    older = (pos >= 0) & (pos < cache.next_pos - window)
    q = cache.recent_q[layer]                                              # (B, nh, W, hs): queries t-W..t-1
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])            # (B, nh, W, S)
    att = scores.masked_fill(~older[:, :, None], float("-inf")).softmax(-1)
    return att.mean(2), older


def check_window(name, window, kernel, room):
    """An observation window and a pooling kernel that fit `room` slots (the budget, less a kept prompt)."""
    if not isinstance(window, int) or not 1 <= window < room:
        raise ValueError(f"policy '{name}' needs 1 <= window < {room} (the budget, less the longest prompt "
                         f"when it is kept), got window={window!r}")
    if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"policy '{name}' needs an odd kernel >= 1, got kernel={kernel!r}")


class Policy:
    """What every policy shares: keep_prompt, and the defaults (no statistic kept, any budget works)."""
    uses_slot_scores = False  # a per-slot float statistic (cache.slot_scores)
    query_window = 0        # how many recent queries the cache keeps for the policy (cache.recent_q)
    scores_prompt = False   # a per-prompt-position score (cache.prompt_scores)

    def __init__(self, keep_prompt=False):
        self.keep_prompt = keep_prompt

    def check(self, budget, seq_len, prompt_len):
        """prompt_len: the batch's longest prompt."""
        if not isinstance(self.keep_prompt, bool):
            raise ValueError(f"keep_prompt must be True or False, got {self.keep_prompt!r}")
        if self.keep_prompt and budget < prompt_len + 1:
            raise ValueError(f"keep_prompt needs a budget of at least the longest prompt + 1 generated "
                             f"token: budget {budget} < prompt {prompt_len} + 1")

    def evictable(self, cache, layer):
        """(B, nh, S) bool: the cached keys this policy may evict (the generated ones, with keep_prompt)."""
        pos = cache.held[layer]
        if self.keep_prompt:
            return pos >= cache.prompt_lengths[:, None, None]
        return pos >= 0

    def observe(self, cache, layer, q, att):
        pass


class Full(Policy):
    """No eviction: the full-cache reference. The budget must hold the whole sequence."""

    def check(self, budget, seq_len, prompt_len):
        if budget < seq_len:
            raise ValueError(f"policy 'full' never evicts: budget {budget} must be >= sequence length "
                             f"{seq_len}")

    def victim(self, cache, layer):
        raise AssertionError("a full-budget cache is never full")


class Streaming(Policy):
    """StreamingLLM (Xiao et al. 2024): keep the first n_sink tokens (attention sinks) and a window of the
    most recent ones; the victim is the oldest non-sink. With keep_prompt the whole prompt is the sinks
    (n_sink counts only where it is longer), so the rest is a sliding window over the generated tokens."""

    def __init__(self, n_sink=4, keep_prompt=False):
        super().__init__(keep_prompt)
        self.n_sink = n_sink

    def check(self, budget, seq_len, prompt_len):
        super().check(budget, seq_len, prompt_len)
        if not isinstance(self.n_sink, int) or not 0 <= self.n_sink < budget:
            raise ValueError(f"policy 'streaming' needs 0 <= n_sink < budget, got n_sink={self.n_sink!r}, "
                             f"budget {budget}")

    def victim(self, cache, layer):
        pos = cache.held[layer]                                       # (B, nh, S)
        return oldest(pos, self.evictable(cache, layer) & (pos >= self.n_sink))


class H2O(Policy):
    """Heavy-Hitter Oracle (Zhang et al. 2023): n_recent newest tokens (the incoming one included) plus
    the n_heavy older ones that received the most attention so far, per head; n_heavy + n_recent = budget.
    Default: the paper's even split, n_heavy = budget // 2. Its code sizes the two separately
    (hh_size, recent_size); ours are the same with recent_size = n_recent - 1 plus the incoming token.
    With keep_prompt the two share what the prompt leaves, free = budget - P_b, per row: by default
    n_heavy = free // 2; a given n_recent (or n_heavy) is fixed and the other part gets the rest."""
    uses_slot_scores = True  # attention mass each key received since it was written

    def __init__(self, n_heavy=None, n_recent=None, keep_prompt=False):
        super().__init__(keep_prompt)
        self.n_heavy, self.n_recent = n_heavy, n_recent

    def recent_size(self, free):
        """n_recent when `free` slots (an int, or (B,) per row) hold the generated tokens."""
        if self.n_recent is not None:
            return self.n_recent
        if self.n_heavy is not None:
            return free - self.n_heavy
        return free - free // 2

    def check(self, budget, seq_len, prompt_len):
        super().check(budget, seq_len, prompt_len)
        n_heavy, n_recent = self.n_heavy, self.n_recent
        if self.keep_prompt and n_heavy is not None and n_recent is not None:
            raise ValueError("policy 'h2o' with keep_prompt takes n_heavy or n_recent, not both: the other "
                             "part gets what each row's prompt leaves")
        both = n_heavy is not None and n_recent is not None
        if not self.keep_prompt and both and n_heavy + n_recent != budget:
            raise ValueError(f"policy 'h2o' needs n_heavy + n_recent = budget {budget}, got "
                             f"n_heavy={n_heavy}, n_recent={n_recent}")
        free = budget - prompt_len if self.keep_prompt else budget  # the tightest row
        if (n_heavy is not None and n_heavy < 0) or not 1 <= self.recent_size(free) <= free:
            raise ValueError(f"policy 'h2o' needs n_heavy >= 0 and 1 <= n_recent <= {free} (the slots "
                             f"{'the longest prompt leaves' if self.keep_prompt else 'of the budget'}), "
                             f"got n_heavy={n_heavy}, n_recent={n_recent}")

    def observe(self, cache, layer, q, att):
        cache.slot_scores[layer] += att.sum(2)                               # (B, nh, S)

    def victim(self, cache, layer):
        free = cache.budget - cache.prompt_lengths * self.keep_prompt     # (B,) slots for generated tokens
        pos = cache.held[layer]
        n_recent = torch.as_tensor(self.recent_size(free), device=pos.device).view(-1, 1, 1)  # (B or 1, 1, 1)
        recent = pos > cache.next_pos - n_recent                           # with the incoming token: n_recent
        return lowest(cache.slot_scores[layer], pos, self.evictable(cache, layer) & ~recent)


class TOVA(Policy):
    """Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs"): after each
    query attends, drop the key it attended to least, its own key a candidate too. head_average=True
    (default, as the reference code does) averages that attention over the layer's heads, so every head
    drops the same token; False decides per head. The published code reads the whole prompt uncompressed
    and then compresses once; ours caps every query at the budget, prompt queries included."""
    uses_slot_scores = True  # the newest query's attention

    def __init__(self, head_average=True, keep_prompt=False):
        super().__init__(keep_prompt)
        self.head_average = head_average

    def check(self, budget, seq_len, prompt_len):
        super().check(budget, seq_len, prompt_len)
        if not isinstance(self.head_average, bool):
            raise ValueError(f"policy 'tova' needs head_average True or False, got {self.head_average!r}")

    def observe(self, cache, layer, q, att):
        cache.slot_scores[layer] = att[:, :, -1]                                 # (B, nh, S)

    def victim(self, cache, layer):
        att = cache.slot_scores[layer]                                           # (B, nh, S)
        if self.head_average:  # heads hold the same positions in the same slots, having dropped the same ones
            att = att.mean(1, keepdim=True).expand_as(att)
        return lowest(att, cache.held[layer], self.evictable(cache, layer))


class SnapKV(Policy):
    """SnapKV (Li et al. 2024) for the prompt, a sliding window for the rest. When a row's prompt has been
    read, each prompt key is scored by the attention it received from the last `window` prompt queries (the
    observation window), smoothed by an average pool of width `kernel` over neighbouring positions; the
    window's own keys are always kept. As published, every prompt position is pooled, those evicted while
    a prompt longer than the budget slid included (they keep the score they received). SnapKV then decodes
    with what it selected, but our cache is capped during decoding too, so a decode-time rule is needed: the
    victim is the remaining prompt key SnapKV ranked lowest, and once only the window is left of the prompt,
    the oldest token (a sliding window, as in StreamingLLM). A prompt longer than the budget slides (oldest
    out) until it has been read.
    With keep_prompt nothing SnapKV scored may go, so it runs the decode-time form the R-KV paper compares
    with: the victim is the generated key, outside the last `window` positions, to which the last `window`
    queries attend least (see window_importance), average-pooled over neighbouring positions.
    Scaled to our 20-token prompts: window 4 (the published 32-64 are for prompts of thousands of tokens),
    kernel 3 (a token and its two neighbours; published 5-7)."""

    def __init__(self, window=4, kernel=3, keep_prompt=False):
        super().__init__(keep_prompt)
        self.window, self.kernel = window, kernel
        self.scores_prompt = not keep_prompt  # raw window attention per prompt position, then pooled
        self.query_window = window if keep_prompt else 0

    def check(self, budget, seq_len, prompt_len):
        super().check(budget, seq_len, prompt_len)
        check_window("snapkv", self.window, self.kernel, budget - prompt_len if self.keep_prompt else budget)

    def observe(self, cache, layer, q, att):
        if self.keep_prompt:
            return
        B, nh, T, S = att.shape
        P = cache.prompt_lengths[:, None]                                  # (B, 1)
        query_pos = cache.next_pos + torch.arange(T, device=att.device)      # (T,)
        in_window = (query_pos >= P - self.window) & (query_pos < P)       # (B, T)
        received = (att * in_window[:, None, :, None]).sum(2)              # (B, nh, S)
        n_prompt = cache.prompt_scores.shape[-1]
        # by position, so a key keeps its score after eviction; a slot past the prompts received 0 here
        cache.prompt_scores[layer].scatter_add_(-1, cache.held[layer].clamp(0, n_prompt - 1), received)
        read = (query_pos == P - 1).any(-1)                                # (B,) rows whose prompt ends here
        if read.any():  # freeze their scores: the pooled window attention of the prompt keys
            raw = cache.prompt_scores[layer]                               # (B, nh, n_prompt)
            body = torch.arange(n_prompt, device=att.device) < P[:, :, None] - self.window  # (B, 1, n_prompt)
            body_scores = raw.masked_fill(~body, 0.0).reshape(B * nh, 1, n_prompt)
            pooled = F.avg_pool1d(body_scores, self.kernel, stride=1, padding=self.kernel // 2)  # zero-padded
            pooled = pooled.view(B, nh, n_prompt)
            cache.prompt_scores[layer] = torch.where(read[:, None, None], pooled, raw)

    def victim(self, cache, layer):
        pos = cache.held[layer]                                       # (B, nh, S), full: no empty slot
        if self.keep_prompt:
            importance, older = window_importance(cache, layer, self.window)
            pooled = in_position_order(F.avg_pool1d, importance, pos, self.kernel)
            return lowest(pooled, pos, older & self.evictable(cache, layer))
        P = cache.prompt_lengths[:, None, None]                            # (B, 1, 1)
        body = (pos < P - self.window) & (cache.next_pos >= P)               # prompt keys, once scored
        score = cache.prompt_scores[layer].gather(-1, pos.clamp(0, cache.prompt_scores.shape[-1] - 1))
        return torch.where(body.any(-1), lowest(score, pos, body), oldest(pos, pos >= 0))


class RKV(Policy):
    """R-KV (Cai et al. 2025, "Redundancy-aware KV Cache Compression for Reasoning Models"): the last
    `window` tokens (the observation window) are kept; every older key is scored
        mix_lambda * importance - (1 - mix_lambda) * redundancy
    and the lowest goes. Importance: the attention the window's queries give it (window_importance),
    max-pooled over `kernel` neighbouring positions. Redundancy: how similar its key is to the head's other
    keys, a softmax over keys of the mean cosine similarity, where each key's most recent near-duplicate
    (cosine > threshold) is spared that key's similarity, so older repeats go first.
    Where we differ: R-KV decodes into a buffer and compresses every 128 tokens, keeping the top keys at
    once; our cache drops one key per step. The reference code pools and picks "most recent" in cache order,
    which after its first compression is score order; we use position order. When a key has no near-duplicate
    nothing is spared (the code's argmax over zeros spares key 0's entry). mix_lambda 0.1 as in the paper (its
    code defaults to 0.07); window 2 and kernel 3 scaled to our sequences (published 8 and 7, for budgets of
    128 and more)."""

    def __init__(self, window=2, kernel=3, mix_lambda=0.1, threshold=0.5, keep_prompt=False):
        super().__init__(keep_prompt)
        self.window, self.kernel, self.mix_lambda, self.threshold = window, kernel, mix_lambda, threshold
        self.query_window = window

    def check(self, budget, seq_len, prompt_len):
        super().check(budget, seq_len, prompt_len)
        check_window("rkv", self.window, self.kernel, budget - prompt_len if self.keep_prompt else budget)
        if not 0.0 <= self.mix_lambda <= 1.0 or not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"policy 'rkv' needs 0 <= mix_lambda <= 1 and -1 <= threshold <= 1, got "
                             f"mix_lambda={self.mix_lambda}, threshold={self.threshold}")

    def redundancy(self, k, pos):
        """k (B, nh, S, hs), pos (B, nh, S) -> (B, nh, S): softmax over keys of their mean similarity."""
        unit = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
        sim = unit @ unit.transpose(-2, -1)                                # (B, nh, S, S) cosine, row i col j
        sim.diagonal(dim1=-2, dim2=-1).zero_()                             # a key is not its own duplicate
        similar = sim > self.threshold
        newest = pos[:, :, None, :].masked_fill(~similar, -1).argmax(-1, keepdim=True)  # (B, nh, S, 1)
        spared = torch.zeros_like(similar).scatter_(-1, newest, True) & similar  # i's newest near-duplicate
        return torch.where(spared, 0.0, sim).mean(2).softmax(-1)

    def victim(self, cache, layer):
        pos = cache.held[layer]                                       # (B, nh, S), full
        importance, older = window_importance(cache, layer, self.window)
        pooled = in_position_order(F.max_pool1d, importance, pos, self.kernel)
        score = self.mix_lambda * pooled - (1 - self.mix_lambda) * self.redundancy(cache.k[layer], pos)
        return lowest(score, pos, older & self.evictable(cache, layer))


class Random(Policy):
    """Evict a uniformly random key, drawn from the rollout's generator (torch's global one without it):
    reproducible for a seed, and different from one rollout to the next. A baseline with no signal."""

    def victim(self, cache, layer):
        pos, g = cache.held[layer], cache.generator
        device = g.device if g is not None else pos.device
        if not self.keep_prompt:
            return torch.randint(pos.shape[-1], pos.shape[:-1], generator=g, device=device).to(pos.device)
        allowed = self.evictable(cache, layer)                            # (B, nh, S)
        n = allowed.sum(-1)                                                # (B, nh) candidates
        u = torch.rand(pos.shape[:-1], generator=g, device=device).to(pos.device)
        k = (u * n).long().clamp(max=n - 1)                                # the k-th candidate by position
        rank = (pos[..., None, :] < pos[..., :, None]) & allowed[..., None, :]  # (B, nh, S, S): older ones
        return (rank.sum(-1).eq(k[..., None]) & allowed).long().argmax(-1)


POLICIES = {"full": Full, "streaming": Streaming, "h2o": H2O, "tova": TOVA, "snapkv": SnapKV, "rkv": RKV,
            "random": Random}


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
    """What every query could see, stored as the cache's write log: slot_of (L, B, nh, T) int16 is the slot
    that position t's key/value went into (each token is written once, evicting whatever held the slot).
    Query t therefore saw, in each slot, the latest position <= t written there. That is O(T) per layer and
    head, less than the KV cache itself, and the learner expands it one layer at a time:
    shadow_mask.seen(l) (B, nh, T, S) lists those positions in slot order (-1 = empty), for the gather path;
    shadow_mask[l] is the (B, nh, T, T) bool attn_mask, so GPT.forward(attn_mask=shadow_mask) works as is."""

    def __init__(self, slot_of, budget):
        self.slot_of = slot_of
        self.budget = budget

    def __len__(self):
        return self.slot_of.shape[0]

    def seen(self, layer):
        slot_of = self.slot_of[layer]                                      # (B, nh, T)
        T, S = slot_of.shape[-1], self.budget
        t = torch.arange(T, device=slot_of.device, dtype=slot_of.dtype)
        slots = torch.arange(S, device=slot_of.device, dtype=slot_of.dtype)
        went_there = slot_of[..., None] == slots                           # (B, nh, T, S)
        table = torch.where(went_there, t[:, None], -1)                    # position t, in the slot it filled
        return table.cummax(dim=2).values                                  # (B, nh, T, S): latest write <= t

    def __getitem__(self, layer):
        seen = self.seen(layer).long()                                     # (B, nh, T, S)
        T = seen.shape[2]
        visible = torch.zeros(*seen.shape[:3], T + 1, dtype=torch.bool, device=seen.device)
        visible.scatter_(-1, torch.where(seen < 0, T, seen), True)         # empty slots go to a spare column
        return visible[..., :T]                                            # (B, nh, T, T)

    def visible(self):
        """(L, B, nh, T, T) bool: every layer's attn_mask at once."""
        return torch.stack([self[layer] for layer in range(len(self))])

    def truncate(self, T):
        return ShadowMask(self.slot_of[..., :T], self.budget)


class KVCache:
    """A KV cache with a hard capacity of `budget` slots per layer, row and head, preallocated so memory is
    O(budget) whatever the sequence length. All rows advance in lockstep (one position per decode step),
    so `next_pos` is the position of the next token for every row (the cache's clock; GPT.forward advances
    it once per call, after every layer has written). Records the shadow mask of every query.
    prompt_lengths (B,) tells prompt-aware policies (SnapKV, keep_prompt) where each row's prompt ends;
    generator feeds the random policy."""

    def __init__(self, config, batch_size, budget, seq_len, policy, device, dtype, prompt_lengths=None,
                 generator=None):
        L, B, nh, S = config.n_layer, batch_size, config.n_head, budget
        hs = config.n_embd // config.n_head
        self.policy, self.budget, self.generator = policy, budget, generator
        self.prompt_lengths = torch.zeros(B, dtype=torch.long, device=device) if prompt_lengths is None \
            else prompt_lengths.to(device)
        self.k = torch.zeros(L, B, nh, S, hs, device=device, dtype=dtype)
        self.v = torch.zeros(L, B, nh, S, hs, device=device, dtype=dtype)
        # the position each slot holds, -1 when empty
        self.held = torch.full((L, B, nh, S), -1, device=device, dtype=torch.long)
        # what the policy keeps, each only if it needs it: a per-slot attention statistic (H2O: mass received,
        # TOVA: newest query's attention), the last queries (R-KV), a score per prompt position (SnapKV)
        self.slot_scores = None
        if policy.uses_slot_scores:
            self.slot_scores = torch.zeros(L, B, nh, S, device=device, dtype=dtype)
        W = policy.query_window
        self.recent_q = torch.zeros(L, B, nh, W, hs, device=device, dtype=dtype) if W else None
        self.prompt_scores = None
        if policy.scores_prompt:
            n_prompt = max(int(self.prompt_lengths.max()), 1)
            self.prompt_scores = torch.zeros(L, B, nh, n_prompt, device=device, dtype=dtype)
        log_dtype = torch.int16 if seq_len <= torch.iinfo(torch.int16).max else torch.int32  # positions fit
        self.shadow_mask = ShadowMask(torch.zeros(L, B, nh, seq_len, device=device, dtype=log_dtype), budget)
        self.next_pos = 0

    def nbytes(self):
        """Every buffer the cache holds for the policy: keys, values, positions, and the policy's statistics.
        (The shadow mask's write log is O(T), not O(budget), and is counted separately.)"""
        buffers = (self.k, self.v, self.held, self.slot_scores, self.recent_q, self.prompt_scores)
        return sum(t.nbytes for t in buffers if t is not None)

    def update(self, layer, k, v):
        """Store the keys/values k, v (B, nh, T, hs) of the next T tokens, then return this layer's cache
        k, v (B, nh, S, hs) and which slots each new query may see, visible (B, nh, T, S)."""
        T, S, t0 = k.shape[2], self.budget, self.next_pos
        if T > 1:  # prefill: the first tokens go into empty slots 0..T-1, no eviction
            assert t0 == 0 and T <= S, "prefill must start an empty cache and fit in it"
            self.k[layer, :, :, :T] = k
            self.v[layer, :, :, :T] = v
            self.held[layer, :, :, :T] = torch.arange(T, device=k.device)
            self.shadow_mask.slot_of[layer, :, :, :T] = torch.arange(T, device=k.device)  # prefill's log
        else:
            if t0 < S:  # not full yet: every row and head fills slot t0
                slot = torch.full(self.held.shape[1:3], t0, device=k.device, dtype=torch.long)  # (B, nh)
            else:
                slot = self.policy.victim(self, layer)
            index = slot[:, :, None, None]                                 # (B, nh, 1, 1)
            hs_index = index.expand(-1, -1, 1, k.shape[-1])
            self.k[layer].scatter_(2, hs_index, k)
            self.v[layer].scatter_(2, hs_index, v)
            self.held[layer].scatter_(2, index[..., 0], t0)
            if self.slot_scores is not None:
                self.slot_scores[layer].scatter_(2, index[..., 0], 0.0)  # a new token starts with no mass
            self.shadow_mask.slot_of[layer, :, :, t0] = slot               # decode's log
        pos = self.held[layer][:, :, None, :]                         # (B, nh, 1, S)
        query_pos = torch.arange(t0, t0 + T, device=k.device)[:, None]     # (T, 1)
        visible = (pos >= 0) & (pos <= query_pos)                          # (B, nh, T, S)
        return self.k[layer], self.v[layer], visible

    def observe(self, layer, q, att):
        """q (B, nh, T, hs), att (B, nh, T, S): the new queries and their attention, for the policy."""
        if self.recent_q is not None:
            self.recent_q[layer] = torch.cat([self.recent_q[layer], q], 2)[:, :, -self.recent_q.shape[3]:]
        self.policy.observe(self, layer, q, att)

    def advance(self, T):
        """The next T positions have been written in every layer: the clock moves on."""
        self.next_pos += T

# -----------------------------------------------------------------------------
# 4. The sampler


@dataclass
class Rollout:
    tokens: torch.Tensor         # (B, T) long: prompt, response, then padding (eos_id, or 0 without one)
    logprobs: torch.Tensor       # (B, T) float: sampler log-prob of each generated token, 0 elsewhere
    response_mask: torch.Tensor  # (B, T) bool: True on generated tokens (up to and including EOS)
    shadow_mask: ShadowMask      # what every query could see: the cache's write log, (L, B, nh, T)
    kv_bytes: int                # bytes of the cache's buffers: K, V, held positions, the policy's statistics
    full_kv_bytes: int           # the same for a full cache of prompt + max_new_tokens slots (built)


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


def rollout(model, prompts, *, policy, budget, max_new_tokens, temperature=1.0, eos_id=None,
            generator=None, **policy_kwargs):
    """Sample continuations of `prompts` with a KV cache of `budget` slots evicted by `policy`, recording
    the shadow mask. Prompts of different lengths share one layout: row b's prompt is at 0..P_b-1 and its
    response starts right after, so all rows advance one position per step: the tail of a longer prompt is
    fed token by token while shorter rows already sample, and a finished row is fed padding (never scored).
    temperature=0 samples greedily (log-probs are then those of temperature 1)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    prompts, lengths = pad_prompts(prompts, 0 if eos_id is None else eos_id, device)  # (B, P), (B,)
    return decode(model, prompts, lengths, lengths + max_new_tokens, prompts.shape[1] + max_new_tokens,
                  policy, budget, temperature, eos_id, generator, policy_kwargs, forced=False)


def record(model, tokens, prompt_lengths, *, policy, budget, temperature=1.0, eos_id=None, generator=None,
           **policy_kwargs):
    """Teacher forcing through the compressed cache: feed the given sequences (B, T) exactly as rollout()
    would have fed them, had it sampled these tokens, and return the Rollout it would have returned: the
    shadow mask, and the compressed policy's log-probs of the tokens after each row's prompt (up to and
    including its first eos_id). Recording a rollout's own tokens, with the same generator seed, gives back
    its shadow mask and log-probs: one code path (decode) serves both. Uses: the compressed policy's
    likelihood of reference answers, an eviction-aware warm-up, tests."""
    device = next(model.parameters()).device
    if not torch.is_tensor(tokens) or tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError("tokens must be a (B, T) tensor with T >= 2")
    tokens = tokens.long().to(device)
    lengths = torch.as_tensor(prompt_lengths, dtype=torch.long, device=device)
    B, T = tokens.shape
    if lengths.shape != (B,) or lengths.min() < 1 or lengths.max() >= T:
        raise ValueError(f"prompt_lengths must be ({B},) with 1 <= P_b < T = {T}, got {prompt_lengths}")
    return decode(model, tokens, lengths, torch.full_like(lengths, T), T, policy, budget, temperature, eos_id,
                  generator, policy_kwargs, forced=True)


@torch.no_grad()
def decode(model, given, lengths, ends, T, policy, budget, temperature, eos_id, generator, policy_kwargs,
           forced):
    """The one loop under the compressed cache, for rollout() and record(). given (B, >= P): prompts (then
    sampled) or whole sequences (forced); row b generates positions lengths[b] .. ends[b]-1 until its EOS."""
    if isinstance(policy, str):
        policy = make_policy(policy, **policy_kwargs)
    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if T > model.config.block_size:
        raise ValueError(f"sequence length {T} (prompt + response) exceeds block_size "
                         f"{model.config.block_size}")
    B, P = given.shape[0], int(lengths.max())
    policy.check(budget, T, P)
    vocab_size = model.config.vocab_size
    if given.min() < 0 or given.max() >= vocab_size or (eos_id is not None and not 0 <= eos_id < vocab_size):
        raise ValueError(f"tokens and eos_id must lie in [0, vocab_size={vocab_size})")
    device, dtype = given.device, next(model.parameters()).dtype
    pad_id = 0 if eos_id is None else eos_id
    tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    tokens[:, :given.shape[1]] = given
    logprobs = torch.zeros(B, T, dtype=dtype, device=device)
    response_mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache(model.config, B, budget, T, policy, device, dtype, lengths, generator)

    # prefill: the prefix every row shares as prompt, in one parallel pass, as far as the cache holds it
    n_prefill = min(int(lengths.min()), budget)
    logits, _ = model(tokens[:, :n_prefill], cache=cache)
    logits = logits[:, -1]                                                 # (B, vocab): predicts n_prefill
    for t in range(n_prefill, T):
        logp = F.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)  # (B, vocab)
        if temperature == 0:
            sampled = logp.argmax(-1)                                      # (B,)
        else:  # drawn when forced too, so the generator (shared with the random policy) moves the same way
            sampled = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        generating = (t >= lengths) & (t < ends) & ~done                   # each row: its own max_new_tokens
        if not forced:
            tokens[:, t] = torch.where(t < lengths, tokens[:, t], torch.where(generating, sampled, pad_id))
        logprobs[:, t] = torch.where(generating, logp.gather(-1, tokens[:, t:t + 1]).squeeze(-1), 0.0)
        response_mask[:, t] = generating
        if eos_id is not None:
            done |= generating & (tokens[:, t] == eos_id)
        # feed token t (even the last one: every position then has a recorded mask row)
        logits, _ = model(tokens[:, t:t + 1], cache=cache)
        logits = logits[:, -1]
        if not forced and bool((done | (t + 1 >= ends)).all()):
            T = t + 1                                                      # every row has finished
            break

    # a full cache of the same shapes, built on the meta device: its real byte count, nothing allocated
    n_full = given.shape[1] + int((ends - lengths).max()) if not forced else T
    full = KVCache(model.config, B, n_full, n_full, Full(), "meta", dtype)
    return Rollout(tokens[:, :T], logprobs[:, :T], response_mask[:, :T], cache.shadow_mask.truncate(T),
                   cache.nbytes(), full.nbytes())

# -----------------------------------------------------------------------------
# 5-6. The learner


def learner_logits(model, tokens, shadow_mask=None, *, attention="mask"):
    """(B, T, vocab) teacher-forced logits. shadow_mask=None: plain causal attention (the unmasked pass, the
    full-cache policy). A ShadowMask: every query sees exactly what the sampler saw, via attention="mask" (a
    T x T boolean attn_mask per layer) or "gather" (each query gathers its S slots: O(T * S) scores, and after
    model.set_exact() bitwise equal to the sampler on CPU)."""
    if attention not in ("mask", "gather"):
        raise ValueError(f"attention must be 'mask' or 'gather', got {attention!r}")
    if attention == "gather" and shadow_mask is None:
        raise ValueError("attention='gather' needs a ShadowMask")
    if shadow_mask is not None and shadow_mask.slot_of.shape[-1] != tokens.shape[1]:
        raise ValueError(f"shadow_mask covers {shadow_mask.slot_of.shape[-1]} positions, tokens have "
                         f"{tokens.shape[1]}")
    if attention == "gather":
        seen = [shadow_mask.seen(layer) for layer in range(len(shadow_mask))]  # L x (B, nh, T, S)
        logits, _ = model(tokens, seen=seen)
    else:
        logits, _ = model(tokens, attn_mask=shadow_mask)
    return logits


def token_logprobs(logits, tokens, temperature=1.0):
    """logits (B, T, vocab) -> (B, T) log-prob of each token given its prefix; 0 at position 0, which has
    none. Divides by the temperature exactly as rollout() does, so the bits agree."""
    if temperature > 0:
        logits = logits / temperature
    # the logits at t-1 predict token t: the one off-by-one a reader must get right
    logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return F.pad(logp, (1, 0))


def learner_logprobs(model, tokens, shadow_mask=None, *, attention="mask", temperature=1.0):
    """(B, T) differentiable log-probs of `tokens` (see learner_logits); with rollout.shadow_mask they
    reproduce rollout.logprobs on response tokens."""
    logits = learner_logits(model, tokens, shadow_mask, attention=attention)
    return token_logprobs(logits, tokens, temperature)


def kl_divergence(p_logits, q_logits, response_mask, temperature=1.0):
    """Mean over response positions of KL(p || q) = sum_v p (log p - log q), p and q the next-token
    distributions two passes give (logits (B, T, vocab); the logits at t-1 predict token t, so response
    position t weighs the prediction made at t-1). Gradients reach both arguments: detach the one that is
    a fixed target. SMD's distillation, as its authors state it, is KL(pi_dense || sg(pi_masked)), their
    pi_dense being our unmasked pass:
    kl_divergence(unmasked_logits, masked_logits.detach(), response_mask)."""
    t = temperature if temperature > 0 else 1.0
    log_p = F.log_softmax(p_logits[:, :-1] / t, dim=-1)                   # (B, T-1, vocab)
    log_q = F.log_softmax(q_logits[:, :-1] / t, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)                           # (B, T-1)
    weights = response_mask[:, 1:].to(kl.dtype)
    return (kl * weights).sum() / weights.sum().clamp(min=1)
