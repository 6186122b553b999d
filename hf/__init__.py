"""
The Hugging Face port (optional: needs transformers): SMD's two hooks on any HF causal LM whose attention goes
through transformers' AttentionInterface. `import hf` gives the API of hooks.py, the same names as smd.py's:
hf.rollout, hf.record, hf.learner_logits, hf.learner_logprobs, plus hf.from_config to build a model with the
hooks' attention and hf.check_model to refuse one they cannot reach. grpo.py runs a few SMD GRPO steps on one
(`python -m hf.grpo`); trl_smd.py runs SMD inside TRL's GRPOTrainer (`python -m hf.trl_smd`; it needs trl,
which `import hf` does not); README.md says how, and maps the hooks onto verl and slime. Nothing in the core
(model.py, smd.py, train.py, ...) imports this folder. `import hf` itself needs no transformers (so pytest
collects hf/'s tests, which skip without it); the first name used loads hooks.py, which does.
"""

API = ("EAGER", "SDPA", "check_model", "from_config", "group_mean", "learner_logits", "learner_logprobs",
       "record", "rollout")


def __getattr__(name):  # Python's module __getattr__ (PEP 562): hf.rollout imports hooks.py on first use
    if name not in API:
        raise AttributeError(f"module 'hf' has no attribute {name!r}")
    from hf import hooks
    return getattr(hooks, name)
