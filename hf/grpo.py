"""
A few SMD GRPO steps on a small random-init Hugging Face Llama-family model (RoPE, grouped-query attention,
RMSNorm; built from a config, nothing downloaded) on our arithmetic task with our tokenizer: rollouts under
the evicting cache (hf.rollout), then
    loss = GRPO(pi_masked) + distill_coef * KL(pi_unmasked || sg(pi_masked))
with pi_masked the learner under the recorded shadow mask (hf.learner_logits). Each step prints one line:
reward, the sampler/learner mismatch of the masked learner (float rounding: the learner is the sampler) and of
the unmasked one (what a naive learner would train on), the distillation KL and the grad norm.
A short supervised warm-up on worked examples (warmup.sft_batch, full attention) comes first, so that rewards
are not all 0. Not here: an eviction-robust warm-up, evaluation, checkpoints, the other modes (train.py has
them all, for model.py's GPT).

    python -m hf.grpo                                         # rkv@28, prompt kept; a few seconds on a CPU
    python -m hf.grpo --policy=h2o --keep_prompt=False --budget=16
    python -m hf.grpo --dtype=float64                         # the smd mismatch drops to float64 rounding
    python -m hf.grpo --attention=eager                       # the mask into HF's eager attention instead
"""

import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig

import configurator
import hf
import policies
import smd
from data.arithmetic import EOS_ID, VOCAB_SIZE, decode, encode, format_prompt, make_splits, max_lengths, \
    partial_reward
from objectives import group_advantages, grpo_loss, mismatch
from warmup import sft_batch

# -----------------------------------------------------------------------------
# config: every default here, one line per knob, any of them overridden by --key=value
policy = "rkv"              # eviction policy: streaming | h2o | tova | snapkv | rkv | random
budget = 28                 # KV slots per layer and KV head (the sequence is 53 tokens)
keep_prompt = True          # never evict a prompt token: the policy chooses among generated tokens only
attention = "sdpa"          # the library attention the learner's mask goes into: sdpa | eager
dtype = "float32"           # float32 | float64
n_layer = 2                 # decoder layers
n_embd = 64                 # hidden size
n_head = 4                  # query heads
n_kv_head = 2               # KV heads (grouped-query attention: 2 query heads per KV head)
warmup_steps = 150          # supervised steps on worked examples (full attention) before RL
warmup_lr = 3e-3            # their learning rate
n_steps = 8                 # GRPO steps
prompts_per_step = 4        # problems per batch
group_size = 4              # samples per problem; advantages are normalised within each group
temperature = 1.0           # sampling temperature (the learner divides by the same)
lr = 1e-4                   # AdamW learning rate of the GRPO steps
clip_eps = 0.2              # PPO ratio clip
distill_coef = 0.1          # lambda: weight of KL(pi_unmasked || sg(pi_masked))
grad_clip = 1.0             # gradient-norm clip
seed = 0                    # weights, problems, sampling
cpu_threads = 1             # torch threads; more only busy-wait on these tiny matrices
CONFIG = configurator.knobs(globals())
# -----------------------------------------------------------------------------


def make_config(argv):
    """The defaults and the overrides, checked before any work (ValueError says what is allowed)."""
    cfg = dict(CONFIG, **configurator.parse(argv, CONFIG))
    if cfg["attention"] not in ("sdpa", "eager") or cfg["dtype"] not in ("float32", "float64"):
        raise ValueError(f"need attention 'sdpa' or 'eager' and dtype 'float32' or 'float64', got "
                         f"{cfg['attention']!r}, {cfg['dtype']!r}")
    if cfg["policy"] == "full":
        raise ValueError("policy 'full' evicts nothing: there would be no mask to inject")
    for key in ("n_layer", "n_embd", "n_head", "n_kv_head", "n_steps", "prompts_per_step", "cpu_threads"):
        if cfg[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    if cfg["warmup_steps"] < 0 or not cfg["warmup_lr"] > 0:
        raise ValueError(f"need warmup_steps >= 0 and warmup_lr > 0, got {cfg['warmup_steps']}, "
                         f"{cfg['warmup_lr']}")
    if cfg["n_head"] % cfg["n_kv_head"] or cfg["n_embd"] % cfg["n_head"]:
        raise ValueError(f"need n_head % n_kv_head == 0 and n_embd % n_head == 0, got "
                         f"n_embd={cfg['n_embd']}, n_head={cfg['n_head']}, n_kv_head={cfg['n_kv_head']}")
    if cfg["group_size"] < 2 or not cfg["lr"] > 0 or not cfg["temperature"] > 0 or cfg["distill_coef"] < 0:
        raise ValueError("need group_size >= 2, lr > 0, temperature > 0 and distill_coef >= 0")
    P, R = max_lengths()
    # an unknown policy, or a budget it cannot work with: the policy's ValueError names them
    policies.make_policy(cfg["policy"], keep_prompt=cfg["keep_prompt"]).check(cfg["budget"], P + R, P)
    return cfg


def build_model(cfg):
    torch.manual_seed(cfg["seed"])
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=cfg["n_embd"],
                         intermediate_size=4 * cfg["n_embd"], num_hidden_layers=cfg["n_layer"],
                         num_attention_heads=cfg["n_head"], num_key_value_heads=cfg["n_kv_head"],
                         max_position_embeddings=64, bos_token_id=None,
                         eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    model = hf.from_config(config, cfg["attention"], getattr(torch, cfg["dtype"]))
    return model.eval()  # Llama has no dropout; eval() says the sampler and learner run the same function


def warm_up(model, problems, cfg, generator):
    """Supervised steps on worked examples, the unmasked pass, responses only (warmup.sft_batch's targets)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["warmup_lr"], weight_decay=0.0)
    for step in range(cfg["warmup_steps"]):
        idx = torch.randint(len(problems), (32,), generator=generator)
        x, y = sft_batch([problems[i] for i in idx.tolist()], "cpu")      # (B, T-1) each
        logits = hf.learner_logits(model, x)                               # (B, T-1, vocab)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item() if cfg["warmup_steps"] else float("nan")


def grpo_step(model, optimizer, problems, cfg, generator):
    """Sample under the evicting cache, score, one gradient step on GRPO(masked) + lambda * KL. -> the log."""
    P, R = max_lengths()
    group = [p for p in problems for _ in range(cfg["group_size"])]
    ro = hf.rollout(model, [encode(format_prompt(p)) for p in group], policy=cfg["policy"],
                    budget=cfg["budget"], max_new_tokens=R, temperature=cfg["temperature"], eos_id=EOS_ID,
                    generator=generator, keep_prompt=cfg["keep_prompt"])
    rewards = [partial_reward(p, decode(ro.tokens[i, P:].tolist())) for i, p in enumerate(group)]
    rewards = torch.tensor(rewards)                                        # (B,)
    adv = group_advantages(rewards, cfg["group_size"])                     # (B,)
    tokens, response_mask = ro.tokens, ro.response_mask                    # (B, T) each

    masked_logits = hf.learner_logits(model, tokens, ro.shadow_mask)       # (B, T, vocab): pi_masked
    unmasked_logits = hf.learner_logits(model, tokens)                     # pi_unmasked: the full cache's
    lp = smd.token_logprobs(masked_logits, tokens, cfg["temperature"])     # (B, T)
    lp_unmasked = smd.token_logprobs(unmasked_logits.detach(), tokens, cfg["temperature"])
    smd_max, _ = mismatch(lp.detach(), ro.logprobs, response_mask)         # float rounding: the same policy
    naive_max, naive_k3 = mismatch(lp_unmasked, ro.logprobs, response_mask)  # another policy's samples
    pg_loss, _ = grpo_loss(lp, ro.logprobs, adv, response_mask, cfg["clip_eps"])
    distill_kl = smd.kl_divergence(unmasked_logits, masked_logits.detach(), response_mask, cfg["temperature"])
    loss = pg_loss + cfg["distill_coef"] * distill_kl
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"]).item()
    optimizer.step()
    return dict(reward=rewards.mean().item(), smd_max=smd_max, naive_max=naive_max, naive_k3=naive_k3,
                distill_kl=distill_kl.item(), grad_norm=grad_norm, kv_frac=ro.kv_bytes / ro.full_kv_bytes)


def main(argv):
    cfg = make_config(argv)
    torch.set_num_threads(cfg["cpu_threads"])
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    train_problems, _, _ = make_splits(cfg["seed"], 1000, 0, 0)
    generator = torch.Generator().manual_seed(cfg["seed"])
    n_weights = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {n_weights} weights, {cfg['n_head']} query / {cfg['n_kv_head']} KV "
          f"heads, {cfg['attention']} {cfg['dtype']}; {cfg['policy']}@{cfg['budget']}"
          f"{', prompt kept' if cfg['keep_prompt'] else ''}")
    t0 = time.time()
    loss = warm_up(model, train_problems, cfg, generator)
    print(f"warm-up: {cfg['warmup_steps']} steps, loss {loss:.3f}, {time.time() - t0:.1f} s")
    logs = []
    for step in range(cfg["n_steps"]):
        t0 = time.time()
        idx = torch.randint(len(train_problems), (cfg["prompts_per_step"],), generator=generator)
        log = grpo_step(model, optimizer, [train_problems[i] for i in idx.tolist()], cfg, generator)
        logs.append(log)
        print(f"step {step:3d} | reward {log['reward']:.3f} | mismatch smd {log['smd_max']:.1e} naive "
              f"{log['naive_max']:.1e} (k3 {log['naive_k3']:.1e}) | KL {log['distill_kl']:.2e} | grad "
              f"{log['grad_norm']:.2f} | KV {log['kv_frac']:.0%} | {time.time() - t0:.2f} s")
    return logs


if __name__ == "__main__":
    configurator.cli(main, CONFIG, __file__, check=make_config)
