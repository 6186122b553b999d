"""
The warm-ups bases/ ships, made again: train one here for any train.py config (whatever out/ and bases/
hold), say whether it is bit for bit the shipped one, and with --ship=True copy it into bases/ and record its
SHA-256 in bases/SHA256SUMS. How bases/ was made; a reader needs it only to check that, or to ship another.

    python -m experiments.warmups                            # train.py's default warm-up, compared to bases/
    python -m experiments.warmups --sft_seed=3               # any train.py --key=value sets its config
    python -m experiments.warmups --sft_seed=3 --ship=True   # and copy it into bases/
    python -m experiments.warmups --preset=long --ship=True  # the long-trace preset's base

Not here: the warm-up itself (warmup.py), the knobs (train.py).
"""

import os
import shutil

import torch

import configurator
import train
import warmup

# -----------------------------------------------------------------------------
# its own knob; every other --key=value is train.py's, the config of the warm-up trained
ship = False                # also copy the trained warm-up into bases/ and record its SHA-256 there
CONFIG = configurator.knobs(globals())
EPILOG = "and any train.py --key=value: the warm-up's config (python train.py --help)"
# -----------------------------------------------------------------------------


def configure(argv):
    """-> (this script's own settings, the warm-up's train.py config), checked before any work."""
    overrides, passed = configurator.parse_known(argv, CONFIG)
    return dict(CONFIG, **overrides), train.make_config(passed)


def main(argv):
    own, cfg = configure(argv)
    torch.set_num_threads(cfg["cpu_threads"])
    model = warmup.build_model(cfg)
    warmup.train_warm_up(model, cfg)
    path = warmup.warmup_path(cfg)
    shipped = os.path.join(warmup.BASES, os.path.basename(path))
    if os.path.exists(shipped):
        trained, theirs = model.state_dict(), torch.load(shipped)
        gap = max((trained[k] - theirs[k]).abs().max().item() for k in trained)
        same = warmup.sha256(path) == warmup.sha256(shipped)
        print(f"sft: {'bit for bit' if same else 'not'} the shipped {os.path.relpath(shipped)} "
              f"(largest weight difference {gap:.1e})")
    if own["ship"]:
        os.makedirs(warmup.BASES, exist_ok=True)
        shutil.copyfile(path, shipped)
        sums = dict(warmup.shipped_sums(), **{os.path.basename(path): warmup.sha256(shipped)})
        with open(os.path.join(warmup.BASES, "SHA256SUMS"), "w") as f:
            f.writelines(f"{digest}  {name}\n" for name, digest in sorted(sums.items()))
        print(f"sft: shipped as {os.path.relpath(shipped)}")


if __name__ == "__main__":
    configurator.cli(main, CONFIG, __file__, check=configure, epilog=EPILOG)
