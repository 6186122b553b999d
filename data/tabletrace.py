"""
The table trace: a long scratchpad (T >= 512) written the way reasoning traces are. It derives a small table
of facts once, near its start, then works through rounds of steps, each restating its running value and
consulting the table again: most tokens are never read again, a few (the table's values) are read over and
over, hundreds of tokens after they were written. The same interface as data/arithmetic.py (vocabulary,
seeded splits, prompt/response text, exact and partial rewards, max_lengths), held by a small object,
TableTrace, whose knobs make the family the regime search (experiments/long_search.toml) explores.
Not here: batching, padding, any model.

    prompt   "3508296147="        ten digits q_a .. q_j (keep_prompt keeps them whole)
    table    "0a3" "0b8" "1c3" ... for each key x = a .. j: "c x v", v = T[x] = (T[x-1] + q_x) mod 10 and c
             its carry (T[a] = q_a): a running sum, written once; 30 tokens. The prompts are drawn so that T
             is a permutation of the digits (each value names one key)
    round r  "|" then "k v", k = the r-th key and v = T[k], then `steps` steps "k v c a": the key k named by
             the value two steps back (digit d -> the d-th key; the round's start counts as k's index, then
             v), v = T[k] (a back-reference: to the table, or to the last step that consulted k), then c a =
             the previous value + v as carry and units: the running value, restated every step
    end      the last round is followed by EOS (the trainer adds it); the answer is each round's result (its
             last value), as the rounds wrote them
Every step needs two things: the last few tokens (the running value, the key's source) and one value of the
table. Where the table's copy is read from decides which caches work: the last step that consulted the same
key (how far back depends on the problem: keys follow the values), else the table itself, hundreds of tokens
back. Since T is a permutation, a step's (value two back, previous value) pair follows from the next one's: the
rounds never fall into a common cycle, so the keys keep moving and no two rounds write the same steps. A cache that keeps the prompt, the last ~10 tokens and the ten values loses nothing; recency alone
loses whatever it cannot reach. Rounds restart from the table, so one error spoils one round, not the rest:
partial_reward (the fraction of rounds whose result is right) grades a trace by how much of it holds.
"""
import random
import re
from typing import NamedTuple

N_KEYS = 10                    # table size: one key per digit, so a value names a key
KEYS = "abcdefghij"
CHARS = "0123456789" + KEYS + "=|"  # digits, keys, the prompt's end, a round's start
EOS = "<|eos|>"
TOKENS = list(CHARS) + [EOS]
EOS_ID = len(TOKENS) - 1
VOCAB_SIZE = len(TOKENS)
_ID = {s: i for i, s in enumerate(TOKENS)}
_PIECE = re.compile(r"<\|eos\|>|.", re.S)


class Problem(NamedTuple):
    """One problem: the ten prompt digits, whose running sum mod 10 is a permutation of the digits (10! of
    them). Hashable, so splits are sets."""
    digits: tuple[int, ...]


def encode(text: str) -> list[int]:
    """Text -> token ids, one per character. EOS is never produced; append EOS_ID yourself."""
    unknown = sorted(set(text) - set(CHARS))
    if unknown:
        raise ValueError(f"characters {unknown} are not in the vocabulary {CHARS!r}")
    return [_ID[c] for c in text]


def decode(ids: list[int]) -> str:
    """Token ids -> text, stopping at the first EOS (a sample is judged only on what came before it)."""
    bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
    if bad:
        raise ValueError(f"token ids {bad} are outside [0, {VOCAB_SIZE})")
    ids = list(ids)
    if EOS_ID in ids:
        ids = ids[: ids.index(EOS_ID)]
    return "".join(TOKENS[i] for i in ids)


def _check_problem(problem: Problem) -> None:
    if len(problem.digits) != N_KEYS or not all(isinstance(x, int) and 0 <= x < 10 for x in problem.digits):
        raise ValueError(f"a problem holds {N_KEYS} digits in 0..9, got {problem.digits}")
    sums = [sum(problem.digits[:x + 1]) % 10 for x in range(N_KEYS)]
    if sorted(sums) != list(range(10)):
        raise ValueError(f"a problem's running sums mod 10 must be a permutation of the digits, got {sums}")


def table(problem: Problem) -> list[tuple[int, int]]:
    """[(carry, T[x]) for x = a .. j]: the running sum of the prompt digits, mod 10."""
    _check_problem(problem)
    out, total = [], 0
    for q in problem.digits:
        out.append(((total + q) // 10 if out else 0, (total + q) % 10))
        total = out[-1][1]
    return out


class TableTrace:
    """The task with its layout: `rounds` rounds (at most N_KEYS: round r starts from the r-th key) of `steps`
    steps."""

    EOS_ID, VOCAB_SIZE, Problem = EOS_ID, VOCAB_SIZE, Problem
    encode, decode = staticmethod(encode), staticmethod(decode)

    def __init__(self, rounds: int = 10, steps: int = 11):
        if not 1 <= rounds <= N_KEYS or steps < 1:
            raise ValueError(f"a table trace needs 1 <= rounds <= {N_KEYS} and steps >= 1, got rounds={rounds}, "
                             f"steps={steps}")
        self.rounds, self.steps = rounds, steps

    def max_lengths(self) -> tuple[int, int]:
        """(prompt tokens, response tokens including EOS): the same for every problem."""
        problem = Problem((0,) + (1,) * (N_KEYS - 1))
        return len(encode(self.format_prompt(problem))), len(encode(self.format_response(problem))) + 1

    def make_splits(self, seed: int, n_train: int, n_val: int, n_test: int):
        """Disjoint (train, val, test) lists of distinct problems, dealt test first from one seeded stream (as
        data/arithmetic.py's): test depends only on (seed, n_test), and n_train never changes val or test."""
        for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if n < 0:
                raise ValueError(f"{name} must be >= 0, got {n}")
        rng, seen, drawn = random.Random(seed), set(), []
        while len(drawn) < n_train + n_val + n_test:  # 10! problems: far more than any split asks for
            sums = rng.sample(range(10), 10)                               # the table T, a permutation
            p = Problem(tuple((s - prev) % 10 for s, prev in zip(sums, [0] + sums[:-1])))
            if p not in seen:
                seen.add(p)
                drawn.append(p)
        return drawn[n_test + n_val:], drawn[n_test:n_test + n_val], drawn[:n_test]

    @staticmethod
    def format_prompt(problem: Problem) -> str:
        """'3508296147=': the ten digits, then '='."""
        _check_problem(problem)
        return "".join(map(str, problem.digits)) + "="

    def round_values(self, problem: Problem, r: int) -> list[tuple[int, int, int, int]]:
        """Round r's steps as (key index, v, carry, value), the round's start first (carry None)."""
        t = [v for _, v in table(problem)]
        values = [r, t[r]]                                                 # what the first two keys read
        out = [(r, t[r], None, t[r])]
        for _ in range(self.steps):
            k = values[-2]
            s = values[-1] + t[k]
            out.append((k, t[k], s // 10, s % 10))
            values.append(s % 10)
        return out

    def format_response(self, problem: Problem) -> str:
        """The table, then the rounds: '0a30b81c3...|a3a362c3...|b8...'. The trainer adds EOS."""
        text = "".join(f"{c}{KEYS[x]}{v}" for x, (c, v) in enumerate(table(problem)))
        for r in range(self.rounds):
            start, *steps = self.round_values(problem, r)
            text += f"|{KEYS[start[0]]}{start[1]}" + "".join(f"{KEYS[k]}{v}{c}{a}" for k, v, c, a in steps)
        return text

    def results(self, problem: Problem) -> list[int]:
        """Each round's result, its last value."""
        return [self.round_values(problem, r)[-1][3] for r in range(self.rounds)]

    def _rounds_written(self, response_text: str) -> list[str]:
        return response_text.split("|")[1:]

    def partial_reward(self, problem: Problem, response_text: str) -> float:
        """The fraction of the rounds whose result (the round's last character) is right, the text after each
        '|' a round; extra rounds count against it (it divides by the number written when that is more), so
        1.0 means every result right. Pass decode(ids), which stops at EOS."""
        written = self._rounds_written(response_text)
        want = self.results(problem)
        got = [w[-1:] for w in written]
        return sum(g == str(v) for g, v in zip(got, want)) / max(len(want), len(got))

    def reward(self, problem: Problem, response_text: str) -> float:
        """1.0 if every round's result is right and there are exactly `rounds` rounds, else 0.0."""
        return float(self.partial_reward(problem, response_text) == 1.0)

    def trace_right(self, problem: Problem, response_text: str) -> float:
        """1.0 if the whole response is exactly the reference text (a diagnostic: where an error began)."""
        return float(response_text == self.format_response(problem))
