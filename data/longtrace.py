"""
The long-trace task: a short prompt, a ~490-token scratchpad, and an answer that reads back values written
hundreds of tokens earlier, so a sequence is T >= 512 tokens and an evicting cache must choose, over a long
response, what to keep. The same interface as data/arithmetic.py (vocabulary, seeded splits, prompt/response
text, exact and partial rewards, max_lengths), held by a small object, LongTrace, so that one file holds the
plain trace and its variants (data/__init__.py names them). Not here: batching, padding, any model.

    prompt   "a606b000c404d101e202f404="   six seed digits x, each as "l x 0 x" (round 0 in the trace layout)
    round k  for each label l = a..f: "l b c u", then one checkpoint token "[Xr]"       (25 tokens a round)
             b = u of the same label one round back (a copy, 23 tokens back)
             c u = u_prev + b as carry and units digit (u_prev = the previous step's u)
             [Xr] names round X = A, B, ... and its result r = the round's last u
    answer   ";" then "A r1 B r2 ... R r18": each round's result read back from its checkpoint; the trainer
             adds EOS
A lagged-Fibonacci sum (u = u_prev + b mod 10) written with its carry, so every step needs two lookups that
each get a gradient alone (written as one digit mod 10, the probe's first form never learned). The trace needs
only the last ~24 tokens; the answer needs 18 tokens spread over the first ~450: a cache of 128 slots that
kept the prompt, the last round and the checkpoints would lose nothing.
Variant recap_every=m: after every m-th round but the last, ":" and the results so far ("A r1 B r2 ..."),
written from the checkpoints, so the tokens the answer needs are read periodically during the trace (what
an attention-scored policy such as H2O or SnapKV can see) and not only at the end.
"""
import random
import re
from typing import NamedTuple

N_SEEDS = 6    # seed digits = steps per round = the lag of the sum
N_ROUNDS = 18  # rounds, each ending in a checkpoint; with 6 seeds: 25 + 488 = 513 tokens, T >= 512

LABELS = "abcdef"                 # one per seed digit (step of a round)
ROUNDS = "ABCDEFGHIJKLMNOPQR"     # one per round, in the checkpoints and the answer
CHARS = "0123456789" + LABELS + ROUNDS + "=;:"  # digits, labels, round names, prompt end, answer, recap
CHECKPOINTS = [f"[{X}{r}]" for X in ROUNDS for r in range(10)]  # one token each: round and result
EOS = "<|eos|>"
TOKENS = list(CHARS) + CHECKPOINTS + [EOS]
EOS_ID = len(TOKENS) - 1
VOCAB_SIZE = len(TOKENS)
_ID = {s: i for i, s in enumerate(TOKENS)}
_PIECE = re.compile(r"\[[A-R][0-9]\]|.", re.S)  # a checkpoint token, else one character


class Problem(NamedTuple):
    """One problem: the seed digits. Hashable, so splits are sets."""
    seeds: tuple[int, ...]


def encode(text: str) -> list[int]:
    """Text -> token ids: one per character, and one per checkpoint "[Xr]". EOS is never produced."""
    pieces = _PIECE.findall(text)
    unknown = sorted({p for p in pieces if p not in _ID})
    if unknown:
        raise ValueError(f"{unknown} are not in the vocabulary: characters {CHARS!r} and checkpoints "
                         f"'[A0]'..'[R9]'")
    return [_ID[p] for p in pieces]


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
    if len(problem.seeds) != N_SEEDS or not all(isinstance(x, int) and 0 <= x < 10 for x in problem.seeds):
        raise ValueError(f"a problem holds {N_SEEDS} seed digits in 0..9, got {problem.seeds}")


def _results(problem: Problem) -> tuple[list[int], list[int]]:
    """(u, carry) of every step, round by round (N_ROUNDS * N_SEEDS each): u = (u_prev + b) mod 10."""
    seq, carry = list(problem.seeds), []
    for _ in range(N_ROUNDS * N_SEEDS):
        s = seq[-1] + seq[-N_SEEDS]                                  # u_prev + the same label a round back
        seq.append(s % 10)
        carry.append(s // 10)
    return seq[N_SEEDS:], carry


def _answer_fields(problem: Problem, n_rounds: int = N_ROUNDS) -> list[str]:
    """["A3", "B7", ...]: each of the first n_rounds rounds' name and result (its last u)."""
    u, _ = _results(problem)
    return [f"{ROUNDS[k]}{u[k * N_SEEDS + N_SEEDS - 1]}" for k in range(n_rounds)]


class LongTrace:
    """The task with its layout: recap_every = 0 (the plain trace) or m (a recap after every m-th round)."""

    EOS_ID, VOCAB_SIZE, Problem = EOS_ID, VOCAB_SIZE, Problem
    encode, decode = staticmethod(encode), staticmethod(decode)

    def __init__(self, recap_every: int = 0):
        if recap_every < 0:
            raise ValueError(f"recap_every must be >= 0 (0 = no recap), got {recap_every}")
        self.recap_every = recap_every

    def max_lengths(self) -> tuple[int, int]:
        """(prompt tokens, response tokens including EOS): the same for every problem."""
        problem = Problem((0,) * N_SEEDS)
        return len(encode(self.format_prompt(problem))), len(encode(self.format_response(problem))) + 1

    def make_splits(self, seed: int, n_train: int, n_val: int, n_test: int):
        """Disjoint (train, val, test) lists of distinct problems, dealt test first from one seeded stream (as
        data/arithmetic.py's): test depends only on (seed, n_test), and n_train never changes val or test."""
        for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if n < 0:
                raise ValueError(f"{name} must be >= 0, got {n}")
        if n_train + n_val + n_test > 10 ** N_SEEDS:
            raise ValueError(f"asked for {n_train + n_val + n_test} problems but only {10 ** N_SEEDS} exist")
        rng, seen, drawn = random.Random(seed), set(), []
        while len(drawn) < n_train + n_val + n_test:
            p = Problem(tuple(rng.randrange(10) for _ in range(N_SEEDS)))
            if p not in seen:
                seen.add(p)
                drawn.append(p)
        return drawn[n_test + n_val:], drawn[n_test:n_test + n_val], drawn[:n_test]

    @staticmethod
    def format_prompt(problem: Problem) -> str:
        """'a606b000c404d101e202f404=': each seed digit x as 'l x 0 x' (label, b, carry, u of round 0)."""
        _check_problem(problem)
        return "".join(f"{LABELS[i]}{x}0{x}" for i, x in enumerate(problem.seeds)) + "="

    def format_trace(self, problem: Problem) -> str:
        """The scratchpad: every round's steps 'l b c u' and checkpoint '[Xr]', with the recaps if any."""
        _check_problem(problem)
        u, carry = _results(problem)
        out = []
        for k in range(N_ROUNDS):
            for i in range(N_SEEDS):
                t = k * N_SEEDS + i
                b = problem.seeds[i] if k == 0 else u[t - N_SEEDS]
                out.append(f"{LABELS[i]}{b}{carry[t]}{u[t]}")
            out.append(f"[{ROUNDS[k]}{u[k * N_SEEDS + N_SEEDS - 1]}]")
            if self.recap_every and (k + 1) % self.recap_every == 0 and k + 1 < N_ROUNDS:
                out.append(":" + "".join(_answer_fields(problem, k + 1)))
        return "".join(out)

    def format_response(self, problem: Problem) -> str:
        """The trace, ';', then every round's name and result: '...;A3B7C0...'. The trainer adds EOS."""
        return self.format_trace(problem) + ";" + "".join(_answer_fields(problem))

    @staticmethod
    def reward(problem: Problem, response_text: str) -> float:
        """1.0 if the text after the last ';' is exactly the answer ('A3B7...R5'), else 0.0; the trace is not
        judged. Pass decode(ids), which stops at EOS."""
        if ";" not in response_text:
            return 0.0
        return float(response_text.rsplit(";", 1)[1] == "".join(_answer_fields(problem)))

    @staticmethod
    def partial_reward(problem: Problem, response_text: str) -> float:
        """The fraction of the answer's N_ROUNDS fields ('A3', 'B7', ...) that are right where the answer puts
        them, the text after the last ';' read two characters a field; extra fields count against it (it
        divides by the number written when that is more), so 1.0 means exactly the answer. No ';': 0.0."""
        if ";" not in response_text:
            return 0.0
        got = response_text.rsplit(";", 1)[1]
        fields = [got[i:i + 2] for i in range(0, len(got), 2)]
        want = _answer_fields(problem)
        return sum(g == w for g, w in zip(fields, want)) / max(len(want), len(fields))

    def trace_right(self, problem: Problem, response_text: str) -> float:
        """1.0 if the text before the last ';' is exactly the trace (a diagnostic: where an error began)."""
        return float(response_text.rsplit(";", 1)[0] == self.format_trace(problem))
