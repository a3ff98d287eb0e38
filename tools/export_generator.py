#!/usr/bin/env python
"""Export a trained generator for shipping: its EMA weights and architecture options, nothing else.

    python tools/export_generator.py RUN/synthetic_full_pipeline.pt checkpoints/synthetic_portraits.pt [--half]

Reads a final checkpoint of train_Full.py (or train_CNeRF.py) — `{"g_ema", "iter", "config"}` — or one of
their training checkpoints (`models_NNNNNNN.pt`, whose architecture options come from the option tree `opt`
it carries: any iteration of a run can be exported, looked at and compared) and writes
`{"g_ema", "config", "iter", "dtype"}` atomically. With --half the floating tensors are stored as float16
(half the size on disk); loading copies them into the float32 model, so every script gets float32 weights.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from checkpoint import (CheckpointError, architecture_config, generator_state, load_checkpoint,  # noqa: E402
                        save_checkpoint)


def export(source, destination, half=False):
    ckpt = load_checkpoint(source)
    state = generator_state(ckpt, source, entries=("g_ema",))
    config = ckpt.get("config")
    if not isinstance(config, dict) and isinstance(ckpt.get("opt"), dict):  # a training checkpoint
        try:
            config = architecture_config(ckpt["opt"])
        except (KeyError, TypeError):
            config = None
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: carries no 'config' (architecture options) nor the 'opt' of a training "
                              f"checkpoint; export a checkpoint written by train_Full.py / train_CNeRF.py")
    dtype = torch.float16 if half else torch.float32
    weights = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    save_checkpoint({"g_ema": weights, "config": config, "iter": int(ckpt.get("iter", -1)),
                     "dtype": str(dtype).replace("torch.", "")}, destination)
    return destination


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="final checkpoint with g_ema and config, or a training models_*.pt")
    parser.add_argument("destination", help="file to write")
    parser.add_argument("--half", action="store_true", help="store floating tensors as float16")
    args = parser.parse_args(argv)
    try:
        export(args.source, args.destination, args.half)
    except CheckpointError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {args.destination} ({os.path.getsize(args.destination) / 2 ** 20:.1f} MiB)")


if __name__ == "__main__":
    main()
