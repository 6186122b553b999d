"""
Run bookkeeping for train.py, kept out of the GRPO loop: the run's history (one list of the per-step keys),
atomic checkpoints and resume, the JSONL log, the printed step and time lines, and the run's summary.
Not here: anything that changes what is trained (train.py, warmup.py).
"""

import json
import os

import torch

from data import TASKS

# what the history keeps of each GRPO step (grpo_step returns them), besides kv_frac and the evaluations
STEP_KEYS = ("reward", "mismatch_max", "mismatch_k3", "old_gap", "tis_ess", "sparse_rl_outside",
             "sparse_rl_rejected")


def check_finite(value, what):
    if not torch.isfinite(torch.as_tensor(value)).all():
        raise FloatingPointError(f"{what} is {value}: stopping (lower lr, or check the last checkpoint)")


def save_atomic(obj, path):
    # a crash mid-write leaves the previous checkpoint intact, never a truncated one
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def run_path(cfg, suffix):
    return os.path.join(cfg["out_dir"], cfg["run_name"] + suffix)


def new_history():
    """Per step: STEP_KEYS and kv_frac; per evaluation: (step, full-cache accuracy, compressed accuracy)."""
    return {key: [] for key in STEP_KEYS + ("kv_frac", "evals")}


def add_step(history, s):
    for key in STEP_KEYS:
        history[key].append(s[key])
    history["kv_frac"].append(s["kv_bytes"] / s["full_kv_bytes"])


def save_checkpoint(cfg, step, model, optimizer, generator, history):
    save_atomic(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                     generator=generator.get_state(), torch_rng=torch.get_rng_state(), history=history,
                     config=cfg), run_path(cfg, ".pt"))


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


def resume(cfg, model, optimizer, generator):
    """-> (the step to start from, the history so far): the checkpoint's when cfg["resume"] (the JSONL then
    keeps each step once: the steps after the checkpoint run again), else a fresh start."""
    if not cfg["resume"]:
        return 0, new_history()
    start, history = load_checkpoint(cfg, model, optimizer, generator)
    print(f"resuming {run_path(cfg, '.pt')} at step {start}")
    keep_log_until(run_path(cfg, ".jsonl"), start)
    return start, history


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


class Log:
    """out/<run_name>.jsonl, one JSON record a line, flushed as it goes (a crash keeps every step logged)."""

    def __init__(self, cfg):
        self.file = open(run_path(cfg, ".jsonl"), "a" if cfg["resume"] else "w")

    def __call__(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def pack(bools):
    """[True, False, ...] -> a hex string, 4 problems a digit (the JSONL's per-problem record); unpack
    reverses it, given the count."""
    bits = "".join("1" if b else "0" for b in bools)
    bits += "0" * (-len(bits) % 4)
    return "".join(f"{int(bits[i:i + 4], 2):x}" for i in range(0, len(bits), 4))


def unpack(digits, n):
    return [c == "1" for c in "".join(f"{int(d, 16):04b}" for d in digits)[:n]]


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
    P, R = TASKS[cfg["task"]].max_lengths()
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


def summary_line(summary):
    return "summary: " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in summary.items())
