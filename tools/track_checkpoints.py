#!/usr/bin/env python
"""The shipped-model check on every stage-2 checkpoint of a run: which one to ship.

    python tools/track_checkpoints.py RUN/checkpoints/synthetic/full_pipeline --out RUN/track [--n 16] [--every 100]

For each training checkpoint `models_NNNNNNN.pt` of the folder (every --every iterations, and the last),
its EMA generator renders --n frontal portraits (seeds 0..n-1, ψ --psi) and a hair texture swap, measured
as tests/test_shipped_model.py measures them (evaluation.portrait_check): how many portraits show each
region, placement problems, the swap's |Δ| outside/inside the hair. Writes, under --out:
  track.json              one record per checkpoint (rerun: checkpoints already measured are skipped); it
                          prints the portraits showing each small region (in brackets: in the renderer's seg)
  track.png               portraits showing eye / mouth / brow / nose, and the swap ratio, over iterations
  portraits_NNNNNNN.png   the portraits, their segs and the swap's |Δ| (0.5 = white), four to a row
Runs beside training (one thread); a checkpoint takes about half a minute at the synthetic recipe's size.
"""
import argparse
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import evaluation  # noqa: E402
import generation as gen  # noqa: E402
import imaging  # noqa: E402
from checkpoint import CheckpointError, generator_export, save_checkpoint  # noqa: E402
from devices import UsageError  # noqa: E402
from latents import mean_latent  # noqa: E402
from options import check_ranges  # noqa: E402

SMALL_REGIONS = ("eye", "mouth", "brow", "nose")
CHECKPOINT_NAME = re.compile(r"models_(\d{7})\.pt$")


def checkpoints(folder, every):
    """[(iteration, path)] of the folder's training checkpoints at multiples of `every`, and the last."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    found = sorted((int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
                   if (m := CHECKPOINT_NAME.match(name)))
    if not found:
        raise CheckpointError(f"{folder}: holds no training checkpoint models_NNNNNNN.pt")
    return [(i, path) for i, path in found if i % every == 0 or (i, path) == found[-1]]


def measure(path, seeds, psi, mean_samples):
    """evaluation.portrait_check of a training checkpoint's EMA generator (float32, on the CPU)."""
    with tempfile.TemporaryDirectory() as folder:
        exported = os.path.join(folder, "generator.pt")
        save_checkpoint(generator_export(path), exported)
        try:
            opt, _ = gen.parse_options(["--trained_ckpt", exported, "--device", "cpu"])
            generator, _ = gen.load_models(opt, torch.device("cpu"), n_samples=opt.rendering.N_samples)
        except CheckpointError as error:  # a stage-1 checkpoint has no decoder: name the file given
            raise CheckpointError(str(error).replace(exported, path)) from None
    mean = mean_latent(generator, mean_samples)
    return evaluation.portrait_check(generator, opt, mean, psi, seeds, swap_region="hair")


def picture(check, size=64, per_row=4):
    """Each portrait as three tiles — image, seg, |Δ| of the hair swap — `per_row` portraits to a row."""
    tiles = []
    for rgb, labels, swapped in zip(check["rgb"], check["labels"], check["swapped"]):
        delta = (swapped - rgb).abs().mean(0)
        tiles.append([imaging.resize_nearest(tile, size) for tile in
                      (imaging.to_uint8(rgb), evaluation.region_image(labels), evaluation.heat(delta))])
    rows = [sum(tiles[i:i + per_row], []) for i in range(0, len(tiles), per_row)]
    return imaging.image_grid(rows, pad=2)


def plot(records, out):
    iters = [r["iter"] for r in records]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for colour, name in zip(("C0", "C1", "C2", "C3"), SMALL_REGIONS):
        left.plot(iters, [r["shown"][name] for r in records], marker="o", color=colour, label=name)
        left.plot(iters, [r["shown_by_renderer"][name] for r in records], linestyle=":", color=colour)
    left.set_ylim(-0.5, max(r["n"] for r in records) + 0.5)
    left.set_xlabel("stage-2 iteration")
    left.set_title("portraits showing the region (dotted: renderer)")
    left.legend()
    right.plot(iters, [r["swap"]["ratio"] for r in records], marker="o", color="k")
    right.axhline(0.1, color="r", linestyle="--", label="target 0.10")
    right.set_xlabel("stage-2 iteration")
    right.set_title("hair texture swap: |Δ| outside / inside")
    right.legend()
    figure.tight_layout()
    imaging.save_figure(out, figure, dpi=90)
    plt.close(figure)


def write_json(path, records):
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(path)), delete=False) as tmp:
        json.dump(records, tmp, indent=1)
    os.replace(tmp.name, path)


def track(folder, out, n=16, every=100, psi=0.7, mean_samples=2000, progress=True):
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "track.json")
    records = json.load(open(log)) if os.path.isfile(log) else []
    done = {r["iter"] for r in records}
    todo = [(i, path) for i, path in checkpoints(folder, every) if i not in done]
    for i, path in tqdm(todo, desc="checkpoints", disable=not progress):
        check = measure(path, list(range(n)), psi, mean_samples)
        imaging.save_image(os.path.join(out, f"portraits_{i:07d}.png"), picture(check))
        records.append({"iter": i, "n": check["n"], "shown": check["shown"],
                        "shown_by_renderer": check["shown_by_renderer"], "area": check["area"],
                        "problems": check["problems"], "swap": check["swap"]})
        records.sort(key=lambda r: r["iter"])
        write_json(log, records)
        plot(records, os.path.join(out, "track.png"))
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a stage-2 checkpoint folder (RUN/checkpoints/EXP/full_pipeline)")
    parser.add_argument("--out", required=True, help="folder for track.json, track.png and the portraits")
    parser.add_argument("--n", type=int, default=16, help="frontal portraits per checkpoint (seeds 0..n-1)")
    parser.add_argument("--every", type=int, default=100, help="measure checkpoints at multiples of this")
    parser.add_argument("--psi", type=float, default=0.7, help="truncation")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        # --n >= 2: the swap takes the next portrait's code
        check_ranges({"--n": (args.n, ">= 2"), "--every": (args.every, ">= 1")})
        records = track(args.folder, args.out, args.n, args.every, args.psi)
    except (CheckpointError, UsageError) as error:
        sys.exit(f"error: {error}")
    for r in records:
        shown = ", ".join(f"{name} {r['shown'][name]} ({r['shown_by_renderer'][name]})" for name in SMALL_REGIONS)
        print(f"{r['iter']:>7}: of {r['n']}: {shown}; problems {len(r['problems'])}; "
              f"hair swap outside/inside {r['swap']['ratio']:.3f} (inside {r['swap']['inside']:.3f})")


if __name__ == "__main__":
    main()
