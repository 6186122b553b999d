"""
The SMD claims as executable checks: with the recorded shadow mask the learner's log-probs equal the
compressed sampler's (to float rounding, or bitwise on the exact path), without it they do not, and the
cache and mask obey the budget. Every test uses a small random GPT on the CPU and runs in seconds.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import model as model_module
import policies
import smd
from model import GPT, GPTConfig, gather_at
from conftest import DEVICE
from smd import learner_logprobs, rollout

COMPRESSED = ["streaming", "h2o", "tova", "snapkv", "rkv", "random"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}  # max |log-prob difference| accepted per dtype; measured
#     on these tests with ATEN_CPU_CAPABILITY avx2 and default: <= 9.6e-7 and <= 1.8e-15, 10x and more inside
EOS = 15
BUDGET = 8  # with 40-42 positions per sequence, under 1/3 of the sequence
KEEP_BUDGET = 16  # keep_prompt needs the longest prompt (11) + 1; 16 leaves 5 slots for the response


@pytest.fixture(autouse=True)
def small_gather_chunks(monkeypatch):
    """Sequences here are ~40 positions; chunks of 16 make every gather-path test cross chunk borders."""
    monkeypatch.setattr(model_module, "GATHER_CHUNK", 16)


def make_model(dtype=torch.float32, seed=0, block_size=64, device="cpu"):
    """A random GPT whose weights are N(0, 0.1) rather than GPT-2's 0.02, so attention is far from
    uniform and hiding a key changes the output clearly (with tiny weights every mask looks alike)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=16, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    return model.to(dtype).to(device).eval()


def sample(model, policy, budget=BUDGET, prompts=None, seed=0, **kwargs):
    if prompts is None:
        prompts = torch.randint(0, 15, (3, 10), generator=torch.Generator().manual_seed(seed))
    return rollout(model, prompts, policy=policy, budget=budget, max_new_tokens=30,
                   generator=torch.Generator(next(model.parameters()).device).manual_seed(seed), **kwargs)


def variable_length_rollout(model, policy, seed, budget=BUDGET, **kwargs):
    """Prompts of 3, 11 and 7 tokens (so prefill is 3 tokens and longer prompts finish in decode) with
    an EOS token that rows sample at different steps."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 15, (n,), generator=gen).tolist() for n in (3, 11, 7)]
    device = next(model.parameters()).device
    if device.type != "cpu":  # sampling needs a generator on the model's device
        gen = torch.Generator(device).manual_seed(seed)
    r = rollout(model, prompts, policy=policy, budget=budget, max_new_tokens=30, eos_id=EOS,
                generator=gen, **kwargs)
    return prompts, r


def max_diff(a, b, where):
    return (a - b)[where].abs().max().item()


@pytest.mark.device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("attention", ["mask", "gather"])
@pytest.mark.parametrize("keep_prompt", [False, True])
@pytest.mark.parametrize("policy", COMPRESSED)
def test_smd_logprobs_equal_sampler_for_every_policy(policy, keep_prompt, attention, dtype):
    model = make_model(dtype, device=DEVICE)
    if keep_prompt:  # prompts of 3, 11 and 7 tokens, each kept whole
        _, r = variable_length_rollout(model, policy, seed=3, budget=KEEP_BUDGET, keep_prompt=True)
    else:
        r = sample(model, policy)
        assert BUDGET <= r.tokens.shape[1] / 3
    lp = learner_logprobs(model, r.tokens, r.shadow_mask, attention=attention)
    assert max_diff(lp, r.logprobs, r.response_mask) <= TOL[dtype]
    assert max_diff(learner_logprobs(model, r.tokens), r.logprobs, r.response_mask) > 1e-2  # the mask matters


@pytest.mark.device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("policy, budget, kwargs", [("rkv", 28, dict(keep_prompt=True)), ("h2o", 26, {})])
def test_smd_logprobs_equal_sampler_at_the_trained_models_scale(policy, budget, kwargs, dtype):
    """train.py's model shape and sequence (20 + 33 tokens) with weights large enough for logits as large as
    the trained model's (10.7; its float32 gap is 1.6e-5 there, `python -m experiments.bench --trained=True`).
    Float rounding in a log-prob grows with the logits, so the tolerance is stated per unit of the largest
    logit."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=15, n_layer=2, n_head=4, n_embd=64))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    model = model.to(dtype).to(DEVICE).eval()
    prompts = torch.randint(0, 14, (32, 20), generator=torch.Generator().manual_seed(0))
    r = rollout(model, prompts, policy=policy, budget=budget, max_new_tokens=33,
                generator=torch.Generator(DEVICE).manual_seed(0), **kwargs)
    logits = smd.learner_logits(model, r.tokens, r.shadow_mask)
    scale = logits.abs().max().item()
    assert scale >= 10.7 and r.logprobs[r.response_mask].min() < -7     # at least the trained model's scale
    lp = smd.token_logprobs(logits, r.tokens)
    assert max_diff(lp, r.logprobs, r.response_mask) <= TOL[dtype] * scale
    assert max_diff(learner_logprobs(model, r.tokens), r.logprobs, r.response_mask) > 1e-2  # the mask matters


@pytest.mark.parametrize("policy", COMPRESSED)
def test_keep_prompt_every_response_query_sees_its_whole_prompt(policy):
    prompts, r = variable_length_rollout(make_model(), policy, seed=3, budget=KEEP_BUDGET, keep_prompt=True)
    visible = r.shadow_mask.attn_masks()                                   # (L, B, nh, T, T)
    T = visible.shape[-1]
    for b, prompt in enumerate(prompts):
        n = len(prompt)
        assert visible[:, b, :, n:, :n].all(), f"row {b} lost a prompt key"
    keys = visible.sum(-1)                                                 # (L, B, nh, T) keys per query
    assert keys.max() == KEEP_BUDGET and (keys < torch.arange(1, T + 1)).any(), "nothing was evicted"
    # the rule still chooses: not a window over the response, except streaming's, which is one by design (its
    # 4 sinks reach past the 3-token prompt of row 0)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    sinks = [max(4, len(p)) for p in prompts]
    sliding = torch.stack([causal.triu(-(KEEP_BUDGET - n - 1)) | ((torch.arange(T) < n) & causal)
                           for n in sinks])[None, :, None]                 # (1, B, 1, T, T)
    assert torch.equal(visible, sliding.expand_as(visible)) == (policy == "streaming")


@pytest.mark.device
@pytest.mark.parametrize("policy", COMPRESSED)
def test_unmasked_learner_differs_from_compressed_sampler(policy):
    model = make_model(device=DEVICE)
    r = sample(model, policy)
    unmasked = learner_logprobs(model, r.tokens)  # no mask: the naive, off-policy learner
    assert max_diff(unmasked, r.logprobs, r.response_mask) > 1e-2


@pytest.mark.parametrize("policy", ["full"] + COMPRESSED)
def test_budget_covering_the_sequence_gives_the_causal_mask(policy):
    model = make_model()
    r = sample(model, policy, budget=40)
    T = r.tokens.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand_as(r.shadow_mask.attn_masks())
    assert torch.equal(r.shadow_mask.attn_masks(), causal)
    assert max_diff(learner_logprobs(model, r.tokens), r.logprobs, r.response_mask) <= TOL[torch.float32]


@pytest.mark.parametrize("policy", COMPRESSED)
def test_cache_and_mask_rows_never_exceed_budget(policy, monkeypatch):
    held = []  # live entries per (layer, row, head) after every cache update
    seen = {}  # (layer, query position) -> the slot positions that query attended over, -1 = invisible
    update = smd.KVCache.update

    def counting_update(self, layer, k, v):
        out = update(self, layer, k, v)
        pos = self.held[layer]                                              # (B, nh, S)
        held.append(int((pos >= 0).sum(-1).max()))
        visible = out[2]                                                   # (B, nh, T_new, S)
        for i in range(visible.shape[2]):
            seen[layer, self.next_pos + i] = torch.where(visible[:, :, i], pos, -1)
        filled = pos.sort(-1).values
        assert not ((filled[..., 1:] == filled[..., :-1]) & (filled[..., 1:] >= 0)).any(), (
            "a position is held twice")
        return out

    monkeypatch.setattr(smd.KVCache, "update", counting_update)
    model = make_model()
    r = sample(model, policy)
    assert max(held) == BUDGET  # the cache filled up, and never beyond
    visible = r.shadow_mask.attn_masks()                                   # (L, B, nh, T, T)
    T = visible.shape[-1]
    assert visible.sum(-1).max() == BUDGET
    assert not (visible & ~torch.ones(T, T, dtype=torch.bool).tril()).any(), "a query sees its future"
    assert visible.diagonal(dim1=-2, dim2=-1).all(), "every query sees itself"
    L, B, nh = 2, 3, 2
    # O(T) storage
    assert r.shadow_mask.slot_of.shape == (L, B, nh, T) and r.shadow_mask.slot_of.dtype == torch.int16
    for layer in range(L):  # the write log replays to exactly the slots, in order, that each query saw
        slots = r.shadow_mask.seen(layer)                                        # (B, nh, T, S)
        assert slots.shape == (B, nh, T, BUDGET)
        for t in range(T):
            assert torch.equal(slots[:, :, t].long(), seen[layer, t]), f"layer {layer} query {t}"


@pytest.mark.parametrize("policy, extra_bytes", [
    ("streaming", 0), ("random", 0),
    ("h2o", BUDGET * 4), ("tova", BUDGET * 4),  # a float slot_scores per slot
    ("snapkv", 10 * 4),                         # a float score per prompt position (prompts of 10)
    ("rkv", 2 * 16 * 4 + BUDGET * (4 + 8 + 4 + 4 + 8)),  # the last window = 2 queries of 16 floats; per
    #                                                  slot the key similarity (a float sum, a long slot, a
    #                                                  float cosine, a float norm), a long slot by position
])
def test_kv_bytes_count_every_buffer_the_cache_holds(policy, extra_bytes):
    r = sample(make_model(), policy)                   # L=2, B=3, nh=2, hs=16, float32; 10 + 30 positions
    per_slot = 2 * 16 * 4 + 8                          # K and V, a long position
    assert r.kv_bytes == 2 * 3 * 2 * (BUDGET * per_slot + extra_bytes)
    assert r.full_kv_bytes == 2 * 3 * 2 * 40 * per_slot  # a full cache: 40 slots, no statistic


def test_full_cache_rollout_reports_kv_fraction_one_even_when_rows_stop_early():
    _, r = variable_length_rollout(make_model(), "full", seed=3, budget=41)
    assert r.tokens.shape[1] < 41  # every row hit EOS before the longest allowed length
    assert r.kv_bytes == r.full_kv_bytes


def test_streaming_keeps_sinks_and_recent_window():
    model = make_model()
    n_sink = 2
    r = sample(model, "streaming", n_sink=n_sink)
    visible = r.shadow_mask.attn_masks()
    T = visible.shape[-1]
    for t in range(BUDGET, T):
        expected = torch.zeros(T, dtype=torch.bool)
        expected[:n_sink] = True
        expected[t - (BUDGET - n_sink) + 1:t + 1] = True
        assert torch.equal(visible[..., t, :], expected.expand_as(visible[..., t, :])), f"query {t}"


def test_h2o_always_sees_its_recent_window():
    model = make_model()
    n_recent = 3
    visible = sample(model, "h2o", n_recent=n_recent).shadow_mask.attn_masks()
    T = visible.shape[-1]
    for t in range(n_recent, T):
        assert visible[..., t, t - n_recent + 1:t + 1].all(), f"query {t}"
    # and it is not just a window: per head, some old (heavy-hitter) token survives beyond it
    assert visible[..., -1, :T - BUDGET].any()


def hand_made_cache(held, slot_scores, prompt_length=0):
    """The state victim() reads, for one layer: held positions, slot_scores (B, nh, S); the next position
    is 10."""
    return SimpleNamespace(held=held[None], slot_scores=slot_scores[None], next_pos=10, budget=held.shape[-1],
                           prompt_lengths=torch.full(held.shape[:1], prompt_length), generator=None)


def test_eviction_policies_pick_the_documented_victim():
    pos = torch.tensor([[[0, 1, 2, 3, 9, 5, 8, 7]]])                     # (B, nh, S) = (1, 1, 8), newest 9
    mass = torch.tensor([[[5.0, 0.5, 3.0, 0.9, 0.0, 4.0, 0.1, 0.05]]])   # H2O: attention mass received
    cache = hand_made_cache(pos, mass)
    assert policies.Streaming(n_sink=2).victim(cache, 0).item() == 2  # the oldest non-sink
    assert policies.H2O(n_recent=3).victim(cache, 0).item() == 7  # 8, 9, the incoming 10 are recent: 7 goes
    assert policies.H2O(n_recent=4).victim(cache, 0).item() == 1  # 7 joins the window: 0.5 is the least left
    # even split: 4 recent (7, 8, 9, 10) + 4 heavy
    assert policies.H2O().victim(cache, 0).item() == 1
    newest_att = torch.tensor([[[0.3, 0.2, 0.1, 0.02, 0.1, 0.08, 0.1, 0.1]]])
    # least liked by the newest query
    assert policies.TOVA().victim(hand_made_cache(pos, newest_att), 0).item() == 3
    assert policies.TOVA().victim(hand_made_cache(pos, 1 - newest_att), 0).item() == 0


def test_ties_go_to_the_oldest_position_whatever_slot_it_is_in():
    pos = torch.tensor([[[5, 2, 9, 1, 7]]])                               # (B, nh, S), newest 9
    att = torch.tensor([[[0.1, 0.3, 0.2, 0.1, 0.3]]])                     # a tie at 0.1: positions 5 and 1
    # position 1's slot, not the first slot
    assert policies.TOVA().victim(hand_made_cache(pos, att), 0).item() == 3
    assert policies.H2O(n_recent=1).victim(hand_made_cache(pos, att), 0).item() == 3


def hand_made_rkv(keys, positions, query, **kwargs):
    """A one-head R-KV cache, full, whose next position is len(positions): keys (S, 2) in slot order."""
    config = GPTConfig(block_size=16, vocab_size=16, n_layer=1, n_head=1, n_embd=2)
    policy = policies.RKV(window=1, **kwargs)
    cache = smd.KVCache(config, 1, len(positions), 16, policy, "cpu", torch.float32)
    cache.k[0, 0, 0] = torch.tensor(keys)
    cache.held[0, 0, 0] = torch.tensor(positions)
    state = policy.key_similarity(cache.k[0], cache.held[0])             # as if written one by one
    cache.similarity_sum[0], cache.newest_similar[0], cache.spared_similarity[0] = state
    cache.by_position[0] = cache.held[0].argsort(-1)
    cache.recent_q[0, 0, 0, 0] = torch.tensor(query)                      # the window: the newest query
    cache.next_pos = len(positions)
    return policy, cache


def test_rkv_evicts_the_least_attended_key_max_pooled_in_position_order():
    # positions 3 0 4 2 1 (4: the window)
    keys = [[0.0, -1.0], [1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [0.0, 1.0]]
    positions, query = [3, 0, 4, 2, 1], [2.0, 1.0]                         # scores by position 2 1 -2 -1
    policy, cache = hand_made_rkv(keys, positions, query, kernel=1, mix_lambda=1.0)
    assert positions[policy.victim(cache, 0).item()] == 2                  # the least attended
    policy, cache = hand_made_rkv(keys, positions, query, kernel=3, mix_lambda=1.0)
    assert positions[policy.victim(cache, 0).item()] == 3                  # pooled: 2's neighbour 1 lifts it
    policy, cache = hand_made_rkv(keys, positions, query, kernel=1, mix_lambda=1.0, keep_prompt=True)
    cache.prompt_lengths[0] = 3
    assert positions[policy.victim(cache, 0).item()] == 3                  # 0..2 are the prompt: 3 is left


def test_rkv_evicts_the_oldest_of_near_duplicate_keys():
    # positions 0, 1, 2 share one key: each spares its most recent duplicate, so 0 is the most redundant
    keys = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-0.7, -0.7], [1.0, 0.0]]  # positions 2 3 0 4 1 (4: window)
    positions = [2, 3, 0, 4, 1]
    policy, cache = hand_made_rkv(keys, positions, [0.0, 0.0], mix_lambda=0.0)
    assert positions[policy.victim(cache, 0).item()] == 0
    redundancy = policy.redundancy(cache, 0)[0, 0]  # by slot
    by_position = redundancy[torch.tensor(positions).argsort()]
    assert by_position[0] > by_position[1] > by_position[2]                # older repeats are more redundant


def test_tova_head_average_decides_for_all_heads_and_per_head_does_not():
    pos = torch.arange(4).expand(1, 2, 4)                               # (B, nh, S): 2 heads, same positions
    att = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.5, 0.0, 0.3, 0.2]]])  # head means: 0.3 0.1 0.3 0.3
    cache = hand_made_cache(pos, att)
    assert policies.TOVA(head_average=True).victim(cache, 0).tolist() == [[1, 1]]
    assert policies.TOVA(head_average=False).victim(cache, 0).tolist() == [[0, 1]]


def test_snapkv_scores_prompt_keys_by_pooled_window_attention_then_slides():
    # prompt of 8 tokens, window 2: positions 0..5 are the body, 6 and 7 the observation window
    config = GPTConfig(block_size=16, vocab_size=16, n_layer=1, n_head=1, n_embd=4)
    policy = policies.SnapKV(window=2, kernel=3)
    cache = smd.KVCache(config, 1, 8, 12, policy, "cpu", torch.float32, prompt_lengths=torch.tensor([8]))
    k = torch.zeros(1, 1, 8, 4)
    cache.update(0, k, k)
    cache.held[0, 0, 0] = torch.tensor([2, 1, 0, 3, 4, 5, 6, 7])  # slot order is not position order
    att = torch.zeros(1, 1, 8, 8)                                          # (B, nh, T, S), by slot
    # window query 6 (slot 1 = position 1)
    att[0, 0, 6] = torch.tensor([0.0, 0.6, 0.0, 0.0, 0.0, 0.3, 0.1, 0.0])
    att[0, 0, 7] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.1])  # window query 7
    att[0, 0, 0, 0] = 1.0                                                  # not a window query: ignored
    cache.observe(0, None, att)
    # raw body scores by position 0 .6 0 0 .9 .3 -> pooled (zero-padded, /3): .2 .2 .2 .3 .4 .4
    assert torch.allclose(cache.prompt_scores[0, 0, 0, :6], torch.tensor([0.2, 0.2, 0.2, 0.3, 0.4, 0.4]))
    cache.next_pos = 8
    # the lowest pooled score; of the tie, the oldest (slot 2)
    assert policy.victim(cache, 0).item() == 2
    cache.held[0, 0, 0, :3] = torch.tensor([8, 9, 10])  # positions 0..2 gone: 3 is the lowest body key left
    cache.next_pos = 11
    assert policy.victim(cache, 0).item() == 3
    cache.held[0, 0, 0, :6] = torch.tensor([8, 9, 10, 11, 12, 13])  # no body key left: the oldest goes (6)
    cache.next_pos = 14
    assert policy.victim(cache, 0).item() == 6


def test_snapkv_pools_the_score_an_evicted_prompt_key_received():
    # prompt of 6 tokens, budget 4, window 2: key 1 is seen by window query 4 and evicted before query 5
    config = GPTConfig(block_size=16, vocab_size=16, n_layer=1, n_head=1, n_embd=4)
    cache = smd.KVCache(config, 1, 4, 8, policies.SnapKV(window=2, kernel=3), "cpu", torch.float32,
                        prompt_lengths=torch.tensor([6]))
    cache.held[0, 0, 0] = torch.tensor([4, 1, 2, 3])
    cache.next_pos = 4
    cache.observe(0, None, torch.tensor([0.1, 0.9, 0.0, 0.0]).view(1, 1, 1, 4))  # query 4: 0.9 to key 1
    cache.held[0, 0, 0] = torch.tensor([4, 5, 2, 3])                 # key 1 evicted, 5 in its slot
    cache.next_pos = 5
    cache.observe(0, None, torch.tensor([0.0, 0.5, 0.2, 0.3]).view(1, 1, 1, 4))  # query 5, the prompt's last
    # raw body (positions 0..3): 0 .9 .2 .3 -> pooled .3 .367 .467 .167:
    # key 2 keeps .467 thanks to evicted key 1
    assert torch.allclose(cache.prompt_scores[0, 0, 0, :4], torch.tensor([0.3, 1.1 / 3, 1.4 / 3, 0.5 / 3]))


def test_snapkv_slides_while_a_long_prompt_is_still_being_read():
    config = GPTConfig(block_size=16, vocab_size=16, n_layer=1, n_head=1, n_embd=4)
    cache = smd.KVCache(config, 1, 8, 16, policies.SnapKV(window=2), "cpu", torch.float32,
                        prompt_lengths=torch.tensor([12]))
    cache.held[0] = torch.tensor([[[8, 1, 2, 3, 4, 5, 6, 7]]])        # prompt of 12 tokens, 9 is next
    cache.next_pos = 9
    assert cache.policy.victim(cache, 0).item() == 1                      # the oldest: position 1


def test_random_policy_is_reproducible_per_seed_and_differs_between_rollouts():
    model = make_model()
    prompts = torch.randint(0, 15, (3, 10), generator=torch.Generator().manual_seed(0))

    def log(generator):
        return rollout(model, prompts, policy="random", budget=BUDGET, max_new_tokens=30, temperature=0,
                       generator=generator).shadow_mask.slot_of
    same_seed = [log(torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(*same_seed)
    g = torch.Generator().manual_seed(1)
    first, second = log(g), log(g)                                         # greedy: same tokens, same prompts
    assert torch.equal(first, same_seed[0]) and not torch.equal(first, second)
    assert not torch.equal(log(torch.Generator().manual_seed(2)), first)


def test_each_row_stops_after_its_own_max_new_tokens():
    prompts = [[1, 2, 3], [4] * 11, [5] * 7]
    r = rollout(make_model(), prompts, policy="h2o", budget=BUDGET, max_new_tokens=5,
                generator=torch.Generator().manual_seed(0))
    assert r.response_mask.sum(1).tolist() == [5, 5, 5]
    for b, prompt in enumerate(prompts):
        assert r.response_mask[b].nonzero().squeeze(-1).tolist() == list(range(len(prompt), len(prompt) + 5))
    assert r.tokens.shape[1] == 11 + 5


def test_cache_scores_accumulate_attention_since_written():
    config = GPTConfig(block_size=16, vocab_size=16, n_layer=1, n_head=1, n_embd=4)
    cache = smd.KVCache(config, 1, 2, 4, policies.H2O(n_recent=1), "cpu", torch.float32)
    k = torch.zeros(1, 1, 1, 4)
    for t, att in enumerate([[1.0, 0.0], [0.25, 0.75], [0.5, 0.5]]):
        cache.update(0, k, k)
        cache.observe(0, None, torch.tensor(att).view(1, 1, 1, 2))
        cache.advance(1)
    # positions 0, 1 filled the slots; position 2 evicted position 1 (less mass: 0.75 < 1.25) from slot 1
    assert cache.held[0].flatten().tolist() == [0, 2]
    assert cache.slot_scores[0].flatten().tolist() == [1.75, 0.5]


def test_sampler_decodes_one_token_per_step(monkeypatch):
    lengths = []  # tokens per model call: a sampler that re-ran the prefix would show growing lengths
    forward = GPT.forward

    def recording_forward(self, idx, *args, **kwargs):
        lengths.append(idx.shape[1])
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", recording_forward)
    r = sample(make_model(), "h2o")
    assert lengths[0] == BUDGET  # prefill: the 10-token prompt, capped at the budget
    assert lengths[1:] == [1] * (r.tokens.shape[1] - BUDGET)


@pytest.mark.device
@pytest.mark.parametrize("policy", COMPRESSED)
def test_variable_length_prompts_and_eos_keep_equality(policy):
    model = make_model(device=DEVICE)
    prompts, r = variable_length_rollout(model, policy, seed=3)
    ends = []
    for b, prompt in enumerate(prompts):
        n = len(prompt)
        assert r.tokens[b, :n].tolist() == prompt
        response = r.response_mask[b].nonzero().squeeze(-1)
        assert response[0] == n and torch.equal(response.cpu(), torch.arange(n, int(response[-1]) + 1))
        ends.append(int(response[-1]) + 1)
        assert (r.tokens[b, ends[-1]:] == EOS).all() and (r.logprobs[b, ends[-1]:] == 0).all()
    assert sum(r.tokens[b, e - 1] == EOS for b, e in enumerate(ends)) >= 2, "want rows stopped by EOS"
    assert len(set(ends)) == 3, "want rows ending at different steps"
    visible = r.shadow_mask.attn_masks()                                   # (L, B, nh, T, T)
    for b, end in enumerate(ends):  # a real token only ever sees real tokens of its own row
        assert not visible[:, b, :, :end, end:].any()
    for attention in ("mask", "gather"):
        lp = learner_logprobs(model, r.tokens, r.shadow_mask, attention=attention)
        assert max_diff(lp, r.logprobs, r.response_mask) <= TOL[torch.float32]


@pytest.mark.device
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("keep_prompt", [False, True])
@pytest.mark.parametrize("policy", COMPRESSED)
def test_record_of_a_rollout_gives_back_its_shadow_mask_and_logprobs(policy, keep_prompt, temperature):
    model = make_model(device=DEVICE)
    budget = KEEP_BUDGET if keep_prompt else BUDGET
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 15, (n,), generator=gen).tolist() for n in (3, 11, 7)]
    seeded = lambda: torch.Generator(DEVICE).manual_seed(5)             # the random policy draws from it too
    r = rollout(model, prompts, policy=policy, budget=budget, max_new_tokens=30, temperature=temperature,
                eos_id=EOS, generator=seeded(), keep_prompt=keep_prompt)
    lengths = [len(p) for p in prompts]
    rec = smd.record(model, r.tokens, lengths, policy=policy, budget=budget, temperature=temperature,
                     eos_id=EOS, generator=seeded(), keep_prompt=keep_prompt)
    assert torch.equal(rec.tokens, r.tokens)
    assert torch.equal(rec.shadow_mask.slot_of, r.shadow_mask.slot_of)
    assert torch.equal(rec.logprobs[r.response_mask], r.logprobs[r.response_mask])  # one code path: bitwise
    assert not (r.response_mask & ~rec.response_mask).any()
    assert r.response_mask.sum() > 30 and (r.shadow_mask.attn_masks().sum(-1) == budget).any()  # not vacuous


def test_record_scores_the_given_tokens_under_the_compressed_cache():
    model = make_model()
    prompts = torch.randint(0, 15, (3, 10), generator=torch.Generator().manual_seed(0))
    r = rollout(model, prompts, policy="tova", budget=BUDGET, max_new_tokens=30, temperature=0)
    answers = r.tokens.clone()
    answers[:, 20:] = (answers[:, 20:] + 1) % 15                          # other tokens from position 20 on
    rec = smd.record(model, answers, [10, 10, 10], policy="tova", budget=BUDGET)
    assert torch.equal(rec.tokens, answers) and rec.response_mask[:, 10:].all()
    assert torch.equal(rec.logprobs[:, :20], r.logprobs[:, :20])          # the same prefix, the same cache
    # tova reads content
    assert not torch.equal(rec.shadow_mask.slot_of[..., 20:], r.shadow_mask.slot_of[..., 20:])
    # and its mask reproduces its log-probs
    lp = learner_logprobs(model, answers, rec.shadow_mask)
    assert max_diff(lp, rec.logprobs, rec.response_mask) <= TOL[torch.float32]


@pytest.mark.device
@pytest.mark.parametrize("attention", ["mask", "gather"])
def test_gradients_flow_through_masked_learner(attention):
    model = make_model(device=DEVICE)
    r = sample(model, "h2o")
    model.train()
    lp = learner_logprobs(model, r.tokens, r.shadow_mask, attention=attention)
    (-(lp * r.response_mask).sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, f"no gradient reaches {name}"


def test_hand_written_attention_matches_sdpa():
    model = make_model()
    r = sample(model, "tova")
    attn = model.transformer.h[0].attn
    x = torch.randn(*r.tokens.shape, 32, generator=torch.Generator().manual_seed(0))  # (B, T, C)
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, 2, C // 2).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    for mask in (torch.ones(T, T, dtype=torch.bool).tril(), r.shadow_mask[0]):
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        reference = attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        ours = attn(x, attn_mask=mask if mask.dim() == 4 else None)
        assert (ours - reference).abs().max() <= 1e-5
    gathered = attn(x, seen=r.shadow_mask.seen(0))
    assert (gathered - reference).abs().max() <= 1e-5


def test_gather_at_reads_positions_in_slot_order():
    x = torch.arange(6.0).view(1, 1, 3, 2)                      # (B, nh, T, hs): position p holds [2p, 2p+1]
    slots = torch.tensor([[[[2, -1], [0, 1], [1, 2]]]])         # (B, nh, T, S)
    assert gather_at(x, slots)[0, 0, :, :, 0].tolist() == [[4.0, 0.0], [0.0, 2.0], [2.0, 4.0]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(policy="lru"), "unknown policy"),
    (dict(policy="h2o", budget=0), "budget must be"),
    (dict(policy="streaming", budget=4, n_sink=4), "n_sink"),
    (dict(policy="h2o", budget=4, n_recent=5), "n_recent"),
    (dict(policy="h2o", budget=8, n_recent=3, n_heavy=3), "n_heavy \\+ n_recent"),
    (dict(policy="streaming", n_sink=-1), "n_sink"),
    (dict(policy="snapkv", window=8), "window"),
    (dict(policy="snapkv", window=0), "window"),
    (dict(policy="snapkv", kernel=4), "odd kernel"),
    (dict(policy="tova", head_average=1), "head_average"),
    (dict(policy="full", budget=8), "never evicts"),
    (dict(policy="h2o", max_new_tokens=60), "exceeds block_size"),
    (dict(policy="streaming", window=3), "bad arguments"),
    (dict(policy="h2o", eos_id=16), "vocab_size"),
    (dict(policy="h2o", keep_prompt=True), "budget 8 < prompt 10 \\+ 1"),      # names both numbers
    (dict(policy="random", budget=10, keep_prompt=True), "budget 10 < prompt 10 \\+ 1"),
    (dict(policy="tova", keep_prompt=1), "keep_prompt must be True or False"),
    (dict(policy="h2o", budget=16, keep_prompt=True, n_heavy=2, n_recent=4), "not both"),
    (dict(policy="h2o", budget=16, keep_prompt=True, n_recent=7), "n_recent <= 6"),
    (dict(policy="rkv", window=8), "window"),
    (dict(policy="rkv", budget=13, window=3, keep_prompt=True), "window < 3"),
    (dict(policy="snapkv", budget=13, window=3, keep_prompt=True), "window < 3"),
    (dict(policy="rkv", kernel=2), "odd kernel"),
    (dict(policy="rkv", mix_lambda=1.5), "mix_lambda"),
    (dict(policy="rkv", budget_fraction=0.5), "bad arguments"),              # an unknown policy setting
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    args = dict(budget=BUDGET, max_new_tokens=30) | kwargs
    with pytest.raises(ValueError, match=message):
        rollout(make_model(), torch.zeros(2, 10, dtype=torch.long), **args)

# -----------------------------------------------------------------------------
# exact (bitwise) path: batch-invariant linears + gathered attention in the sampler's slot order


# (n_layer, n_head, n_embd, bias): head widths 16, 12, 7 (odd) and 20; the 3 x 4 x 64 without bias
EXACT_SHAPES = [(2, 2, 32, True), (3, 4, 64, False), (4, 3, 36, True), (2, 5, 35, False), (3, 2, 40, True)]


def exact_rollouts(shape, policy, keep_prompt, device):
    """A random model of `shape` in the bitwise mode and two of its rollouts: prompts of 3, 11 and 7 tokens
    with rows stopping at EOS, and one prompt alone (B = 1: a decode step's linears then see one row, the
    learner's B * T, and BLAS may sum those in another order)."""
    n_layer, n_head, n_embd, bias = shape
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=16, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                          bias=bias))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
    model = model.to(device).eval()
    model.set_exact()  # the one switch: batch-invariant linears everywhere
    budget = 41 if policy == "full" else KEEP_BUDGET if keep_prompt else BUDGET  # full: 11 + 30 new tokens
    _, batch = variable_length_rollout(model, policy, seed=3, budget=budget, keep_prompt=keep_prompt)
    gen = torch.Generator(device).manual_seed(4)
    alone = rollout(model, [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]], policy=policy, budget=budget,
                    max_new_tokens=30, eos_id=EOS, generator=gen, keep_prompt=keep_prompt)
    return model, (batch, alone)


@pytest.mark.device
@pytest.mark.parametrize("shape", EXACT_SHAPES, ids=lambda s: "L{}-nh{}-C{}-bias{}".format(*s))
@pytest.mark.parametrize("policy, keep_prompt",
                         [("full", False)] + [(p, k) for p in COMPRESSED for k in (False, True)])
def test_exact_learner_is_bitwise_equal_to_sampler(policy, keep_prompt, shape):
    """After model.set_exact(), the gather path's log-probs are the sampler's bit for bit on CPU, asserted
    with torch.equal: both run attend_slots on the same slots in the same order, and every linear sums one
    row at a time. Chunk borders are crossed (chunks of 16 queries, ~40 positions). On a GPU the same recipe
    is asserted only to TOL: it holds bit for bit only as far as that GPU's kernels are batch-invariant,
    which we do not control."""
    model, rollouts = exact_rollouts(shape, policy, keep_prompt, DEVICE)
    assert sum(r.tokens[b, -1] == EOS for r in rollouts for b in range(len(r.tokens))) >= 1, "want an EOS"
    for r in rollouts:
        lp = learner_logprobs(model, r.tokens, r.shadow_mask, attention="gather")
        if DEVICE == "cpu":
            assert torch.equal(lp[r.response_mask], r.logprobs[r.response_mask])
        else:
            assert max_diff(lp, r.logprobs, r.response_mask) <= TOL[torch.float32]


@pytest.mark.parametrize("policy", COMPRESSED)
def test_gather_path_equals_mask_path_values_and_gradients(policy):
    model = make_model()
    _, r = variable_length_rollout(model, policy, seed=3)
    results = {}
    for attention in ("mask", "gather"):
        model.zero_grad()
        lp = learner_logprobs(model, r.tokens, r.shadow_mask, attention=attention)
        (lp * r.response_mask).sum().backward()
        results[attention] = lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (lp_mask, grad_mask), (lp_gather, grad_gather) = results["mask"], results["gather"]
    assert (lp_mask - lp_gather).abs().max() <= TOL[torch.float32]  # measured <= 9.5e-7, either kernel
    # a gradient sums many products, so its rounding grows with its size: float32's tolerance per unit of the
    # largest gradient entry (7.7-15.8 here; measured differences <= 5.3e-6 with the gather path's written-out
    # backward, either kernel, 15x and more inside; a wrong mask moves them by the size of the gradient itself)
    scale = max(g.abs().max().item() for g in grad_mask.values())
    for name in grad_mask:
        assert (grad_mask[name] - grad_gather[name]).abs().max() <= TOL[torch.float32] * scale, name
