"""
Specification of the table trace (data/tabletrace.py): the tokenizer round-trips and rejects what it cannot
encode, every problem of a layout has one T >= 512, the table is the prompt's running sum and a permutation,
every step follows its rule (key from the value two back, v = T[key], carry and units of the sum), the rounds
never repeat one another's steps, the back-references reach far (the point of the task), the rewards judge
each round's result as their docstrings say, and bad problems or layouts raise. And --preset=long, which runs
it: the config validates, the fast random-eviction masks of its warm-up keep what a random-eviction cache
keeps, the learner reproduces the sampler's log-probs on its 512-token sequence (a tiny model: seconds), and a
position a warm-up answers at chance is caught as unlearned.
"""
import pytest
import torch

import smd
import train
import warmup
from data import TASKS
from data.tabletrace import CHARS, EOS_ID, KEYS, N_KEYS, VOCAB_SIZE, Problem, TableTrace, decode, encode, table
from model import GPT

TASK = TASKS["tabletrace"]


def problems(n, task=TASK, seed=0):
    return task.make_splits(seed, n, 0, 0)[0]


def test_every_token_round_trips_as_itself_and_eos_is_last():
    for i, c in enumerate(CHARS):
        assert encode(c) == [i] and decode([i]) == c
    assert VOCAB_SIZE == len(CHARS) + 1 and EOS_ID == VOCAB_SIZE - 1
    assert decode(encode("3a") + [EOS_ID] + encode("4b")) == "3a"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        encode("3k")
    with pytest.raises(ValueError, match="outside"):
        decode([VOCAB_SIZE])


@pytest.mark.parametrize("name, T", [("tabletrace", 512), ("tabletrace_r8", 514)])
def test_every_problem_has_the_layouts_length(name, T):
    task = TASKS[name]
    P, R = task.max_lengths()
    assert P + R == T >= 512
    for p in problems(30, task):
        prompt, response = task.format_prompt(p), task.format_response(p)
        assert decode(encode(prompt + response)) == prompt + response
        assert (len(encode(prompt)), len(encode(response)) + 1) == (P, R)


def test_the_table_is_the_running_sum_of_the_prompt_and_a_permutation():
    for p in problems(50):
        entries = table(p)
        total = 0
        for x, (carry, value) in enumerate(entries):
            assert 10 * carry + value == total + p.digits[x]
            total = value
        assert sorted(v for _, v in entries) == list(range(N_KEYS))
        written = TASK.format_response(p).split("|")[0]
        assert written == "".join(f"{c}{KEYS[x]}{v}" for x, (c, v) in enumerate(entries))


def test_every_step_reads_the_key_named_two_values_back_and_adds_its_table_value():
    for p in problems(30):
        t = [v for _, v in table(p)]
        rounds = TASK.format_response(p).split("|")[1:]
        assert len(rounds) == TASK.rounds
        for r, text in enumerate(rounds):
            assert text[:2] == f"{KEYS[r]}{t[r]}" and len(text) == 2 + 4 * TASK.steps
            values = [r, t[r]]
            for j in range(TASK.steps):
                k, v, c, a = text[2 + 4 * j:6 + 4 * j]
                assert k == KEYS[values[-2]] and int(v) == t[values[-2]]
                assert 10 * int(c) + int(a) == values[-1] + int(v)
                values.append(int(a))
            assert TASK.results(p)[r] == values[-1]


def test_no_two_rounds_write_the_same_steps_and_keys_are_reread_from_far_back():
    """The table is a permutation, so the (value two back, previous value) map is one-to-one: two rounds that
    start apart never merge. And the point of the task: many keys were last written hundreds of tokens back."""
    far = total = 0
    for p in problems(100):
        text = TASK.format_prompt(p) + TASK.format_response(p)
        rounds = text.split("|")[1:]
        assert len(set(rounds)) == len(rounds)
        last = {}
        for i, ch in enumerate(text):
            if ch in KEYS:
                if i > len(text) - len(TASK.format_response(p)) + 3 * N_KEYS:  # a key read in a round
                    far += i - last[ch] > 120
                    total += 1
                last[ch] = i
    assert 0.02 < far / total < 0.2  # measured 0.038: recency beyond ~120 tokens misses a few per trace


def test_rewards_judge_each_rounds_result():
    p = problems(1)[0]
    right = TASK.format_response(p)
    rounds = right.split("|")
    wrong_last = "|".join(rounds[:-1] + [rounds[-1][:-1] + str((int(rounds[-1][-1]) + 1) % 10)])
    assert TASK.reward(p, right) == 1.0 and TASK.partial_reward(p, right) == 1.0
    assert TASK.reward(p, wrong_last) == 0.0
    assert TASK.partial_reward(p, wrong_last) == pytest.approx((TASK.rounds - 1) / TASK.rounds, abs=1e-12)
    assert TASK.partial_reward(p, right + "|a3") == pytest.approx(TASK.rounds / (TASK.rounds + 1), abs=1e-12)
    assert TASK.partial_reward(p, rounds[0]) == 0.0 and TASK.reward(p, "") == 0.0  # no round written
    assert TASK.trace_right(p, right) == 1.0 and TASK.trace_right(p, wrong_last) == 0.0


def test_splits_are_disjoint_reproducible_and_bad_input_raises():
    train_p, val, test = TASK.make_splits(3, 200, 50, 50)
    assert len(set(train_p) | set(val) | set(test)) == 300
    assert TASK.make_splits(3, 10, 50, 50)[2] == test                      # n_train never moves test
    with pytest.raises(ValueError, match="10 digits"):
        TASK.format_prompt(Problem((1, 2, 3)))
    with pytest.raises(ValueError, match="permutation"):
        TASK.format_prompt(Problem((0,) * 10))                             # running sums 0, 0, ...
    with pytest.raises(ValueError, match="rounds"):
        TableTrace(rounds=11)


def test_long_preset_validates_with_t_at_least_512_and_its_budget_within_a_quarter_of_t():
    cfg = train.make_config(["--preset=long"])
    P, R = TASKS[cfg["task"]].max_lengths()
    assert cfg["task"] == "tabletrace" and cfg["block_size"] >= P + R >= 512 and cfg["keep_prompt"]
    assert cfg["budget"] <= 0.25 * (P + R)
    assert train.make_config([])["task"] == "arithmetic"                   # the default stays the short task


@pytest.mark.parametrize("argv, message", [
    (["--task=tabletrac"], "task must be one of"),
    (["--task=tabletrace"], "block_size 64 must hold prompt \\+ response = 512"),
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


def test_learner_logprobs_equal_the_samplers_on_the_presets_512_token_trace():
    """Tiny model, 2 samples, the preset's h2o at 64 slots (12% of T): max |d log p| < 1e-5, mask path."""
    cfg = train.make_config(["--preset=long", "--n_layer=1", "--n_embd=16", "--n_head=2"])
    task = TASKS[cfg["task"]]
    P, R = task.max_lengths()
    torch.manual_seed(0)
    model = GPT(warmup.model_config(cfg)).eval()
    prompts = [encode(task.format_prompt(p)) for p in problems(2, task)]
    ro = smd.rollout(model, prompts, policy="h2o", budget=64, max_new_tokens=R, temperature=1.0, eos_id=None,
                     generator=torch.Generator().manual_seed(0), **train.policy_kwargs(cfg))
    assert ro.tokens.shape == (2, P + R) and P + R == 512                 # no EOS: every token
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
