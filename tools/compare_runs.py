#!/usr/bin/env python
"""Runs of the same training side by side: do two runs learn the same, within the noise between two seeds?

    python tools/compare_runs.py --out DIR [--window FIRST:LAST] [--smooth 50] \
        fp32=RUN_A/losses.jsonl,TRACK_A/track.json  bf16=RUN_B/losses.jsonl,TRACK_B/track.json \
        fp32_seed1=RUN_C/losses.jsonl,TRACK_C/track.json

Each run is NAME=LOSSES[,TRACK]: a stage's `losses.jsonl` and, optionally, the `track.json` that
tools/track_checkpoints.py wrote for the same run. The first run is the reference. Writes, under --out:
  curves.png      every loss, one panel each, every run's moving average (--smooth iterations) overlaid
  comparison.md   one row per measure: each run's value, then each other run's difference to the reference
  comparison.json the same numbers
A loss's measure is its mean over the iterations of --window (default: the second half of the iterations
every run logged); the tracker's measures (portraits showing each region, the hair swap's outside/inside
ratio, the renderer seg's leak, mean area fractions) are means over the checkpoints tracked in the window.
Give a second run of the reference that differs only in its seed (`--reseed --seed N` on a resumed run, or
another --seed on a fresh one): its differences are the run-to-run noise the others' are read against.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import imaging  # noqa: E402
from common.cli import UsageError, check_output, command  # noqa: E402
from common.files import write_json, write_text  # noqa: E402
from tools.plot_losses import LogError, moving_average, read_log  # noqa: E402

TRACK_SETTINGS = ("iter", "n", "first_seed", "psi")  # a tracker record's keys that are not measures
COLUMNS = 4  # loss panels per row


def parse_run(text):
    """NAME=LOSSES[,TRACK] -> (name, losses path, track path or None)."""
    name, sep, paths = text.partition("=")
    parts = paths.split(",") if paths else []
    if not sep or not name or len(parts) not in (1, 2) or not all(parts):
        raise UsageError(f"run {text!r}: expected NAME=LOSSES.jsonl[,TRACK.json]")
    return name, parts[0], parts[1] if len(parts) == 2 else None


def parse_window(text):
    first, sep, last = text.partition(":")
    try:
        window = int(first), int(last)
    except ValueError:
        window = None
    if not sep or window is None or window[0] > window[1]:
        raise UsageError(f"--window {text!r}: expected FIRST:LAST iterations, FIRST <= LAST")
    return window


def read_track(path):
    """{iteration: {measure name: value}} from a track.json, nested measures flattened with dots."""
    if not os.path.isfile(path):
        raise LogError(f"{path}: file not found")
    try:
        records = json.load(open(path))
        return {int(record["iter"]): flatten({k: v for k, v in record.items() if k not in TRACK_SETTINGS})
                for record in records}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise LogError(f"{path}: not a track.json of tools/track_checkpoints.py") from None


def flatten(tree, prefix=""):
    """The numeric leaves of nested dicts as {"a.b.c": float}; strings and lists (descriptions) are left out."""
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            leaves[f"{prefix}{key}"] = float(value)
    return leaves


def default_window(runs_curves):
    """The second half of the iterations every run logged."""
    first = max(min(steps.min() for steps, _ in curves.values()) for curves in runs_curves)
    last = min(max(steps.max() for steps, _ in curves.values()) for curves in runs_curves)
    if first > last:
        raise UsageError("the runs' loss logs share no iteration: give --window")
    return (first + last + 1) // 2, last


def loss_measures(curves, window):
    """{"loss <name>": mean over the window} for each loss logged in it."""
    measures = {}
    for name, (steps, values) in curves.items():
        inside = (steps >= window[0]) & (steps <= window[1])
        if inside.any():
            measures[f"loss {name}"] = float(values[inside].mean())
    return measures


def track_measures(track, window):
    """{"track <measure>": mean over the checkpoints tracked in the window}."""
    inside = [measures for i, measures in sorted(track.items()) if window[0] <= i <= window[1]]
    names = sorted({name for measures in inside for name in measures})
    return {f"track {name}": float(np.mean([m[name] for m in inside if name in m])) for name in names}


def compare(runs, window=None, curves=None):
    """{"window": [first, last], "runs": [names], "measures": {measure: {run name: value}},
    "checkpoints": {run name: tracked iterations in the window}} for [(name, losses, track or None)];
    `curves`: the runs' loss logs (read_log), when the caller has read them already."""
    curves = curves or [read_log(losses) for _, losses, _ in runs]
    window = tuple(window) if window else default_window(curves)
    tracks = [read_track(track) if track else {} for _, _, track in runs]
    table = {}
    for (name, _, _), run_curves, track in zip(runs, curves, tracks):
        for measure, value in {**loss_measures(run_curves, window), **track_measures(track, window)}.items():
            table.setdefault(measure, {})[name] = value
    return {"window": list(window), "runs": [name for name, _, _ in runs], "measures": table,
            "checkpoints": {name: [i for i in sorted(track) if window[0] <= i <= window[1]]
                            for (name, _, _), track in zip(runs, tracks)}}


def markdown(result):
    names = result["runs"]
    reference, others = names[0], names[1:]
    lines = [f"Means over iterations {result['window'][0]}–{result['window'][1]} (tracker: checkpoints "
             + "; ".join(f"{name} {result['checkpoints'][name] or 'none'}" for name in names) + ").", "",
             "| measure | " + " | ".join(names) + " | " + " | ".join(f"{o} − {reference}" for o in others) + " |",
             "|---|" + "---|" * (len(names) + len(others))]
    for measure, values in result["measures"].items():
        cells = [f"{values[n]:.4g}" if n in values else "–" for n in names]
        deltas = [f"{values[o] - values[reference]:+.3g}" if o in values and reference in values else "–"
                  for o in others]
        lines.append(f"| {measure} | " + " | ".join(cells + deltas) + " |")
    return "\n".join(lines) + "\n"


def plot(names, curves, out, window, smooth=50):
    """Every loss in a panel of its own, each run's moving average (`curves`: read_log per run, in the order of
    `names`) overlaid; the window shaded."""
    losses = sorted({loss for run_curves in curves for loss in run_curves})
    rows = -(-len(losses) // COLUMNS)
    figure, axes = plt.subplots(rows, COLUMNS, figsize=(3.2 * COLUMNS, 2.5 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        if index >= len(losses):
            axis.axis("off")
            continue
        for colour, run, run_curves in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], names, curves):
            if losses[index] in run_curves:
                steps, values = run_curves[losses[index]]
                axis.plot(steps, moving_average(values, smooth), color=colour, linewidth=1.2, label=run)
        axis.axvspan(window[0], window[1], color="0.9", zorder=0)
        axis.set_title(losses[index], fontsize=9)
        axis.tick_params(labelsize=7)
    axes.flat[0].legend(fontsize=7)
    figure.tight_layout()
    imaging.save_figure(out, figure, dpi=100)
    plt.close(figure)


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="NAME=LOSSES.jsonl[,TRACK.json]; the first is the reference")
    parser.add_argument("--out", required=True, help="folder for curves.png, comparison.md and comparison.json")
    parser.add_argument("--window", type=str, default="", help="FIRST:LAST iterations the measures average over "
                                                               "(default: the second half of the common iterations)")
    parser.add_argument("--smooth", type=int, default=50, help="moving-average window of the curves (iterations)")
    args = parser.parse_args(argv)
    runs = [parse_run(text) for text in args.runs]
    if len(runs) < 2:
        raise UsageError("give at least two runs to compare")
    if len({name for name, _, _ in runs}) != len(runs):
        raise UsageError("two runs have the same NAME")
    window = parse_window(args.window) if args.window else None
    inputs = [path for _, losses, track in runs for path in (losses, track) if path]
    check_output(args.out, "--out", "folder", inputs=inputs)
    curves = [read_log(losses) for _, losses, _ in runs]
    result = compare(runs, window, curves)
    os.makedirs(args.out, exist_ok=True)
    plot(result["runs"], curves, os.path.join(args.out, "curves.png"), result["window"], args.smooth)
    write_json(os.path.join(args.out, "comparison.json"), result, indent=1)
    write_text(os.path.join(args.out, "comparison.md"), markdown(result))
    print(markdown(result))
    print(f"wrote {args.out}/curves.png, comparison.md, comparison.json")


if __name__ == "__main__":
    main()
