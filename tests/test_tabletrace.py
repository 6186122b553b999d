"""
Specification of the table trace (data/tabletrace.py): the tokenizer round-trips and rejects what it cannot
encode, every problem of a layout has one T >= 512, the table is the prompt's running sum and a permutation,
every step follows its rule (key from the value two back, v = T[key], carry and units of the sum), the rounds
never repeat one another's steps, the back-references reach far (the point of the task), the rewards judge
each round's result as their docstrings say, and bad problems or layouts raise.
"""
import pytest

from data import TASKS
from data.tabletrace import CHARS, EOS_ID, KEYS, N_KEYS, VOCAB_SIZE, Problem, TableTrace, decode, encode, table

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
