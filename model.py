"""
A small GPT (nanoGPT-sized: pre-LayerNorm blocks, learned absolute positions, tied embeddings) whose
attention is written out by hand, so a reader can see exactly where a visibility mask enters.

Attention runs in one of three ways (see CausalSelfAttention.forward):
  mask    scores for every (query, key) pair, then a boolean attn_mask (B, nh, T, T); causal if none is given;
  gather  each query gathers only the keys/values it saw, their positions in slot order (seen, (B, nh, T, S));
  cached  new tokens attend over a KV cache of S slots (prefill: a few tokens at once; decode: one).
Gather and cached share one function, `attend_slots`, so their arithmetic is identical. This file knows
nothing about eviction: the cache (smd.KVCache, asking a policies.py policy) decides what is kept and
records the shadow mask.
The bitwise mode lives in one place: GPT.set_exact() makes every Linear batch-invariant (see Linear).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

GATHER_CHUNK = 64  # queries per chunk on the gather path; its transient memory is ~ chunk * S * hs per head


@dataclass
class GPTConfig:
    block_size: int = 128  # longest sequence (prompt + response) the model can see
    vocab_size: int = 32
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # must be 0 when learner log-probs should equal sampler log-probs
    bias: bool = True

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class Linear(nn.Linear):
    """nn.Linear, optionally batch-invariant. With exact=True (set for the whole model by GPT.set_exact) every
    row is its own 1-row matmul (a batched bmm) on a 64-byte aligned copy, so a row's result depends neither
    on how many rows share the call nor on where the row sits: BLAS picks its kernel, and so its summation
    order, by the row count (B rows in a decode step, B*T in the learner) and by alignment, which changes the
    last bits. Off by default: it is slower."""
    exact = False

    def forward(self, x):
        if not self.exact:
            return F.linear(x, self.weight, self.bias)
        # zeros pad each row to a multiple of 16 values, so every row starts 64-byte aligned: BLAS treats an
        # unaligned start apart, which sums a row of odd width (C_in = 35) in another order at another offset
        pad = -x.shape[-1] % 16
        rows = F.pad(x, (0, pad)).reshape(-1, 1, x.shape[-1] + pad)      # (N, 1, C_in + pad), aligned rows
        weight = F.pad(self.weight, (0, pad)).t().expand(rows.shape[0], -1, -1)  # (N, C_in + pad, C_out)
        y = torch.bmm(rows, weight).reshape(*x.shape[:-1], -1)             # (..., C_out)
        return y if self.bias is None else y + self.bias


def attend_slots(q, k, v, visible):
    """Attention of each query over its own S key/value slots.
    q (B, nh, T, hs); k, v (B, nh, T or 1, S, hs); visible (B, nh, T, S) bool
    -> y (B, nh, T, hs), att (B, nh, T, S).
    Written with elementwise products and sums (not matmuls) so the result for one query is the same whether
    it is computed alone (a decode step) or among T queries (the learner): the basis of bitwise equality."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    att = (q.unsqueeze(-2) * k).sum(-1) * scale                            # (B, nh, T, S)
    att = att.masked_fill(~visible, float("-inf"))
    att = F.softmax(att, dim=-1)
    y = (att.unsqueeze(-1) * v).sum(-2)                                    # (B, nh, T, hs)
    return y, att


def attend_gathered(q, k, v, seen):
    """The gather path: q, k, v (B, nh, T, hs), seen (B, nh, T, S) -> y (B, nh, T, hs). Queries go in
    chunks, and each chunk's gathered keys/values are rebuilt during backward instead of kept (see
    GatheredAttention), so memory is O(T * S), not O(T * S * hs) nor O(T^2). Per-query arithmetic is
    unchanged."""
    k, v = k.contiguous(), v.contiguous()                                 # so gather_at's rows are views
    ys = [GatheredAttention.apply(q[:, :, i:i + GATHER_CHUNK], k, v, seen[:, :, i:i + GATHER_CHUNK])
          for i in range(0, q.shape[2], GATHER_CHUNK)]
    return torch.cat(ys, dim=2)


class GatheredAttention(torch.autograd.Function):
    """One chunk of the gather path, q (B, nh, Tc, hs), k, v (B, nh, T, hs), seen (B, nh, Tc, S) -> y. Forward
    is attend_slots on the gathered keys and values, the sampler's arithmetic bit for bit, and keeps only the
    attention probabilities att (B, nh, Tc, S). Backward gathers k_g, v_g again (as checkpointing would) and
    writes the gradients out instead of replaying the forward under autograd, which is 1.5x faster:
        y = sum_s att_s v_s,  att = softmax(q . k_s / sqrt(hs))
        dv_s = att_s dy,  datt_s = dy . v_s,  dscore_s = att_s (datt_s - sum_s' att_s' datt_s') / sqrt(hs)
        dq = sum_s dscore_s k_s,  dk_s = dscore_s q
    and dk_s, dv_s are added to the positions the slots held (0 for an invisible slot: its att is 0)."""

    @staticmethod
    def forward(ctx, q, k, v, seen):
        y, att = attend_slots(q, gather_at(k, seen), gather_at(v, seen), seen >= 0)
        ctx.save_for_backward(q, k, v, seen, att)
        return y

    @staticmethod
    def backward(ctx, dy):                                                 # dy (B, nh, Tc, hs)
        q, k, v, seen, att = ctx.saved_tensors
        k_g, v_g = gather_at(k, seen), gather_at(v, seen)                  # (B, nh, Tc, S, hs)
        datt = (v_g @ dy[..., None])[..., 0]                               # (B, nh, Tc, S)
        dscore = att * (datt - (att * datt).sum(-1, keepdim=True)) / math.sqrt(q.shape[-1])
        dq = (dscore[..., None, :] @ k_g)[..., 0, :]                       # (B, nh, Tc, hs)
        dk = add_at(dscore[..., None] * q[..., None, :], seen, k.shape)    # (B, nh, T, hs)
        dv = add_at(att[..., None] * dy[..., None, :], seen, v.shape)
        return dq, dk, dv, None


def rows_at(seen, T):
    """seen (B, nh, Tq, S) -> the row of each slot's position in a (B * nh * T, hs) view of (B, nh, T, hs);
    an empty slot (-1) reads position 0."""
    B, nh = seen.shape[:2]
    head = torch.arange(B * nh, device=seen.device).view(B, nh, 1, 1)
    return (head * T + seen.clamp(min=0).long()).view(-1)


def gather_at(x, seen):
    """x (B, nh, T, hs), seen (B, nh, Tq, S) the positions each query's slots held (-1 = empty) ->
    (B, nh, Tq, S, hs): query row i gets the keys (or values) at those positions, in slot order. Empty slots
    read position 0; the caller masks them out. Whole rows of hs values are selected (index_select), not
    element by element (gather): 2-3x faster on CPU."""
    B, nh, T, hs = x.shape
    return x.reshape(B * nh * T, hs).index_select(0, rows_at(seen, T)).view(*seen.shape, hs)


def add_at(grad, seen, shape):
    """gather_at's transpose: grad (B, nh, Tq, S, hs) added to the positions seen held -> (B, nh, T, hs)."""
    B, nh, T, hs = shape
    out = grad.new_zeros(B * nh * T, hs).index_add_(0, rows_at(seen, T), grad.reshape(-1, hs))
    return out.view(shape)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, seen=None, cache=None, layer=0, fused=False):
        """x (B, T, C). At most one of: attn_mask (B, nh, T, T) bool, True = may attend; seen (B, nh, T, S),
        the positions each query's slots held (gather); cache (smd.KVCache). None of them:
        plain causal attention. fused: the mask path through torch's scaled_dot_product_attention, the same
        math in another summation order and ~4x faster on CPU at T = 512: for the warm-up, which need not
        reproduce a sampler's log-probs."""
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)                           # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)                           # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)                           # (B, nh, T, hs)

        if cache is not None:
            # the cache stores the new keys/values (evicting if full) and says which slots each query sees
            k_slots, v_slots, visible = cache.update(layer, k, v)         # (B, nh, S, hs) x2, (B, nh, T, S)
            y, att = attend_slots(q, k_slots.unsqueeze(2), v_slots.unsqueeze(2), visible)
            cache.observe(layer, q, att)                                   # the policy's statistics
        elif seen is not None:
            y = attend_gathered(q, k, v, seen)
        elif fused:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None)
        else:
            if attn_mask is None:
                attn_mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))         # (B, nh, T, T)
            att = att.masked_fill(~attn_mask, float("-inf"))                # <- the shadow mask enters here
            att = F.softmax(att, dim=-1)
            y = self.attn_dropout(att) @ v                                 # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                   # re-assemble heads
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, **attn_kwargs):
        x = x + self.attn(self.ln_1(x), **attn_kwargs)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of residual projections (GPT-2)
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):  # Linear too
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_exact(self, exact=True):
        """Batch-invariant linears everywhere (see Linear): with attention="gather", the learner then
        reproduces the sampler bit for bit on CPU. The one switch for the bitwise mode."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.exact = exact
        return self

    def forward(self, idx, targets=None, attn_mask=None, seen=None, cache=None, fused=False):
        """idx (B, T) token ids -> logits (B, T, vocab), and the mean cross-entropy if targets are given.
        attn_mask:      per-layer bool visibility, attn_mask[l] is (B, nh, T, T) (an (L, B, nh, T, T) tensor
                        or an smd.ShadowMask, which expands one layer at a time);
        seen:           per-layer positions held by each query's slots, [l] is (B, nh, T, S): the gather path;
        cache:          an smd.KVCache; idx then holds the next tokens, at positions cache.next_pos, ...; the
                        cache's clock advances by T once every layer has written;
        fused:          the mask path through torch's fused attention (see CausalSelfAttention.forward)."""
        if sum(a is not None for a in (attn_mask, seen, cache)) > 1:
            raise ValueError("give at most one of attn_mask, seen, cache")
        B, T = idx.size()
        start = cache.next_pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, attn_mask=None if attn_mask is None else attn_mask[layer], cache=cache, layer=layer,
                      seen=None if seen is None else seen[layer], fused=fused)
        if cache is not None:
            cache.advance(T)
        logits = self.lm_head(self.transformer.ln_f(x))                    # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss
