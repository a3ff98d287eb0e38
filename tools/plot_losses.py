#!/usr/bin/env python
"""Loss curves of a training run, as one PNG.

    python tools/plot_losses.py --out curves.png RUN/volume_renderer/losses.jsonl [RUN/full_pipeline/losses.jsonl ...]

Each input is the `losses.jsonl` a training stage appends to (one {"step": i, name: value, ...} object per
iteration; a resumed run appends again from its resumed step, and the last value logged for a step wins).
Every loss gets its own panel (rows of at most six per file): the raw values faint, a moving average (--smooth
iterations) on top.
"""
import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import imaging  # noqa: E402
from common.cli import UsageError, check_output, command  # noqa: E402

MAX_COLUMNS = 6  # panels per row; a log with more losses wraps onto further rows


class LogError(UsageError):
    """A loss log that cannot be read (one-line message)."""


def read_log(path):
    """{name: (steps, values)} from one losses.jsonl, the last record of each step kept."""
    if not os.path.isfile(path):
        raise LogError(f"{path}: file not found")
    by_step = {}
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record.pop("step"))
                by_step[step] = {k: float(v) for k, v in record.items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                raise LogError(f"{path}:{number}: not a loss record ({line.strip()[:60]!r})") from None
    if not by_step:
        raise LogError(f"{path}: no loss records")
    steps = sorted(by_step)
    names = sorted({name for values in by_step.values() for name in values})
    curves = {}
    for name in names:
        points = [(s, by_step[s][name]) for s in steps if name in by_step[s]]
        curves[name] = (np.array([p[0] for p in points]), np.array([p[1] for p in points]))
    return curves


def moving_average(values, window):
    """Trailing mean over `window` values (shorter at the start), so curve i depends on values ≤ i only."""
    window = max(1, min(int(window), len(values)))
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.maximum(0, np.arange(1, len(values) + 1) - window)]) / counts


def plot(logs, out, smooth=50, titles=None):
    """Write the curves of every log (a row each) to `out` (PNG, atomically)."""
    logs_curves = [read_log(path) for path in logs]
    columns = min(MAX_COLUMNS, max(len(curves) for curves in logs_curves))
    rows_of = [math.ceil(len(curves) / columns) for curves in logs_curves]  # panel rows per log
    figure, axes = plt.subplots(sum(rows_of), columns, figsize=(2.8 * columns, 2.4 * sum(rows_of)), squeeze=False)
    first_row = 0
    for r, curves in enumerate(logs_curves):
        title = titles[r] if titles else os.path.basename(os.path.dirname(os.path.abspath(logs[r])))
        for index in range(rows_of[r] * columns):
            axis = axes[first_row + index // columns][index % columns]
            if index >= len(curves):
                axis.axis("off")
                continue
            name = sorted(curves)[index]
            steps, values = curves[name]
            axis.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.6)
            axis.plot(steps, moving_average(values, smooth), color="tab:blue", linewidth=1.4)
            axis.set_title(f"{title}: {name}", fontsize=8)
            axis.tick_params(labelsize=7)
            axis.set_xlabel("iteration", fontsize=7)
        first_row += rows_of[r]
    figure.tight_layout()
    imaging.save_figure(out, figure, dpi=110)
    plt.close(figure)
    return out


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logs", nargs="+", help="losses.jsonl files, one row of panels each")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--smooth", type=int, default=50, help="moving-average window (iterations)")
    parser.add_argument("--titles", type=str, default="", help="comma-separated row titles (default: stage folder)")
    args = parser.parse_args(argv)
    check_output(args.out, "--out", "file", inputs=args.logs)
    titles = args.titles.split(",") if args.titles else None
    if titles and len(titles) != len(args.logs):
        raise UsageError(f"--titles has {len(titles)} names for {len(args.logs)} logs")
    plot(args.logs, args.out, args.smooth, titles)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
