"""
Shadow Mask Distillation, the SMD-specific parts, read top to bottom:
  1. ShadowMask: for every layer, row, head and query, the positions that query could see;
  2. KVCache: `budget` preallocated slots per layer and head, which records the shadow mask as it goes;
  3. rollout(): a real incremental sampler (prefill, then one-token decode steps) under the compressed cache;
  4. learner_logprobs(): teacher-forced log-probs, with the shadow mask injected into attention;
  5. kl_divergence(): the KL between two passes (SMD: the unmasked and the masked pass of the same weights).
Which slot a full cache overwrites is policies.py's; the model (and the attention arithmetic) is model.py's;
training is train.py's.
"""

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from policies import Full, make_policy

# -----------------------------------------------------------------------------
# 1-2. The shadow mask and the cache that records it


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

    def attn_masks(self):
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
        # TOVA: newest query's attention), the last queries (R-KV), a score per prompt position (SnapKV), the
        # keys' similarity (R-KV)
        self.slot_scores = None
        if policy.uses_slot_scores:
            self.slot_scores = torch.zeros(L, B, nh, S, device=device, dtype=dtype)
        W = policy.query_window
        self.recent_q = torch.zeros(L, B, nh, W, hs, device=device, dtype=dtype) if W else None
        # R-KV: per slot, its key's summed cosine similarity to the other cached keys, the slot of its
        # newest near-duplicate (-1: none), their cosine and the key's norm, kept up to date by policy.write
        self.similarity_sum = self.newest_similar = self.spared_similarity = self.key_norms = None
        if policy.keeps_key_similarity:
            self.similarity_sum = torch.zeros(L, B, nh, S, device=device, dtype=dtype)
            self.newest_similar = torch.full((L, B, nh, S), -1, device=device, dtype=torch.long)
            self.spared_similarity = torch.zeros(L, B, nh, S, device=device, dtype=dtype)
            self.key_norms = torch.full((L, B, nh, S), 1e-8, device=device, dtype=dtype)  # |k| + 1e-8
        # the slots sorted by position (empty ones first), kept as each write moves its slot to the back
        # (the newest position): a sort per step would cost R-KV as much as the rest of its decode step
        self.by_position = None
        if policy.orders_by_position:
            self.by_position = torch.arange(S, device=device).expand(L, B, nh, S).clone()
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
        buffers = (self.k, self.v, self.held, self.slot_scores, self.recent_q, self.prompt_scores,
                   self.similarity_sum, self.newest_similar, self.spared_similarity, self.key_norms,
                   self.by_position)
        return sum(t.nbytes for t in buffers if t is not None)

    def update(self, layer, k, v):
        """Store the keys/values k, v (B, nh, T, hs) of the next T tokens, then return this layer's cache
        k, v (B, nh, S, hs) and which slots each new query may see, visible (B, nh, T, S)."""
        T, S, t0 = k.shape[2], self.budget, self.next_pos
        # one storage dtype: under autocast a model's values can come out bf16 and its keys float32 (RoPE's
        # float32 cos/sin promote them), and scatter_ takes no mixed dtypes; a no-op when k, v are in it
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if T > 1:  # prefill: the first tokens go into empty slots 0..T-1, no eviction
            assert t0 == 0 and T <= S, "prefill must start an empty cache and fit in it"
            self.policy.write(self, layer, torch.arange(T, device=k.device).expand(*k.shape[:2], T), k)
            self.k[layer, :, :, :T] = k
            self.v[layer, :, :, :T] = v
            self.held[layer, :, :, :T] = torch.arange(T, device=k.device)
            self.shadow_mask.slot_of[layer, :, :, :T] = torch.arange(T, device=k.device)  # prefill's log
            if self.by_position is not None:  # the empty slots T.., then 0..T-1
                self.by_position[layer] = torch.arange(S, device=k.device).roll(-T)
        else:
            if t0 < S:  # not full yet: every row and head fills slot t0
                slot = torch.full(self.held.shape[1:3], t0, device=k.device, dtype=torch.long)  # (B, nh)
            else:
                slot = self.policy.victim(self, layer)
            self.policy.write(self, layer, slot[:, :, None], k)             # first: it reads the leaving key
            index = slot[:, :, None, None]                                 # (B, nh, 1, 1)
            hs_index = index.expand(-1, -1, 1, k.shape[-1])
            self.k[layer].scatter_(2, hs_index, k)
            self.v[layer].scatter_(2, hs_index, v)
            self.held[layer].scatter_(2, index[..., 0], t0)
            if self.slot_scores is not None:
                self.slot_scores[layer].scatter_(2, index[..., 0], 0.0)    # a new token starts with no mass
            self.shadow_mask.slot_of[layer, :, :, t0] = slot               # decode's log
            if self.by_position is not None:
                self.by_position[layer] = move_to_back(self.by_position[layer], slot[:, :, None])
        pos = self.held[layer][:, :, None, :]                              # (B, nh, 1, S)
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


def move_to_back(order, slot):
    """order (B, nh, S), a permutation of the slots; slot (B, nh, 1) -> that order with slot moved last."""
    j = torch.arange(order.shape[-1], device=order.device)
    at = (order == slot).int().argmax(-1, keepdim=True)                     # (B, nh, 1): where slot is now
    moved = order.gather(-1, (j + (j >= at)).clamp(max=order.shape[-1] - 1))  # those after it move up one
    moved[..., -1:] = slot
    return moved

# -----------------------------------------------------------------------------
# 3. The sampler


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
    return generate(model, prompts, lengths, ends=lengths + max_new_tokens,
                    seq_len=prompts.shape[1] + max_new_tokens, policy=policy, budget=budget,
                    temperature=temperature, eos_id=eos_id, generator=generator, policy_kwargs=policy_kwargs,
                    forced=False)


def record(model, tokens, prompt_lengths, *, policy, budget, temperature=1.0, eos_id=None, generator=None,
           **policy_kwargs):
    """Teacher forcing through the compressed cache: feed the given sequences (B, T) exactly as rollout()
    would have fed them, had it sampled these tokens, and return the Rollout it would have returned: the
    shadow mask, and the compressed policy's log-probs of the tokens after each row's prompt (up to and
    including its first eos_id). Recording a rollout's own tokens, with the same generator seed, gives back
    its shadow mask and log-probs: one code path (generate) serves both. Uses: the compressed policy's
    likelihood of reference answers, an eviction-aware warm-up, tests."""
    device = next(model.parameters()).device
    if not torch.is_tensor(tokens) or tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError("tokens must be a (B, T) tensor with T >= 2")
    tokens = tokens.long().to(device)
    lengths = torch.as_tensor(prompt_lengths, dtype=torch.long, device=device)
    B, T = tokens.shape
    if lengths.shape != (B,) or lengths.min() < 1 or lengths.max() >= T:
        raise ValueError(f"prompt_lengths must be ({B},) with 1 <= P_b < T = {T}, got {prompt_lengths}")
    return generate(model, tokens, lengths, ends=torch.full_like(lengths, T), seq_len=T, policy=policy,
                    budget=budget, temperature=temperature, eos_id=eos_id, generator=generator,
                    policy_kwargs=policy_kwargs, forced=True)


@torch.no_grad()
def generate(model, given, lengths, *, ends, seq_len, policy, budget, temperature, eos_id, generator,
             policy_kwargs, forced):
    """The one loop under the compressed cache, for rollout() and record(). given (B, >= P): prompts (then
    sampled) or whole sequences (forced); row b generates positions lengths[b] .. ends[b]-1 until its EOS,
    within seq_len positions in all (the Rollout is cut to where the last row finished)."""
    T = seq_len
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
    T_used = T  # the positions that hold tokens: fewer when every row finished early
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
            T_used = t + 1                                                 # every row has finished
            break

    # a full cache of the same shapes, built on the meta device: its real byte count, nothing allocated
    n_full = given.shape[1] + int((ends - lengths).max()) if not forced else T
    full = KVCache(model.config, B, n_full, n_full, Full(), "meta", dtype)
    return Rollout(tokens[:, :T_used], logprobs[:, :T_used], response_mask[:, :T_used],
                   cache.shadow_mask.truncate(T_used), cache.nbytes(), full.nbytes())

# -----------------------------------------------------------------------------
# 4-5. The learner


def check_attention(attention):
    if attention not in ("mask", "gather"):
        raise ValueError(f"learner attention must be 'mask' or 'gather', got {attention!r}")


def learner_logits(model, tokens, shadow_mask=None, *, attention="mask"):
    """(B, T, vocab) teacher-forced logits. shadow_mask=None: plain causal attention (the unmasked pass, the
    full-cache policy). A ShadowMask: every query sees exactly what the sampler saw, via attention="mask" (a
    T x T boolean attn_mask per layer) or "gather" (each query gathers its S slots: O(T * S) scores, and after
    model.set_exact() bitwise equal to the sampler on CPU)."""
    check_attention(attention)
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
