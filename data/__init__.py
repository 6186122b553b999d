"""
The tasks, by the name train.py's `task` knob takes. Each has the same interface: EOS_ID, VOCAB_SIZE, encode,
decode, make_splits, max_lengths, format_prompt, format_response, reward, partial_reward.
  arithmetic         running sums of 10 digits, 53 tokens (the 3-minute default)
  longtrace          a 488-token scratchpad whose answer reads back 18 checkpoints, 513 tokens
  longtrace_recap6   the same, with the checkpoints read back every 6 rounds during the trace, 551 tokens
  longtrace_recap3   ... every 3 rounds, 608 tokens (--preset=long)
"""
from data import arithmetic
from data.longtrace import LongTrace

TASKS = {"arithmetic": arithmetic, "longtrace": LongTrace(), "longtrace_recap6": LongTrace(recap_every=6),
         "longtrace_recap3": LongTrace(recap_every=3)}
