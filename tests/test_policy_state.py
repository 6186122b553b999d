"""
The state a policy keeps from step to step equals what recomputing it from the cache gives: R-KV's key
similarity (what policies.RKV.write moves on, against RKV.key_similarity's S x S definition) and the slots
in position order (cache.by_position, against a sort), after every cache write of whole rollouts, and the
victims are those the recomputed state picks. Not here: whether the victims follow the published rules
(tests/test_reference.py), the learner (test_smd.py), speed.
"""

import copy

import pytest
import torch

import policies
import smd
from model import GPTConfig
from tests.test_reference import PROMPT_LENGTHS, make_model, make_prompts

# max |incremental - recomputed| of the similarity sums, spared cosines and key norms over a rollout (sums of
# up to S - 1 cosines); measured on these cases with ATEN_CPU_CAPABILITY avx2 and default: <= 3.8e-6 and
# <= 7.1e-15
TOL = {torch.float32: 2e-5, torch.float64: 1e-13}
MAX_NEW_TOKENS = 50  # 62 positions (the model's block is 64): over 45 writes into a full cache

SETTINGS = [  # (policy, options, budget): budget 10 is below the longest prompt (12), so it slides too
    ("rkv", {}, 10),
    ("rkv", dict(window=3, kernel=1, threshold=0.8), 10),
    ("rkv", dict(mix_lambda=0.0, threshold=0.2), 10),     # pure redundancy, many near-duplicates
    ("rkv", dict(threshold=-0.3), 10),                    # the empty slots' zero keys must not count
    ("rkv", dict(keep_prompt=True), 17),
    ("rkv", dict(keep_prompt=True, window=1, kernel=5, mix_lambda=0.5, threshold=0.8), 14),
    ("snapkv", dict(keep_prompt=True), 17),               # pools in position order, keeps no similarity
]


def recomputed(cache, layer):
    """The cache with `layer`'s R-KV state replaced by its definition (the other layers' left as they are);
    an empty slot's key is 0, so its norm is the 1e-8 the cache starts with."""
    fresh = copy.copy(cache)
    k = cache.k[layer]
    state = (*cache.policy.key_similarity(k, cache.held[layer]), policies.key_norm(k))
    for name, value in zip(("similarity_sum", "newest_similar", "spared_similarity", "key_norms"), state):
        buffer = getattr(cache, name).clone()
        buffer[layer] = value
        setattr(fresh, name, buffer)
    return fresh


def checked_rollout(monkeypatch, policy, options, budget, dtype):
    """A rollout that, after every cache write, compares the kept state with its recomputation, and at every
    eviction the victim with the one the recomputed state picks. -> the largest difference of the float
    state, the number of keys whose newest near-duplicate was evicted (the rows write recomputes)."""
    worst, orphaned = [0.0], [0]
    update, write, victim = smd.KVCache.update, policies.RKV.write, policies.RKV.victim

    def checked_update(cache, layer, k, v):
        out = update(cache, layer, k, v)
        held = cache.held[layer]                                           # (B, nh, S)
        if cache.by_position is not None:  # a permutation of the slots, by ascending position
            order = cache.by_position[layer]
            assert torch.equal(order.sort(-1).values, torch.arange(budget).expand_as(order))
            assert torch.equal(held.gather(-1, order), held.sort(-1).values)
        if cache.similarity_sum is not None:
            fresh = recomputed(cache, layer)
            assert torch.equal(cache.newest_similar[layer], fresh.newest_similar[layer])
            for name in ("similarity_sum", "spared_similarity", "key_norms"):
                diff = (getattr(cache, name)[layer] - getattr(fresh, name)[layer]).abs().max().item()
                worst[0] = max(worst[0], diff)
        return out

    def counted_write(self, cache, layer, slot, k):
        before = cache.newest_similar[layer].clone()
        write(self, cache, layer, slot, k)
        if k.shape[2] == 1:  # a decode write (prefill fills an empty cache)
            others = torch.arange(budget) != slot                          # (B, nh, S)
            orphaned[0] += int(((before == slot) & (cache.newest_similar[layer] != slot) & others).sum())

    def checked_victim(self, cache, layer):
        slot = victim(self, cache, layer)
        assert torch.equal(slot, victim(self, recomputed(cache, layer), layer))
        return slot

    monkeypatch.setattr(smd.KVCache, "update", checked_update)
    monkeypatch.setattr(policies.RKV, "write", counted_write)
    monkeypatch.setattr(policies.RKV, "victim", checked_victim)
    r = smd.rollout(make_model(dtype), make_prompts(), policy=policy, budget=budget,
                    max_new_tokens=MAX_NEW_TOKENS, generator=torch.Generator().manual_seed(0), **options)
    assert r.tokens.shape[1] == max(PROMPT_LENGTHS) + MAX_NEW_TOKENS
    return worst[0], orphaned[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("policy, options, budget", SETTINGS,
                         ids=[f"{p}-{','.join(f'{k}={v}' for k, v in o.items())}-S{b}"
                              for p, o, b in SETTINGS])
def test_incremental_policy_state_equals_its_recomputation_at_every_step(monkeypatch, policy, options, budget,
                                                                          dtype):
    worst, orphaned = checked_rollout(monkeypatch, policy, options, budget, dtype)
    assert worst <= TOL[dtype]
    if policy == "rkv":  # not vacuous: write had to recompute the rows of keys whose duplicate left
        assert orphaned > 0


def test_rkv_write_hands_an_evicted_near_duplicate_on_to_the_next_newest():
    """One head, 4 slots holding positions 0-3: keys 0, 1, 3 point one way, 2 another. Each key's newest
    near-duplicate: 0 -> 3, 1 -> 3, 3 -> 1, 2 none. Position 4 (like 2) overwrites 3's slot: 0 and 1 lose
    theirs and take the next newest (1 and 0), 2 takes the new key, the new key takes 2."""
    config = GPTConfig(block_size=8, vocab_size=4, n_layer=1, n_head=1, n_embd=2)
    policy = policies.RKV(window=1)
    cache = smd.KVCache(config, 1, 4, 8, policy, "cpu", torch.float64)
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 0.2]], dtype=torch.float64)
    policy.write(cache, 0, torch.arange(4).view(1, 1, 4), keys.view(1, 1, 4, 2))  # prefill
    cache.k[0, 0, 0], cache.held[0, 0, 0] = keys, torch.arange(4)
    assert cache.newest_similar[0, 0, 0].tolist() == [3, 3, -1, 1]
    new = torch.tensor([0.1, 1.0], dtype=torch.float64)
    policy.write(cache, 0, torch.tensor([[[3]]]), new.view(1, 1, 1, 2))
    cache.k[0, 0, 0, 3], cache.held[0, 0, 0, 3] = new, 4
    assert cache.newest_similar[0, 0, 0].tolist() == [1, 0, 3, 2]
    fresh = policy.key_similarity(cache.k[0], cache.held[0])
    torch.testing.assert_close(cache.similarity_sum[0], fresh[0], rtol=0, atol=1e-15)
    torch.testing.assert_close(cache.spared_similarity[0], fresh[2], rtol=0, atol=1e-15)
