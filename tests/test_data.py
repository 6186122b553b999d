"""
Specification of data/arithmetic.py: the tokenizer round-trips exactly and rejects what it cannot encode,
the splits are disjoint and reproducible, both rewards check exactly what their docstrings promise, and the
default sequence is long enough that the trainer's default KV budget forces eviction. No model is involved.
"""
import random

import pytest

from data.arithmetic import (CHARS, EOS_ID, N_DIGITS, N_OPERANDS, VOCAB_SIZE, Problem, decode, encode,
                             format_prompt, format_response, make_splits, max_lengths, partial_reward, reward)

DEFAULT_KV_BUDGET = 28  # train.py's default cache budget (train.budget); it must fill early enough to bite


def test_every_vocab_character_round_trips_as_its_own_token():
    for i, c in enumerate(CHARS):
        assert encode(c) == [i]
        assert decode([i]) == c
    assert decode(encode(CHARS)) == CHARS


def test_problem_texts_round_trip_exactly_one_token_per_character():
    rng = random.Random(0)
    for _ in range(200):
        p = Problem(tuple(rng.randrange(10 ** N_DIGITS) for _ in range(N_OPERANDS)), N_DIGITS)
        text = format_prompt(p) + format_response(p)
        ids = encode(text)
        assert len(ids) == len(text)
        assert decode(ids) == text


@pytest.mark.parametrize("text", ["12a+3", "1 + 2", "3\n", "<|eos|>", "9-4"])
def test_unknown_characters_raise_value_error_naming_them(text):
    bad = sorted(set(text) - set(CHARS))
    with pytest.raises(ValueError) as err:
        encode(text)
    assert all(repr(c) in str(err.value) for c in bad)


def test_eos_is_the_last_id_and_decoding_stops_at_it():
    assert VOCAB_SIZE == len(CHARS) + 1
    assert EOS_ID == VOCAB_SIZE - 1
    assert EOS_ID not in encode(CHARS)
    assert decode([EOS_ID]) == ""
    assert decode(encode("12;3") + [EOS_ID] + encode("99")) == "12;3"


@pytest.mark.parametrize("ids", [[VOCAB_SIZE], [-1], [0, 1, 1000]])
def test_decode_rejects_ids_outside_the_vocabulary(ids):
    with pytest.raises(ValueError):
        decode(ids)


def test_splits_are_disjoint_distinct_and_have_the_requested_sizes():
    train, val, test = make_splits(seed=0, n_train=2000, n_val=200, n_test=200)
    assert (len(train), len(val), len(test)) == (2000, 200, 200)
    assert len(set(train) | set(val) | set(test)) == 2400  # no repeats within or across splits


def test_splits_are_disjoint_when_they_exhaust_a_small_problem_space():
    train, val, test = make_splits(seed=0, n_train=60, n_val=20, n_test=20, n_operands=2, n_digits=1)
    assert set(train) | set(val) | set(test) == {Problem((a, b), 1) for a in range(10) for b in range(10)}


def test_splits_are_identical_for_the_same_seed_and_differ_for_another():
    sizes = dict(n_train=100, n_val=10, n_test=10)
    assert make_splits(seed=3, **sizes) == make_splits(seed=3, **sizes)
    assert make_splits(seed=3, **sizes) != make_splits(seed=4, **sizes)


def test_test_and_val_sets_do_not_change_when_n_train_changes():
    _, val_small, test_small = make_splits(seed=1, n_train=10, n_val=20, n_test=30)
    _, val_big, test_big = make_splits(seed=1, n_train=1000, n_val=20, n_test=30)
    assert (val_small, test_small) == (val_big, test_big)


@pytest.mark.parametrize("kwargs", [
    dict(n_operands=1), dict(n_digits=0), dict(n_train=-1),
    dict(n_train=101, n_operands=2, n_digits=1),  # only 10**2 problems exist
])
def test_bad_config_raises_value_error(kwargs):
    args = dict(seed=0, n_train=10, n_val=0, n_test=0) | kwargs
    with pytest.raises(ValueError):
        make_splits(**args)


def test_operand_wider_than_n_digits_is_rejected():
    with pytest.raises(ValueError):
        format_prompt(Problem((123, 4), 2))


def test_worked_example_matches_the_documented_format():
    p = Problem((31, 7, 58, 24, 5, 90, 12), 2)
    assert format_prompt(p) == "31+07+58+24+05+90+12="
    assert format_response(p) == "031>038>096>120>125>215>227;227"


def test_every_problem_has_exactly_the_max_lengths():
    train, _, _ = make_splits(seed=0, n_train=300, n_val=0, n_test=0)
    for p in train:
        prompt_len, response_len = max_lengths()
        assert len(encode(format_prompt(p))) == prompt_len
        assert len(encode(format_response(p))) + 1 == response_len  # +1 for EOS


def test_default_cache_fills_before_half_the_response_is_written():
    prompt_len, response_len = max_lengths()
    # evicting for most of the running sums
    assert prompt_len < DEFAULT_KV_BUDGET < prompt_len + response_len / 2
    import train
    assert train.budget == DEFAULT_KV_BUDGET
    assert prompt_len + response_len <= 64  # small enough for a tiny GPT on a CPU


def test_reward_is_one_for_every_correct_response():
    train, _, _ = make_splits(seed=0, n_train=300, n_val=0, n_test=0)
    assert all(reward(p, format_response(p)) == 1.0 for p in train)


@pytest.mark.parametrize("response, expected", [
    ("031>038>096>120>125>215>227;227", 1.0),  # correct
    ("031>038>096>120>125>215>227;228", 0.0),  # wrong final answer
    ("031>038>096>120>125>215>228;227", 1.0),  # wrong scratchpad step, right answer: only the answer counts
    ("031>038>096>120>125>215>227;27", 0.0),   # the zero padding is part of the answer
    ("031>038>096>120>125>215>227;0227", 0.0),  # extra character after the answer
    ("031>038>096>120>125>215>227;227>", 0.0),  # malformed tail
    ("031>038>096>120>125>215>227", 0.0),      # no ';' at all
    ("", 0.0),                                 # empty
    ("1;999;227", 1.0),                        # only the text after the last ';' counts
])
def test_reward_on_hand_made_responses(response, expected):
    p = Problem((31, 7, 58, 24, 5, 90, 12), 2)
    assert reward(p, response) == expected


def test_reward_ignores_what_was_sampled_after_eos():
    p = Problem((31, 7, 58, 24, 5, 90, 12), 2)
    ids = encode(format_response(p)) + [EOS_ID] + encode("999")
    assert reward(p, decode(ids)) == 1.0


def test_partial_reward_is_one_exactly_for_the_worked_example():
    train, _, _ = make_splits(seed=0, n_train=300, n_val=0, n_test=0)
    assert all(partial_reward(p, format_response(p)) == 1.0 for p in train)


@pytest.mark.parametrize("response, expected", [  # 7 operands: 7 running sums + the total = 8 fields
    ("031>038>096>120>125>215>227;227", 8 / 8),
    ("031>038>096>120>125>215>228;227", 7 / 8),   # one wrong running sum, right total
    ("031>038>096>120>125>215>227;228", 7 / 8),   # right scratchpad, wrong total: reward() gives 0
    ("031>038>096>999>999>999>999;999", 3 / 8),   # lost the thread after three sums
    ("031>038", 2 / 8),                           # cut off: missing sums and no total count as wrong
    ("031>038;227", 3 / 8),                       # skipped the middle of the scratchpad
    ("031>038>096>120>125>215>227>999;227", 8 / 9),  # an extra field counts against the score
    ("31>038>096>120>125>215>227;227", 7 / 8),    # the zero padding is part of each field
    ("", 0.0),
])
def test_partial_reward_on_hand_made_responses(response, expected):
    p = Problem((31, 7, 58, 24, 5, 90, 12), 2)
    assert partial_reward(p, response) == pytest.approx(expected, abs=1e-12)


def test_partial_reward_ignores_what_was_sampled_after_eos():
    p = Problem((31, 7, 58, 24, 5, 90, 12), 2)
    ids = encode("031>038>096") + [EOS_ID] + encode(">120>125>215>227;227")
    assert partial_reward(p, decode(ids)) == pytest.approx(3 / 8, abs=1e-12)
