"""
The experiment around the method (run from the repo's root, outputs under out/): compare.py (the rows, paired
over warm-ups and RL seeds), variance.py (each mode's policy-gradient variance on shared rollouts), bench.py
(KV memory, decode speed, learner cost), plot.py (the figures); README.md holds today's results with the
command behind each table, LOG.md the earlier ones. Each script: `python -m experiments.<name> --help`.
"""
