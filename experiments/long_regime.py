"""
The regime of a long-trace task (experiments/long_search.md states the search that uses it): does a
compressed cache lose little at a light budget (<= 25% of T), bite at a harsher one, and does a content-aware
policy beat recency? For one task and warm-up (train.py's, trained here and cached in out/ unless bases/ ships
it), it prints the warm-up's teacher-forced accuracy per response position (a position right less often than
unlearned_below is one the warm-up did not learn), then greedy accuracy with the full cache and with every
policy at every budget: exact answers, fully right traces, and the fraction of answer values right. No RL.

    python -m experiments.long_regime --preset=long                        # the preset's task and base
    python -m experiments.long_regime --preset=long --sft_seed=1           # another warm-up
    python -m experiments.long_regime --preset=long --budgets=192,160,128,96,64 --evicting=streaming,h2o
    python -m experiments.long_regime --preset=long --task=tabletrace_r8 --block_size=514  # another layout

Not here: training (warmup.py, train.py), the task (data/tabletrace.py).
"""

import time

import torch

import configurator
import policies
import smd
import train
import warmup
from data import TASKS

# -----------------------------------------------------------------------------
# config: overridable as --key=value; every other --key=value is train.py's (the task, model and warm-up)
budgets = (128, 96, 64, 56, 48, 40)         # KV slots per layer and head (25% .. 7.8% of T = 512)
evicting = "streaming,h2o,snapkv,rkv,tova"  # the policies, each at every budget
problems = 200                              # held-out (val) problems, greedy
unlearned_below = 0.5                       # a response position right less often than this, teacher-forced,
                                            # is one the warm-up did not learn (a digit's chance is ~0.1)
CONFIG = configurator.knobs(globals())
EPILOG = "and any train.py --key=value: the task, model and warm-up (python train.py --help)"
# -----------------------------------------------------------------------------


def configure(argv):
    """-> (this script's settings, train.py's config), checked before any work."""
    overrides, passed = configurator.parse_known(argv, CONFIG)
    own, cfg = dict(CONFIG, **overrides), train.make_config(passed)
    if cfg["task"] == "arithmetic":
        raise ValueError("long_regime.py is for the long-trace tasks: --task=tabletrace (or --preset=long)")
    P, R = TASKS[cfg["task"]].max_lengths()
    for name in own["evicting"].split(","):  # an unknown policy, or a budget it cannot work with
        for budget in own["budgets"]:
            policies.make_policy(name, **train.policy_kwargs(dict(cfg, policy=name))).check(budget, P + R, P)
    if not 0 < own["unlearned_below"] <= 1:
        raise ValueError(f"unlearned_below must be in (0, 1], got {own['unlearned_below']}")
    if not 1 <= own["problems"] <= warmup.EVAL_POOL:
        raise ValueError(f"problems must be in 1 .. {warmup.EVAL_POOL}, got {own['problems']}")
    return own, cfg


@torch.no_grad()
def unlearned_positions(model, problems, task, below):
    """Teacher-forced greedy accuracy at each response position over `problems` -> (the positions right less
    often than `below`, each with its accuracy; the mean accuracy). The layout is the same for every problem,
    so a position is one token of the trace or answer (e.g. round 7's checkpoint), learned by the warm-up or
    not: a position it never learned sits at chance (~0.1 for a digit), not at 0."""
    P, _ = task.max_lengths()
    x, y = warmup.sft_batch(problems, "cpu", task)                         # (N, T-1) each
    logits, _ = model(x.to(next(model.parameters()).device))
    right = (logits.argmax(-1).cpu() == y).float()[:, P - 1:].mean(0)      # (R,) per response position
    missed = (right < below).nonzero().squeeze(-1).tolist()
    return [(i, right[i].item()) for i in missed], right.mean().item()


@torch.no_grad()
def greedy_scores(model, problems, task, policy, budget, **settings):
    """Greedy decoding with a `budget`-slot cache evicted by `policy` -> (exact, trace right, answer values),
    each a mean over `problems`."""
    P, R = task.max_lengths()
    ro = smd.rollout(model, [task.encode(task.format_prompt(p)) for p in problems], policy=policy,
                     budget=budget, max_new_tokens=R, temperature=0, eos_id=task.EOS_ID,
                     generator=torch.Generator(next(model.parameters()).device).manual_seed(0), **settings)
    texts = [task.decode(ro.tokens[i, P:].tolist()) for i in range(len(problems))]
    mean = lambda f: sum(f(p, s) for p, s in zip(problems, texts)) / len(problems)
    return mean(task.reward), mean(task.trace_right), mean(task.partial_reward)


def main(argv):
    own, cfg = configure(argv)
    torch.set_num_threads(cfg["cpu_threads"])
    task = TASKS[cfg["task"]]
    P, R = task.max_lengths()
    model = train.build_model(cfg)
    times = warmup.warm_up(model, cfg)
    if times:
        print(f"warm-up: {times['warmup_s']:.0f}s")
    model.eval()
    _, held_out = warmup.problem_splits(dict(cfg, eval_split="val", eval_problems=own["problems"]))
    missed, mean_right = unlearned_positions(model, held_out, task, own["unlearned_below"])
    print(f"task {cfg['task']}: T = {P + R} (prompt {P}, response {R}), sft_seed {cfg['sft_seed']}, "
          f"{len(held_out)} val problems")
    layout = task.format_response(held_out[0])  # one character or checkpoint a token, as task.encode splits
    pieces = [task.decode([i]) for i in task.encode(layout)]
    print(f"teacher-forced: {mean_right:.4f} of response tokens right; positions right < "
          f"{own['unlearned_below']:.0%} of the time: {len(missed)}")
    for i, acc in missed[:12]:  # where in the layout: the tokens around it, the position itself in [ ]
        print(f"  position {i:3d}: {acc:.2f} right | ...{''.join(pieces[max(0, i - 8):i])}"
              f"[{''.join(pieces[i:i + 1])}]{''.join(pieces[i + 1:i + 4])}...")
    print(f"{'policy':>10} {'budget':>6} {'of T':>5} | {'exact':>5} {'x full':>6} | {'trace':>5} | "
          f"{'values':>6} | {'time':>5}")
    t0 = time.time()
    full = greedy_scores(model, held_out, task, "full", P + R)
    print(f"{'full':>10} {P + R:6d} {1:5.0%} | {full[0]:5.2f} {1:6.2f} | {full[1]:5.2f} | {full[2]:6.2f} | "
          f"{time.time() - t0:4.0f}s", flush=True)
    for budget in own["budgets"]:
        for name in own["evicting"].split(","):
            t0 = time.time()
            settings = train.policy_kwargs(dict(cfg, policy=name))
            exact, trace, values = greedy_scores(model, held_out, task, name, budget, **settings)
            print(f"{name:>10} {budget:6d} {budget / (P + R):5.0%} | {exact:5.2f} "
                  f"{exact / max(full[0], 1e-9):6.2f} | {trace:5.2f} | {values:6.2f} | "
                  f"{time.time() - t0:4.0f}s", flush=True)


if __name__ == "__main__":
    configurator.cli(main, CONFIG, __file__, check=configure, epilog=EPILOG)
