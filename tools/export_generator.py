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

from common.checkpoint import generator_export, save_checkpoint  # noqa: E402
from common.cli import check_output, command  # noqa: E402


def export(source, destination, half=False):
    save_checkpoint(generator_export(source, half), destination)
    return destination


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="final checkpoint with g_ema and config, or a training models_*.pt")
    parser.add_argument("destination", help="file to write")
    parser.add_argument("--half", action="store_true", help="store floating tensors as float16")
    args = parser.parse_args(argv)
    check_output(args.destination, "destination", "file", inputs=(args.source,))
    export(args.source, args.destination, args.half)
    print(f"wrote {args.destination} ({os.path.getsize(args.destination) / 2 ** 20:.1f} MiB)")


if __name__ == "__main__":
    main()
