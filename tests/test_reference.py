"""
An independent, slow reference sampler, and tests that smd.rollout agrees with it exactly. The reference keeps
no KV cache: for every (layer, row, head) it keeps the list of positions the newest query saw, moves it on by
the eviction rule of each policy, and recomputes the whole prefix at every step with those boolean masks, by
hand from the model's modules (attention probabilities, and the query and key vectors R-KV and keep_prompt
SnapKV score with). The rules are the written ones (experiments/README.md's policy table, and the spec for:
ties to the oldest position; SnapKV's pooling over every prompt position; keep_prompt for every policy; the
rkv policy), written here as plain loops over positions, not from policies.py's classes. It shares no code
with policies.py, smd.py or model.py's attention; it tests neither the learner (test_smd.py does) nor speed.
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from smd import rollout

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}  # max |log-prob difference| accepted per dtype; measured
#     on these tests with ATEN_CPU_CAPABILITY avx2 and default: <= 9.6e-7 and <= 1.8e-15, 10x and more inside
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
    probabilities (B, nh, T, T) (0 where masked) and the query and key vectors (B, nh, T, hs) each. Attention
    is written out here, not taken from model.py. A position's q and k depend only on the mask rows of
    queries up to it, so these equal what the sampler computed when that position was fed."""
    B, T = tokens.shape
    tr = model.transformer
    x = tr.wte(tokens) + tr.wpe(torch.arange(T))                           # (B, T, C)
    C = x.shape[-1]
    atts, qs, ks = [], [], []
    for layer, block in enumerate(tr.h):
        nh = block.attn.n_head
        hs = C // nh
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)
        q, k, v = (z.view(B, T, nh, hs).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)                   # (B, nh, T, T)
        att = scores.masked_fill(~visible[layer], float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + block.attn.c_proj(y)
        x = x + block.mlp(block.ln_2(x))
        atts.append(att)
        qs.append(q)
        ks.append(k)
    return model.lm_head(tr.ln_f(x)), atts, qs, ks


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


def h2o_keep_prompt_recent(budget, prompt_len, n_heavy=None, n_recent=None):
    """H2O with keep_prompt: the n_recent of row b, from the free_b = S - P_b slots its prompt leaves."""
    assert n_heavy is None or n_recent is None, "keep_prompt with both n_heavy and n_recent: a ValueError"
    free = budget - prompt_len
    if n_recent is not None:
        return n_recent
    if n_heavy is not None:
        return free - n_heavy                                              # as written, even if < 1
    return free - free // 2                                                # the even split of what is left


def lowest(candidates, score):
    """The candidate with the lowest score; exact ties go to the oldest, the lowest position, whatever slot it
    is in (spec "Ties")."""
    assert candidates, "nothing to evict: these settings leave no candidate"
    return min(candidates, key=lambda p: (score(p), p))


def pool(values, kernel, how):
    """values (n,), one per key in position order -> (n,): each pooled with its kernel // 2 neighbours on
    each side in that order. "max" (R-KV) ignores missing neighbours at the ends; "avg" (SnapKV) counts them
    as 0 and divides by kernel (zero padding, as avg_pool1d)."""
    half = kernel // 2
    near = [values[max(i - half, 0):i + half + 1] for i in range(len(values))]
    return torch.stack([z.max() if how == "max" else z.sum() / kernel for z in near]) if near else values


def importance(q_window, k_outside):
    """q_window (W, hs): the observation window's queries; k_outside (n, hs): the cached keys outside the
    window -> (n,): each window query's softmax over these keys only (the window's own keys take no part),
    averaged over the W queries (R-KV; SnapKV's decode-time form)."""
    hs = q_window.shape[-1]
    a = ((q_window @ k_outside.T) / math.sqrt(hs)).softmax(-1)             # (W, n)
    return a.mean(0)


def redundancy(keys, positions, threshold):
    """keys (S, hs): every key in one head's cache; positions: theirs, in the same (any) order -> (S,) in that
    order: R-KV's redundancy, the softmax over keys j of the mean over keys i of cos(k_i, k_j) (0 for i = j),
    where each i spares the most recent (highest-position) j it is more than threshold similar to."""
    S = len(positions)
    unit = keys / (keys.norm(dim=-1, keepdim=True) + 1e-8)                 # (S, hs)
    sim = unit @ unit.T                                                    # (S, S)
    sim.fill_diagonal_(0.0)
    for i in range(S):
        similar = [j for j in range(S) if sim[i, j] > threshold]
        if similar:
            sim[i, max(similar, key=lambda j: positions[j])] = 0.0
    return sim.mean(0).softmax(-1)


def random_victim(u, seen, prompt_len):
    """random with keep_prompt: u, this (row, head)'s float32 draw from torch.rand (0-dim) -> the k-th
    generated position in position order, k = floor(u * n) in float32 (u * n may round up to n: clamped)."""
    candidates = sorted(p for p in seen if p >= prompt_len)
    n = len(candidates)
    return candidates[min(int((u * n).floor()), n - 1)]


def victim(policy, options, budget, t, h, seen, att, q, k, prompt_len):
    """The position that leaves this (layer, row, head) so that position t (>= budget) can enter, from what
    is known once query t-1 attended. seen: the S positions query t-1 saw, in cache-slot order; att
    (nh, t, t): this layer's and row's attention probabilities of queries 0..t-1 (0 where masked); q, k
    (nh, t, hs): this layer's and row's query and key vectors; prompt_len: this row's P_b."""
    keep = options.get("keep_prompt", False)
    allowed = [p for p in seen if p >= prompt_len] if keep else seen      # keep_prompt: generated keys only

    if policy == "streaming":
        return min(p for p in allowed if p >= options.get("n_sink", 4))
    if policy == "h2o":
        if keep:
            n_recent = h2o_keep_prompt_recent(budget, prompt_len, options.get("n_heavy"),
                                              options.get("n_recent"))
        else:
            _, n_recent = h2o_split(budget, options.get("n_heavy"), options.get("n_recent"))
        received = att[h].sum(0)                                           # (t,) from every query that saw p
        # the n_recent newest, t included, are protected: n_recent - 1 of them are in the cache
        return lowest([p for p in allowed if p <= t - n_recent], lambda p: received[p].item())
    if policy == "tova":
        newest = att[:, t - 1].mean(0) if options.get("head_average", True) else att[h, t - 1]  # (t,)
        return lowest(allowed, lambda p: newest[p].item())
    if policy == "snapkv" and not keep:
        if t < prompt_len:
            return min(seen)                                               # still reading the prompt
        # the prompt's scores are fixed once query prompt_len-1 attended; recomputing them from the
        # observation window's rows of att gives the same numbers, as later queries cannot change them.
        # Every prompt position before the window is scored, also one evicted while the prompt slid (it
        # keeps what the window queries that saw it gave it, 0 if none did), and pooled over positions.
        W, kernel = options.get("window", 4), options.get("kernel", 3)
        n_body = max(prompt_len - W, 0)                                    # positions 0..n_body-1 are scored
        raw = att[h, max(prompt_len - W, 0):prompt_len].sum(0)[:n_body]    # (n_body,)
        pooled = pool(raw, kernel, "avg")                                  # (n_body,) indexed by position
        left = [p for p in seen if p < n_body]
        return lowest(left, lambda p: pooled[p].item()) if left else min(seen)
    if policy in ("snapkv", "rkv"):                                        # snapkv here with keep_prompt
        W = options.get("window", 4 if policy == "snapkv" else 2)
        kernel = options.get("kernel", 3)
        # the window t-W..t-1 (never a victim) queries; every cached key before it is scored
        outside = sorted(p for p in seen if p < t - W)                     # position order
        imp = importance(q[h, t - W:t], k[h, outside])                     # (n,)
        score = pool(imp, kernel, "avg" if policy == "snapkv" else "max")  # (n,)
        if policy == "rkv":
            lam = options.get("mix_lambda", 0.1)
            red = redundancy(k[h, seen], seen, options.get("threshold", 0.5))  # (S,) slot order
            score = lam * score - (1 - lam) * red[[seen.index(p) for p in outside]]
        score = dict(zip(outside, score.tolist()))
        return lowest([p for p in allowed if p < t - W], score.get)
    raise AssertionError(f"no victim rule for {policy}")


@functools.lru_cache(maxsize=None)
def reference_rollout(policy, options, budget, temperature, eos_id, dtype=torch.float64,
                      lengths=PROMPT_LENGTHS):
    """What rollout(make_model(dtype), make_prompts(lengths), ...) must return, with generator seed SEED,
    as a dict of tokens (B, T), logprobs (B, T), response_mask (B, T) and mask (L, B, nh, T, T).
    options is a tuple of (name, value) pairs so results can be cached across tests."""
    options = dict(options)
    keep = options.get("keep_prompt", False)
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

    def enter(t, state):
        """Position t enters every (layer, row, head): into a free slot, or into the slot of a victim.
        state: the per-layer atts, qs, ks of reference_forward over positions 0..t-1."""
        for layer in range(L):
            draws = None
            if policy == "random" and t >= S:  # one draw per layer and eviction step, in the sampling stream
                draws = (torch.rand((B, nh), generator=generator, dtype=torch.float32)  # (B, nh) in [0, 1)
                         if keep else torch.randint(S, (B, nh), generator=generator))   # (B, nh) slots
            for b in range(B):
                for h in range(nh):
                    slots = seen[layer][b][h]
                    if t < S:
                        slots.append(t)
                    elif policy == "random" and not keep:
                        slots[int(draws[b, h])] = t
                    else:
                        if policy == "random":
                            gone = random_victim(draws[b, h], slots, lengths[b])
                        else:
                            atts, qs, ks = state
                            gone = victim(policy, options, S, t, h, slots, atts[layer][b], qs[layer][b],
                                          ks[layer][b], lengths[b])
                        slots[slots.index(gone)] = t
                    mask[layer, b, h, t, slots] = True

    n_prefill = min(min(lengths), S)
    for t in range(n_prefill):
        enter(t, None)
    logits, *state = reference_forward(model, tokens[:, :n_prefill], mask[..., :n_prefill, :n_prefill])
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
        enter(t, state)
        logits, *state = reference_forward(model, tokens[:, :t + 1], mask[..., :t + 1, :t + 1])
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
    (a row's tokens up to its first EOS do not depend on whether EOS stops it), so the cases are not
    vacuous."""
    ref = reference_rollout(policy, options, budget, temperature, None, dtype)
    best, best_key = None, None
    for token in range(VOCAB):
        ends = []
        for b, n in enumerate(PROMPT_LENGTHS):
            hits = ((ref["tokens"][b] == token) & ref["response_mask"][b]).nonzero()
            ends.append(int(hits[0]) + 1 if len(hits) else n + MAX_NEW_TOKENS)
        n_hit = sum(e < n + MAX_NEW_TOKENS for e, n in zip(ends, PROMPT_LENGTHS))
        # most rows, then the longest response
        key = (n_hit, min(e - n for e, n in zip(ends, PROMPT_LENGTHS)))
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
    ("rkv", ()),                                     # window 2, kernel 3, mix_lambda 0.1, threshold 0.5
    ("rkv", (("window", 3), ("kernel", 1))),
    ("rkv", (("mix_lambda", 1.0),)),                 # pure importance (max-pooled): exact ties, to the oldest
    ("rkv", (("mix_lambda", 0.0),)),                 # pure redundancy
]
FULL_BUDGET = max(PROMPT_LENGTHS) + MAX_NEW_TOKENS
CASES = [(policy, options, budget, temperature)
         for policy, options in POLICIES for budget in BUDGETS for temperature in (0.0, 1.0)
         if not (policy == "streaming" and budget <= dict(options).get("n_sink", 4))]
CASES += [("h2o", (("n_heavy", 3), ("n_recent", 7)), 10, 1.0)]  # both halves given
CASES += [("full", (), FULL_BUDGET, temperature) for temperature in (0.0, 1.0)]

# keep_prompt: legal from S = P_max + 1 = 13 (every row then reads its whole prompt before any eviction),
# and where a window of W newest keys is kept as well (snapkv, rkv) from S = P_max + W + 1; H2O's n_recent
# must fit in what the longest prompt leaves, S - P_max. At 13 the longest row keeps one generated key.
KEEP = (("keep_prompt", True),)
KEEP_PROMPT_POLICIES = [  # (policy, options, budgets)
    ("streaming", KEEP, (13, 17)),                   # n_sink 4: row 0's prompt (3) is shorter: 3 stays a sink
    ("streaming", KEEP + (("n_sink", 2),), (13, 17)),  # the prompt is the sinks: a sliding window after it
    ("h2o", KEEP, (13, 17)),                         # per row: n_recent_b = free_b - free_b // 2
    ("h2o", KEEP + (("n_recent", 2),), (14, 17)),
    ("h2o", KEEP + (("n_heavy", 1),), (14, 17)),     # n_recent_b = free_b - 1 (at 13: 0 for the longest row)
    ("tova", KEEP + (("head_average", True),), (13, 17)),
    ("tova", KEEP + (("head_average", False),), (13, 17)),
    ("snapkv", KEEP, (17, 20)),                      # window 4, kernel 3
    ("snapkv", KEEP + (("window", 1), ("kernel", 5)), (14, 17)),
    ("random", KEEP, (13, 17)),
    ("rkv", KEEP, (15, 17)),                         # window 2
    ("rkv", KEEP + (("window", 1), ("kernel", 5), ("mix_lambda", 0.5), ("threshold", 0.8)), (14, 17)),
]
CASES += [(policy, options, budget, temperature)
          for policy, options, budgets in KEEP_PROMPT_POLICIES for budget in budgets
          for temperature in (0.0, 1.0)]


def case_id(policy, options, budget, temperature):
    opts = ",".join(f"{k}={v}" for k, v in options)
    return f"{policy}[{opts}]-S{budget}-{'greedy' if temperature == 0 else f'T{temperature}'}"


def assert_same(r, ref, dtype):
    """rollout r equals the reference: tokens and every mask entry exactly, response log-probs to TOL."""
    assert r.tokens.shape == ref["tokens"].shape, "different sequence length"
    differ = (r.tokens != ref["tokens"]).nonzero()
    assert len(differ) == 0, f"first differing token (row, position): {differ[0].tolist()}"
    visible = r.shadow_mask.attn_masks()                                   # (L, B, nh, T, T)
    differ = (visible != ref["mask"]).nonzero()
    assert len(differ) == 0, ("first differing mask entry (layer, row, head, query, key): "
                              f"{differ[0].tolist()}")
    assert torch.equal(r.response_mask, ref["response_mask"])
    assert (r.logprobs - ref["logprobs"])[ref["response_mask"]].abs().max().item() <= TOL[dtype]
    assert (r.logprobs[~ref["response_mask"]] == 0).all()


def assert_keeps_the_prompt(mask, lengths=PROMPT_LENGTHS):
    """mask (L, B, nh, T, T): every query from row b's first response position on sees all of 0..P_b-1, in
    every layer and head (keep_prompt never evicts a prompt key)."""
    for b, P in enumerate(lengths):
        assert mask[:, b, :, P:, :P].all(), f"row {b} lost a prompt key"


def prompt_and_newest(budget, T, lengths=PROMPT_LENGTHS):
    """(B, T, T) bool: the sliding window keep_prompt allows: query t of row b sees 0..P_b-1 and its
    S - P_b newest positions (itself included), or all of 0..t while t < S."""
    window = torch.ones(T, T, dtype=torch.bool).tril()
    masks = []
    for P in lengths:
        m = window.triu(-(budget - P - 1)).clone()
        m[:, :P] = window[:, :P]
        masks.append(m)
    return torch.stack(masks)


@pytest.mark.parametrize("policy, options, budget, temperature", CASES, ids=[case_id(*c) for c in CASES])
def test_rollout_equals_reference_sampler_tokens_masks_and_logprobs(policy, options, budget, temperature):
    eos_id = pick_eos(policy, options, budget, temperature)
    ref = reference_rollout(policy, options, budget, temperature, eos_id)
    assert_same(run_rollout(policy, options, budget, temperature, eos_id), ref, torch.float64)

    # not vacuous: rows stop by EOS at different steps, and the cache evicts, during the prompt too
    # (keep_prompt: among the generated tokens, and never a prompt key)
    ends = [int(row.nonzero()[-1]) + 1 for row in ref["response_mask"]]
    assert len(set(ends)) == len(ends), f"rows end at {ends}"
    assert sum(ref["tokens"][b, e - 1] == eos_id for b, e in enumerate(ends)) >= 2, "want rows stopped by EOS"
    T = ref["mask"].shape[-1]
    seen = ref["mask"].sum(-1)                                             # (L, B, nh, T) keys per query
    assert seen.max() == min(budget, T)
    if policy == "full":
        assert torch.equal(ref["mask"], torch.ones(T, T, dtype=torch.bool).tril().expand_as(ref["mask"]))
    elif dict(options).get("keep_prompt"):
        assert_keeps_the_prompt(ref["mask"])
        # with the whole prompt seen, a response query that sees fewer than position + 1 keys misses a
        # generated one
        evicted = (seen < torch.arange(1, T + 1)) & ref["response_mask"][None, :, None]  # (L, B, nh, T)
        assert evicted.any(), "no eviction among generated tokens"
    else:
        long_row = PROMPT_LENGTHS.index(max(PROMPT_LENGTHS))
        prompt_seen = seen[:, long_row, :, :max(PROMPT_LENGTHS)]
        assert (prompt_seen < torch.arange(1, max(PROMPT_LENGTHS) + 1)).any(), "no eviction inside the prompt"


FLOAT32_CASES = [("streaming", (), 5), ("h2o", (), 5), ("tova", (), 5), ("snapkv", (), 5), ("random", (), 5),
                 ("rkv", (), 5), ("snapkv", KEEP, 17), ("h2o", KEEP, 13)]


@pytest.mark.parametrize("policy, options, budget", FLOAT32_CASES,
                         ids=[case_id(*c, 1.0) for c in FLOAT32_CASES])
def test_rollout_equals_reference_sampler_in_float32(policy, options, budget):
    eos_id = pick_eos(policy, options, budget, 1.0, torch.float32)
    ref = reference_rollout(policy, options, budget, 1.0, eos_id, torch.float32)
    assert_same(run_rollout(policy, options, budget, 1.0, eos_id, torch.float32), ref, torch.float32)


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "random", "rkv"])
def test_rollout_equals_reference_sampler_on_a_prompt_tensor_longer_than_the_budget(policy):
    # a (B, P) tensor: prefill stops at the budget, and the rest of the prompt enters by evicting
    lengths = (9, 9, 9)
    ref = reference_rollout(policy, (), 6, 1.0, None, lengths=lengths)
    assert_same(run_rollout(policy, (), 6, 1.0, None, lengths=lengths, tensor_prompts=True), ref,
                torch.float64)
    assert ref["response_mask"].sum(1).tolist() == [MAX_NEW_TOKENS] * 3


MAX_NEW_TOKENS_CASES = [("streaming", (), 5), ("h2o", (), 5), ("snapkv", (), 5), ("rkv", (), 5),
                        ("h2o", KEEP, 13)]


@pytest.mark.parametrize("policy, options, budget", MAX_NEW_TOKENS_CASES,
                         ids=[case_id(*c, 1.0) for c in MAX_NEW_TOKENS_CASES])
def test_rollout_stops_each_row_after_its_own_max_new_tokens(policy, options, budget):
    ref = reference_rollout(policy, options, budget, 1.0, None)
    assert_same(run_rollout(policy, options, budget, 1.0, None), ref, torch.float64)
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


def test_keep_prompt_policies_evict_differently_on_the_same_input():
    """With keep_prompt, at budget 17 (no EOS): every setting keeps the prompt and gives its own shadow mask.
    Streaming whose sinks fit in every prompt IS the sliding window after the prompt (that pins down the
    window); n_sink 4 differs from it in row 0 only, whose 3-token prompt leaves position 3 a sink; no other
    policy is that window in disguise."""
    budget = 17
    settings = [(policy, options) for policy, options, budgets in KEEP_PROMPT_POLICIES if budget in budgets]
    masks = {name: reference_rollout(*name, budget, 1.0, None)["mask"]  # (L, B, nh, T, T)
             for name in settings}
    names = list(masks)
    for i, a in enumerate(names):
        assert_keeps_the_prompt(masks[a])
        for b in names[i + 1:]:
            assert not torch.equal(masks[a], masks[b]), f"{a} and {b} give the same mask"
    T = masks[names[0]].shape[-1]
    window = prompt_and_newest(budget, T)[None, :, None]                  # (1, B, 1, T, T)
    sinks2 = masks["streaming", KEEP + (("n_sink", 2),)]
    assert torch.equal(sinks2, window.expand_as(sinks2))
    sinks4 = masks["streaming", KEEP]
    assert torch.equal(sinks4[:, 1:], window[:, 1:].expand_as(sinks4[:, 1:]))
    assert (sinks4[:, 0, :, budget:, 3].all()
            and not torch.equal(sinks4[:, :1], window[:, :1].expand_as(sinks4[:, :1])))
    for name, mask in masks.items():
        if name[0] != "streaming":
            assert not torch.equal(mask, window.expand_as(mask)), (
                f"{name} is the sliding window after the prompt")


def test_reference_redundancy_spares_the_most_recent_similar_key_by_position_not_slot():
    """A hand case for R-KV's redundancy. Keys a, b, d are one direction, c another; they sit in slots in an
    order that is not their positions' (as after evictions): a (position 5), d (7), b (2), c (9).
    a spares d (the highest position of b, d), d spares a (of a, b), b spares d (of a, d), c is similar to
    none: the columns keep sim[d, b] = sim[a, b] = 1 and sim[b, a] = 1, so the means over the 4 rows are
    a 1/4, d 0, b 2/4, c 0. Sparing by slot (the last of the similar slots) would give a 2/4, d 1/4, b 0."""
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # (S, hs)
    positions = [5, 7, 2, 9]                                                    # slot order
    got = redundancy(keys, positions, threshold=0.5)
    cos = 1 / (1 + 1e-8) ** 2                                                   # k / (|k| + 1e-8), squared
    want = torch.tensor([0.25, 0.0, 0.5, 0.0], dtype=torch.float64) * cos
    torch.testing.assert_close(got, want.softmax(-1), rtol=0, atol=1e-15)
    # a threshold of 1 (nothing is more similar than that) spares nothing: a, d, b each see two similar keys
    got = redundancy(keys, positions, threshold=1.0)
    torch.testing.assert_close(
        got, (torch.tensor([2.0, 2.0, 2.0, 0.0], dtype=torch.float64) * cos / 4).softmax(-1),
        rtol=0, atol=1e-15)


def test_reference_pure_importance_with_one_window_query_is_tova_without_the_newest_key():
    """An independent check of the reference's R-KV importance (its q and k vectors, the softmax over the keys
    outside the window only): with window 1, kernel 1 and mix_lambda 1 the score is query t-1's attention
    renormalized over the keys other than its own, so the victim is the key (not t-1) query t-1 attended to
    least, per head, read here from the attention of a separate masked recompute."""
    budget = 6
    options = (("window", 1), ("kernel", 1), ("mix_lambda", 1.0))
    ref = reference_rollout("rkv", options, budget, 1.0, None)
    model = make_model(torch.float64)
    mask = ref["mask"]                                                           # (L, B, nh, T, T)
    _, atts, _, _ = reference_forward(model, ref["tokens"], mask)
    L, B, nh, T, _ = mask.shape
    for layer in range(L):
        for b in range(B):
            for h in range(nh):
                for t in range(budget, T):
                    before, after = mask[layer, b, h, t - 1, :t], mask[layer, b, h, t, :t]
                    gone = (before & ~after).nonzero()[:, 0].tolist()            # the one key evicted for t
                    att = atts[layer][b, h, t - 1]                               # (T,)
                    candidates = [p for p in before.nonzero()[:, 0].tolist() if p != t - 1]
                    assert gone == [min(candidates, key=lambda p: att[p].item())], (layer, b, h, t)


def test_reference_snapkv_with_keep_prompt_is_rkv_with_pure_importance_and_kernel_one():
    """With kernel 1 both poolings are the identity, and mix_lambda 1 drops redundancy: keep_prompt SnapKV and
    R-KV then score alike (the same importance, the same candidates), so their masks coincide."""
    options = KEEP + (("window", 2), ("kernel", 1))
    snap = reference_rollout("snapkv", options, 15, 1.0, None)
    rkv = reference_rollout("rkv", options + (("mix_lambda", 1.0),), 15, 1.0, None)
    assert torch.equal(snap["tokens"], rkv["tokens"]) and torch.equal(snap["mask"], rkv["mask"])
