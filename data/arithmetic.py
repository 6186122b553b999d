"""
The toy task and its tokenizer: add n_operands numbers and write the running sums as a scratchpad.
Each step of the scratchpad needs an operand from far back in the prompt, so a KV cache that evicts old
tokens loses exactly what the answer depends on. Here: vocabulary, problems, their seeded train/val/test
splits, prompt/response text, the exact-match reward and a partial-credit one.
Not here: batching, padding, any model.

    prompt   "3+0+5+2+0+9+1+4+7+2="                operands, n_digits each (default 10 of 1 digit)
    response "03>03>08>10>10>19>20>24>31>33;33"  running sums, ';', the final sum; the trainer adds EOS
"""
import random
from typing import NamedTuple

import tiktoken

N_OPERANDS = 10  # with N_DIGITS=1: 20 prompt + 33 response tokens = 53; train.py's budget of 28 fills early
N_DIGITS = 1  # every operand has exactly this many digits, so all problems have one length; 1 (not 2) so
#               a 2-layer GPT learns the task on a CPU in minutes (7 two-digit operands: ~8% after 1000 steps)

# -----------------------------------------------------------------------------
# tokenizer: one token per character, built from this list alone (nothing is downloaded)

CHARS = "0123456789+=>;"  # digits, then: plus, equals, running-sum separator, answer separator
EOS = "<|eos|>"
EOS_ID = len(CHARS)
VOCAB_SIZE = len(CHARS) + 1

_enc = tiktoken.Encoding(
    name="smd-arithmetic",
    pat_str=r".",  # every character is its own piece; there are no merges to apply
    mergeable_ranks={c.encode(): i for i, c in enumerate(CHARS)},
    special_tokens={EOS: EOS_ID},
    explicit_n_vocab=VOCAB_SIZE,
)


def encode(text: str) -> list[int]:
    """Text -> token ids, one per character. EOS is never produced; append EOS_ID yourself."""
    # checked here because tiktoken panics on a byte it has no rank for, and silently drops
    # any character its pattern does not match (r"." skips newlines)
    unknown = sorted(set(text) - set(CHARS))
    if unknown:
        raise ValueError(f"characters {unknown} are not in the vocabulary {CHARS!r}")
    return _enc.encode_ordinary(text)


def decode(ids: list[int]) -> str:
    """Token ids -> text, stopping at the first EOS: EOS and everything after it decode to nothing,
    so a sample that runs past its end is judged only on what came before."""
    bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
    if bad:
        raise ValueError(f"token ids {bad} are outside [0, {VOCAB_SIZE})")
    ids = list(ids)
    if EOS_ID in ids:
        ids = ids[: ids.index(EOS_ID)]
    return _enc.decode(ids)


# -----------------------------------------------------------------------------
# problems

class Problem(NamedTuple):
    """One problem: the numbers to add and the width they are written in. Hashable, so splits are sets."""
    operands: tuple[int, ...]
    n_digits: int


def _check_config(n_operands: int, n_digits: int) -> None:
    if n_operands < 2:
        raise ValueError(f"n_operands must be >= 2 (a sum needs two numbers), got {n_operands}")
    if n_digits < 1:
        raise ValueError(f"n_digits must be >= 1, got {n_digits}")


def _sum_width(n_operands: int, n_digits: int) -> int:
    # every running sum is padded to the width of the largest possible total, so the scratchpad
    # has the same layout for every problem and the response length is a constant
    return len(str(n_operands * (10 ** n_digits - 1)))


def max_lengths(n_operands: int = N_OPERANDS, n_digits: int = N_DIGITS) -> tuple[int, int]:
    """(prompt tokens, response tokens including EOS). Every problem's prompt and every correct response
    have exactly these lengths; use them to size block_size and to cap sampling."""
    _check_config(n_operands, n_digits)
    width = _sum_width(n_operands, n_digits)
    prompt = n_operands * n_digits + (n_operands - 1) + 1  # operands, '+' between them, '='
    response = n_operands * width + (n_operands - 1) + 1 + width + 1  # sums, '>'s, ';', answer, EOS
    return prompt, response


def make_splits(seed: int, n_train: int, n_val: int, n_test: int, n_operands: int = N_OPERANDS,
                n_digits: int = N_DIGITS) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """Disjoint (train, val, test) lists of distinct problems, the same for the same arguments.

    Problems are drawn uniformly without replacement from one seeded stream and dealt out test first,
    then val, then train. So test depends only on (seed, n_test, n_operands, n_digits), val also on
    n_test, and changing n_train never changes val or test.
    """
    _check_config(n_operands, n_digits)
    counts = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    for name, n in counts.items():
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    n_possible = 10 ** (n_digits * n_operands)
    n_wanted = n_train + n_val + n_test
    if n_wanted > n_possible:
        raise ValueError(f"asked for {n_wanted} problems but only {n_possible} exist with "
                         f"n_operands={n_operands}, n_digits={n_digits}")
    rng = random.Random(seed)
    seen, drawn = set(), []
    while len(drawn) < n_wanted:
        # redraw duplicates instead of random.sample, so the first k problems never depend on n_wanted
        p = Problem(tuple(rng.randrange(10 ** n_digits) for _ in range(n_operands)), n_digits)
        if p not in seen:
            seen.add(p)
            drawn.append(p)
    test = drawn[:n_test]
    val = drawn[n_test:n_test + n_val]
    train = drawn[n_test + n_val:]
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    return train, val, test


# -----------------------------------------------------------------------------
# text and reward

def _check_problem(problem: Problem) -> None:
    # an operand wider than n_digits would silently lengthen the prompt past max_lengths()
    _check_config(len(problem.operands), problem.n_digits)
    if not all(0 <= x < 10 ** problem.n_digits for x in problem.operands):
        raise ValueError(f"operands {problem.operands} must lie in [0, {10 ** problem.n_digits})")


def format_prompt(problem: Problem) -> str:
    """'3+0+5+2+0+9+1+4+7+2=': the operands, zero-padded to n_digits."""
    _check_problem(problem)
    return "+".join(f"{x:0{problem.n_digits}d}" for x in problem.operands) + "="


def _answer_text(problem: Problem) -> str:
    width = _sum_width(len(problem.operands), problem.n_digits)
    return f"{sum(problem.operands):0{width}d}"


def format_response(problem: Problem) -> str:
    """'03>03>08>10>10>19>20>24>31>33;33': each running sum (the first is operand 1 itself), then ';' and
    the total, all zero-padded to the width of the largest possible total. No EOS: the trainer adds EOS_ID."""
    _check_problem(problem)
    width = _sum_width(len(problem.operands), problem.n_digits)
    partial, sums = 0, []
    for x in problem.operands:
        partial += x
        sums.append(f"{partial:0{width}d}")
    return ">".join(sums) + ";" + _answer_text(problem)


def reward(problem: Problem, response_text: str) -> float:
    """1.0 if the text after the last ';' is exactly the total as format_response writes it, else 0.0.

    Only the final answer counts, not the scratchpad: wrong running sums followed by the right total
    still earn 1.0. Exact means the same characters: the zero padding is part of the answer ('045', not
    '45'), and any extra character after it earns 0.0. No ';' at all earns 0.0. Pass decode(ids), which
    stops at EOS, so whatever was sampled after EOS is ignored; a response cut off before EOS is judged
    on its text like any other. There is no partial credit.
    """
    if ";" not in response_text:
        return 0.0
    final = response_text.rsplit(";", 1)[1]
    return float(final == _answer_text(problem))


def partial_reward(problem: Problem, response_text: str) -> float:
    """Partial credit: the fraction of the n_operands + 1 fields that are right where format_response puts
    them, the k-th running sum as the k-th '>'-separated field before the last ';' and the total after it.

    A shaped reward for RL, not an accuracy: a sample that gets the first running sums right and then loses
    an operand scores above one that is wrong from the start, so a group of samples that all miss the exact
    answer still carries a signal. Each field is compared exactly, as in reward(). A missing field is wrong
    (no ';' at all: no total), and extra fields count against the score (it divides by the number of fields
    written when that is more than n_operands + 1), so 1.0 means exactly format_response's text.
    """
    *want_sums, want_total = format_response(problem).replace(";", ">").split(">")
    scratch, total = response_text.rsplit(";", 1) if ";" in response_text else (response_text, None)
    sums = scratch.split(">")
    n_right = sum(got == want for got, want in zip(sums, want_sums)) + (total == want_total)
    return n_right / (max(len(want_sums), len(sums)) + 1)                # + 1: the total
