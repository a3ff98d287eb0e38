#!/usr/bin/env python
"""The shipped-model check on every checkpoint of a run: which one to ship, and how the renderer gets there.

    python tools/track_checkpoints.py RUN/checkpoints/synthetic/full_pipeline --out RUN/track [--n 16] [--every 100]
                                      [--first_seed 100]
    python tools/track_checkpoints.py RUN/checkpoints/synthetic/volume_renderer --out RUN/track_stage1 --every 300

For each training checkpoint `models_NNNNNNN.pt` of the folder (every --every iterations, and the last),
its EMA generator renders --n frontal portraits (seeds first_seed..first_seed+n-1, ψ --psi) and a hair texture
swap, measured as tests/test_shipped_model.py measures them (evaluation.measures.portrait_check): how many portraits show each
region, how much the portraits differ (each region's area spread, the pairwise difference of their segs),
placement problems, the swap's |Δ| outside/inside the hair — for the output (stage 2) and for the
volume renderer's own low-res image and seg (both stages), with the renderer seg's off-region leak
(evaluation.measures.mask_leak: a hair texture swap reaches every pixel where the hair's seg is not zero). Writes,
under --out:
  track.json              one record per checkpoint (rerun: checkpoints already measured are skipped); it
                          prints the portraits showing each small region (in brackets: in the renderer's seg)
  track.png               portraits showing eye / mouth / brow / nose, the swap ratio and the hair's leak,
                          over iterations
  portraits_NNNNNNN.png   the portraits, their segs and the swap's |Δ| (0.5 = white), four to a row (stage
                          1: the renderer's)
Runs beside training (one thread); a checkpoint takes about half a minute at the synthetic recipe's size.
The seeds start at 100 so that choosing a checkpoint with this tool does not choose it on the portraits the
test renders (seeds 0-7): run 4 chose on seeds 0-15, and its choice passed the test's seeds while showing
noses and brows in fewer of 64 other portraits than the last checkpoint did (README, "Run 4").
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

from common import imaging  # noqa: E402
from common.checkpoint import CheckpointError, generator_export, save_checkpoint  # noqa: E402
from common.cli import UsageError, check_output, command  # noqa: E402
from common.files import write_json  # noqa: E402
from evaluation import measures  # noqa: E402
from options import check_ranges  # noqa: E402
from rendering import loading as gen  # noqa: E402
from rendering.latents import mean_latent  # noqa: E402

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
    """measures.portrait_check of a training checkpoint's EMA generator (float32, on the CPU): the full
    pipeline for a stage-2 checkpoint, the renderer alone for a stage-1 one."""
    export = generator_export(path)
    full_pipeline = any(key.startswith("decoder.") for key in export["g_ema"])
    with tempfile.TemporaryDirectory() as folder:
        exported = os.path.join(folder, "generator.pt")
        save_checkpoint(export, exported)
        try:
            opt, _ = gen.parse_options(["--trained_ckpt", exported, "--device", "cpu"])
            generator, _ = gen.load_models(opt, torch.device("cpu"), n_samples=opt.rendering.N_samples,
                                           full_pipeline=full_pipeline)
        except CheckpointError as error:  # name the file given, not the temporary export
            raise CheckpointError(str(error).replace(exported, path)) from None
    mean = mean_latent(generator, mean_samples)
    return measures.portrait_check(generator, opt, mean, psi, seeds, swap_region="hair")


def picture(check, size=64, per_row=4):
    """Each portrait as three tiles — image, seg, |Δ| of the hair swap — `per_row` portraits to a row (the
    output's; a stage-1 check has only the renderer's)."""
    tiles = []
    pictures = check if "rgb" in check else check["low"]  # the output's, else (stage 1) the renderer's
    for rgb, labels, swapped in zip(pictures["rgb"], pictures["labels"], pictures["swapped"]):
        delta = (swapped - rgb).abs().mean(0)
        tiles.append([imaging.resize_nearest(tile, size) for tile in
                      (imaging.to_uint8(rgb), measures.region_image(labels), measures.heat(delta))])
    rows = [sum(tiles[i:i + per_row], []) for i in range(0, len(tiles), per_row)]
    return imaging.image_grid(rows, pad=2)


def plot(records, out):
    iters = [r["iter"] for r in records]
    output = all("shown" in r for r in records)  # stage 2: the output's counts, the renderer's dotted
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for colour, name in zip(("C0", "C1", "C2", "C3"), SMALL_REGIONS):
        if output:
            left.plot(iters, [r["shown"][name] for r in records], marker="o", color=colour, label=name)
        left.plot(iters, [r["renderer"]["shown"][name] for r in records], linestyle=":" if output else "-",
                  marker=None if output else "o", color=colour, label=None if output else name)
    left.set_ylim(-0.5, max(r["n"] for r in records) + 0.5)
    left.set_xlabel("iteration")
    left.set_title("portraits showing the region" + (" (dotted: renderer)" if output else " (renderer)"))
    left.legend()
    if output:
        right.plot(iters, [r["swap"]["ratio"] for r in records], marker="o", color="k", label="swap: output")
    right.plot(iters, [r["renderer"]["swap"]["ratio"] for r in records], marker="o", linestyle=":", color="0.5",
               label="swap: renderer")
    right.plot(iters, [r["renderer"]["mask_leak"]["hair"] for r in records], marker=".", linestyle="--",
               color="C4", label="hair seg off the hair (renderer)")
    right.axhline(0.1, color="r", linestyle="--", label="target 0.10")
    right.set_ylim(bottom=0)
    right.set_xlabel("iteration")
    right.set_title("hair texture swap: |Δ| outside / inside")
    right.legend()
    figure.tight_layout()
    imaging.save_figure(out, figure, dpi=90)
    plt.close(figure)


def track(folder, out, n=16, every=100, psi=0.7, mean_samples=2000, progress=True, first_seed=100):
    os.makedirs(out, exist_ok=True)
    log = os.path.join(out, "track.json")
    records = json.load(open(log)) if os.path.isfile(log) else []
    measured_on = {(r.get("first_seed", 0), r["n"], r.get("psi", 0.7)) for r in records}  # older logs: seeds 0..n-1
    if measured_on - {(first_seed, n, psi)}:
        raise UsageError(f"{log} holds checkpoints measured on other portraits (first seed, n, psi: "
                         f"{sorted(measured_on)}); give another --out")
    done = {r["iter"] for r in records}
    todo = [(i, path) for i, path in checkpoints(folder, every) if i not in done]
    for i, path in tqdm(todo, desc="checkpoints", disable=not progress):
        check = measure(path, list(range(first_seed, first_seed + n)), psi, mean_samples)
        imaging.save_image(os.path.join(out, f"portraits_{i:07d}.png"), picture(check))
        record = {"iter": i, "n": check["n"], "first_seed": first_seed, "psi": psi, "renderer": check["renderer"]}
        record.update({key: check[key] for key in ("shown", "area", "spread", "pairwise_difference", "problems", "swap")
                       if key in check})
        records.append(record)
        records.sort(key=lambda r: r["iter"])
        write_json(log, records, indent=1)
        plot(records, os.path.join(out, "track.png"))
    if records and not todo:  # nothing new: the plot still reflects the log (e.g. after records were removed)
        plot(records, os.path.join(out, "track.png"))
    return records


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a checkpoint folder: RUN/checkpoints/EXP/full_pipeline (stage 2) or "
                                       "RUN/checkpoints/EXP/volume_renderer (stage 1)")
    parser.add_argument("--out", required=True, help="folder for track.json, track.png and the portraits")
    parser.add_argument("--n", type=int, default=16, help="frontal portraits per checkpoint")
    parser.add_argument("--first_seed", type=int, default=100,
                        help="their seeds are first_seed..first_seed+n-1 (the shipped-model test renders 0-7)")
    parser.add_argument("--every", type=int, default=100, help="measure checkpoints at multiples of this")
    parser.add_argument("--psi", type=float, default=0.7, help="truncation")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    check_output(args.out, "--out", "folder", inputs=(args.folder,))
    # --n >= 2: the swap takes the next portrait's code
    check_ranges({"--n": (args.n, ">= 2"), "--every": (args.every, ">= 1"), "--first_seed": (args.first_seed, ">= 0")})
    records = track(args.folder, args.out, args.n, args.every, args.psi, first_seed=args.first_seed)
    for r in records:
        low = r["renderer"]
        shown = ", ".join(f"{name} {r['shown'][name] if 'shown' in r else '-'} ({low['shown'][name]})"
                          for name in SMALL_REGIONS)
        swap = (f"{r['swap']['ratio']:.3f} (inside {r['swap']['inside']:.3f})" if "swap" in r else "-")
        print(f"{r['iter']:>7}: of {r['n']}: {shown}; problems {len(r.get('problems', low['problems']))}; "
              f"hair swap outside/inside {swap}, renderer {low['swap']['ratio']:.3f}; "
              f"hair seg off the hair {low['mask_leak']['hair']:.3f}")


if __name__ == "__main__":
    main()
