"""
The Hugging Face port (optional: needs transformers): SMD's two hooks on any HF causal LM whose attention goes
through transformers' AttentionInterface. `import hf` gives the API of hooks.py, the same names as smd.py's:
hf.rollout, hf.record, hf.learner_logits, hf.learner_logprobs, plus hf.from_config to build a model with the
hooks' attention. grpo.py runs a few SMD GRPO steps on one (`python -m hf.grpo`); README.md maps the hooks
onto TRL, verl and slime. Nothing in the core (model.py, smd.py, train.py, ...) imports this folder.
"""

from hf.hooks import EAGER, SDPA, check_model, from_config, group_mean, learner_logits, learner_logprobs, \
    record, rollout
