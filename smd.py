"""
Shadow Mask Distillation, the SMD-specific parts, read top to bottom:
  1. eviction policies: which cache slot to overwrite when the cache is full;
  2. KVCache: `budget` preallocated slots per layer and head, which records the shadow mask as it goes;
  3. ShadowMask: for every layer, row, head and query, the positions that query could see;
  4. rollout(): a real incremental sampler (prefill, then one-token decode steps) under the compressed cache;
  5. learner_logprobs(): teacher-forced log-probs, with the shadow mask injected into attention;
  6. distill_kl(): the KL between the masked (sparse) and the unmasked (dense) pass of the same weights.
The model itself (and the attention arithmetic) lives in model.py; training lives in train.py.
"""

from dataclasses import dataclass

import torch
from torch.nn import functional as F

# -----------------------------------------------------------------------------
# 1. Eviction policies. Each gets the state of one layer's cache, every tensor (B, nh, S):
#    pos (absolute position held by each slot), score (attention mass accumulated since the slot was
#    written), last_att (attention of the newest query), and returns the slot to overwrite, (B, nh) long.
#    It is called only when the cache is full, before the new token is written, so the new token is never
#    a candidate and every score already includes the attention of the previous token.

NEVER = torch.iinfo(torch.long).max  # a "position" so large argmin never picks it


class Full:
    """No eviction: the dense reference. The budget must hold the whole sequence."""

    def check(self, budget, seq_len):
        if budget < seq_len:
            raise ValueError(f"policy 'full' never evicts: budget {budget} must be >= sequence length {seq_len}")

    def victim(self, pos, score, last_att):
        raise AssertionError("a full-budget cache is never full")


class Streaming:
    """StreamingLLM: keep the first n_sink tokens (attention sinks) and a window of the most recent ones."""

    def __init__(self, n_sink=4):
        self.n_sink = n_sink

    def check(self, budget, seq_len):
        if budget <= self.n_sink:
            raise ValueError(f"policy 'streaming' needs budget > n_sink={self.n_sink}, got budget {budget}")

    def victim(self, pos, score, last_att):
        return pos.masked_fill(pos < self.n_sink, NEVER).argmin(-1)   # the oldest non-sink


class H2O:
    """Heavy-Hitter Oracle: keep a window of the n_recent newest tokens (the incoming one included), and
    fill the rest with the tokens that received the most attention so far, per head."""

    def __init__(self, n_recent=4):
        self.n_recent = n_recent

    def check(self, budget, seq_len):
        if self.n_recent < 1 or budget <= self.n_recent:
            raise ValueError(f"policy 'h2o' needs 1 <= n_recent < budget, "
                             f"got n_recent={self.n_recent}, budget {budget}")

    def victim(self, pos, score, last_att):
        newest = pos.max(-1, keepdim=True).values                     # (B, nh, 1)
        recent = pos > newest - (self.n_recent - 1)                    # the incoming token makes n_recent
        return score.masked_fill(recent, float("inf")).argmin(-1)


class TOVA:
    """Token Omission Via Attention: drop the token the newest query attended to least, per head."""

    def check(self, budget, seq_len):
        pass

    def victim(self, pos, score, last_att):
        return last_att.argmin(-1)


class Random:
    """Evict a uniformly random slot, from its own seeded generator (a baseline with no signal)."""

    def __init__(self, seed=0):
        self.generator = torch.Generator().manual_seed(seed)

    def check(self, budget, seq_len):
        pass

    def victim(self, pos, score, last_att):
        return torch.randint(pos.shape[-1], pos.shape[:-1], generator=self.generator).to(pos.device)


POLICIES = {"full": Full, "streaming": Streaming, "h2o": H2O, "tova": TOVA, "random": Random}


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
    mask.slots(l) (B, nh, T, S) lists those positions in slot order (-1 = empty), for the gather path;
    mask[l] is the dense (B, nh, T, T) bool mask, so GPT.forward(mask=shadow_mask) works as is."""

    def __init__(self, written, budget):
        self.written = written
        self.budget = budget

    def __len__(self):
        return self.written.shape[0]

    def slots(self, layer):
        written = self.written[layer]                                      # (B, nh, T)
        T, S = written.shape[-1], self.budget
        positions = torch.arange(T, device=written.device, dtype=written.dtype)
        went_there = written[..., None] == torch.arange(S, device=written.device, dtype=written.dtype)  # (B, nh, T, S)
        table = torch.where(went_there, positions[:, None], -1)            # position t, in the slot it filled
        return table.cummax(dim=2).values                                  # (B, nh, T, S): latest write <= t

    def __getitem__(self, layer):
        slots = self.slots(layer).long()                                   # (B, nh, T, S)
        T = slots.shape[2]
        dense = torch.zeros(*slots.shape[:3], T + 1, dtype=torch.bool, device=slots.device)
        dense.scatter_(-1, torch.where(slots < 0, T, slots), True)         # empty slots land in a spare column
        return dense[..., :T]                                              # (B, nh, T, T)

    def to_dense(self):
        return torch.stack([self[layer] for layer in range(len(self))])    # (L, B, nh, T, T)

    def truncate(self, T):
        return ShadowMask(self.written[..., :T], self.budget)


class KVCache:
    """A KV cache with a hard capacity of `budget` slots per layer, row and head, preallocated so memory is
    O(budget) whatever the sequence length. All rows advance in lockstep (one position per decode step),
    so `length` is the position of the next token for every row. Records the shadow mask of every query."""

    def __init__(self, config, batch_size, budget, seq_len, policy, device, dtype):
        L, B, nh, S = config.n_layer, batch_size, config.n_head, budget
        hs = config.n_embd // config.n_head
        self.policy = policy
        self.k = torch.zeros(L, B, nh, S, hs, device=device, dtype=dtype)
        self.v = torch.zeros(L, B, nh, S, hs, device=device, dtype=dtype)
        self.pos = torch.full((L, B, nh, S), -1, device=device, dtype=torch.long)  # -1 = empty slot
        self.score = torch.zeros(L, B, nh, S, device=device, dtype=dtype)    # attention received (H2O)
        self.last_att = torch.zeros(L, B, nh, S, device=device, dtype=dtype) # newest query's attention (TOVA)
        log_dtype = torch.int16 if seq_len <= torch.iinfo(torch.int16).max else torch.int32  # holds positions too
        self.mask = ShadowMask(torch.zeros(L, B, nh, seq_len, device=device, dtype=log_dtype), budget)
        self.length = 0

    def nbytes(self):
        return self.k.nbytes + self.v.nbytes

    def update(self, layer, k, v):
        """Store the keys/values k, v (B, nh, T, hs) of the next T tokens, then return this layer's cache
        k, v (B, nh, S, hs) and which slots each new query may see, visible (B, nh, T, S)."""
        T, S, t0 = k.shape[2], self.k.shape[3], self.length
        if T > 1:  # prefill: the first tokens go into empty slots 0..T-1, no eviction
            assert t0 == 0 and T <= S, "prefill must start an empty cache and fit in it"
            self.k[layer, :, :, :T] = k
            self.v[layer, :, :, :T] = v
            self.pos[layer, :, :, :T] = torch.arange(T, device=k.device)
            self.mask.written[layer, :, :, :T] = torch.arange(T, device=k.device)
        else:
            if t0 < S:  # not full yet: every row and head fills slot t0
                slot = torch.full(self.pos.shape[1:3], t0, device=k.device, dtype=torch.long)  # (B, nh)
            else:
                slot = self.policy.victim(self.pos[layer], self.score[layer], self.last_att[layer])
            index = slot[:, :, None, None]                                 # (B, nh, 1, 1)
            hs_index = index.expand(-1, -1, 1, k.shape[-1])
            self.k[layer].scatter_(2, hs_index, k)
            self.v[layer].scatter_(2, hs_index, v)
            self.pos[layer].scatter_(2, index[..., 0], t0)
            self.score[layer].scatter_(2, index[..., 0], 0.0)              # a new token starts with no mass
            self.mask.written[layer, :, :, t0] = slot                      # the shadow mask is this log
        pos = self.pos[layer][:, :, None, :]                               # (B, nh, 1, S)
        query_pos = torch.arange(t0, t0 + T, device=k.device)[:, None]     # (T, 1)
        visible = (pos >= 0) & (pos <= query_pos)                          # (B, nh, T, S)
        return self.k[layer], self.v[layer], visible

    def observe(self, layer, att):
        """att (B, nh, T, S): attention probabilities of the new queries, for content-based eviction."""
        self.score[layer] += att.sum(2)
        self.last_att[layer] = att[:, :, -1]

# -----------------------------------------------------------------------------
# 4. The sampler


@dataclass
class Rollout:
    tokens: torch.Tensor         # (B, T) long: prompt, response, then padding (eos_id, or 0 without one)
    logprobs: torch.Tensor       # (B, T) float: sampler log-prob of each generated token, 0 elsewhere
    response_mask: torch.Tensor  # (B, T) bool: True on generated tokens (up to and including EOS)
    mask: ShadowMask             # what every query could see: the cache's write log, (L, B, nh, T)
    kv_bytes: int                # bytes of the preallocated K/V cache
    full_kv_bytes: int           # what a full cache for prompt + max_new_tokens would preallocate


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
            generator=None, exact=False, **policy_kwargs):
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
    cache = KVCache(model.config, B, budget, T, policy, device, logprobs.dtype)

    # prefill: the prefix every row shares as prompt, in one parallel pass, as far as the cache holds it
    n_prefill = min(int(lengths.min()), budget)
    logits, _ = model(tokens[:, :n_prefill], cache=cache, exact=exact)
    logits = logits[:, -1]                                                 # (B, vocab): predicts position n_prefill
    for t in range(n_prefill, T):
        logp = F.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)  # (B, vocab)
        if temperature == 0:
            sampled = logp.argmax(-1)                                      # (B,)
        else:
            sampled = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        generating = (t >= lengths) & ~done                                # rows past their prompt, not finished
        in_prompt = t < lengths
        tokens[:, t] = torch.where(in_prompt, tokens[:, t], torch.where(generating, sampled, pad_id))
        logprobs[:, t] = torch.where(generating, logp.gather(-1, tokens[:, t:t + 1]).squeeze(-1), 0.0)
        response_mask[:, t] = generating
        if eos_id is not None:
            done |= generating & (tokens[:, t] == eos_id)
        # feed token t (even the last one: every position then has a recorded mask row)
        logits, _ = model(tokens[:, t:t + 1], cache=cache, exact=exact)
        logits = logits[:, -1]
        if bool((done | (t + 1 >= lengths + max_new_tokens)).all()):
            T = t + 1                                                      # every row has finished
            break

    full_bytes = cache.nbytes() // budget * (P + max_new_tokens)  # what a full cache would preallocate
    return Rollout(tokens[:, :T], logprobs[:, :T], response_mask[:, :T], cache.mask.truncate(T), cache.nbytes(),
                   full_bytes)

# -----------------------------------------------------------------------------
# 5-6. The learner


def learner_logits(model, tokens, mask=None, *, attention="dense", exact=False):
    """(B, T, vocab) teacher-forced logits. mask=None: plain causal attention (the dense learner).
    mask=ShadowMask: every query sees exactly what the sampler saw, via attention="dense" (a T x T boolean
    mask per layer) or "gather" (each query gathers its S slots: O(T * S) scores, and with exact=True
    bitwise equal to the sampler on CPU)."""
    if attention not in ("dense", "gather"):
        raise ValueError(f"attention must be 'dense' or 'gather', got {attention!r}")
    if attention == "gather" and mask is None:
        raise ValueError("attention='gather' needs a ShadowMask")
    if mask is not None and mask.written.shape[-1] != tokens.shape[1]:
        raise ValueError(f"mask covers {mask.written.shape[-1]} positions, tokens have {tokens.shape[1]}")
    if attention == "gather":
        slots = [mask.slots(layer) for layer in range(len(mask))]          # L x (B, nh, T, S)
        logits, _ = model(tokens, slots=slots, exact=exact)
    else:
        logits, _ = model(tokens, mask=mask, exact=exact)
    return logits


def token_logprobs(logits, tokens, temperature=1.0):
    """logits (B, T, vocab) -> (B, T) log-prob of each token given its prefix; 0 at position 0, which has
    none. Divides by the temperature exactly as rollout() does, so the bits agree."""
    if temperature > 0:
        logits = logits / temperature
    logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return F.pad(logp, (1, 0))


def learner_logprobs(model, tokens, mask=None, *, attention="dense", temperature=1.0, exact=False):
    """(B, T) differentiable log-probs of `tokens` (see learner_logits); with mask=rollout.mask they
    reproduce rollout.logprobs on response tokens."""
    logits = learner_logits(model, tokens, mask, attention=attention, exact=exact)
    return token_logprobs(logits, tokens, temperature)


def distill_kl(student_logits, teacher_logits, response_mask, temperature=1.0):
    """Mean per-token KL(teacher || student) over response positions, the teacher a stop-gradient.
    In SMD the usual pairing is teacher = the dense (unmasked) pass, student = the masked pass of the same
    weights: full-context knowledge flows into the compressed policy. Logits (B, T, vocab); the logits at
    t-1 predict token t, so response position t weighs the prediction made at t-1."""
    t = temperature if temperature > 0 else 1.0
    student = F.log_softmax(student_logits[:, :-1] / t, dim=-1)           # (B, T-1, vocab)
    teacher = F.log_softmax(teacher_logits[:, :-1].detach() / t, dim=-1)
    kl = (teacher.exp() * (teacher - student)).sum(-1)                     # (B, T-1)
    weights = response_mask[:, 1:].to(kl.dtype)
    return (kl * weights).sum() / weights.sum().clamp(min=1)
