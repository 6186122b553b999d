"""
Shadow Mask Distillation on Hugging Face causal LMs (transformers 5.x): the two hooks SMD needs, both
through transformers' AttentionInterface, so any model whose attention calls that interface (GPT-2, Llama,
Qwen3, Mistral, ...) gets them without a change to its modeling file:
  1. the sampler: rollout() / record() run smd.py's own loop (prefill, one-token decode, EOS, the write
     log) with the cache of smd.KVCache, `budget` slots per layer and KV head, evicted by a policies.py
     policy; the attention over the slots, and the statistics the policy keeps, come from the same
     attention function, with the model's true position ids (learned or RoPE);
  2. the learner: learner_logits(model, tokens, shadow_mask) injects the recorded mask per layer (its
     module.layer_idx) as a -inf bias before the library's own sdpa or eager attention; without a mask the
     call is exactly the model's own causal forward.
Grouped-query attention: the cache, the eviction and the write log are per KV head (which is what a GQA
cache stores); a policy's statistic for a KV head is the mean over the query heads that share it (see
group_mean). Never silently wrong: a model whose attention does not go through the interface is refused up
front, and every hooked forward checks that the hook ran once in every layer (the sampler also that the cache
was written), so a family whose decoder layers drop the extra keyword arguments (StableLM) is refused in one
line instead of sampling from a cache nobody filled; a shadow mask of another model's or batch's shape, and a
padding mask under the shadow mask, are refused too (rows are laid out as smd.py lays them: prompt from
position 0, padding on the right; hf/trl_smd.py converts TRL's left-padded batches to it).
Not here: the policies (policies.py), the loop and the Rollout (smd.py), training (grpo.py, trl_smd.py),
HF's own Cache classes and generate() (an evicting cache's visibility differs per KV head, which HF's
one-mask-per-row Cache API cannot say), flash/flex/paged kernels (README.md says what blocks them).
"""

import copy
import math
import sys
from types import SimpleNamespace

import torch
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

import smd
from model import attend_slots
from policies import make_policy

SDPA, EAGER = "smd_sdpa", "smd_eager"  # the attn_implementation names this module registers


def group_mean(x, n_kv):
    """(B, nh, ...) per query head -> (B, n_kv, ...): the mean over the nh / n_kv query heads that share each
    KV head (HF's layout: query head h reads KV head h // (nh / n_kv)). A GQA policy statistic, per KV head,
    is that of the group's average query; with nh = n_kv it is the statistic itself, bit for bit."""
    B, nh = x.shape[:2]
    return x.view(B, n_kv, nh // n_kv, *x.shape[2:]).mean(2)


def per_query_head(x, nh):
    """(B, n_kv, ...) -> (B, nh, ...): each KV head's tensor repeated for its query heads (HF's repeat_kv)."""
    return x.repeat_interleave(nh // x.shape[1], dim=1)


def sample_over_slots(module, query, key, value, scaling, cache):
    """The sampler's attention: store the new keys/values in the cache (evicting), attend over its S slots,
    let the policy observe. query (B, nh, T, hs), key/value (B, n_kv, T, hs) -> (B, T, nh, hs)."""
    B, nh, T, hs = query.shape
    n_kv = key.shape[1]
    # the cache after writing the new tokens (B, n_kv, S, hs) x2, and what each query sees (B, n_kv, T, S)
    k_slots, v_slots, visible = cache.update(module.layer_idx, key, value)
    if scaling != 1 / math.sqrt(hs):  # attend_slots scales by 1/sqrt(hs); a model may have its own scale
        query = query * (scaling * math.sqrt(hs))
    k, v = (per_query_head(x, nh).unsqueeze(2) for x in (k_slots, v_slots))  # (B, nh, 1, S, hs) each
    y, att = attend_slots(query, k, v, per_query_head(visible, nh))   # (B, nh, T, hs), (B, nh, T, S)
    # the policy sees each KV head's group: its mean attention, and every query of the group (time-major, so
    # the cache's window of query_window = g * window rows is the last `window` steps of all g heads)
    group_q = query.view(B, n_kv, nh // n_kv, T, hs).transpose(2, 3)          # (B, n_kv, T, g, hs)
    group_q = group_q.reshape(B, n_kv, -1, hs)                                # (B, n_kv, T * g, hs)
    cache.observe(module.layer_idx, group_q, group_mean(att, n_kv))
    return y.transpose(1, 2), None                                     # HF's layout: (B, T, nh, hs)


def padding_free(attention_mask):
    """HF's 4D mask (B, 1, T, S) as an attention function gets it (None, bool with True = attend, or float
    with 0 = attend): True when it is plain causal, i.e. it masks no padding."""
    if attention_mask is None:
        return True
    T, S = attention_mask.shape[-2:]
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    causal = torch.ones(T, S, dtype=torch.bool, device=allowed.device).tril(S - T)
    return bool((allowed == causal).all())


def smd_attention(base, module, query, key, value, attention_mask, scaling=None, dropout=0.0, smd_cache=None,
                  smd_mask=None, smd_reached=None, **kwargs):
    """The one attention function behind SDPA and EAGER. smd_cache (an smd.KVCache): the sampler.
    smd_mask (a ShadowMask, or (L, B, n_kv, T, T) bool): the learner under the mask. Neither: `base`, the
    library's own attention, called with exactly what the model passed. smd_reached (a list): each layer
    that got here appends its index, for the caller to check that no layer was skipped."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if smd_cache is None and smd_mask is None:
        return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if smd_reached is not None:
        smd_reached.append(module.layer_idx)
    for name in ("sliding_window", "softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:  # each changes what a query sees or how: the slots would not say it
            raise ValueError(f"hf does not support attention with {name} (layer {module.layer_idx})")
    if smd_cache is not None:
        if dropout:  # a config's attention_dropout, applied in training mode
            raise ValueError("sampling with dropout on: call model.eval() (the learner could not follow it)")
        return sample_over_slots(module, query, key, value, scaling, smd_cache)
    # the shadow mask replaces HF's causal mask: it is a subset of it (no query sees a later position), and
    # our layout has no left padding (each row's prompt starts at position 0); a padding mask would be dropped
    if not padding_free(attention_mask):
        raise ValueError("smd_mask with a padding attention_mask: lay rows out as smd.py does (prompt "
                         "from position 0, padding on the right), no attention_mask (as trl_smd.py does)")
    visible = per_query_head(smd_mask[module.layer_idx], query.shape[1])  # (B, nh, T, T) bool
    bias = torch.zeros(visible.shape, dtype=query.dtype, device=query.device)
    bias = bias.masked_fill(~visible, float("-inf"))                   # <- the shadow mask enters here
    return base(module, query, key, value, bias, scaling=scaling, dropout=dropout, **kwargs)


def sdpa(module, *args, **kwargs):
    return smd_attention(sdpa_attention_forward, module, *args, **kwargs)


def eager(module, *args, **kwargs):
    # transformers writes eager attention once per modeling file (GPT-2's, Llama's with repeat_kv, ...)
    base = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if base is None:
        raise ValueError(f"{type(module).__name__} has no eager_attention_forward in its modeling file: "
                         f"use attention='sdpa'")
    return smd_attention(base, module, *args, **kwargs)


AttentionInterface.register(SDPA, sdpa)
AttentionInterface.register(EAGER, eager)
# without these, transformers builds no causal mask for an unknown name (eager would then see the future)
AttentionMaskInterface.register(SDPA, sdpa_mask)
AttentionMaskInterface.register(EAGER, eager_mask)

# -----------------------------------------------------------------------------
# models


def from_config(config, attention="sdpa", dtype=torch.float32):
    """A random-init causal LM from a transformers config, with SMD's attention ("sdpa" or "eager"). The
    config is copied first: from_config(attn_implementation=...) writes into the object it is given."""
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention must be 'sdpa' or 'eager', got {attention!r}")
    config = copy.deepcopy(config)
    name = SDPA if attention == "sdpa" else EAGER
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    except (KeyError, ValueError) as e:  # Falcon: a bare KeyError; Bloom, MPT: "does not support ... sdpa"
        first_line = str(e).splitlines()[0][:80]
        raise ValueError(f"transformers cannot build {config.model_type!r} with a registered attention "
                         f"function ({type(e).__name__}: {first_line}): hf cannot hook it") from e
    check_model(model)
    return model.to(dtype)


def unwrap(model):
    """The Hugging Face model inside a DistributedDataParallel (or any wrapper that keeps it as .module)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model


def check_model(model):
    """Refuse, up front, a model the hooks would not reach: loaded with another attention, or a family whose
    attention does not call AttentionInterface (transformers marks it _supports_attention_backend=False)."""
    model = unwrap(model)
    impl = model.config._attn_implementation
    if impl not in (SDPA, EAGER):
        raise ValueError(f"the model's attn_implementation is {impl!r}; load it with attn_implementation="
                         f"hf.SDPA or hf.EAGER (or use hf.from_config) so the sampler and learner hooks run")
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{type(model).__name__}'s attention does not go through transformers' "
                         f"AttentionInterface: hf's hooks would never run in it")


def check_reached(model, reached, what):
    """After one hooked forward: the hook ran exactly once in every layer, or the model is refused (its
    decoder layers do not pass attention keyword arguments on: the cache or mask would be ignored)."""
    model = unwrap(model)
    L = model.config.num_hidden_layers
    if sorted(reached) != list(range(L)):
        raise ValueError(f"{type(model).__name__}: SMD's attention hook ran in layers {sorted(reached)} of "
                         f"0..{L - 1} during {what}: its decoder layers do not pass attention kwargs on")


class Sampler(nn.Module):
    """A Hugging Face causal LM seen as smd.generate() sees our GPT: `config` with the cache's sizes (per KV
    head), and forward(idx, cache) -> (logits, None) for the next tokens at positions cache.next_pos, ...
    Every row is at the same position (smd.py's layout), so one row of position ids serves the batch."""

    def __init__(self, model):
        super().__init__()
        check_model(model)
        if model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
            raise ValueError("sampling with dropout on: call model.eval() (the learner could not follow it)")
        self.model = model
        c = model.config
        n_head = c.num_attention_heads
        n_kv = getattr(c, "num_key_value_heads", None) or n_head
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_head
        self.group = n_head // n_kv
        self.config = SimpleNamespace(n_layer=c.num_hidden_layers, n_head=n_kv, n_embd=n_kv * head_dim,
                                      vocab_size=c.vocab_size, block_size=c.max_position_embeddings)

    def forward(self, idx, cache):
        T = idx.shape[1]
        position_ids = torch.arange(cache.next_pos, cache.next_pos + T, device=idx.device)[None]  # (1, T)
        reached = []
        logits = self.model(input_ids=idx, position_ids=position_ids, use_cache=False, smd_cache=cache,
                            smd_reached=reached).logits
        check_reached(self.model, reached, "sampling")
        last = cache.next_pos + T - 1  # the newest position: every layer, row and KV head holds it now
        if not (cache.held == last).any(-1).all():                         # (L, B, n_kv) -> one bool
            raise ValueError(f"{type(self.model).__name__}: the evicting cache was not written in every "
                             f"layer")
        cache.advance(T)
        return logits, None


def grouped_policy(policy, group, policy_kwargs):
    """The policy, with room in the cache for the last `window` queries of every query head of a group."""
    policy = make_policy(policy, **policy_kwargs) if isinstance(policy, str) else copy.copy(policy)
    policy.query_window *= group
    return policy


def check_not_left_padded(model, tokens):
    """A (B, T) tensor whose first column holds the pad token looks left-padded, and every token of a tensor
    counts as prompt: refuse it rather than sample from padding."""
    pad_id = getattr(unwrap(model).config, "pad_token_id", None)  # some configs (CodeGen) have none
    if pad_id is None or not torch.is_tensor(tokens) or tokens.dim() != 2:
        return  # nothing to tell padding by, or not a tensor (lists carry their own lengths)
    if (tokens[:, 0] == pad_id).any():
        raise ValueError(f"a row starts with pad_token_id {pad_id}: left padding would count as prompt; "
                         f"pass the prompts as a list of token lists (each its own length)")


def check_shadow_mask(model, tokens, shadow_mask):
    """The mask must be this model's (layers, KV heads) and these tokens' (rows, length): no broadcasting."""
    c = unwrap(model).config
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    want = (c.num_hidden_layers, tokens.shape[0], n_kv, tokens.shape[1])
    if isinstance(shadow_mask, smd.ShadowMask):
        got = tuple(shadow_mask.slot_of.shape)
    elif torch.is_tensor(shadow_mask) and shadow_mask.dtype == torch.bool and shadow_mask.dim() == 5:
        got, want = tuple(shadow_mask.shape), want + (tokens.shape[1],)   # (L, B, n_kv, T, T)
    else:
        raise ValueError("shadow_mask must be a ShadowMask or an (L, B, n_kv, T, T) bool tensor")
    if got != want:
        raise ValueError(f"shadow_mask (layers, rows, KV heads, positions) is {got}; the model and tokens "
                         f"need {want}")

# -----------------------------------------------------------------------------
# the two hooks: sampler and learner


def rollout(model, prompts, *, policy, budget, max_new_tokens, temperature=1.0, eos_id=None, generator=None,
            **policy_kwargs):
    """smd.rollout on a Hugging Face model (same arguments, same smd.Rollout): sample under a cache of
    `budget` slots per layer and KV head, recording the write log, shadow_mask.slot_of (L, B, n_kv, T)."""
    sampler = Sampler(model)
    check_not_left_padded(model, prompts)
    return smd.rollout(sampler, prompts, policy=grouped_policy(policy, sampler.group, policy_kwargs),
                       budget=budget, max_new_tokens=max_new_tokens, temperature=temperature, eos_id=eos_id,
                       generator=generator)


def record(model, tokens, prompt_lengths, *, policy, budget, temperature=1.0, eos_id=None, generator=None,
           **policy_kwargs):
    """smd.record on a Hugging Face model: the given sequences (B, T) fed through the compressed cache."""
    sampler = Sampler(model)
    check_not_left_padded(model, tokens)
    policy = grouped_policy(policy, sampler.group, policy_kwargs)
    return smd.record(sampler, tokens, prompt_lengths, policy=policy, budget=budget, temperature=temperature,
                      eos_id=eos_id, generator=generator)


def learner_logits(model, tokens, shadow_mask=None):
    """(B, T, vocab) teacher-forced logits. shadow_mask=None: the model's own causal forward (the unmasked
    pass). A ShadowMask from rollout() (or any (L, B, n_kv, T, T) bool tensor): every query of layer l sees,
    per KV head, exactly the positions shadow_mask[l] lets it see."""
    check_model(model)
    if shadow_mask is None:
        return model(input_ids=tokens, use_cache=False).logits
    check_shadow_mask(model, tokens, shadow_mask)
    reached = []
    logits = model(input_ids=tokens, use_cache=False, smd_mask=shadow_mask, smd_reached=reached).logits
    check_reached(model, reached, "the masked learner pass")
    return logits


def learner_logprobs(model, tokens, shadow_mask=None, temperature=1.0):
    """(B, T) differentiable log-probs of tokens (see learner_logits); with a rollout's shadow_mask they
    reproduce its logprobs on response tokens."""
    return smd.token_logprobs(learner_logits(model, tokens, shadow_mask), tokens, temperature)
