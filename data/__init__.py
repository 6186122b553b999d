"""
The tasks, by the name train.py's `task` knob takes. Each has the same interface: EOS_ID, VOCAB_SIZE, encode,
decode, make_splits, max_lengths, format_prompt, format_response, reward, partial_reward.
  arithmetic         running sums of 10 digits, 53 tokens (the 3-minute default)
  tabletrace         a table derived once, then 10 rounds of 11 steps that consult it, 512 tokens
                     (--preset=long)
  tabletrace_r8      the same in 8 rounds of 14 steps, 514 tokens (a candidate of the regime search)
"""
from data import arithmetic
from data.tabletrace import TableTrace

TASKS = {"arithmetic": arithmetic, "tabletrace": TableTrace(), "tabletrace_r8": TableTrace(rounds=8, steps=14)}
