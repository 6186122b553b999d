"""
GRPO post-training of the small GPT on the arithmetic task, with a compressed (evicting) KV cache during
rollouts. `--mode` picks how the learner treats those rollouts, so one command shows the whole story:
  full   full-cache rollouts, unmasked learner: the on-policy reference;
  naive  compressed rollouts, unmasked (full-cache) learner: it silently trains on someone else's samples;
  tis    as naive, each token weighted by min(pi_learner / pi_sampler, tis_cap): patched, at a variance cost;
  sparse_rl  as naive, with Sparse-RL's rejection sampling: tokens whose pi_learner / pi_sampler leaves
         [sparse_rl_low, sparse_rl_high] are dropped, sequences with a token below sparse_rl_veto rejected;
  smd    compressed rollouts, the policy-gradient pass under the recorded shadow mask (exactly on-policy),
         plus distill_coef * KL(pi_unmasked || sg(pi_masked)): the unmasked pass of the same weights learns
         from the masked one (Shadow Mask Distillation as its authors state it; their pi_dense is our
         unmasked pass).
Phase 1 is the eviction-robust supervised warm-up on worked examples, cached in out/sft_<hash>.pt so every
mode and RL seed starts from the same base; phase 2 is GRPO (the per-mode loss terms are in objectives.py).
Every step logs reward, sampler-vs-learner mismatch, TIS
diagnostics, KL terms, grad norm, KV memory and speed; out/<run_name>.jsonl holds the same for plotting;
the last line printed starts with "summary:".

    python train.py                          # smd under rkv@28; ~2.6 min on one CPU core, warm-up included
    python train.py --mode=naive             # same base, shows the off-policy mismatch
    python train.py --mode=tis --policy=snapkv
    python train.py --preset=gpu             # a larger model and batch, for one GPU (never on by itself)
    python compare.py                        # the core rows, 4 warm-ups x 3 RL seeds, paired, transfer

Not here: the model (model.py), the eviction policies (policies.py), the cache, shadow mask, rollout and
learner passes (smd.py), the task (data/).
"""

import copy
import hashlib
import json
import math
import os
import time

import torch

import configurator
import policies
import smd
from objectives import correction, group_advantages, grpo_loss, mismatch
from data.arithmetic import EOS_ID, N_DIGITS, N_OPERANDS, VOCAB_SIZE, decode, encode, format_prompt, \
    format_response, make_splits, max_lengths, partial_reward
from data.arithmetic import reward as exact_reward
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# config: every default here, one line per knob, any of them overridden by --key=value. Why each default is
# what it is, with the runs that chose it: README.md and EXPERIMENTS.md.
# run
mode = "smd"                # full | naive | tis | sparse_rl | smd (see above)
policy = "rkv"              # eviction policy: streaming | h2o | tova | snapkv | rkv | random | full
budget = 28                 # KV slots per layer and head in compressed rollouts (the sequence is 53 tokens)
keep_prompt = True          # never evict a prompt token: the policy chooses among generated tokens only
n_sink = 4                  # streaming: attention-sink tokens always kept
n_recent = 0                # h2o: newest tokens kept (the incoming one included); 0: half (the paper's split)
tova_head_average = True    # tova: average the newest query's attention over heads (reference code), or not
snap_window = 4             # snapkv: observation window, the last prompt queries, whose attention scores it
snap_kernel = 3             # snapkv: width of the average pool smoothing those scores (odd)
rkv_window = 2              # rkv: observation window, the last queries whose attention scores older keys
rkv_kernel = 3              # rkv: width of the max pool smoothing those scores (odd)
rkv_lambda = 0.1            # rkv: weight of importance against redundancy (the paper's lambda)
seed = 0                    # RL seed: batches, sampling
sft_seed = 0                # initial weights and warm-up batches: one base for every RL seed
data_seed = 0               # the problem splits (train, val, test), the same for every warm-up
device = "cuda" if torch.cuda.is_available() else "cpu"  # where the model runs (a GPU when one is visible)
cpu_threads = 1             # torch threads; more only busy-wait on these tiny matrices
out_dir = "out"             # warm-ups, checkpoints and JSONL logs
run_name = ""               # "" -> f"{mode}_{policy}{budget}"
resume = False              # continue out/<run_name>.pt (model, optimizer, step, RNG states)
preset = ""                 # "gpu": a larger model and batch (PRESETS below), applied before other overrides
# data
n_train = 20000             # training problems (warm-up and RL prompts)
eval_problems = 400         # held-out problems for greedy accuracy, <= EVAL_POOL
eval_split = "val"          # "val" to choose settings, "test" to report them
eval_also = ""              # more compressed evals at the first and last eval: "policy@budget,..." (transfer)
# model (dropout stays 0: with it the learner could never reproduce the sampler's log-probs)
n_layer = 2                 # transformer blocks
n_head = 4                  # attention heads per block
n_embd = 64                 # width of the residual stream
block_size = 64             # longest sequence the model can see (prompt + response = 53)
# phase 1: supervised warm-up on correct worked examples
sft_steps = 600             # optimizer steps
sft_batch_size = 64         # worked examples per step
sft_lr = 3e-3               # peak learning rate
sft_warmup = 50             # linear warm-up steps, then cosine decay to 10% of sft_lr
sft_grad_clip = 1.0         # gradient-norm clip of the warm-up (RL has its own, grad_clip)
sft_mask_frac = 0.25        # fraction of warm-up rows trained under eviction masks (an eviction-robust base)
sft_mask_recipe = "random"  # those masks: streaming | random (content-blind) | policy (recorded, --policy)
sft_min_budget = 26         # random or policy recipe: the masks' budget is drawn from sft_min_budget .. T-1
# phase 2: GRPO, shared by every mode
reward = "partial"          # training reward: "exact" | "partial" (fraction of right fields); eval: exact
n_steps = 80                # GRPO steps (one batch of rollouts each)
prompts_per_step = 8        # problems per batch
group_size = 8              # samples per problem; advantages are normalised within each group
temperature = 1.0           # sampling temperature of the rollouts (the learner divides by the same)
lr = 1e-5                   # AdamW learning rate after the warm-up
lr_warmup = 20              # steps of linear learning-rate warm-up from 0
updates_per_batch = 2       # gradient steps on each batch; from the 2nd on, the ratio clip acts
clip_eps = 0.2              # PPO ratio clip
grad_clip = 1.0             # gradient-norm clip
ref_kl_coef = 0.1           # beta: KL(unmasked pass || the frozen warm-up's), in every mode alike
tis_cap = 2.0               # mode=tis: C in min(pi_learner / pi_sampler, C) (verl's default; TRL's is 3)
sparse_rl_low = 0.5         # mode=sparse_rl: tokens with pi_learner / pi_sampler below this are dropped
sparse_rl_high = 1.5        # mode=sparse_rl: ... and above this; it also caps the importance weights
sparse_rl_veto = 1e-4       # mode=sparse_rl: a sequence with any token ratio below this is rejected whole
# mode=smd
distill = "unmasked_from_masked"  # student_from_teacher: unmasked_from_masked | masked_from_warmup_unmasked
#   unmasked_from_masked: KL(pi_unmasked || sg(pi_masked)), the unmasked pass learns from the masked one;
#   masked_from_warmup_unmasked: KL(sg(pi_warm-up) || pi_masked), the masked pass learns from the warm-up
distill_coef = 0.1          # lambda, the weight of that KL; 0 = on-policy GRPO under the mask only
policy_gradient = True      # False: no GRPO term, distillation only (an ablation)
learner_attention = "mask"  # the masked pass: "mask" (a T x T boolean attn_mask) or "gather" (O(T * budget))
# logging
log_interval = 1            # steps between printed lines (every step goes to the JSONL)
eval_interval = 40          # steps between held-out evaluations
ckpt_interval = 40          # steps between checkpoints
CONFIG = configurator.knobs(globals())
PRESETS = {"gpu": dict(n_layer=4, n_embd=128, sft_steps=3000, sft_batch_size=256, prompts_per_step=32,
                       group_size=16, eval_problems=1000, cpu_threads=4)}
# -----------------------------------------------------------------------------

MODES = ("full", "naive", "tis", "sparse_rl", "smd")
REWARDS = {"exact": exact_reward, "partial": partial_reward}
DISTILL = ("unmasked_from_masked", "masked_from_warmup_unmasked")  # student_from_teacher, see `distill` above
EVAL_POOL = 1000  # val and test hold this many problems each, dealt before train: eval_problems moves none


def problem_splits(cfg):
    """(train, eval) problems. Test and val are fixed pools dealt before train, so no setting of
    eval_problems or eval_split can put a training problem into an evaluation."""
    train_problems, val, test = make_splits(cfg["data_seed"], cfg["n_train"], EVAL_POOL, EVAL_POOL)
    return train_problems, (val if cfg["eval_split"] == "val" else test)[:cfg["eval_problems"]]


def policy_kwargs(cfg):
    """The settings of cfg's eviction policy, as policies.make_policy takes them."""
    if cfg["policy"] == "full":
        return {}
    own = {"streaming": dict(n_sink=cfg["n_sink"]), "h2o": dict(n_recent=cfg["n_recent"] or None),
           "tova": dict(head_average=cfg["tova_head_average"]),
           "snapkv": dict(window=cfg["snap_window"], kernel=cfg["snap_kernel"]),
           "rkv": dict(window=cfg["rkv_window"], kernel=cfg["rkv_kernel"], mix_lambda=cfg["rkv_lambda"])}
    return dict(own.get(cfg["policy"], {}), keep_prompt=cfg["keep_prompt"])


def eval_settings(cfg):
    """eval_also as [(policy, budget)]: "streaming@32,h2o@42" -> [("streaming", 32), ("h2o", 42)]. Each is
    run with this run's keep_prompt and that policy's settings: policies the weights did not train under."""
    settings = []
    for item in filter(None, cfg["eval_also"].split(",")):
        name, _, budget = item.partition("@")
        if name not in policies.POLICIES or not budget.isdigit():
            raise ValueError(f"eval_also takes policy@budget items, policies from "
                             f"{sorted(policies.POLICIES)}; got {item!r}")
        settings.append((name, int(budget)))
    return settings


def validate_config(cfg):
    """Raise ValueError, saying what is allowed, for any value that would fail later (or silently)."""
    if cfg["mode"] not in MODES:
        raise ValueError(f"unknown mode {cfg['mode']!r}; choose one of {MODES}")
    model_config(cfg)  # the model's own checks: sizes, n_embd % n_head
    for key in ("n_train", "eval_problems", "sft_batch_size", "n_steps", "prompts_per_step",
                "updates_per_batch", "log_interval", "eval_interval", "ckpt_interval", "budget",
                "cpu_threads"):
        if cfg[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    for key in ("sft_steps", "sft_warmup"):
        if cfg[key] < 0:
            raise ValueError(f"{key} must be >= 0, got {cfg[key]}")
    for key in ("sft_lr", "lr", "temperature", "tis_cap", "grad_clip", "sft_grad_clip", "sparse_rl_veto"):
        if not cfg[key] > 0:
            raise ValueError(f"{key} must be > 0, got {cfg[key]}")
    if cfg["group_size"] < 2:
        raise ValueError(f"group_size must be >= 2 (advantages compare one prompt's samples), got "
                         f"{cfg['group_size']}")
    if not 0 <= cfg["clip_eps"] < 1 or cfg["distill_coef"] < 0:
        raise ValueError(f"need 0 <= clip_eps < 1 and distill_coef >= 0, got {cfg['clip_eps']}, "
                         f"{cfg['distill_coef']}")
    if not 0 <= cfg["sft_mask_frac"] <= 1 or cfg["sft_mask_recipe"] not in ("streaming", "random", "policy"):
        raise ValueError(f"need 0 <= sft_mask_frac <= 1 and sft_mask_recipe 'streaming', 'random' or "
                         f"'policy', got {cfg['sft_mask_frac']}, {cfg['sft_mask_recipe']!r}")
    if not 0 < cfg["sparse_rl_low"] < 1 < cfg["sparse_rl_high"]:
        raise ValueError(f"need 0 < sparse_rl_low < 1 < sparse_rl_high, got {cfg['sparse_rl_low']}, "
                         f"{cfg['sparse_rl_high']}")
    if cfg["distill"] not in DISTILL:
        raise ValueError(f"distill must be one of {DISTILL}, got {cfg['distill']!r}")
    if cfg["ref_kl_coef"] < 0 or cfg["lr_warmup"] < 0:
        raise ValueError(f"need ref_kl_coef >= 0 and lr_warmup >= 0, got {cfg['ref_kl_coef']}, "
                         f"{cfg['lr_warmup']}")
    if not cfg["policy_gradient"] and not (cfg["mode"] == "smd" and cfg["distill_coef"] > 0):
        raise ValueError("policy_gradient=False (distillation only) needs mode='smd' and distill_coef > 0: "
                         "otherwise nothing is trained")
    if cfg["preset"] and cfg["preset"] not in PRESETS:
        raise ValueError(f"unknown preset {cfg['preset']!r}; choose one of {sorted(PRESETS)} or ''")
    if cfg["eval_problems"] > EVAL_POOL or cfg["eval_split"] not in ("val", "test"):
        raise ValueError(f"need eval_problems <= {EVAL_POOL} and eval_split 'val' or 'test', "
                         f"got {cfg['eval_problems']}, {cfg['eval_split']!r}")
    if cfg["n_recent"] < 0:
        raise ValueError(f"n_recent must be >= 0 (0 = half the budget), got {cfg['n_recent']}")
    if cfg["reward"] not in REWARDS:
        raise ValueError(f"reward must be one of {sorted(REWARDS)}, got {cfg['reward']!r}")
    smd.check_attention(cfg["learner_attention"])
    P, R = max_lengths()
    for name, budget in eval_settings(cfg):  # a policy and budget that cannot work fail here, not at the end
        policies.make_policy(name, **policy_kwargs(dict(cfg, policy=name))).check(budget, P + R, P)
    seq_len = P + R
    if cfg["block_size"] < seq_len:
        raise ValueError(f"block_size {cfg['block_size']} must hold prompt + response = {seq_len} tokens")
    if cfg["budget"] > cfg["block_size"]:
        raise ValueError(f"budget {cfg['budget']} is larger than block_size {cfg['block_size']}")
    # unknown policy, or settings that cannot work with this budget (the policy's ValueError names them)
    policy = policies.make_policy(cfg["policy"], **policy_kwargs(cfg))
    policy.check(cfg["budget"], seq_len, P)
    if cfg["sft_mask_frac"] and cfg["sft_mask_recipe"] != "streaming":  # recorded down to sft_min_budget
        no_policy = cfg["sft_mask_recipe"] == "policy" and cfg["policy"] == "full"
        if no_policy or not cfg["sft_min_budget"] < seq_len - 1:
            raise ValueError(f"sft_mask_recipe={cfg['sft_mask_recipe']!r} needs an evicting policy and "
                             f"sft_min_budget < {seq_len - 1}, got {cfg['policy']!r}, "
                             f"{cfg['sft_min_budget']}")
        recorder = (policy if cfg["sft_mask_recipe"] == "policy"
                    else policies.make_policy("random", keep_prompt=cfg["keep_prompt"]))
        recorder.check(cfg["sft_min_budget"], seq_len - 1, P)
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no GPU is visible")


def keep_log_until(path, step):
    """Drop the JSONL records of steps after `step` (and any summary): a resumed run logs them again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in records if r["kind"] != "summary" and r["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)


def save_atomic(obj, path):
    # a crash mid-write leaves the previous checkpoint intact, never a truncated one
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)

# -----------------------------------------------------------------------------
# phase 1: supervised warm-up


def sft_batch(problems, device):
    """Worked examples -> inputs x (B, T-1) and targets y (B, T-1), -1 (ignored) on prompt positions."""
    P, _ = max_lengths()
    seq = [encode(format_prompt(p) + format_response(p)) + [EOS_ID] for p in problems]
    seq = torch.tensor(seq, device=device)                                # (B, T)
    x, y = seq[:, :-1], seq[:, 1:].clone()                                # (B, T-1) each
    y[:, :P - 1] = -1  # learn the response only; the prompt is random digits
    return x, y


def warmup_masks(model, x, cfg, generator):
    """Which keys each query of the warm-up inputs x (B, T) may see: (L, B, nh, T, T) bool. A fraction
    sft_mask_frac of the rows see what an evicting cache would keep, the others every earlier position, so the
    base tolerates eviction as large pretrained models do. The default recipe is content-blind (random
    eviction), so the base is not trained on the masks of the policy that RL and evaluation then use."""
    B, T = x.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
    masks = causal.expand(cfg["n_layer"], B, cfg["n_head"], T, T).clone()
    rows = torch.rand(B, generator=generator, device=generator.device) < cfg["sft_mask_frac"]
    if rows.any():
        rows = rows.nonzero().squeeze(-1).to(x.device)                     # (R,)
        masks[:, rows] = eviction_masks(model, x[rows], cfg, generator)
    return masks


def eviction_masks(model, x, cfg, generator):
    """What an evicting cache lets each query of x (R, T) see, by sft_mask_recipe: (L, R, nh, T, T) bool."""
    B, T = x.shape
    P, _ = max_lengths()
    draw = lambda high, n, low=0: torch.randint(low, high, (n,), generator=generator, device=generator.device)
    if cfg["sft_mask_recipe"] == "streaming":  # content-blind: 0, 4 or all prompt tokens as sinks, window 2+
        n_sink = torch.tensor([0, 4, P], device=x.device)[draw(3, B).to(x.device)][:, None, None]
        window = draw(T, B, low=2).to(x.device)[:, None, None]
        t = torch.arange(T, device=x.device)
        visible = (t[:, None] >= t) & ((t < n_sink) | (t[:, None] - t < window))  # (B, T, T)
        return visible[None, :, None].expand(cfg["n_layer"], -1, cfg["n_head"], -1, -1)
    budget = int(draw(T, 1, low=cfg["sft_min_budget"]))
    if cfg["sft_mask_recipe"] == "random":
        # content-blind: what random eviction keeps depends on positions only, so a one-unit stand-in model
        # records it (the prompt kept if --keep_prompt), for every layer and head
        stand_in = GPT(GPTConfig(block_size=T, vocab_size=VOCAB_SIZE, n_layer=1, n_head=1, n_embd=1))
        stand_in = stand_in.to(x.device)
        recorded = smd.record(stand_in, x, [P] * B, policy="random", budget=budget, temperature=0,
                              generator=generator, keep_prompt=cfg["keep_prompt"])
        return recorded.shadow_mask[0][None].expand(cfg["n_layer"], -1, cfg["n_head"], -1, -1)
    # the policy's own masks, recorded with the current weights
    recorded = smd.record(model, x, [P] * B, policy=cfg["policy"], budget=budget, temperature=0,
                          generator=generator, **policy_kwargs(cfg))
    return recorded.shadow_mask.attn_masks()


def sft(model, train_problems, cfg, generator):
    """The warm-up's optimizer steps -> seconds spent recording eviction masks (the rest is forward, backward
    and update)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["sft_lr"], weight_decay=0.0)
    masks_s = 0.0
    for step in range(cfg["sft_steps"]):
        decay = 0.5 * (1 + math.cos(math.pi * step / cfg["sft_steps"]))
        lr_now = cfg["sft_lr"] * min(1.0, (step + 1) / (cfg["sft_warmup"] + 1)) * (0.1 + 0.9 * decay)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        idx = torch.randint(len(train_problems), (cfg["sft_batch_size"],), generator=generator,
                            device=generator.device)
        x, y = sft_batch([train_problems[i] for i in idx.tolist()], cfg["device"])
        t0 = time.time()
        attn_mask = warmup_masks(model, x, cfg, generator) if cfg["sft_mask_frac"] else None
        masks_s += time.time() - t0
        _, loss = model(x, y, attn_mask=attn_mask)  # attn_mask (L, B, nh, T, T), or None: causal
        check_finite(loss, f"sft step {step} loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["sft_grad_clip"])
        optimizer.step()
        if step % 100 == 0 or step == cfg["sft_steps"] - 1:
            print(f"sft {step:4d} | loss {loss.item():.4f} | lr {lr_now:.2e}")
    return masks_s

# -----------------------------------------------------------------------------
# phase 2: GRPO


def check_finite(value, what):
    if not torch.isfinite(torch.as_tensor(value)).all():
        raise FloatingPointError(f"{what} is {value}: stopping (lower lr, or check the last checkpoint)")


def sample_batch(model, problems, cfg, generator):
    """group_size samples of each problem (group-major), with a full cache in full mode and the compressed
    one otherwise, scored -> the rollout, rewards (B,) and group advantages (B,)."""
    P, R = max_lengths()
    group_problems = [p for p in problems for _ in range(cfg["group_size"])]
    compressed = cfg["mode"] != "full"
    ro = smd.rollout(model, [encode(format_prompt(p)) for p in group_problems],
                     policy=cfg["policy"] if compressed else "full",
                     budget=cfg["budget"] if compressed else P + R,
                     max_new_tokens=R, temperature=cfg["temperature"], eos_id=EOS_ID, generator=generator,
                     **(policy_kwargs(cfg) if compressed else {}))
    reward_fn = REWARDS[cfg["reward"]]
    rewards = [reward_fn(p, decode(ro.tokens[i, P:].tolist())) for i, p in enumerate(group_problems)]
    rewards = torch.tensor(rewards, device=ro.tokens.device)              # (B,)
    return ro, rewards, group_advantages(rewards, cfg["group_size"])


def policy_pass(model, ro, cfg):
    """The learner's logits for the policy-gradient term (B, T, vocab): SMD's pass sees, through the shadow
    mask, exactly what the sampler saw; every other mode's is the unmasked (full-cache) pass."""
    if cfg["mode"] == "smd":
        return smd.learner_logits(model, ro.tokens, ro.shadow_mask, attention=cfg["learner_attention"])
    return smd.learner_logits(model, ro.tokens)


def unmasked_pass(model, ro, cfg, policy_logits):
    """The full-cache policy's logits (the paper's pi_dense): the policy pass itself outside smd; in smd a
    second pass without the mask, run only when a KL term needs it (None otherwise)."""
    if cfg["mode"] != "smd":
        return policy_logits
    if cfg["ref_kl_coef"] > 0 or (cfg["distill_coef"] > 0 and cfg["distill"] == "unmasked_from_masked"):
        return smd.learner_logits(model, ro.tokens)
    return None


def reference_logits(reference, tokens, cfg):
    """The frozen warm-up's unmasked logits (B, T, vocab), if the reference KL or warm-up teacher use them."""
    warmup_teacher = (cfg["mode"] == "smd" and cfg["distill_coef"] > 0
                      and cfg["distill"] == "masked_from_warmup_unmasked")
    if cfg["ref_kl_coef"] == 0 and not warmup_teacher:
        return None
    if reference is None:
        raise ValueError("the reference KL and distill='masked_from_warmup_unmasked' need the warm-up model "
                         "(reference=)")
    return smd.learner_logits(reference, tokens)


def distill_loss(cfg, masked_logits, unmasked_logits, ref_logits, response_mask):
    """SMD's distillation term (0 in the other modes and with distill_coef 0):
      unmasked_from_masked (the paper): KL(pi_unmasked || sg(pi_masked)), the unmasked pass learns from the
        masked one;
      masked_from_warmup_unmasked: KL(sg(pi_warm-up) || pi_masked), the masked pass learns from the
        warm-up."""
    if cfg["mode"] != "smd" or cfg["distill_coef"] == 0:
        return torch.zeros((), device=response_mask.device)
    if cfg["distill"] == "unmasked_from_masked":
        return smd.kl_divergence(unmasked_logits, masked_logits.detach(), response_mask, cfg["temperature"])
    return smd.kl_divergence(ref_logits, masked_logits, response_mask, cfg["temperature"])


def reference_kl(cfg, unmasked_logits, ref_logits, response_mask):
    """KL(pi_unmasked || pi_warm-up), every mode's anchor of the full-cache policy (0 with ref_kl_coef 0)."""
    if cfg["ref_kl_coef"] == 0:
        return torch.zeros((), device=response_mask.device)
    return smd.kl_divergence(unmasked_logits, ref_logits, response_mask, cfg["temperature"])


def grpo_step(model, optimizer, problems, cfg, generator, reference=None):
    """One GRPO iteration: sample, score, and take updates_per_batch gradient steps on
        loss = GRPO(policy pass) + distill_coef * distillation KL + ref_kl_coef * KL(pi_unmasked || pi_warmup)
    reference: the frozen warm-up model (the reference KL and the warm-up teacher need it).
    Returns the numbers a practitioner diagnoses with."""
    t0 = time.time()
    ro, rewards, adv = sample_batch(model, problems, cfg, generator)
    rollout_s = time.time() - t0
    tokens, response_mask, lp_sampler = ro.tokens, ro.response_mask, ro.logprobs  # (B, T) each
    with torch.no_grad():  # the learner's view of the batch before any update: what the mismatch measures
        lp_learner = smd.token_logprobs(policy_pass(model, ro, cfg), tokens, cfg["temperature"])  # (B, T)
        ref_logits = reference_logits(reference, tokens, cfg)              # (B, T, vocab) or None
    mm_max, mm_k3 = mismatch(lp_learner, lp_sampler, response_mask)
    # full, smd: the sampler's log-probs are the learner's own (to rounding). naive, tis, sparse_rl: the
    # usual practice of recomputing them with the learner, which hides that the samples came from elsewhere
    lp_old = lp_sampler if cfg["mode"] in ("full", "smd") else lp_learner
    weights, loss_mask, diagnostics = correction(cfg, lp_learner, lp_sampler, response_mask)

    for update in range(cfg["updates_per_batch"]):
        policy_logits = policy_pass(model, ro, cfg)                        # (B, T, vocab), masked in smd
        unmasked_logits = unmasked_pass(model, ro, cfg, policy_logits)     # the full-cache policy's
        lp = smd.token_logprobs(policy_logits, tokens, cfg["temperature"])  # (B, T)
        if update == 0:  # before any step the ratio is 1 (to rounding) in every mode: lp is what lp_old is
            old_gap = (lp.detach() - lp_old)[response_mask].abs().max().item()
        pg_loss, clip_frac = grpo_loss(lp, lp_old, adv, loss_mask, cfg["clip_eps"], weights)
        distill_kl = distill_loss(cfg, policy_logits, unmasked_logits, ref_logits, response_mask)
        ref_kl = reference_kl(cfg, unmasked_logits, ref_logits, response_mask)
        pg_term = pg_loss if cfg["policy_gradient"] else torch.zeros_like(pg_loss)  # False: distillation only
        loss = pg_term + cfg["distill_coef"] * distill_kl + cfg["ref_kl_coef"] * ref_kl
        check_finite(loss, "loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"]).item()
        check_finite(grad_norm, "grad norm")
        optimizer.step()

    return dict(reward=rewards.mean().item(), mismatch_max=mm_max, mismatch_k3=mm_k3, old_gap=old_gap,
                loss=loss.item(), pg_loss=pg_loss.item(), distill_kl=distill_kl.item(), ref_kl=ref_kl.item(),
                clip_frac=clip_frac, grad_norm=grad_norm, **diagnostics,
                kv_bytes=ro.kv_bytes, full_kv_bytes=ro.full_kv_bytes, rollout_s=rollout_s,
                learner_s=time.time() - t0 - rollout_s,
                tok_per_s=response_mask.sum().item() / (time.time() - t0))


@torch.no_grad()
def solved(model, problems, policy, budget, **policy_kwargs):
    """Which of `problems` greedy decoding gets exactly right with a cache of `budget` slots evicted by
    `policy`: a list of bools, so two runs judged on the same problems can be paired problem by problem. The
    random policy draws from a generator of its own, seeded: the same weights always get the same answer."""
    P, R = max_lengths()
    generator = torch.Generator(next(model.parameters()).device).manual_seed(0)
    ro = smd.rollout(model, [encode(format_prompt(p)) for p in problems], policy=policy, budget=budget,
                     max_new_tokens=R, temperature=0, eos_id=EOS_ID, generator=generator, **policy_kwargs)
    return [exact_reward(p, decode(ro.tokens[i, P:].tolist())) == 1.0 for i, p in enumerate(problems)]


def evaluate(model, problems, policy, budget, **policy_kwargs):
    """Greedy exact-match accuracy on `problems` with a cache of `budget` slots evicted by `policy`."""
    right = solved(model, problems, policy, budget, **policy_kwargs)
    return sum(right) / len(right)


def pack(bools):
    """[True, False, ...] -> a hex string, 4 problems a digit (the JSONL's per-problem record); unpack
    reverses it, given the count."""
    bits = "".join("1" if b else "0" for b in bools)
    bits += "0" * (-len(bits) % 4)
    return "".join(f"{int(bits[i:i + 4], 2):x}" for i in range(0, len(bits), 4))


def unpack(digits, n):
    return [c == "1" for c in "".join(f"{int(d, 16):04b}" for d in digits)[:n]]

# -----------------------------------------------------------------------------


def make_config(argv):
    """The run's config: the defaults, then the preset if one is named, then the other overrides; checked."""
    overrides = configurator.parse(argv, CONFIG)
    preset = overrides.get("preset", CONFIG["preset"])
    cfg = {**CONFIG, **PRESETS.get(preset, {}), **overrides}
    validate_config(cfg)  # before any work, an unknown preset too: a typo should cost a second, not a warm-up
    cfg["run_name"] = cfg["run_name"] or f"{cfg['mode']}_{cfg['policy']}{cfg['budget']}"
    return cfg


def model_config(cfg):
    return GPTConfig(block_size=cfg["block_size"], vocab_size=VOCAB_SIZE, n_layer=cfg["n_layer"],
                     n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=0.0)


def build_model(cfg):
    torch.manual_seed(cfg["sft_seed"])  # the initial weights belong to the shared base
    return GPT(model_config(cfg)).to(cfg["device"])


def warmup_path(cfg, dtype=torch.float32):
    """out/sft_<hash>.pt, the hash of everything that shapes the warm-up's weights and nothing RL-only."""
    names = ("sft_seed", "data_seed", "n_train", "n_layer", "n_head", "n_embd", "block_size", "sft_steps",
             "sft_batch_size", "sft_lr", "sft_warmup", "sft_grad_clip", "device", "sft_mask_frac")
    key = {k: cfg[k] for k in names}
    if cfg["sft_mask_frac"]:  # what the masks are, and for recorded ones which policy made them
        key.update(sft_mask_recipe=cfg["sft_mask_recipe"])
        if cfg["sft_mask_recipe"] == "random":
            key.update(keep_prompt=cfg["keep_prompt"], sft_min_budget=cfg["sft_min_budget"])
        if cfg["sft_mask_recipe"] == "policy":
            key.update(policy=cfg["policy"], policy_kwargs=policy_kwargs(cfg),
                       sft_min_budget=cfg["sft_min_budget"])
    key.update(n_operands=N_OPERANDS, n_digits=N_DIGITS, eval_pool=EVAL_POOL, dtype=str(dtype))
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(cfg["out_dir"], f"sft_{digest}.pt")


def warm_up(model, cfg):
    """Phase 1, shared by every mode and RL seed: load the warm-up checkpoint (warmup_path), or train and save
    it. Returns where its time went: {} when it was reused, else warmup_s and warmup_masks_s (the part spent
    recording eviction masks)."""
    path = warmup_path(cfg, next(model.parameters()).dtype)
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location=cfg["device"]))
        print(f"sft: reusing {path}")
        return {}
    t0 = time.time()
    os.makedirs(cfg["out_dir"], exist_ok=True)
    train_problems, _ = problem_splits(cfg)
    masks_s = sft(model, train_problems, cfg,
                  torch.Generator(device=cfg["device"]).manual_seed(cfg["sft_seed"]))
    save_atomic(model.state_dict(), path)
    print(f"sft: {cfg['sft_steps']} steps in {time.time() - t0:.1f}s, saved {path}")
    return dict(warmup_s=time.time() - t0, warmup_masks_s=masks_s)


def start_run(cfg, model):
    """From the warmed-up model: its frozen copy, the optimizer, the RL generator, the step to start from and
    the history so far (the checkpoint's when resuming; a resumed run's log keeps each step once)."""
    # a copy taken before any RL step: the reference KL's anchor and the warm-up teacher (also when resuming)
    reference = copy.deepcopy(model).requires_grad_(False)
    torch.manual_seed(cfg["seed"])
    generator = torch.Generator(device=cfg["device"]).manual_seed(cfg["seed"])  # RL batches and sampling
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    start, history = 0, dict(reward=[], mismatch_max=[], mismatch_k3=[], old_gap=[], kv_frac=[], tis_ess=[],
                             sparse_rl_outside=[], sparse_rl_rejected=[], evals=[])
    if cfg["resume"]:
        start, history = load_checkpoint(cfg, model, optimizer, generator)
        print(f"resuming {run_path(cfg, '.pt')} at step {start}")
        keep_log_until(run_path(cfg, ".jsonl"), start)  # the steps after the checkpoint run again
    return reference, optimizer, generator, start, history


def load_checkpoint(cfg, model, optimizer, generator):
    """Restore model, optimizer and RNG states from out/<run_name>.pt -> (step, history). Loaded onto the CPU:
    the RNG states must stay CPU byte tensors (set_state takes no other, a CUDA generator's included);
    load_state_dict copies the weights and the optimizer's moments to wherever the model lives."""
    ckpt = torch.load(run_path(cfg, ".pt"), map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    generator.set_state(ckpt["generator"])
    torch.set_rng_state(ckpt["torch_rng"])
    return ckpt["step"], ckpt["history"]


def run_path(cfg, suffix):
    return os.path.join(cfg["out_dir"], cfg["run_name"] + suffix)


def step_line(step, s, cfg, elapsed):
    """The printed line of one GRPO step."""
    extra = ""
    if cfg["mode"] == "tis":
        extra = f" ess {s['tis_ess']:.2f} capped {s['tis_capped']:.2f} |"
    if cfg["mode"] == "sparse_rl":
        extra = f" outside {s['sparse_rl_outside']:.2f} rejected {s['sparse_rl_rejected']:.2f} |"
    return (f"step {step:4d} | reward {s['reward']:.3f} | mismatch max {s['mismatch_max']:.1e} "
            f"k3 {s['mismatch_k3']:.1e} |{extra} loss {s['loss']:+.4f} distill {s['distill_kl']:.4f} "
            f"ref {s['ref_kl']:.4f} clip {s['clip_frac']:.2f} | grad {s['grad_norm']:.3f} | "
            f"kv {s['kv_bytes'] / 1024:.0f}/{s['full_kv_bytes'] / 1024:.0f} KiB | {s['tok_per_s']:.0f} tok/s "
            f"| {elapsed:.1f}s")


def time_line(times, summary):
    """Where the run's time went, so a reader on a slower machine knows which part to expect to grow."""
    if "warmup_s" in times:
        warm = (f"warm-up {times['warmup_s']:.1f}s (recording masks {times['warmup_masks_s']:.1f}s, "
                f"forward/backward/update {times['warmup_s'] - times['warmup_masks_s']:.0f}s)")
    else:
        warm = "warm-up reused"
    other = summary["rl_s"] - times["rollout_s"] - times["learner_s"] - times["eval_s"]
    return (f"time: {warm} | RL {summary['rl_s']:.0f}s (rollouts {times['rollout_s']:.1f}s, learner passes "
            f"{times['learner_s']:.1f}s, evaluation {times['eval_s']:.1f}s, other {other:.0f}s) | "
            f"total {summary['wall_s']:.0f}s")


def summarize(cfg, history, rl_s, wall_s):
    """The run's summary: start and end accuracies and rewards, mean diagnostics, KV fraction, times."""
    P, R = max_lengths()
    n, k = len(history["reward"]), min(10, len(history["reward"]))
    mean = lambda values: sum(values) / len(values)
    mean_in = lambda key, mode: mean(history[key]) if cfg["mode"] == mode else None
    compressed = cfg["mode"] != "full"  # a full-mode run's rollouts used a full cache, whatever --policy says
    (_, full0, comp0), (_, full1, comp1) = history["evals"][0], history["evals"][-1]
    return dict(mode=cfg["mode"], policy=cfg["policy"] if compressed else "full",
                budget=cfg["budget"] if compressed else P + R, eval_split=cfg["eval_split"],
                acc_full_start=full0, acc_full=full1, acc_compressed_start=comp0, acc_compressed=comp1,
                reward_start=mean(history["reward"][:k]), reward_end=mean(history["reward"][n - k:]),
                mismatch_max_mean=mean(history["mismatch_max"]),
                mismatch_k3_mean=mean(history["mismatch_k3"]),
                old_gap_max=max(history["old_gap"]), tis_ess_mean=mean_in("tis_ess", "tis"),
                sparse_rl_outside_mean=mean_in("sparse_rl_outside", "sparse_rl"),
                sparse_rl_rejected_mean=mean_in("sparse_rl_rejected", "sparse_rl"),
                kv_frac=mean(history["kv_frac"]), rl_s=rl_s, wall_s=wall_s)


def main(argv):
    t_start = time.time()
    cfg = make_config(argv)
    if cfg["resume"] and not os.path.exists(run_path(cfg, ".pt")):
        raise FileNotFoundError(f"--resume=True but there is no checkpoint at {run_path(cfg, '.pt')}")
    os.makedirs(cfg["out_dir"], exist_ok=True)
    torch.set_num_threads(cfg["cpu_threads"])
    P, R = max_lengths()
    train_problems, held_out = problem_splits(cfg)
    model = build_model(cfg)
    times = warm_up(model, cfg)  # {} when reused
    reference, optimizer, generator, start, history = start_run(cfg, model)
    t_rl = time.time()
    times.update(rollout_s=0.0, learner_s=0.0, eval_s=0.0)
    log_file = open(run_path(cfg, ".jsonl"), "a" if cfg["resume"] else "w")

    def log(record):
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    def run_eval(step):
        t0 = time.time()
        solved_full = solved(model, held_out, "full", P + R)
        solved_comp = solved(model, held_out, cfg["policy"], cfg["budget"], **policy_kwargs(cfg))
        acc_full, acc_comp = sum(solved_full) / len(held_out), sum(solved_comp) / len(held_out)
        print(f"eval  {step:4d} | greedy acc ({cfg['eval_split']}) full cache {acc_full:.3f} | "
              f"{cfg['policy']}@{cfg['budget']} {acc_comp:.3f}")
        log(dict(kind="eval", step=step, acc_full=acc_full, acc_compressed=acc_comp,
                 solved_full=pack(solved_full), solved_compressed=pack(solved_comp)))
        history["evals"].append((step, acc_full, acc_comp))
        if step in (0, cfg["n_steps"]) and cfg["eval_also"]:  # transfer: the first and the last eval
            also = {f"{name}@{budget}": solved(model, held_out, name, budget,
                                               **policy_kwargs(dict(cfg, policy=name, budget=budget)))
                    for name, budget in eval_settings(cfg)}
            print(f"eval  {step:4d} | also "
                  + " ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in also.items()))
            log(dict(kind="eval_also", step=step, acc={k: sum(v) / len(v) for k, v in also.items()},
                     solved={k: pack(v) for k, v in also.items()}))
        times["eval_s"] += time.time() - t0

    if start == 0:
        run_eval(0)
    print(f"grpo: mode={cfg['mode']} policy={cfg['policy']} budget={cfg['budget']} "
          f"batch={cfg['prompts_per_step']}x{cfg['group_size']} device={cfg['device']}")
    for step in range(start + 1, cfg["n_steps"] + 1):
        lr_now = cfg["lr"] * min(1.0, step / cfg["lr_warmup"]) if cfg["lr_warmup"] else cfg["lr"]
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        idx = torch.randint(len(train_problems), (cfg["prompts_per_step"],), generator=generator,
                            device=generator.device)
        s = grpo_step(model, optimizer, [train_problems[i] for i in idx.tolist()], cfg, generator, reference)
        for key in ("reward", "mismatch_max", "mismatch_k3", "old_gap", "tis_ess", "sparse_rl_outside",
                    "sparse_rl_rejected"):
            history[key].append(s[key])
        history["kv_frac"].append(s["kv_bytes"] / s["full_kv_bytes"])
        times["rollout_s"] += s["rollout_s"]
        times["learner_s"] += s["learner_s"]
        log(dict(kind="train", step=step, lr=lr_now, elapsed_s=time.time() - t_start, **s))
        if step % cfg["log_interval"] == 0:
            print(step_line(step, s, cfg, time.time() - t_start))
        if step % cfg["eval_interval"] == 0 or step == cfg["n_steps"]:
            run_eval(step)
        if step % cfg["ckpt_interval"] == 0 or step == cfg["n_steps"]:
            save_atomic(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                             generator=generator.get_state(), torch_rng=torch.get_rng_state(),
                             history=history, config=cfg), run_path(cfg, ".pt"))
    if start >= cfg["n_steps"] and (not history["evals"] or history["evals"][-1][0] != start):
        run_eval(start)  # resumed past n_steps (a finished run's checkpoint holds its last eval already)
    summary = summarize(cfg, history, time.time() - t_rl, time.time() - t_start)
    log(dict(kind="summary", **summary, **times))
    log_file.close()
    print(time_line(times, summary))
    print("summary: " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in summary.items()))
    return summary


if __name__ == "__main__":
    configurator.cli(main, CONFIG, __file__, check=make_config)
