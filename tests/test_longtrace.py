"""
Specification of the long-trace task (data/longtrace.py) and of --preset=long: the tokenizer round-trips and
rejects what it cannot encode, every problem has the same T >= 512, the trace follows its rule, the rewards
check exactly what their docstrings promise, the preset's config validates, the fast random-eviction masks
of its warm-up keep what a random-eviction cache keeps, a position a warm-up answers at chance is caught as
unlearned, and the learner reproduces the sampler's log-probs on the preset's 608-token sequence (a tiny
model: a few seconds).
"""
import pytest
import torch

import smd
import train
import warmup
from data import TASKS
from data.longtrace import CHARS, CHECKPOINTS, EOS_ID, N_ROUNDS, N_SEEDS, VOCAB_SIZE, LongTrace, Problem, \
    decode, encode
from model import GPT

TASK = TASKS["longtrace"]


def problems(n, task=TASK):
    return task.make_splits(0, n, 0, 0)[0]


def test_every_token_round_trips_as_itself():
    for i, piece in enumerate(list(CHARS) + CHECKPOINTS):
        assert encode(piece) == [i]
        assert decode([i]) == piece
    assert VOCAB_SIZE == len(CHARS) + len(CHECKPOINTS) + 1 and EOS_ID == VOCAB_SIZE - 1


@pytest.mark.parametrize("name", ["longtrace", "longtrace_recap6", "longtrace_recap3"])
def test_problem_texts_round_trip_and_have_the_lengths_max_lengths_gives(name):
    task = TASKS[name]
    P, R = task.max_lengths()
    for p in problems(50, task):
        prompt, response = task.format_prompt(p), task.format_response(p)
        assert decode(encode(prompt + response)) == prompt + response
        assert (len(encode(prompt)), len(encode(response)) + 1) == (P, R)
    assert P + R == {"longtrace": 513, "longtrace_recap6": 551, "longtrace_recap3": 608}[name]
    assert P + R >= 512


@pytest.mark.parametrize("text", ["a1 2", "[S0]", "[A10]", "x", "<|eos|>"])
def test_unknown_text_raises_value_error_naming_it(text):
    with pytest.raises(ValueError, match="not in the vocabulary"):
        encode(text)


def test_decode_stops_at_eos_and_rejects_ids_outside_the_vocabulary():
    assert decode(encode("a1") + [EOS_ID] + encode("b2")) == "a1"
    with pytest.raises(ValueError, match="outside"):
        decode([VOCAB_SIZE])


def test_each_step_is_the_lagged_sum_with_its_carry_and_each_round_ends_in_its_checkpoint():
    for p in problems(20):
        ids = encode(TASK.format_trace(p))
        assert len(ids) == N_ROUNDS * (4 * N_SEEDS + 1)
        text = [decode([i]) for i in ids]
        u = list(p.seeds)                                                  # round 0: the seeds
        for k in range(N_ROUNDS):
            rnd = text[k * 25:(k + 1) * 25]
            for i in range(N_SEEDS):
                label, b, c, v = rnd[4 * i:4 * i + 4]
                assert label == "abcdef"[i] and int(b) == u[-N_SEEDS]       # b: the same label a round back
                assert 10 * int(c) + int(v) == u[-1] + int(b)               # c v: u_prev + b
                u.append(int(v))
            assert rnd[24] == f"[{'ABCDEFGHIJKLMNOPQR'[k]}{u[-1]}]"


def test_recap_variant_repeats_the_results_so_far_every_m_rounds():
    p = problems(1)[0]
    answer = TASK.format_response(p).rsplit(";", 1)[1]                     # "A3B7...": 2 characters a round
    recaps = LongTrace(recap_every=6).format_trace(p).split(":")[1:]
    assert len(recaps) == 2 and recaps[0][:13] == answer[:12] + "a" and recaps[1][:25] == answer[:24] + "a"


def test_reward_is_exact_on_the_answer_and_partial_counts_its_fields():
    p = problems(1)[0]
    right = TASK.format_response(p)
    trace, answer = right.rsplit(";", 1)
    one_off = trace + ";" + answer[:-1] + str((int(answer[-1]) + 1) % 10)
    assert TASK.reward(p, right) == 1.0 and TASK.partial_reward(p, right) == 1.0
    assert TASK.reward(p, one_off) == 0.0
    assert TASK.partial_reward(p, one_off) == pytest.approx((N_ROUNDS - 1) / N_ROUNDS, abs=1e-12)
    assert TASK.partial_reward(p, right + "S1") == pytest.approx(N_ROUNDS / (N_ROUNDS + 1), abs=1e-12)
    assert TASK.reward(p, trace) == 0.0 and TASK.partial_reward(p, trace) == 0.0   # no ';'
    assert TASK.reward(p, "wrong trace;" + answer) == 1.0                 # only the answer is judged
    assert TASK.trace_right(p, right) == 1.0 and TASK.trace_right(p, "wrong trace;" + answer) == 0.0


def test_splits_are_disjoint_and_reproducible():
    train_p, val, test = TASK.make_splits(3, 200, 50, 50)
    assert len(set(train_p) | set(val) | set(test)) == 300
    assert TASK.make_splits(3, 10, 50, 50)[2] == test                      # n_train never moves test
    with pytest.raises(ValueError, match="seed digits"):
        TASK.format_prompt(Problem((1, 2, 3)))


def test_long_preset_validates_with_t_at_least_512_and_its_budget_within_a_quarter_of_t():
    cfg = train.make_config(["--preset=long"])
    P, R = TASKS[cfg["task"]].max_lengths()
    assert cfg["task"].startswith("longtrace") and cfg["block_size"] >= P + R >= 512
    assert cfg["budget"] <= 0.25 * (P + R)
    assert train.make_config([])["task"] == "arithmetic"                   # the default stays the short task


@pytest.mark.parametrize("argv, message", [
    (["--task=longtrac"], "task must be one of"),
    (["--task=longtrace"], "block_size 64 must hold prompt \\+ response = 513"),
    (["--preset=long", "--sft_attention=sdpa"], "sft_attention must be 'mask' or 'fused'"),
])
def test_bad_task_settings_raise_one_clear_value_error(argv, message):
    with pytest.raises(ValueError, match=message):
        train.make_config(argv)


def test_random_positions_masks_keep_what_a_random_eviction_cache_keeps():
    """Each query sees itself, never a later token, min(t + 1, budget) positions, and the whole prompt."""
    B, T, P, budget = 8, 200, 25, 40
    visible = warmup.random_eviction_visibility(B, T, P, budget, True, torch.Generator().manual_seed(0))
    t = torch.arange(T)
    assert not (visible & (t[None, :] > t[:, None])).any()                # causal
    assert visible[:, t, t].all()                                         # itself
    assert (visible.sum(-1) == torch.clamp(t + 1, max=budget)).all()       # as many as the cache holds
    assert visible[:, P:, :P].all()                                       # keep_prompt
    assert not visible[:, -1, P:T - budget + P].all()                     # something old was evicted


def test_learner_logprobs_equal_the_samplers_on_the_presets_608_token_long_trace():
    """Tiny model, 2 samples, the preset's h2o at 64 slots (11% of T): max |d log p| < 1e-5, mask path."""
    cfg = train.make_config(["--preset=long", "--n_layer=1", "--n_embd=16", "--n_head=2"])
    task = TASKS[cfg["task"]]
    P, R = task.max_lengths()
    torch.manual_seed(0)
    model = GPT(warmup.model_config(cfg)).eval()
    prompts = [encode(task.format_prompt(p)) for p in problems(2, task)]
    ro = smd.rollout(model, prompts, policy="h2o", budget=64, max_new_tokens=R, temperature=1.0, eos_id=None,
                     generator=torch.Generator().manual_seed(0), **train.policy_kwargs(cfg))
    assert ro.tokens.shape == (2, P + R) and P + R == 608                 # no EOS: every token
    with torch.no_grad():
        lp = smd.learner_logprobs(model, ro.tokens, ro.shadow_mask, attention="mask")
    assert (lp - ro.logprobs)[ro.response_mask].abs().max().item() < 1e-5
    assert ro.kv_bytes < 0.25 * ro.full_kv_bytes


def test_a_position_the_warm_up_answers_at_chance_is_reported_unlearned():
    """long_regime.py's check of a warm-up: a position right about as often as chance (as a never-learned one
    is: not never) is named, with its accuracy; the positions an oracle gets right are not."""
    from experiments.long_regime import unlearned_positions

    held_out = problems(40)
    _, y = warmup.sft_batch(held_out, "cpu", TASK)                          # (N, T-1)
    P, _ = TASK.max_lengths()
    guessed = P - 1 + 100                                                  # response position 100

    class Oracle(torch.nn.Module):  # right everywhere, except at one position, right on a quarter of rows
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            predicted = y.clamp(min=0).clone()                             # (N, T-1)
            predicted[:30, guessed] = (predicted[:30, guessed] + 1) % VOCAB_SIZE  # wrong on rows 0 .. 29
            return torch.nn.functional.one_hot(predicted, VOCAB_SIZE).float(), None

    missed, _ = unlearned_positions(Oracle(), held_out, TASK, below=0.5)
    assert [i for i, _ in missed] == [100] and missed[0][1] == pytest.approx(10 / 40)
    assert unlearned_positions(Oracle(), held_out, TASK, below=0.2)[0] == []
