"""
GRPO post-training of the small GPT on a task from data/ (arithmetic by default; --task, --preset=long),
with a compressed (evicting) KV cache during rollouts. `--mode` picks how the learner treats those rollouts,
so one command shows the whole story:
  full   full-cache rollouts, unmasked learner: the on-policy reference;
  naive  compressed rollouts, unmasked (full-cache) learner: it silently trains on someone else's samples;
  tis    as naive, each token weighted by min(pi_learner / pi_sampler, tis_cap): patched, at a variance cost;
  sparse_rl  as naive, with Sparse-RL's rejection sampling: tokens whose pi_learner / pi_sampler leaves
         [sparse_rl_low, sparse_rl_high] are dropped, sequences with a token below sparse_rl_veto rejected;
  smd    compressed rollouts, the policy-gradient pass under the recorded shadow mask (exactly on-policy),
         plus distill_coef * KL(pi_unmasked || sg(pi_masked)): the unmasked pass of the same weights learns
         from the masked one (Shadow Mask Distillation as its authors state it; their pi_dense is our
         unmasked pass).
Read top to bottom: the knobs and what each accepts, sampling, the learner's passes per mode, the GRPO step,
evaluation, main. Each step prints one line (reward, sampler/learner mismatch, KL terms, grad norm, KV memory,
speed), out/<run_name>.jsonl holds the same, and the last line printed starts with "summary:".

    python train.py                          # smd under rkv@28; ~2 min on one CPU core, warm-up included
    python train.py --mode=naive             # same base, shows the off-policy mismatch
    python train.py --mode=tis --policy=snapkv
    python train.py --preset=gpu             # a larger model and batch, for one GPU (never on by itself)
    python train.py --preset=long            # a long-trace task, T = 512 (data/tabletrace.py): GRPO from the
                                             # shipped base; --base=trained adds its warm-up

Not here: the base and its eviction-robust warm-up (warmup.py, phase 1), checkpoints, logs and the summary
(runlog.py), the loss terms (objectives.py), the model (model.py), the eviction policies (policies.py), the
cache, shadow mask, rollout and learner passes (smd.py), the task (data/), the experiment (experiments/).
"""

import copy
import os
import time

import torch

import configurator
import policies
import runlog
import smd
from data import TASKS, arithmetic
from objectives import correction, distill_loss, group_advantages, grpo_loss, mismatch, reference_kl
from runlog import check_finite
from warmup import EVAL_POOL, build_model, model_config, policy_kwargs, problem_splits, warm_up
from warmup import check_config as check_warmup_config

# -----------------------------------------------------------------------------
# config: every default here, one line per knob, any of them overridden by --key=value. Why each default is
# what it is, with the runs that chose it: README.md and experiments/README.md.
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
preset = ""                 # "gpu" | "long" (PRESETS below), applied before the other overrides
# data
task = "arithmetic"         # the task (data/__init__.py): arithmetic | tabletrace | tabletrace_r8
n_train = 20000             # training problems (warm-up and RL prompts)
eval_problems = 400         # held-out problems for greedy accuracy, <= EVAL_POOL
eval_split = "val"          # "val" to choose settings, "test" to report them
eval_also = ""              # more compressed evals at the first and last eval: "policy@budget,..." (transfer)
# model (dropout stays 0: with it the learner could never reproduce the sampler's log-probs)
n_layer = 2                 # transformer blocks
n_head = 4                  # attention heads per block
n_embd = 64                 # width of the residual stream
block_size = 64             # longest sequence the model can see (prompt + response = 53)
# phase 1: supervised warm-up on correct worked examples (warmup.py)
base = "shipped"            # "shipped": bases/'s warm-up where it holds this config's; "trained": train here
sft_steps = 1200            # optimizer steps
sft_batch_size = 64         # worked examples per step
sft_lr = 3e-3               # peak learning rate
sft_warmup = 50             # linear warm-up steps, then cosine decay to 10% of sft_lr
sft_grad_clip = 1.0         # gradient-norm clip of the warm-up (RL has its own, grad_clip)
sft_mask_frac = 0.25        # fraction of warm-up rows trained under eviction masks (an eviction-robust base)
sft_mask_recipe = "random"  # those masks: streaming | random | random_positions (both content-blind) | policy
sft_min_budget = 26         # random or policy recipe: the masks' budget is drawn from sft_min_budget .. T-1
sft_attention = "mask"      # "mask": model.py's written-out scores | "fused": torch's SDPA (faster at T=512)
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
                       group_size=16, eval_problems=1000, cpu_threads=4),
           # long traces (T = 512): a table derived once, then consulted over and over (data/tabletrace.py);
           # H2O at 96 slots (19% of T) bites there; lr: smd's on validation (experiments/README.md)
           "long": dict(task="tabletrace", block_size=512, policy="h2o", budget=96, sft_steps=3000,
                        sft_batch_size=16, sft_min_budget=32, sft_mask_recipe="random_positions",
                        sft_attention="fused", n_steps=40, prompts_per_step=4, group_size=4, lr=1e-4,
                        eval_problems=200, eval_interval=20, ckpt_interval=20)}
MODES = ("full", "naive", "tis", "sparse_rl", "smd")
REWARDS = {"exact": "reward", "partial": "partial_reward"}  # reward knob -> the task's function of that name
DISTILL = ("unmasked_from_masked", "masked_from_warmup_unmasked")  # student_from_teacher, see `distill` above
# what each knob accepts, checked before any work: knob -> (is the value allowed?, what is allowed). The
# checks that tie several knobs together, and the policy's own, are in validate_config below.
ALLOWED = {
    "mode": (lambda v: v in MODES, f"one of {MODES}"),
    "task": (lambda v: v in TASKS, f"one of {tuple(TASKS)}"),
    "reward": (lambda v: v in REWARDS, f"one of {tuple(REWARDS)}"),
    "distill": (lambda v: v in DISTILL, f"one of {DISTILL}"),
    "preset": (lambda v: v in ("",) + tuple(PRESETS), f"'' or one of {tuple(PRESETS)}"),
    "eval_split": (lambda v: v in ("val", "test"), "'val' or 'test'"),
    "base": (lambda v: v in ("shipped", "trained"), "'shipped' or 'trained'"),
    "sft_attention": (lambda v: v in ("mask", "fused"), "'mask' or 'fused'"),
    "eval_problems": (lambda v: 1 <= v <= EVAL_POOL, f"in 1 .. {EVAL_POOL} (the pool each split holds)"),
    "group_size": (lambda v: v >= 2, ">= 2 (advantages compare one prompt's samples)"),
    "clip_eps": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "sft_mask_frac": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "sparse_rl_low": (lambda v: 0 < v < 1, "in (0, 1)"),
    "sparse_rl_high": (lambda v: v > 1, "> 1"),
    "n_recent": (lambda v: v >= 0, ">= 0 (0 = half the budget)"),
    **{key: (lambda v: v >= 1, ">= 1") for key in (
        "n_train", "sft_batch_size", "n_steps", "prompts_per_step", "updates_per_batch", "log_interval",
        "eval_interval", "ckpt_interval", "budget", "cpu_threads")},
    **{key: (lambda v: v >= 0, ">= 0") for key in (
        "sft_steps", "sft_warmup", "lr_warmup", "distill_coef", "ref_kl_coef")},
    **{key: (lambda v: v > 0, "> 0") for key in (
        "sft_lr", "lr", "temperature", "tis_cap", "grad_clip", "sft_grad_clip", "sparse_rl_veto")},
}
# -----------------------------------------------------------------------------


def validate_config(cfg):
    """Raise ValueError, saying what is allowed, for any value that would fail later (or silently)."""
    for key, (allowed, what) in ALLOWED.items():
        if not allowed(cfg[key]):
            raise ValueError(f"{key} must be {what}, got {cfg[key]!r}")
    model_config(cfg)  # the model's own checks: sizes, n_embd % n_head
    smd.check_attention(cfg["learner_attention"])
    check_warmup_config(cfg)
    P, R = TASKS[cfg["task"]].max_lengths()
    if cfg["block_size"] < P + R:
        raise ValueError(f"block_size {cfg['block_size']} must hold prompt + response = {P + R} tokens")
    if cfg["budget"] > cfg["block_size"]:
        raise ValueError(f"budget {cfg['budget']} is larger than block_size {cfg['block_size']}")
    # an unknown policy, or settings that cannot work with this budget (the policy's ValueError names them);
    # the transfer evaluations' too, so they fail here and not at the end
    policies.make_policy(cfg["policy"], **policy_kwargs(cfg)).check(cfg["budget"], P + R, P)
    for name, budget in eval_settings(cfg):
        policies.make_policy(name, **policy_kwargs(dict(cfg, policy=name))).check(budget, P + R, P)
    if not cfg["policy_gradient"] and not (cfg["mode"] == "smd" and cfg["distill_coef"] > 0):
        raise ValueError("policy_gradient=False (distillation only) needs mode='smd' and distill_coef > 0: "
                         "otherwise nothing is trained")
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no GPU is visible")


def make_config(argv):
    """The run's config: the defaults, then the preset if one is named, then the other overrides; checked."""
    overrides = configurator.parse(argv, CONFIG)
    preset = overrides.get("preset", CONFIG["preset"])
    cfg = {**CONFIG, **PRESETS.get(preset, {}), **overrides}
    validate_config(cfg)  # before any work, an unknown preset too: a typo should cost a second, not a warm-up
    cfg["run_name"] = cfg["run_name"] or f"{cfg['mode']}_{cfg['policy']}{cfg['budget']}"
    return cfg


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


# -----------------------------------------------------------------------------
# sampling, the learner's passes per mode, and the GRPO step


def sample_batch(model, problems, cfg, generator):
    """group_size samples of each problem (group-major), with a full cache in full mode and the compressed
    one otherwise, scored -> the rollout, rewards (B,) and group advantages (B,)."""
    task = TASKS[cfg["task"]]
    P, R = task.max_lengths()
    group_problems = [p for p in problems for _ in range(cfg["group_size"])]
    compressed = cfg["mode"] != "full"
    ro = smd.rollout(model, [task.encode(task.format_prompt(p)) for p in group_problems],
                     policy=cfg["policy"] if compressed else "full",
                     budget=cfg["budget"] if compressed else P + R,
                     max_new_tokens=R, temperature=cfg["temperature"], eos_id=task.EOS_ID,
                     generator=generator, **(policy_kwargs(cfg) if compressed else {}))
    reward_fn = getattr(task, REWARDS[cfg["reward"]])
    rewards = [reward_fn(p, task.decode(ro.tokens[i, P:].tolist())) for i, p in enumerate(group_problems)]
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


# -----------------------------------------------------------------------------
# evaluation and the loop


@torch.no_grad()
def solved(model, problems, policy, budget, task=arithmetic, **policy_kwargs):
    """Which of `problems` (of `task`) greedy decoding gets exactly right with a cache of `budget` slots
    evicted by `policy`: a list of bools, so two runs judged on the same problems can be paired problem by
    problem. The random policy draws from a generator of its own, seeded: the same weights always get the same
    answer."""
    P, R = task.max_lengths()
    generator = torch.Generator(next(model.parameters()).device).manual_seed(0)
    ro = smd.rollout(model, [task.encode(task.format_prompt(p)) for p in problems], policy=policy,
                     budget=budget, max_new_tokens=R, temperature=0, eos_id=task.EOS_ID, generator=generator,
                     **policy_kwargs)
    return [task.reward(p, task.decode(ro.tokens[i, P:].tolist())) == 1.0 for i, p in enumerate(problems)]


def evaluate(model, problems, policy, budget, task=arithmetic, **policy_kwargs):
    """Greedy exact-match accuracy on `problems` with a cache of `budget` slots evicted by `policy`."""
    right = solved(model, problems, policy, budget, task, **policy_kwargs)
    return sum(right) / len(right)


def main(argv):
    t_start = time.time()
    cfg = make_config(argv)
    if cfg["resume"] and not os.path.exists(runlog.run_path(cfg, ".pt")):
        raise FileNotFoundError(f"--resume=True but there is no checkpoint at {runlog.run_path(cfg, '.pt')}")
    os.makedirs(cfg["out_dir"], exist_ok=True)
    torch.set_num_threads(cfg["cpu_threads"])
    task = TASKS[cfg["task"]]
    P, R = task.max_lengths()
    train_problems, held_out = problem_splits(cfg)
    model = build_model(cfg)
    times = warm_up(model, cfg)  # phase 1; {} when reused
    # a copy taken before any RL step: the reference KL's anchor and the warm-up teacher (also when resuming)
    reference = copy.deepcopy(model).requires_grad_(False)
    torch.manual_seed(cfg["seed"])
    generator = torch.Generator(device=cfg["device"]).manual_seed(cfg["seed"])  # RL batches and sampling
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    start, history = runlog.resume(cfg, model, optimizer, generator)
    t_rl = time.time()
    times.update(rollout_s=0.0, learner_s=0.0, eval_s=0.0)
    log = runlog.Log(cfg)

    def run_eval(step):
        t0 = time.time()
        solved_full = solved(model, held_out, "full", P + R, task)
        solved_comp = solved(model, held_out, cfg["policy"], cfg["budget"], task, **policy_kwargs(cfg))
        acc_full, acc_comp = sum(solved_full) / len(held_out), sum(solved_comp) / len(held_out)
        print(f"eval  {step:4d} | greedy acc ({cfg['eval_split']}) full cache {acc_full:.3f} | "
              f"{cfg['policy']}@{cfg['budget']} {acc_comp:.3f}")
        log(dict(kind="eval", step=step, acc_full=acc_full, acc_compressed=acc_comp,
                 solved_full=runlog.pack(solved_full), solved_compressed=runlog.pack(solved_comp)))
        history["evals"].append((step, acc_full, acc_comp))
        if step in (0, cfg["n_steps"]) and cfg["eval_also"]:  # transfer: the first and the last eval
            also = {f"{name}@{budget}": solved(model, held_out, name, budget, task,
                                               **policy_kwargs(dict(cfg, policy=name, budget=budget)))
                    for name, budget in eval_settings(cfg)}
            print(f"eval  {step:4d} | also "
                  + " ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in also.items()))
            log(dict(kind="eval_also", step=step, acc={k: sum(v) / len(v) for k, v in also.items()},
                     solved={k: runlog.pack(v) for k, v in also.items()}))
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
        runlog.add_step(history, s)
        times["rollout_s"] += s["rollout_s"]
        times["learner_s"] += s["learner_s"]
        log(dict(kind="train", step=step, lr=lr_now, elapsed_s=time.time() - t_start, **s))
        if step % cfg["log_interval"] == 0:
            print(runlog.step_line(step, s, cfg, time.time() - t_start))
        if step % cfg["eval_interval"] == 0 or step == cfg["n_steps"]:
            run_eval(step)
        if step % cfg["ckpt_interval"] == 0 or step == cfg["n_steps"]:
            runlog.save_checkpoint(cfg, step, model, optimizer, generator, history)
    if start >= cfg["n_steps"] and (not history["evals"] or history["evals"][-1][0] != start):
        run_eval(start)  # resumed past n_steps (a finished run's checkpoint holds its last eval already)
    summary = runlog.summarize(cfg, history, time.time() - t_rl, time.time() - t_start)
    log(dict(kind="summary", **summary, **times))
    log.close()
    print(runlog.time_line(times, summary))
    print(runlog.summary_line(summary))
    return summary


if __name__ == "__main__":
    configurator.cli(main, CONFIG, __file__, check=make_config)
