"""
An independent, slow reference sampler, and tests that smd.rollout agrees with it exactly. The reference
keeps no KV cache: for every (layer, row, head) it keeps the list of positions the newest query saw, moves
it on by the published eviction rule of each policy, and recomputes the whole prefix at every step with
those boolean masks, by hand from the model's modules. It shares no code with smd.py or with model.py's
attention; it does not test the learner (test_smd.py does) nor speed.
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from smd import rollout

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}  # max |log-prob difference| accepted per dtype
PROMPT_LENGTHS = (3, 12, 7)  # mixed lengths: prefill is min(3, budget), longer prompts finish in decode
MAX_NEW_TOKENS = 20
VOCAB = 16
SEED = 1


# -----------------------------------------------------------------------------
# the reference sampler


def make_model(dtype, seed=0):
    """A random GPT with N(0, 0.1) weights, so attention is peaked and every eviction changes the output."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    return model.to(dtype).eval()


def make_prompts(lengths=PROMPT_LENGTHS, seed=SEED):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def reference_forward(model, tokens, visible):
    """tokens (B, T), visible (L, B, nh, T, T) bool -> logits (B, T, vocab) and, per layer, the attention
    probabilities (B, nh, T, T). Attention is written out here, not taken from model.py."""
    B, T = tokens.shape
    tr = model.transformer
    x = tr.wte(tokens) + tr.wpe(torch.arange(T))                           # (B, T, C)
    C = x.shape[-1]
    atts = []
    for layer, block in enumerate(tr.h):
        nh = block.attn.n_head
        hs = C // nh
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, nh, hs).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)                  # (B, nh, T, T)
        att = scores.masked_fill(~visible[layer], float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + block.attn.c_proj(y)
        x = x + block.mlp(block.ln_2(x))
        atts.append(att)
    return model.lm_head(tr.ln_f(x)), atts


def h2o_split(budget, n_heavy=None, n_recent=None):
    """The H2O budget split: n_heavy + n_recent = budget, half and half by default."""
    if n_heavy is None and n_recent is None:
        n_heavy = budget // 2
    if n_recent is None:
        n_recent = budget - n_heavy
    if n_heavy is None:
        n_heavy = budget - n_recent
    assert n_heavy + n_recent == budget
    return n_heavy, n_recent


def victim(policy, options, budget, t, h, seen, att, visible, prompt_len):
    """The position that leaves this (layer, row, head) when position t+1 enters, from what is known once
    query t attended. seen: the positions query t saw, in cache-slot order; att (nh, T, T): this layer's
    and row's attention probabilities of queries 0..t; visible (nh, T, T): this layer's and row's mask."""
    def lowest(candidates, score):  # the cache's argmin keeps the first slot of equal scores
        return min(candidates, key=lambda p: (score(p), seen.index(p)))

    if policy == "streaming":
        return min(p for p in seen if p >= options.get("n_sink", 4))
    if policy == "h2o":
        _, n_recent = h2o_split(budget, options.get("n_heavy"), options.get("n_recent"))
        received = att[h, :t + 1].sum(0)                                   # (T,) from every query that saw p
        return lowest([p for p in seen if p <= t + 1 - n_recent], lambda p: received[p].item())
    if policy == "tova":
        newest = att[:, t].mean(0) if options.get("head_average", True) else att[h, t]  # (T,)
        return lowest(seen, lambda p: newest[p].item())
    if policy == "snapkv":
        if t + 1 < prompt_len:
            return min(seen)                                               # still reading the prompt
        # the prompt's scores are fixed once query prompt_len-1 attended; recomputing them from the
        # observation window's rows of att gives the same numbers, as later queries cannot change them
        W, k = options.get("window", 4), options.get("kernel", 3)
        raw = att[h, max(prompt_len - W, 0):prompt_len].sum(0)            # (T,) from the observation window
        body = [p for p in range(prompt_len - W) if visible[h, prompt_len - 1, p]]
        pooled = {p: sum(raw[body[j]].item() for j in range(max(i - k // 2, 0), min(i + k // 2 + 1, len(body)))) / k
                  for i, p in enumerate(body)}
        left = [p for p in seen if p in pooled]
        return lowest(left, pooled.get) if left else min(seen)
    raise AssertionError(f"no victim rule for {policy}")


@functools.lru_cache(maxsize=None)
def reference_rollout(policy, options, budget, temperature, eos_id, dtype=torch.float64, lengths=PROMPT_LENGTHS):
    """What rollout(make_model(dtype), make_prompts(lengths), ...) must return, with generator seed SEED,
    as a dict of tokens (B, T), logprobs (B, T), response_mask (B, T) and mask (L, B, nh, T, T).
    options is a tuple of (name, value) pairs so results can be cached across tests."""
    options = dict(options)
    model = make_model(dtype)
    prompts = make_prompts(lengths)
    generator = torch.Generator().manual_seed(SEED)
    L, nh, S = model.config.n_layer, model.config.n_head, budget
    B, T = len(prompts), max(lengths) + MAX_NEW_TOKENS
    pad = 0 if eos_id is None else eos_id
    tokens = torch.full((B, T), pad)
    for b, prompt in enumerate(prompts):
        tokens[b, :len(prompt)] = torch.tensor(prompt)
    logprobs = torch.zeros(B, T, dtype=dtype)
    response_mask = torch.zeros(B, T, dtype=torch.bool)
    mask = torch.zeros(L, B, nh, T, T, dtype=torch.bool)
    seen = [[[[] for _ in range(nh)] for _ in range(B)] for _ in range(L)]  # slot order, as the real cache
    done = [False] * B

    def enter(t, atts):
        """Position t enters every (layer, row, head): into a free slot, or into the slot of a victim."""
        for layer in range(L):
            draws = torch.randint(S, (B, nh), generator=generator) if policy == "random" and t >= S else None
            for b in range(B):
                for h in range(nh):
                    slots = seen[layer][b][h]
                    if t < S:
                        slots.append(t)
                    elif policy == "random":
                        slots[int(draws[b, h])] = t
                    else:
                        gone = victim(policy, options, S, t - 1, h, slots, atts[layer][b], mask[layer, b], lengths[b])
                        slots[slots.index(gone)] = t
                    mask[layer, b, h, t, slots] = True

    n_prefill = min(min(lengths), S)
    for t in range(n_prefill):
        enter(t, None)
    logits, atts = reference_forward(model, tokens[:, :n_prefill], mask[..., :n_prefill, :n_prefill])
    for t in range(n_prefill, T):
        scaled = logits[:, t - 1] / temperature if temperature > 0 else logits[:, t - 1]
        logp = F.log_softmax(scaled, dim=-1)                               # (B, vocab)
        if temperature > 0:
            sampled = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
        else:
            sampled = logp.argmax(-1)
        for b in range(B):
            if t < lengths[b]:
                continue                                                   # prompt token, already in place
            if not done[b] and t < lengths[b] + MAX_NEW_TOKENS:
                tokens[b, t] = sampled[b]
                logprobs[b, t] = logp[b, sampled[b]]
                response_mask[b, t] = True
                done[b] = eos_id is not None and sampled[b].item() == eos_id
        enter(t, atts)
        logits, atts = reference_forward(model, tokens[:, :t + 1], mask[..., :t + 1, :t + 1])
        if all(done[b] or t + 1 >= lengths[b] + MAX_NEW_TOKENS for b in range(B)):
            T = t + 1
            break
    return dict(tokens=tokens[:, :T], logprobs=logprobs[:, :T], response_mask=response_mask[:, :T],
                mask=mask[..., :T, :T])


def run_rollout(policy, options, budget, temperature, eos_id, dtype=torch.float64, lengths=PROMPT_LENGTHS,
                tensor_prompts=False):
    """smd.rollout on the same model, prompts and generator seed as reference_rollout."""
    prompts = make_prompts(lengths)
    if tensor_prompts:
        prompts = torch.tensor(prompts)
    return rollout(make_model(dtype), prompts, policy=policy, budget=budget, max_new_tokens=MAX_NEW_TOKENS,
                   temperature=temperature, eos_id=eos_id, generator=torch.Generator().manual_seed(SEED),
                   **dict(options))


def pick_eos(policy, options, budget, temperature, dtype=torch.float64):
    """An EOS token that at least two rows generate, at different steps, in the reference run without EOS
    (a row's tokens up to its first EOS do not depend on whether EOS stops it), so the cases are not vacuous."""
    ref = reference_rollout(policy, options, budget, temperature, None, dtype)
    best, best_key = None, None
    for token in range(VOCAB):
        ends = []
        for b, n in enumerate(PROMPT_LENGTHS):
            hits = ((ref["tokens"][b] == token) & ref["response_mask"][b]).nonzero()
            ends.append(int(hits[0]) + 1 if len(hits) else n + MAX_NEW_TOKENS)
        n_hit = sum(e < n + MAX_NEW_TOKENS for e, n in zip(ends, PROMPT_LENGTHS))
        key = (n_hit, min(e - n for e, n in zip(ends, PROMPT_LENGTHS)))   # most rows, then the longest response
        if n_hit >= 2 and len(set(ends)) == len(ends) and (best_key is None or key > best_key):
            best, best_key = token, key
    assert best is not None, f"no token ends two rows at different steps for {policy} {options}"
    return best

# -----------------------------------------------------------------------------
# the cases

BUDGETS = (5, 10)  # 5 is below every prompt but the shortest, 10 below the longest only
POLICIES = [
    ("streaming", ()),
    ("streaming", (("n_sink", 2),)),
    ("h2o", ()),
    ("h2o", (("n_recent", 2),)),
    ("h2o", (("n_heavy", 1),)),
    ("tova", (("head_average", True),)),
    ("tova", (("head_average", False),)),
    ("snapkv", ()),
    ("snapkv", (("window", 3), ("kernel", 5))),
    ("random", ()),
]
FULL_BUDGET = max(PROMPT_LENGTHS) + MAX_NEW_TOKENS
CASES = [(policy, options, budget, temperature)
         for policy, options in POLICIES for budget in BUDGETS for temperature in (0.0, 1.0)
         if not (policy == "streaming" and budget <= dict(options).get("n_sink", 4))]
CASES += [("h2o", (("n_heavy", 3), ("n_recent", 7)), 10, 1.0)]  # both halves given
CASES += [("full", (), FULL_BUDGET, temperature) for temperature in (0.0, 1.0)]


def case_id(policy, options, budget, temperature):
    opts = ",".join(f"{k}={v}" for k, v in options)
    return f"{policy}[{opts}]-S{budget}-{'greedy' if temperature == 0 else f'T{temperature}'}"


def assert_same(r, ref, dtype):
    """rollout r equals the reference: tokens and every mask entry exactly, response log-probs to TOL."""
    assert r.tokens.shape == ref["tokens"].shape, "different sequence length"
    differ = (r.tokens != ref["tokens"]).nonzero()
    assert len(differ) == 0, f"first differing token (row, position): {differ[0].tolist()}"
    dense = r.shadow_mask.to_dense()                                              # (L, B, nh, T, T)
    differ = (dense != ref["mask"]).nonzero()
    assert len(differ) == 0, f"first differing mask entry (layer, row, head, query, key): {differ[0].tolist()}"
    assert torch.equal(r.response_mask, ref["response_mask"])
    assert (r.logprobs - ref["logprobs"])[ref["response_mask"]].abs().max().item() <= TOL[dtype]
    assert (r.logprobs[~ref["response_mask"]] == 0).all()


@pytest.mark.parametrize("policy, options, budget, temperature", CASES, ids=[case_id(*c) for c in CASES])
def test_rollout_equals_reference_sampler_tokens_masks_and_logprobs(policy, options, budget, temperature):
    eos_id = pick_eos(policy, options, budget, temperature)
    ref = reference_rollout(policy, options, budget, temperature, eos_id)
    assert_same(run_rollout(policy, options, budget, temperature, eos_id), ref, torch.float64)

    # not vacuous: rows stop by EOS at different steps, and the cache evicts, during the prompt too
    ends = [int(row.nonzero()[-1]) + 1 for row in ref["response_mask"]]
    assert len(set(ends)) == len(ends), f"rows end at {ends}"
    assert sum(ref["tokens"][b, e - 1] == eos_id for b, e in enumerate(ends)) >= 2, "want rows stopped by EOS"
    T = ref["mask"].shape[-1]
    seen = ref["mask"].sum(-1)                                             # (L, B, nh, T) keys per query
    assert seen.max() == min(budget, T)
    if policy == "full":
        assert torch.equal(ref["mask"], torch.ones(T, T, dtype=torch.bool).tril().expand_as(ref["mask"]))
    else:
        long_row = PROMPT_LENGTHS.index(max(PROMPT_LENGTHS))
        prompt_seen = seen[:, long_row, :, :max(PROMPT_LENGTHS)]
        assert (prompt_seen < torch.arange(1, max(PROMPT_LENGTHS) + 1)).any(), "no eviction inside the prompt"


@pytest.mark.parametrize("policy, options", [("streaming", ()), ("h2o", ()), ("tova", ()), ("snapkv", ()),
                                             ("random", ())])
def test_rollout_equals_reference_sampler_in_float32(policy, options):
    eos_id = pick_eos(policy, options, 5, 1.0, torch.float32)
    ref = reference_rollout(policy, options, 5, 1.0, eos_id, torch.float32)
    assert_same(run_rollout(policy, options, 5, 1.0, eos_id, torch.float32), ref, torch.float32)


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "random"])
def test_rollout_equals_reference_sampler_on_a_prompt_tensor_longer_than_the_budget(policy):
    lengths = (9, 9, 9)  # a (B, P) tensor: prefill stops at the budget, the rest of the prompt is evicted into
    ref = reference_rollout(policy, (), 6, 1.0, None, lengths=lengths)
    assert_same(run_rollout(policy, (), 6, 1.0, None, lengths=lengths, tensor_prompts=True), ref, torch.float64)
    assert ref["response_mask"].sum(1).tolist() == [MAX_NEW_TOKENS] * 3


@pytest.mark.parametrize("policy, options", [("streaming", ()), ("h2o", ()), ("snapkv", ())])
def test_rollout_stops_each_row_after_its_own_max_new_tokens(policy, options):
    ref = reference_rollout(policy, options, 5, 1.0, None)
    assert_same(run_rollout(policy, options, 5, 1.0, None), ref, torch.float64)
    assert ref["response_mask"].sum(1).tolist() == [MAX_NEW_TOKENS] * 3
    assert ref["tokens"].shape[1] == max(PROMPT_LENGTHS) + MAX_NEW_TOKENS  # the short rows stopped earlier


def test_policies_evict_differently_on_the_same_input():
    """Every policy setting, on the same prompts and generator seed (no EOS), gives its own shadow mask, and
    none is a sliding window in disguise. At budget 10: at budget 5 some coincide for a reason (H2O's two
    heavy hitters are the first two tokens, as streaming's two sinks; SnapKV's body is one token)."""
    budget = 10
    masks = {(policy, options): reference_rollout(policy, options, budget, 1.0, None)["mask"]
             for policy, options in POLICIES}
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.equal(masks[a], masks[b]), f"{a} and {b} give the same mask"
    T = masks[names[0]].shape[-1]
    window = torch.ones(T, T, dtype=torch.bool).tril().triu(-(budget - 1))
    for name, mask in masks.items():
        assert not torch.equal(mask, window.expand_as(mask)), f"{name} is a sliding window"
