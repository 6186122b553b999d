"""
GRPO post-training of the small GPT on the arithmetic task, with a compressed (evicting) KV cache during
rollouts. `--mode` picks how the learner treats those rollouts, so one command shows the whole story:
  dense  full-cache rollouts, dense learner: the on-policy reference;
  naive  compressed rollouts, dense learner: the learner silently trains on someone else's samples;
  tis    as naive, each token weighted by min(pi_learner / pi_sampler, tis_cap): patched, at a variance cost;
  smd    compressed rollouts, learner under the recorded shadow mask (exactly on-policy), plus a KL that
         distils a dense pass into the masked one (Shadow Mask Distillation): by default the dense pass of
         the frozen warm-up weights (distill_teacher explains why not the current ones).
Phase 1 is a supervised warm-up on worked examples, cached in out/sft_<hash>.pt so every mode starts from
the same base; phase 2 is GRPO. Every step logs reward, sampler-vs-learner mismatch, grad norm, KV memory
and speed; out/<run_name>.jsonl holds the same for plotting; the last line printed starts with "summary:".

    python train.py                                    # smd, h2o, budget 32: about a minute on 2 CPU cores
    python train.py --mode=naive                       # same base, shows the off-policy mismatch
    python train.py --mode=tis --policy=streaming --budget=36
    python compare.py                                  # all four modes x 3 RL seeds, one table (compare.py)
    # one GPU (picked automatically when present), a bigger model and batch (a suggestion, not measured here):
    python train.py --n_layer=4 --n_embd=128 --sft_steps=4000 --sft_batch_size=256 --n_steps=300 \
        --prompts_per_step=32 --group_size=16 --eval_problems=1000

Not here: the model (model.py), the cache, shadow mask, rollout and learner passes (smd.py), the task (data/).
"""

import ast
import copy
import hashlib
import json
import math
import os
import random
import sys
import time

import torch

import smd
from data.arithmetic import EOS_ID, N_DIGITS, N_OPERANDS, VOCAB_SIZE, decode, encode, format_prompt, \
    format_response, make_splits, max_lengths, partial_reward
from data.arithmetic import reward as exact_reward
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# config: every default here, any of them overridden by --key=value
# run
mode = "smd"                # dense | naive | tis | smd
policy = "h2o"              # eviction policy of the compressed rollouts: streaming | h2o | tova | snapkv | random | full
budget = 32                 # KV slots per layer and head during compressed rollouts (the sequence is 53 tokens).
#                             32 (60% of the full cache): h2o keeps what the sums need, but the warm-up model,
#                             trained with full attention, gets 4% right under it, so there is something to learn.
#                             At 16 and 24 the needed operands are gone: no mode got past 9%, SMD included
n_sink = 4                  # streaming: attention-sink tokens always kept
n_recent = 0                # h2o: newest tokens kept (the incoming one included), the rest of the budget are heavy
#                             hitters; 0 = half the budget, the H2O paper's even split
tova_head_average = True    # tova: average the newest query's attention over heads (the reference code) or not
snap_window = 4             # snapkv: observation window, the last prompt queries whose attention scores the prompt
snap_kernel = 3             # snapkv: width of the average pool that smooths those scores (odd)
seed = 0                    # RL: batches, sampling, evaluation order
sft_seed = 0                # data splits, initial weights and warm-up: one base (and one held-out set) for
#                             every RL seed, so seeds measure the RL run and not the warm-up
device = "cuda" if torch.cuda.is_available() else "cpu"
cpu_threads = 1             # the matrices are too small to gain from more, and an extra thread busy-waits
#                             (50x slower here) whenever another process shares the cores
out_dir = "out"
run_name = ""               # "" -> f"{mode}_{policy}{budget}"
resume = False              # continue out/<run_name>.pt (model, optimizer, step, RNG states)
# data
n_train = 20000
eval_problems = 200         # held-out problems for greedy accuracy, <= EVAL_POOL
eval_split = "val"          # "val" to choose settings, "test" to report them
# model (dropout stays 0: with it the learner could never reproduce the sampler's log-probs)
n_layer = 2
n_head = 4
n_embd = 64
block_size = 64
# phase 1: supervised warm-up on correct worked examples
sft_steps = 600
sft_batch_size = 64
sft_lr = 3e-3
sft_warmup = 50             # linear warm-up steps, then cosine decay to 10% of sft_lr
sft_grad_clip = 1.0         # gradient-norm clip of the warm-up (RL has its own, grad_clip)
# phase 2: GRPO
reward = "partial"          # training reward: "exact" (1 for the right total) | "partial" (the fraction of
#                             right running sums and total, data.arithmetic.partial_reward); eval is always exact.
#                             partial: with 4% exact under compression most groups would score all 0, advantage 0
n_steps = 100
prompts_per_step = 8
group_size = 8              # G samples per prompt; advantages are normalized within each group
temperature = 1.0           # sampling temperature of the rollouts (the learner divides by the same)
lr = 1e-4                   # at 3e-4 the policy gradient wipes out the warm-up in every mode (dense mode 54% -> 18%
#                             in 100 steps); at 3e-5 the distillation barely moves in 100 steps (SMD compressed 20%)
updates_per_batch = 2       # gradient steps on each batch of rollouts; from the 2nd on, the ratio clip acts
clip_eps = 0.2              # PPO ratio clip
grad_clip = 1.0
tis_cap = 2.0               # C in min(pi_learner / pi_sampler, C), mode=tis
distill_coef = 1.0          # weight of the SMD distillation KL, mode=smd; 0 = on-policy GRPO under the mask only.
#                             Default run, one seed, h2o@32 greedy accuracy dense/compressed from 54%/4%: coef 1
#                             -> 20%/44%, coef 0 (on-policy policy gradient only) -> 26%/28%
distill_teacher = "frozen"  # who teaches the masked pass: "frozen": the dense pass of a frozen copy of the warm-up
#                             weights; "dense": the dense pass of the current (shared) weights, a stop-gradient
#                             teacher; "sparse": the reverse, the dense pass is pulled towards the masked one.
#                             "frozen" is the default because "dense" collapses here: the student shares the
#                             teacher's weights, so every step that moves the masked pass also moves its target,
#                             and the KL is cheapest to lower by making the dense pass as bad as the masked one
#                             (coef 1: compressed and dense accuracy both went to ~0%, see compare.py / README)
learner_attention = "dense"  # mode=smd: "dense" (T x T boolean mask) or "gather" (O(T * budget) scores)
log_interval = 1
eval_interval = 25
ckpt_interval = 25
CONFIG = {k: v for k, v in globals().items() if k.islower() and not k.startswith("_")  # not the imported constants
          and isinstance(v, (bool, int, float, str))}
# -----------------------------------------------------------------------------

MODES = ("dense", "naive", "tis", "smd")
REWARDS = {"exact": exact_reward, "partial": partial_reward}
EVAL_POOL = 1000  # val and test each hold this many problems, dealt before train: eval_problems never moves them


def problem_splits(cfg):
    """(train, eval) problems. Test and val are fixed pools dealt before train, so no setting of
    eval_problems or eval_split can put a training problem into an evaluation."""
    train_problems, val, test = make_splits(cfg["sft_seed"], cfg["n_train"], EVAL_POOL, EVAL_POOL)
    return train_problems, (val if cfg["eval_split"] == "val" else test)[:cfg["eval_problems"]]


def policy_kwargs(cfg):
    """The settings of cfg's eviction policy, as smd.make_policy takes them."""
    return {"streaming": dict(n_sink=cfg["n_sink"]), "h2o": dict(n_recent=cfg["n_recent"] or None),
            "tova": dict(head_average=cfg["tova_head_average"]),
            "snapkv": dict(window=cfg["snap_window"], kernel=cfg["snap_kernel"])}.get(cfg["policy"], {})


def parse_overrides(argv, defaults=CONFIG):
    """['--budget=8', '--mode=tis'] -> {'budget': 8, 'mode': 'tis'}; a value keeps its default's type."""
    out = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"arguments look like --key=value, got {arg!r}")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise ValueError(f"unknown config key {key!r}; known: {sorted(defaults)}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word such as --mode=smd
        default = defaults[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise ValueError(f"--{key} wants a {type(default).__name__}, got {text!r}")
        out[key] = value
    return out


def validate_config(cfg):
    """Raise ValueError, saying what is allowed, for any value that would fail later (or silently)."""
    if cfg["mode"] not in MODES:
        raise ValueError(f"unknown mode {cfg['mode']!r}; choose one of {MODES}")
    for key in ("n_layer", "n_head", "n_embd", "block_size", "n_train", "eval_problems", "sft_batch_size",
                "n_steps", "prompts_per_step", "updates_per_batch", "log_interval", "eval_interval",
                "ckpt_interval", "budget", "cpu_threads"):
        if cfg[key] < 1:
            raise ValueError(f"{key} must be >= 1, got {cfg[key]}")
    for key in ("sft_steps", "sft_warmup"):
        if cfg[key] < 0:
            raise ValueError(f"{key} must be >= 0, got {cfg[key]}")
    for key in ("sft_lr", "lr", "temperature", "tis_cap", "grad_clip", "sft_grad_clip"):
        if not cfg[key] > 0:
            raise ValueError(f"{key} must be > 0, got {cfg[key]}")
    if cfg["group_size"] < 2:
        raise ValueError(f"group_size must be >= 2 (advantages compare samples of one prompt), got {cfg['group_size']}")
    if not 0 <= cfg["clip_eps"] < 1 or cfg["distill_coef"] < 0:
        raise ValueError(f"need 0 <= clip_eps < 1 and distill_coef >= 0, got {cfg['clip_eps']}, {cfg['distill_coef']}")
    if cfg["distill_teacher"] not in ("dense", "sparse", "frozen"):
        raise ValueError(f"distill_teacher must be 'dense', 'sparse' or 'frozen', got {cfg['distill_teacher']!r}")
    if cfg["eval_problems"] > EVAL_POOL or cfg["eval_split"] not in ("val", "test"):
        raise ValueError(f"need eval_problems <= {EVAL_POOL} and eval_split 'val' or 'test', "
                         f"got {cfg['eval_problems']}, {cfg['eval_split']!r}")
    if cfg["n_recent"] < 0:
        raise ValueError(f"n_recent must be >= 0 (0 = half the budget), got {cfg['n_recent']}")
    if cfg["reward"] not in REWARDS:
        raise ValueError(f"reward must be one of {sorted(REWARDS)}, got {cfg['reward']!r}")
    if cfg["learner_attention"] not in ("dense", "gather"):
        raise ValueError(f"learner_attention must be 'dense' or 'gather', got {cfg['learner_attention']!r}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise ValueError(f"n_embd={cfg['n_embd']} must be divisible by n_head={cfg['n_head']}")
    seq_len = sum(max_lengths())
    if cfg["block_size"] < seq_len:
        raise ValueError(f"block_size {cfg['block_size']} must hold prompt + response = {seq_len} tokens")
    if cfg["budget"] > cfg["block_size"]:
        raise ValueError(f"budget {cfg['budget']} is larger than block_size {cfg['block_size']}")
    # unknown policy, or settings that cannot work with this budget (the policy's ValueError names them)
    smd.make_policy(cfg["policy"], **policy_kwargs(cfg)).check(cfg["budget"], seq_len)
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no GPU is visible")


def save_atomic(obj, path):
    # a crash mid-write leaves the previous checkpoint intact, never a truncated one
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)

# -----------------------------------------------------------------------------
# phase 1: supervised warm-up


def sft_batch(problems, device):
    """Worked examples -> inputs x (B, T-1) and targets y (B, T-1), -1 (ignored) on prompt positions."""
    P, _ = max_lengths()
    seq = torch.tensor([encode(format_prompt(p) + format_response(p)) + [EOS_ID] for p in problems], device=device)
    x, y = seq[:, :-1], seq[:, 1:].clone()                                # (B, T-1) each
    y[:, :P - 1] = -1  # learn the response only; the prompt is random digits
    return x, y


def sft(model, train_problems, cfg, generator):
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["sft_lr"], weight_decay=0.0)
    for step in range(cfg["sft_steps"]):
        decay = 0.5 * (1 + math.cos(math.pi * step / cfg["sft_steps"]))
        lr_now = cfg["sft_lr"] * min(1.0, (step + 1) / (cfg["sft_warmup"] + 1)) * (0.1 + 0.9 * decay)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        idx = torch.randint(len(train_problems), (cfg["sft_batch_size"],), generator=generator, device=generator.device)
        x, y = sft_batch([train_problems[i] for i in idx.tolist()], cfg["device"])
        _, loss = model(x, y)
        check_finite(loss, f"sft step {step} loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["sft_grad_clip"])
        optimizer.step()
        if step % 100 == 0 or step == cfg["sft_steps"] - 1:
            print(f"sft {step:4d} | loss {loss.item():.4f} | lr {lr_now:.2e}")

# -----------------------------------------------------------------------------
# phase 2: GRPO


def group_advantages(rewards, group_size):
    """rewards (B,) with B = n_prompts * group_size, group-major -> (B,) advantages, zero mean per group.
    A group whose samples all scored the same carries no signal and gets advantage exactly 0 (its mean
    can differ from its values in the last bit, which the division by a tiny std would blow up)."""
    r = rewards.view(-1, group_size)                                       # (n_prompts, G)
    adv = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True, unbiased=False) + 1e-6)
    uniform = (r == r[:, :1]).all(-1, keepdim=True)                        # (n_prompts, 1)
    return adv.masked_fill(uniform, 0.0).view(-1)


def tis_weights(lp_learner, lp_sampler, cap):
    """Truncated importance weights min(pi_learner / pi_sampler, cap), (B, T), no gradient: they correct
    for sampling from the compressed policy while training the dense one, and the cap bounds the variance."""
    return torch.exp(lp_learner - lp_sampler).clamp(max=cap).detach()


def mismatch(lp_learner, lp_sampler, response_mask):
    """Max |log pi_learner - log pi_sampler| and the mean k3 estimate of KL(sampler || learner)
    (exp(r) - 1 - r, r the log-ratio: unbiased and >= 0 per token) over response tokens."""
    r = (lp_learner - lp_sampler)[response_mask]                           # (n_response_tokens,)
    return r.abs().max().item(), (r.exp() - 1 - r).mean().item()


def grpo_loss(lp, lp_old, advantages, response_mask, clip_eps, weights=None):
    """Clipped-ratio policy-gradient loss, a mean over every response token of the batch (token-level, so a
    long response is not down-weighted). lp, lp_old, weights (B, T); advantages (B,). -> loss, clip fraction."""
    ratio = torch.exp(lp - lp_old)                                         # (B, T)
    adv = advantages[:, None]                                              # (B, 1), one per sequence
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if weights is not None:
        per_token = per_token * weights
    m = response_mask.to(lp.dtype)
    clipped = ((ratio - 1).abs() > clip_eps).to(lp.dtype)
    return (per_token * m).sum() / m.sum(), ((clipped * m).sum() / m.sum()).item()


def check_finite(value, what):
    if not torch.isfinite(torch.as_tensor(value)).all():
        raise FloatingPointError(f"{what} is {value}: stopping (lower lr, or check the last checkpoint)")


def grpo_step(model, optimizer, problems, cfg, generator, frozen_teacher=None):
    """One GRPO iteration: sample group_size completions of each problem, score them, and take
    updates_per_batch gradient steps. frozen_teacher: the model whose dense pass teaches the masked one
    when distill_teacher="frozen". Returns the numbers a practitioner diagnoses with."""
    t0 = time.time()
    P, R = max_lengths()
    G, mode = cfg["group_size"], cfg["mode"]
    group_problems = [p for p in problems for _ in range(G)]               # B = len(problems) * G, group-major
    compressed = mode != "dense"
    ro = smd.rollout(model, [encode(format_prompt(p)) for p in group_problems],
                     policy=cfg["policy"] if compressed else "full", budget=cfg["budget"] if compressed else P + R,
                     max_new_tokens=R, temperature=cfg["temperature"], eos_id=EOS_ID, generator=generator,
                     **(policy_kwargs(cfg) if compressed else {}))
    tokens, resp, lp_sampler = ro.tokens, ro.response_mask, ro.logprobs     # (B, T) each
    reward_fn = REWARDS[cfg["reward"]]
    rewards = torch.tensor([reward_fn(p, decode(tokens[i, P:].tolist())) for i, p in enumerate(group_problems)],
                           device=tokens.device)                           # (B,)
    adv = group_advantages(rewards, G)                                     # (B,)
    mask = ro.mask if mode == "smd" else None  # only SMD shows the learner what the sampler saw
    attention = cfg["learner_attention"] if mode == "smd" else "dense"

    def learner(m):
        return smd.learner_logits(model, tokens, m, attention=attention if m is not None else "dense")

    with torch.no_grad():  # the learner's view of the batch before any update: what the mismatch measures
        lp_learner = smd.token_logprobs(learner(mask), tokens, cfg["temperature"])   # (B, T)
    mm_max, mm_k3 = mismatch(lp_learner, lp_sampler, resp)
    # dense, smd: the sampler's log-probs are the learner's own (to rounding). naive, tis: the usual practice
    # of recomputing them with the learner, which hides that the samples came from another policy
    lp_old = lp_sampler if mode in ("dense", "smd") else lp_learner
    weights = tis_weights(lp_learner, lp_sampler, cfg["tis_cap"]) if mode == "tis" else None

    for update in range(cfg["updates_per_batch"]):
        logits = learner(mask)                                             # (B, T, vocab)
        lp = smd.token_logprobs(logits, tokens, cfg["temperature"])       # (B, T)
        if update == 0:  # before any step the ratio must be 1 (to rounding) in every mode: lp is what lp_old is
            old_gap = (lp.detach() - lp_old)[resp].abs().max().item()
        pg_loss, clip_frac = grpo_loss(lp, lp_old, adv, resp, cfg["clip_eps"], weights)
        kl = torch.zeros((), device=tokens.device)
        if mode == "smd" and cfg["distill_coef"] > 0:
            if cfg["distill_teacher"] == "frozen" and frozen_teacher is None:
                raise ValueError("distill_teacher='frozen' needs the frozen_teacher model")
            if cfg["distill_teacher"] in ("dense", "frozen"):
                with torch.no_grad():  # the unmasked pass, of the same weights or of the frozen warm-up
                    teacher = smd.learner_logits(frozen_teacher if cfg["distill_teacher"] == "frozen" else model,
                                                 tokens)
                kl = smd.distill_kl(logits, teacher, resp, cfg["temperature"])
            else:
                kl = smd.distill_kl(learner(None), logits, resp, cfg["temperature"])  # the teacher is detached
        loss = pg_loss + cfg["distill_coef"] * kl
        check_finite(loss, "loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"]).item()
        check_finite(grad_norm, "grad norm")
        optimizer.step()

    return dict(reward=rewards.mean().item(), mismatch_max=mm_max, mismatch_k3=mm_k3, loss=loss.item(),
                distill_kl=kl.item(), clip_frac=clip_frac, grad_norm=grad_norm, old_gap=old_gap,
                tis_w_mean=None if weights is None else weights[resp].mean().item(),
                kv_bytes=ro.kv_bytes, full_kv_bytes=ro.full_kv_bytes,
                tok_per_s=resp.sum().item() / (time.time() - t0))


@torch.no_grad()
def evaluate(model, problems, policy, budget, **policy_kwargs):
    """Greedy exact-match accuracy on `problems` with a cache of `budget` slots evicted by `policy`."""
    P, R = max_lengths()
    ro = smd.rollout(model, [encode(format_prompt(p)) for p in problems], policy=policy, budget=budget,
                     max_new_tokens=R, temperature=0, eos_id=EOS_ID, **policy_kwargs)
    return sum(exact_reward(p, decode(ro.tokens[i, P:].tolist())) for i, p in enumerate(problems)) / len(problems)

# -----------------------------------------------------------------------------


def main(argv):
    t_start = time.time()
    cfg = dict(CONFIG, **parse_overrides(argv))
    validate_config(cfg)  # before any work: a typo should cost a second, not a warm-up
    cfg["run_name"] = cfg["run_name"] or f"{cfg['mode']}_{cfg['policy']}{cfg['budget']}"
    ckpt_path = os.path.join(cfg["out_dir"], cfg["run_name"] + ".pt")
    if cfg["resume"] and not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"--resume=True but there is no checkpoint at {ckpt_path}")
    os.makedirs(cfg["out_dir"], exist_ok=True)
    torch.set_num_threads(cfg["cpu_threads"])
    random.seed(cfg["seed"])
    torch.manual_seed(cfg["sft_seed"])  # the initial weights belong to the shared base
    P, R = max_lengths()
    train_problems, held_out = problem_splits(cfg)
    model = GPT(GPTConfig(block_size=cfg["block_size"], vocab_size=VOCAB_SIZE, n_layer=cfg["n_layer"],
                          n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=0.0)).to(cfg["device"])
    dense_eval = lambda: evaluate(model, held_out, "full", P + R)
    compressed_eval = lambda: evaluate(model, held_out, cfg["policy"], cfg["budget"], **policy_kwargs(cfg))

    # phase 1, shared by every mode: the checkpoint is named by everything that determines it
    sft_key = {k: cfg[k] for k in ("sft_seed", "n_train", "n_layer", "n_head", "n_embd", "block_size", "sft_steps",
                                   "sft_batch_size", "sft_lr", "sft_warmup", "sft_grad_clip", "device")}
    sft_key.update(n_operands=N_OPERANDS, n_digits=N_DIGITS, eval_pool=EVAL_POOL,
                   dtype=str(next(model.parameters()).dtype))
    sft_path = os.path.join(cfg["out_dir"], "sft_" + hashlib.sha1(json.dumps(sft_key, sort_keys=True).encode())
                            .hexdigest()[:10] + ".pt")
    if os.path.exists(sft_path):
        model.load_state_dict(torch.load(sft_path, map_location=cfg["device"]))
        print(f"sft: reusing {sft_path}")
    elif not cfg["resume"]:
        t0 = time.time()
        sft(model, train_problems, cfg, torch.Generator(device=cfg["device"]).manual_seed(cfg["sft_seed"]))
        save_atomic(model.state_dict(), sft_path)
        print(f"sft: {cfg['sft_steps']} steps in {time.time() - t0:.1f}s, saved {sft_path}")
    elif cfg["distill_teacher"] == "frozen" and cfg["mode"] == "smd":
        raise FileNotFoundError(f"distill_teacher='frozen' needs the warm-up weights at {sft_path}")
    # a copy taken before any RL step, so the teacher stays the warm-up model (also when resuming)
    use_frozen = cfg["mode"] == "smd" and cfg["distill_teacher"] == "frozen"
    frozen_teacher = copy.deepcopy(model).requires_grad_(False) if use_frozen else None
    torch.manual_seed(cfg["seed"])
    generator = torch.Generator(device=cfg["device"]).manual_seed(cfg["seed"])  # RL batches and sampling

    t_rl = time.time()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    start, history = 0, dict(mismatch_max=[], mismatch_k3=[], grad_norm=[], kv_frac=[])
    log_path = os.path.join(cfg["out_dir"], cfg["run_name"] + ".jsonl")
    if cfg["resume"]:
        ckpt = torch.load(ckpt_path, map_location=cfg["device"], weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        random.setstate(ckpt["python_rng"])
        start, history = ckpt["step"], ckpt["history"]
        print(f"resuming {ckpt_path} at step {start}")
    log_file = open(log_path, "a" if cfg["resume"] else "w")

    def log(record):
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    if start == 0:
        acc_dense, acc_comp = dense_eval(), compressed_eval()
        print(f"eval  {0:4d} | greedy acc dense {acc_dense:.3f} | {cfg['policy']}@{cfg['budget']} {acc_comp:.3f}")
        log(dict(kind="eval", step=0, acc_dense=acc_dense, acc_compressed=acc_comp))
    print(f"grpo: mode={cfg['mode']} policy={cfg['policy']} budget={cfg['budget']} "
          f"batch={cfg['prompts_per_step']}x{cfg['group_size']} device={cfg['device']}")
    for step in range(start, cfg["n_steps"]):
        idx = torch.randint(len(train_problems), (cfg["prompts_per_step"],), generator=generator,
                            device=generator.device)
        s = grpo_step(model, optimizer, [train_problems[i] for i in idx.tolist()], cfg, generator, frozen_teacher)
        elapsed = time.time() - t_start
        history["mismatch_max"].append(s["mismatch_max"])
        history["mismatch_k3"].append(s["mismatch_k3"])
        history["grad_norm"].append(s["grad_norm"])
        history["kv_frac"].append(s["kv_bytes"] / s["full_kv_bytes"])
        log(dict(kind="train", step=step + 1, elapsed_s=elapsed, **s))
        if (step + 1) % cfg["log_interval"] == 0:
            print(f"step {step + 1:4d} | reward {s['reward']:.3f} | mismatch max {s['mismatch_max']:.1e} "
                  f"k3 {s['mismatch_k3']:.1e} | loss {s['loss']:+.4f} kl {s['distill_kl']:.4f} "
                  f"clip {s['clip_frac']:.2f} | grad {s['grad_norm']:.3f} | kv {s['kv_bytes'] / 1024:.0f}/"
                  f"{s['full_kv_bytes'] / 1024:.0f} KiB | {s['tok_per_s']:.0f} tok/s | {elapsed:.1f}s")
        last = step + 1 == cfg["n_steps"]
        if (step + 1) % cfg["eval_interval"] == 0 or last:
            acc_dense, acc_comp = dense_eval(), compressed_eval()
            print(f"eval  {step + 1:4d} | greedy acc dense {acc_dense:.3f} | "
                  f"{cfg['policy']}@{cfg['budget']} {acc_comp:.3f}")
            log(dict(kind="eval", step=step + 1, acc_dense=acc_dense, acc_compressed=acc_comp))
        if (step + 1) % cfg["ckpt_interval"] == 0 or last:
            save_atomic(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step + 1,
                             generator=generator.get_state(), torch_rng=torch.get_rng_state(),
                             python_rng=random.getstate(), history=history, config=cfg), ckpt_path)

    if start >= cfg["n_steps"]:  # resumed a finished run: nothing trained, evaluate for the summary
        acc_dense, acc_comp = dense_eval(), compressed_eval()
    grad_norms = torch.tensor(history["grad_norm"])
    compressed = cfg["mode"] != "dense"  # a dense run's rollouts used a full cache, whatever --policy says
    summary = dict(mode=cfg["mode"], policy=cfg["policy"] if compressed else "full",
                   budget=cfg["budget"] if compressed else P + R, acc_dense=acc_dense,
                   acc_compressed=acc_comp, mismatch_max_mean=sum(history["mismatch_max"]) / len(grad_norms),
                   mismatch_k3_mean=sum(history["mismatch_k3"]) / len(grad_norms),
                   grad_norm_std=grad_norms.std(unbiased=False).item(),
                   kv_frac=sum(history["kv_frac"]) / len(grad_norms), rl_s=time.time() - t_rl,
                   wall_s=time.time() - t_start)
    log(dict(kind="summary", **summary))
    log_file.close()
    print("summary: " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
