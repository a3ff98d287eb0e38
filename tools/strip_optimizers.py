#!/usr/bin/env python
"""Write a training checkpoint without its optimiser states: a small snapshot a run can continue from.

    python tools/strip_optimizers.py RUN/volume_renderer/models_0002199.pt snapshot.pt [--half]

Keeps the networks (generator, discriminators, EMA), the iteration, seed, RNG streams, options and the
running path-length mean; drops every `*_optim` entry (the Adam moments, as large as the networks twice
over). Continue from it with `--continue_training --ckpt snapshot.pt --fresh_optimizers`: the optimisers
restart from zero moments, everything else goes on where it was. With --half the floating tensors are
stored as float16 (loading copies them into the float32 networks). Written atomically.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common.checkpoint import CheckpointError, cast_floating, load_checkpoint, save_checkpoint  # noqa: E402
from common.cli import check_output, command  # noqa: E402

NETWORKS = ("g", "g_ema", "d", "gd", "sd")  # the state dicts of both stages' training checkpoints


def strip(source, destination, half=False):
    ckpt = load_checkpoint(source)
    optimizer_keys = [key for key in ckpt if key.endswith("_optim")]
    if "iter" not in ckpt or not optimizer_keys:
        raise CheckpointError(f"{source}: not a training checkpoint with optimiser states (no 'iter' or '*_optim' "
                              f"entries); nothing to strip")
    snapshot = {key: value for key, value in ckpt.items() if key not in optimizer_keys}
    if half:
        snapshot = {key: cast_floating(value, torch.float16) if key in NETWORKS else value
                    for key, value in snapshot.items()}
    save_checkpoint(snapshot, destination)
    return destination


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="a training checkpoint models_NNNNNNN.pt")
    parser.add_argument("destination", help="the snapshot to write")
    parser.add_argument("--half", action="store_true", help="store the network weights as float16")
    args = parser.parse_args(argv)
    check_output(args.destination, "destination", "file", inputs=(args.source,))
    strip(args.source, args.destination, args.half)
    before, after = os.path.getsize(args.source), os.path.getsize(args.destination)
    print(f"{args.destination}: {after / 2**20:.1f} MiB (from {before / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
