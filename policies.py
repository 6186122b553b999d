"""
Eviction policies: which cache slot a new token overwrites once the KV cache is full (smd.KVCache asks).
full, streaming (StreamingLLM), h2o (H2O), tova (TOVA), snapkv (SnapKV, decode-time), rkv (R-KV), random;
make_policy(name, **kwargs) builds one. Not here: the cache itself, the shadow mask, sampling (smd.py).

Adding a policy takes a few lines and no change to the shadow mask, the learner or the equality tests
(whatever a policy evicts, the write log records). TOVA per head, never evicting position 0:

    import policies

    class KeepFirstTOVA(policies.Policy):
        uses_slot_scores = True  # allocate cache.slot_scores, (L, B, nh, S)

        def check(self, budget, seq_len, prompt_len):
            super().check(budget, seq_len, prompt_len)  # keep_prompt's own check
            if budget < 2:
                raise ValueError(f"policy 'keep_first_tova' needs budget >= 2, got {budget}")

        def observe(self, cache, layer, q, att):     # q (B, nh, T, hs), att (B, nh, T, S): the new queries
            cache.slot_scores[layer] = att[:, :, -1]

        def victim(self, cache, layer):
            pos = cache.held[layer]
            return policies.lowest(cache.slot_scores[layer], pos, self.evictable(cache, layer) & (pos != 0))

    policies.POLICIES["keep_first_tova"] = KeepFirstTOVA
"""

import math

import torch
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# The budget S counts the keys a query attends over, its own included. Once the cache is full, each new
# token is written into the slot of a victim that the policy picks per (row, head) from the keys the previous
# query saw, using what that query's attention showed. So a query never sees more than S keys: the published
# rules' "add the new token, attend, drop one", with the drop taken after each query (the published codes
# hold S - 1 keys between steps plus the incoming one).
# A policy has check(budget, seq_len, prompt_len) (ValueError for settings that cannot work),
# observe(cache, layer, q, att) (update its statistic from the new queries) and victim(cache, layer) ->
# (B, nh) slots; a policy that keeps state about the cached keys themselves also has
# write(cache, layer, slot, k), called before the cache writes keys k (B, nh, T, hs) into slot (B, nh, T)
# (prefill: T empty slots; decode: T = 1, the victim's or an empty one). Two rules hold for every policy:
# - keep_prompt=True: no prompt position of a row is ever a victim; the rule chooses among that row's
#   generated tokens only (reasoning RL compresses the trace and keeps the question, as Sparse-RL does).
# - ties in a score go to the oldest position, so the victim never depends on which slot a key is in.

NEVER = torch.iinfo(torch.long).max  # a "position" so large argmin never picks it


def oldest(pos, allowed):
    """(B, nh, S) -> (B, nh): the slot holding the oldest allowed position."""
    return pos.masked_fill(~allowed, NEVER).argmin(-1)


def oldest_first(pos, allowed):
    """(B, nh, S) -> (B, nh, S): the slots of the allowed positions, oldest first, then the others.
    A sort, O(S log S): ranking each key against every other would be an S x S matrix per step."""
    return pos.masked_fill(~allowed, NEVER).argsort(-1)


def lowest(score, pos, allowed):
    """(B, nh, S) -> (B, nh): the slot of the allowed key with the lowest score, the oldest of any tie."""
    score = score.masked_fill(~allowed, float("inf"))
    tied = score == score.min(-1, keepdim=True).values                    # (B, nh, S)
    return oldest(pos, tied & allowed)


def in_position_order(pool, values, order, kernel):
    """Pool values (B, nh, S) over neighbouring keys in position order, not slot order; back in slot order.
    order (B, nh, S): the slots by position (cache.by_position)."""
    B, nh, S = values.shape
    ranked = values.gather(-1, order).reshape(B * nh, 1, S)
    pooled = pool(ranked, kernel, stride=1, padding=kernel // 2).view(B, nh, S)
    return torch.empty_like(values).scatter_(-1, order, pooled)


def key_norm(k):
    """k (..., hs) -> (...,): |k| + 1e-8, so an empty slot's zero key has cosine 0 with every key."""
    return k.norm(dim=-1) + 1e-8


def cosine(a, b):
    """a (..., m, hs), b (..., n, hs) -> (..., m, n): the cosine similarity of every pair of keys."""
    return (a @ b.transpose(-2, -1)) / (key_norm(a)[..., :, None] * key_norm(b)[..., None, :])


def newest_of(pos, allowed):
    """(..., S) -> the slot of the allowed key with the highest position (...,), and whether there is one.
    Positions count from 1 in the max, so a disallowed key (0) never wins over an allowed one."""
    best = ((pos + 1) * allowed).max(-1)
    return best.indices, best.values > 0


def window_importance(cache, layer, window):
    """The attention the last `window` queries give each cached key older than them: a softmax over those
    keys alone, averaged over the window queries (R-KV's and decode-time SnapKV's importance).
    -> importance (B, nh, S), 0 for keys in the window; older (B, nh, S) bool, the keys scored."""
    pos, k = cache.held[layer], cache.k[layer]                             # (B, nh, S), (B, nh, S, hs)
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
    orders_by_position = False  # the slots sorted by position, to pool over neighbours (cache.by_position)
    keeps_key_similarity = False  # R-KV's key similarity per slot (cache.similarity_sum, newest_similar,
    #                               spared_similarity, key_norms)

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

    def write(self, cache, layer, slot, k):
        pass

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
        pos = cache.held[layer]                                            # (B, nh, S)
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
    With keep_prompt nothing SnapKV scored may go, so it runs a decode-time form, the kind the R-KV paper
    compares with: the victim is the generated key, outside the last `window` positions, to which the last
    `window` queries attend least (see window_importance), average-pooled over neighbouring positions as
    SnapKV's paper pools. R-KV's repository max-pools its decode-time SnapKV; we keep SnapKV's own pool.
    Scaled to our 20-token prompts: window 4 (the published 32-64 are for prompts of thousands of tokens),
    kernel 3 (a token and its two neighbours; published 5-7)."""

    def __init__(self, window=4, kernel=3, keep_prompt=False):
        super().__init__(keep_prompt)
        self.window, self.kernel = window, kernel
        self.scores_prompt = not keep_prompt  # raw window attention per prompt position, then pooled
        self.query_window = window if keep_prompt else 0
        self.orders_by_position = keep_prompt

    def check(self, budget, seq_len, prompt_len):
        super().check(budget, seq_len, prompt_len)
        check_window("snapkv", self.window, self.kernel, budget - prompt_len if self.keep_prompt else budget)

    def observe(self, cache, layer, q, att):
        if self.keep_prompt:
            return
        B, nh, T, _ = att.shape                                            # (B, nh, T, S)
        P = cache.prompt_lengths[:, None]                                  # (B, 1)
        query_pos = cache.next_pos + torch.arange(T, device=att.device)    # (T,)
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
        pos = cache.held[layer]                                            # (B, nh, S), full: no empty slot
        if self.keep_prompt:
            importance, older = window_importance(cache, layer, self.window)
            pooled = in_position_order(F.avg_pool1d, importance, cache.by_position[layer], self.kernel)
            return lowest(pooled, pos, older & self.evictable(cache, layer))
        P = cache.prompt_lengths[:, None, None]                            # (B, 1, 1)
        body = (pos < P - self.window) & (cache.next_pos >= P)             # prompt keys, once scored
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
    Where we differ: R-KV's code reads the whole prompt uncompressed and compresses once the sequence outgrows
    the budget, then decodes into a buffer and compresses every 128 tokens, keeping the top keys at once; our
    cache caps every query at the budget, prompt queries included (with keep_prompt the budget holds the
    prompt, so only there do the two agree on the prompt), and drops one key per step. The reference code
    pools and picks "most recent" in cache order, which after its first compression is score order; we use
    position order. When a key has no near-duplicate nothing is spared (the code's argmax over zeros spares
    key 0's entry). mix_lambda 0.1 as in the paper (its code defaults to 0.07); window 2 and kernel 3 scaled
    to our sequences (published 8 and 7, for budgets of 128 and more).
    Cost: the redundancy needs every key's similarity to every other, an S x S matrix per head; recomputed
    at each step it made R-KV's decode O(S^2 * hs) (25-40x streaming's time at S = 128). The cache instead
    keeps four numbers per slot: its key's summed similarity to the others, the slot of its newest
    near-duplicate and their cosine, and its norm; write moves them on as one key leaves and one enters,
    O(S * hs) per step, and the victims are the same. Pooling reads the slots in position order, which the
    cache keeps too (a sort per step cost as much as the rest of the step)."""
    orders_by_position = True
    keeps_key_similarity = True

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

    def redundancy(self, cache, layer):
        """(B, nh, S): softmax over keys j of the mean over keys i of cos(k_i, k_j), each i's newest
        near-duplicate spared. From the state the cache keeps (see write): O(S) per head."""
        newest, spared = cache.newest_similar[layer], cache.spared_similarity[layer]  # (B, nh, S) each
        spared_by_column = torch.zeros_like(spared).scatter_add_(-1, newest.clamp(min=0), spared)  # 0 if none
        return ((cache.similarity_sum[layer] - spared_by_column) / spared.shape[-1]).softmax(-1)

    def key_similarity(self, k, pos):
        """The state, from its definition (the S x S cosine matrix): k (B, nh, S, hs), pos (B, nh, S), -1 =
        empty -> similarity_sum, sum over the other cached keys i of cos(k_i, k_j); newest_similar, the slot
        of key i's newest near-duplicate (cosine > threshold), -1 if none; spared_similarity, their cosine,
        0 if none; each (B, nh, S). Prefill builds the state with it; tests check write against it."""
        sim = cosine(k, k)                                                 # (B, nh, S, S), row i col j
        sim.diagonal(dim1=-2, dim2=-1).zero_()
        not_self = ~torch.eye(pos.shape[-1], dtype=torch.bool, device=pos.device)  # not its own duplicate
        similar = (sim > self.threshold) & not_self & (pos[..., None, :] >= 0) & (pos[..., :, None] >= 0)
        newest, found = newest_of(pos[:, :, None, :], similar)             # (B, nh, S) each
        spared = sim.gather(-1, newest[..., None])[..., 0]
        return sim.sum(2), torch.where(found, newest, -1), torch.where(found, spared, 0.0)

    def write(self, cache, layer, slot, k):
        """Before the cache writes the new keys k (B, nh, T, hs) into `slot` (B, nh, T): move the state on
        by the key that leaves and the one that enters, O(S * hs) per head, not the S x S recomputation.
        A sum adds and subtracts one cosine per step, so it drifts from a recomputation by rounding: over
        tests/test_policy_state.py's rollouts (~50 writes per slot) by <= 3.8e-6 in float32 and 7.1e-15 in
        float64, which there never changed a victim; the slots (newest_similar) agree exactly."""
        state = cache.similarity_sum[layer], cache.newest_similar[layer], cache.spared_similarity[layer]
        total, newest, spared = state                                      # (B, nh, S) each
        if k.shape[2] > 1:  # prefill, into an empty cache: the state from its definition
            for buffer, value in zip(state, self.key_similarity(k, slot)):  # slot s holds position s
                buffer[..., :k.shape[2]] = value
            cache.key_norms[layer, :, :, :k.shape[2]] = key_norm(k)
            return
        pos, keys = cache.held[layer], cache.k[layer]                      # (B, nh, S), (B, nh, S, hs)
        norm = cache.key_norms[layer]                                      # (B, nh, S); empty slots: 1e-8
        staying = (pos >= 0) & (torch.arange(pos.shape[-1], device=pos.device) != slot)  # (B, nh, S)
        leaving = keys.gather(2, slot[..., None].expand_as(k))             # (B, nh, 1, hs)
        dots = keys @ torch.cat([k, leaving], 2).transpose(-2, -1)         # (B, nh, S, 2)
        cos_new, cos_old = (dots / norm[..., None]).unbind(-1)             # (B, nh, S) each
        cos_new = torch.where(staying, cos_new / key_norm(k), 0.0)
        cos_old = cos_old / norm.gather(-1, slot)                          # (0 at empty slots: zero keys)
        total += cos_new - cos_old
        total.scatter_(-1, slot, cos_new.sum(-1, keepdim=True))          # the new key's own column
        norm.scatter_(-1, slot, key_norm(k))
        # the new key is the newest of all: the newest near-duplicate of every key it is similar to
        near_new = (cos_new > self.threshold) & staying
        orphaned = (newest == slot) & staying & ~near_new                  # their newest duplicate leaves
        newest.copy_(torch.where(near_new, slot, newest))
        spared.copy_(torch.where(near_new, cos_new, spared))
        own, found = newest_of(pos, near_new)                              # (B, nh): the new key's own
        own_cos = torch.where(found, cos_new.gather(-1, own[..., None])[..., 0], 0.0)
        newest.scatter_(-1, slot, torch.where(found, own, -1)[..., None])
        spared.scatter_(-1, slot, own_cos[..., None])
        head, i = orphaned.flatten(0, 1).nonzero(as_tuple=True)            # (n,) of B * nh heads, (n,) slots
        if len(i):  # ~1 key per head and step (T = 513, S = 128): recompute their S cosines
            head_keys = keys.flatten(0, 1).index_select(0, head)           # (n, S, hs)
            head_norm = norm.flatten(0, 1).index_select(0, head)           # (n, S)
            n = torch.arange(len(i), device=i.device)
            dots = (head_keys @ head_keys[n, i, :, None])[..., 0]          # (n, S)
            sim = dots / (head_norm * head_norm[n, i, None])
            candidate = (sim > self.threshold) & staying.flatten(0, 1).index_select(0, head)
            candidate[n, i] = False                                        # cos(k_i, every other key)
            latest, found = newest_of(pos.flatten(0, 1).index_select(0, head), candidate)  # (n,)
            newest.flatten(0, 1)[head, i] = torch.where(found, latest, -1)
            spared.flatten(0, 1)[head, i] = torch.where(found, sim.gather(-1, latest[:, None])[:, 0], 0.0)

    def victim(self, cache, layer):
        pos = cache.held[layer]                                            # (B, nh, S), full
        importance, older = window_importance(cache, layer, self.window)
        pooled = in_position_order(F.max_pool1d, importance, cache.by_position[layer], self.kernel)
        score = self.mix_lambda * pooled - (1 - self.mix_lambda) * self.redundancy(cache, layer)
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
        n = allowed.sum(-1)                                               # (B, nh) candidates
        u = torch.rand(pos.shape[:-1], generator=g, device=device).to(pos.device)
        chosen = (u * n).long().clamp(max=n - 1)                           # (B, nh): the chosen-th oldest
        by_age = oldest_first(pos, allowed)                                # (B, nh, S), candidates first
        return by_age.gather(-1, chosen[..., None]).squeeze(-1)


POLICIES = {"full": Full, "streaming": Streaming, "h2o": H2O, "tova": TOVA, "snapkv": SnapKV, "rkv": RKV,
            "random": Random}


def make_policy(name, **policy_kwargs):
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    try:
        return POLICIES[name](**policy_kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments {policy_kwargs} for policy {name!r}: {e}") from None
