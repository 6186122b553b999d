"""
The base every GRPO run starts from (phase 1 of train.py): the model built from train.py's knobs, the problem
splits, and the eviction-robust supervised warm-up on worked examples. A fraction of the warm-up's rows train
under the masks an evicting cache would leave (content-blind random eviction by default), so the base
tolerates eviction as large pretrained models do. A warm-up is named sft_<hash>.pt, the hash of everything
that shapes its weights, so every mode and RL seed starts from the same base.
Where it comes from: bases/ ships the default config's warm-ups and --preset=long's, trained once here
(bases/SHA256SUMS holds each file's SHA-256, checked at every load), because another CPU's kernels give other
last bits and the warm-up amplifies them into another base; with train.py's --base=trained, or for a config
bases/ does not hold, the warm-up is trained on this machine and cached in out/. Every function takes
train.py's config (a dict): train.py owns the knobs, this file imports nothing of it.
`python -m experiments.warmups` trains one here, says whether it is bit for bit the shipped one, and ships it.

Not here: the GRPO loop (train.py), the cache and the recorded masks (smd.py), the tasks (data/, by the
task knob).
"""

import hashlib
import json
import math
import os
import time

import torch

import policies
import smd
from data import TASKS, arithmetic
from model import GPT, GPTConfig
from runlog import check_finite, save_atomic

BASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bases")  # the shipped warm-ups
EVAL_POOL = 1000  # val and test hold this many problems each, dealt before train: eval_problems moves none
RECIPES = ("streaming", "random", "random_positions", "policy")  # the warm-up's masks (sft_mask_recipe)


def problem_splits(cfg):
    """(train, eval) problems. Test and val are fixed pools dealt before train, so no setting of
    eval_problems or eval_split can put a training problem into an evaluation."""
    train_problems, val, test = TASKS[cfg["task"]].make_splits(cfg["data_seed"], cfg["n_train"], EVAL_POOL,
                                                               EVAL_POOL)
    return train_problems, (val if cfg["eval_split"] == "val" else test)[:cfg["eval_problems"]]


def policy_kwargs(cfg):
    """The settings of cfg's eviction policy, as policies.make_policy takes them (the rollouts', the
    evaluations' and the policy recipe's masks alike)."""
    if cfg["policy"] == "full":
        return {}
    own = {"streaming": dict(n_sink=cfg["n_sink"]), "h2o": dict(n_recent=cfg["n_recent"] or None),
           "tova": dict(head_average=cfg["tova_head_average"]),
           "snapkv": dict(window=cfg["snap_window"], kernel=cfg["snap_kernel"]),
           "rkv": dict(window=cfg["rkv_window"], kernel=cfg["rkv_kernel"], mix_lambda=cfg["rkv_lambda"])}
    return dict(own.get(cfg["policy"], {}), keep_prompt=cfg["keep_prompt"])


def model_config(cfg):
    return GPTConfig(block_size=cfg["block_size"], vocab_size=TASKS[cfg["task"]].VOCAB_SIZE,
                     n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=0.0)


def build_model(cfg):
    torch.manual_seed(cfg["sft_seed"])  # the initial weights belong to the shared base
    return GPT(model_config(cfg)).to(cfg["device"])


def check_config(cfg):
    """The warm-up's own knobs, beside the code they steer: ValueError saying what is allowed."""
    if cfg["sft_mask_recipe"] not in RECIPES:
        raise ValueError(f"sft_mask_recipe must be one of {RECIPES}, got {cfg['sft_mask_recipe']!r}")
    if not cfg["sft_mask_frac"] or cfg["sft_mask_recipe"] == "streaming":
        return
    P, R = TASKS[cfg["task"]].max_lengths()
    seq_len = P + R
    if cfg["sft_mask_recipe"] == "policy" and cfg["policy"] == "full":
        raise ValueError("sft_mask_recipe='policy' needs an evicting policy, got policy='full'")
    if not cfg["sft_min_budget"] < seq_len - 1:  # the masks' budgets are drawn from sft_min_budget .. T-1
        raise ValueError(f"sft_min_budget must be < {seq_len - 1}, got {cfg['sft_min_budget']}")
    if cfg["sft_mask_recipe"] == "policy":
        recorder = policies.make_policy(cfg["policy"], **policy_kwargs(cfg))
    else:
        recorder = policies.make_policy("random", keep_prompt=cfg["keep_prompt"])
    recorder.check(cfg["sft_min_budget"], seq_len - 1, P)  # e.g. keep_prompt needs room past the prompt


def warmup_path(cfg, dtype=torch.float32):
    """out/sft_<hash>.pt, the hash of everything that shapes the warm-up's weights and nothing RL-only."""
    names = ("sft_seed", "data_seed", "n_train", "n_layer", "n_head", "n_embd", "block_size", "sft_steps",
             "sft_batch_size", "sft_lr", "sft_warmup", "sft_grad_clip", "device", "sft_mask_frac")
    key = {k: cfg[k] for k in names}
    if cfg["sft_mask_frac"]:  # what the masks are, and for recorded ones which policy made them
        key.update(sft_mask_recipe=cfg["sft_mask_recipe"])
        if cfg["sft_mask_recipe"] in ("random", "random_positions"):
            key.update(keep_prompt=cfg["keep_prompt"], sft_min_budget=cfg["sft_min_budget"])
        if cfg["sft_mask_recipe"] == "policy":
            key.update(policy=cfg["policy"], policy_kwargs=policy_kwargs(cfg),
                       sft_min_budget=cfg["sft_min_budget"])
    if cfg["sft_attention"] != "mask":  # added only when set, so the keys of bases/ stay what they were
        key.update(sft_attention=cfg["sft_attention"])
    if cfg["task"] == "arithmetic":  # the default's key as it was before tasks had names: bases/ holds those
        key.update(n_operands=arithmetic.N_OPERANDS, n_digits=arithmetic.N_DIGITS)
    else:
        key.update(task=cfg["task"])
    key.update(eval_pool=EVAL_POOL, dtype=str(dtype))
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(cfg["out_dir"], f"sft_{digest}.pt")


def sft_batch(problems, device, task=arithmetic):
    """Worked examples of `task` -> inputs x (B, T-1) and targets y (B, T-1), -1 (ignored) on prompt
    positions."""
    P, _ = task.max_lengths()
    seq = [task.encode(task.format_prompt(p) + task.format_response(p)) + [task.EOS_ID] for p in problems]
    seq = torch.tensor(seq, device=device)                                # (B, T)
    x, y = seq[:, :-1], seq[:, 1:].clone()                                # (B, T-1) each
    y[:, :P - 1] = -1  # learn the response only; the prompt is random digits
    return x, y


def warmup_masks(model, x, cfg, generator):
    """Which keys each query of the warm-up inputs x (B, T) may see: (L, B, nh, T, T) bool. A fraction
    sft_mask_frac of the rows see what an evicting cache would keep, the others every earlier position. The
    default recipe is content-blind (random eviction), so the base is not trained on the masks of the policy
    that RL and evaluation then use."""
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
    P, _ = TASKS[cfg["task"]].max_lengths()
    draw = lambda high, n, low=0: torch.randint(low, high, (n,), generator=generator, device=generator.device)
    if cfg["sft_mask_recipe"] == "streaming":  # content-blind: 0, 4 or all prompt tokens as sinks, window 2+
        n_sink = torch.tensor([0, 4, P], device=x.device)[draw(3, B).to(x.device)][:, None, None]
        window = draw(T, B, low=2).to(x.device)[:, None, None]
        t = torch.arange(T, device=x.device)
        visible = (t[:, None] >= t) & ((t < n_sink) | (t[:, None] - t < window))  # (B, T, T)
        return visible[None, :, None].expand(cfg["n_layer"], -1, cfg["n_head"], -1, -1)
    budget = int(draw(T, 1, low=cfg["sft_min_budget"]))
    if cfg["sft_mask_recipe"] == "random_positions":
        visible = random_eviction_visibility(B, T, P, budget, cfg["keep_prompt"], generator).to(x.device)
        return visible[None, :, None].expand(cfg["n_layer"], -1, cfg["n_head"], -1, -1)
    if cfg["sft_mask_recipe"] == "random":
        # content-blind: what random eviction keeps depends on positions only, so a one-unit stand-in model
        # records it (the prompt kept if --keep_prompt), for every layer and head
        stand_in = GPT(GPTConfig(block_size=T, vocab_size=TASKS[cfg["task"]].VOCAB_SIZE, n_layer=1, n_head=1,
                                 n_embd=1))
        stand_in = stand_in.to(x.device)
        recorded = smd.record(stand_in, x, [P] * B, policy="random", budget=budget, temperature=0,
                              generator=generator, keep_prompt=cfg["keep_prompt"])
        return recorded.shadow_mask[0][None].expand(cfg["n_layer"], -1, cfg["n_head"], -1, -1)
    # the policy's own masks, recorded with the current weights
    recorded = smd.record(model, x, [P] * B, policy=cfg["policy"], budget=budget, temperature=0,
                          generator=generator, **policy_kwargs(cfg))
    return recorded.shadow_mask.attn_masks()


def random_eviction_visibility(B, T, P, budget, keep_prompt, generator):
    """The random recipe simulated on positions alone: what a `budget`-slot cache that evicts a uniformly
    random slot for each new token lets each query of B sequences of T tokens see, (B, T, T) bool. Random
    eviction never looks at content, so no model or cache is needed: the same distribution as the "random"
    recipe (smd.record with policies.Random), another random stream, and ~50x faster at T = 512, where
    recording runs a model forward for every token. The prompt (P tokens) is prefilled whole; with
    keep_prompt its slots are never the victim."""
    device = generator.device
    held = torch.full((B, budget), -1, dtype=torch.long, device=device)  # (B, S) slots' positions, -1: empty
    seen = torch.empty(B, T, budget, dtype=torch.long, device=device)    # (B, T, S) what query t attends over
    rows = torch.arange(B, device=device)
    for t in range(T):
        if t < budget:
            held[:, t] = t                                                 # a free slot: nothing evicted
        else:
            score = torch.rand(B, budget, generator=generator, device=device)  # (B, S); victim: the largest
            if keep_prompt:
                score = score.masked_fill(held < P, -1.0)
            held[rows, score.argmax(-1)] = t
        seen[:, t] = held
    visible = torch.zeros(B, T, T + 1, dtype=torch.bool, device=device)  # column T catches the empty slots
    visible.scatter_(2, torch.where(seen < 0, T, seen), True)
    return visible[..., :T]                                                # (B, T, T), causal by construction


def fused_loss(model, x, y, cfg, generator):
    """The warm-up's loss on x, y (B, T) through torch's fused attention -> (loss, seconds spent on masks).
    The rows under eviction masks and the causal rows go through two forwards, so the causal ones keep the
    fused kernel's causal fast path; every row has the same number of targets, so the row-weighted mean of
    the two losses is the batch's mean."""
    B = x.shape[0]
    under_masks = torch.rand(B, generator=generator, device=generator.device) < cfg["sft_mask_frac"]  # (B,)
    causal, masked = (~under_masks).nonzero().squeeze(-1), under_masks.nonzero().squeeze(-1)
    loss, masks_s = 0.0, 0.0
    if len(causal):
        loss = model(x[causal], y[causal], fused=True)[1] * len(causal)
    if len(masked):
        t0 = time.time()
        attn_mask = eviction_masks(model, x[masked], cfg, generator)       # (L, R, nh, T, T)
        masks_s = time.time() - t0
        loss = loss + model(x[masked], y[masked], attn_mask=attn_mask, fused=True)[1] * len(masked)
    return loss / B, masks_s


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
        x, y = sft_batch([train_problems[i] for i in idx.tolist()], cfg["device"], TASKS[cfg["task"]])
        if cfg["sft_attention"] == "fused":
            loss, seconds = fused_loss(model, x, y, cfg, generator)
            masks_s += seconds
        else:
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


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def shipped_sums():
    """{file name: SHA-256} from bases/SHA256SUMS (the `sha256sum` format: `sha256sum -c` checks it too)."""
    path = os.path.join(BASES, "SHA256SUMS")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {name: digest for digest, name in (line.split() for line in f if line.strip())}


def load_shipped(model, cfg, path):
    """Load bases/<name> into model after checking its bytes against the SHA-256 recorded for it."""
    name = os.path.basename(path)
    expected = shipped_sums().get(name)
    if expected is None or sha256(path) != expected:
        raise ValueError(f"{path} does not match its SHA-256 in bases/SHA256SUMS (a damaged or edited file): "
                         f"restore it with git checkout, or train one here with --base=trained")
    model.load_state_dict(torch.load(path, map_location=cfg["device"]))
    print(f"sft: the shipped base {os.path.relpath(path)} (SHA-256 checked)")


def warm_up(model, cfg):
    """Load the warm-up: the shipped one (bases/, with --base=shipped and where it holds this config's), else
    the one cached in out/ (warmup_path), else train and save it there. Returns where its time went: {} when
    it was loaded, else warmup_s and warmup_masks_s (the part spent recording eviction masks)."""
    path = warmup_path(cfg, next(model.parameters()).dtype)
    shipped = os.path.join(BASES, os.path.basename(path))
    if cfg["base"] == "shipped" and os.path.exists(shipped):
        load_shipped(model, cfg, shipped)
        return {}
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, map_location=cfg["device"]))
        print(f"sft: reusing {path}")
        return {}
    return train_warm_up(model, cfg)


def train_warm_up(model, cfg):
    """Train the warm-up here and save it to out/ (warmup_path) -> where its time went."""
    path = warmup_path(cfg, next(model.parameters()).dtype)
    t0 = time.time()
    os.makedirs(cfg["out_dir"], exist_ok=True)
    train_problems, _ = problem_splits(cfg)
    masks_s = sft(model, train_problems, cfg,
                  torch.Generator(device=cfg["device"]).manual_seed(cfg["sft_seed"]))
    save_atomic(model.state_dict(), path)
    print(f"sft: {cfg['sft_steps']} steps in {time.time() - t0:.1f}s, saved {path}")
    return dict(warmup_s=time.time() - t0, warmup_masks_s=masks_s)
