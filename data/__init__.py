"""
The tasks, by the name train.py's `task` knob takes. Each has the same interface: EOS_ID, VOCAB_SIZE, encode,
decode, make_splits, max_lengths, format_prompt, format_response, reward, partial_reward.
  arithmetic         running sums of 10 digits, 53 tokens (the 3-minute default)
  longtrace          a 488-token scratchpad whose answer reads back 18 checkpoints, 513 tokens
  longtrace_recap6   the same, with the checkpoints read back every 6 rounds during the trace, 551 tokens
  longtrace_recap3   ... every 3 rounds, 608 tokens
  tabletrace         a table derived once, then 10 rounds of 11 steps that consult it, 512 tokens
  tabletrace_r8      the same in 8 rounds of 14 steps, 514 tokens
"""
from data import arithmetic
from data.longtrace import LongTrace
from data.tabletrace import TableTrace

TASKS = {"arithmetic": arithmetic, "longtrace": LongTrace(), "longtrace_recap6": LongTrace(recap_every=6),
         "longtrace_recap3": LongTrace(recap_every=3), "tabletrace": TableTrace(),
         "tabletrace_r8": TableTrace(rounds=8, steps=14)}
