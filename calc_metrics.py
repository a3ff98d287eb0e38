#!/usr/bin/env python
"""The numbers a researcher reports for a trained generator, in one command.

  python calc_metrics.py --trained_ckpt CKPT --dataset_path LMDB \\
      --metrics fid,kid,miou,locality,consistency,inversion,diversity [--n 2000] [--out DIR] \\
      [--parser FILE] [--inception FILE] [model flags of the checkpoint: --size ... --style_dim ...]

Writes DIR/metrics.json, DIR/metrics.md (the same numbers as tables) and pictures (samples.png,
locality.png, consistency.png, inversions.png, diversity.png); default DIR is <results_dir>/metrics. Every identity,
camera and subset comes from a fixed seed, so two runs give the same numbers. Images are rendered
the published inference way at --inference_samples samples per ray, with truncation --psi (default 1:
no truncation, as FID is conventionally measured).

Metrics:
  fid, kid     Generated images (n = min(--n, half the dataset) identities, cameras drawn like training
               cameras, 8-bit) against as many dataset images at the model's output size; features
               from an Inception-v3 read from --inception (the StyleGAN2-ADA/EG3D TorchScript file or a
               torchvision inception_v3 state dict; nothing is downloaded), reported as `fid`, `kid`;
               without --inception from the face parser's pooled bottleneck, reported as `fid_parser`,
               `kid_parser`. FID: Fréchet distance of the fitted Gaussians (scipy sqrtm). KID: unbiased
               MMD² with the cubic polynomial kernel over --kid_subsets random subsets (mean ± std).
               The data-vs-data value (two disjoint dataset halves of the same size) is the floor.
  miou         The face parser on --n generated images against the generator's own rendered
               segmentation (argmax): IoU per region over all pixels of all images, and their mean.
               The parser's own held-out mIoU on real data (tools/train_parser.py) is its ceiling.
  locality     For --n_pairs identity pairs, each region k and each of --locality_attributes: the
               source's codes with region k's texture (or shape) code from the reference, frontal view;
               M = the source's pixels whose rendered region is k; |Δ| = per-pixel mean absolute RGB
               change (images in [-1, 1]). Reported per region: mean |Δ| outside M, inside M and the
               mean of the ratios outside/inside (lower = more local), over the pairs where M covers
               at least --min_area of the image (their count and M's mean area are given).
  consistency  --n_consistency identities rendered from azimuth -a and +a (--consistency_azim, elevation
               0); each view is warped onto the other through the rendered surface points and compared
               where both views see the same point: mean absolute colour error of the output images
               (and of the renderer's low-resolution RGB) and the fraction of those pixels whose regions
               agree, with the fraction of the image seen in both views.
  inversion    The last --n_inversions portraits of --inversion_dataset (default --dataset_path; give
               an LMDB of portraits the model was not trained on) are inverted with editing.invert
               (pixel L2, --inversion_steps Adam steps, from the mean latent and a frontal camera; the
               label map is not used by the fit): PSNR and SSIM (scikit-image) of the reconstruction,
               and the IoU of the rendered seg's regions against the true label map.
  diversity    --n_diversity identities rendered under cameras drawn like training cameras, and the
               same number of dataset label maps (a fixed random subset): per region, the standard
               deviation over images of its area fraction in the rendered seg (argmax) or label map, the
               model's beside the data's and their ratio (`spread_ratio_min`: the least ratio over
               background, face, hair and neck+cloth); and the pairwise difference, the mean fraction of
               pixels whose region differs between two identities (disjoint pairs), for the model at
               training cameras, the model frontally (all identities under one camera) and the data.

The face parser: --parser FILE (tools/train_parser.py output; zllrunning's BiSeNet state dict, e.g. its
79999_iter.pth, the parser of IDE-3D-style evaluation, run at 512 px or --parser_size; or a TorchScript
module giving 19-class logits in CelebAMask-HQ order or 9 region logits, for RGB in [-1, 1]; the
format is read from the file, see evaluation/face_parser.py); without it one is trained on the LMDB's
label maps (saved as DIR/parser.pt and reused by later runs on the same LMDB and size).
"""
import json
import math
import os
import time

import numpy as np

from common import devices, imaging
from common.cli import UsageError, command
from common.draws import seed_everything
from common.files import write_text
from common.regions import REGION_NAMES
from dataset import MultiResolutionDataset
from evaluation import face_parser, measures, metrics
from options import check_ranges
from rendering import loading as gen
from rendering.latents import mean_latent

METRICS = ("fid", "kid", "miou", "locality", "consistency", "inversion", "diversity")
# Regions whose spread the diversity metric compares with the data's (the large ones every portrait has).
DIVERSITY_REGIONS = ("background", "face", "hair", "neck+cloth")


def add_arguments(group):
    group.add_argument("--metrics", type=str, default=",".join(METRICS), help=f"comma-separated: {', '.join(METRICS)}")
    group.add_argument("--n", type=int, default=2000, help="generated images for fid, kid and miou")
    group.add_argument("--out", type=str, default="", help="output folder (default <results_dir>/metrics)")
    group.add_argument("--psi", type=float, default=1.0, help="truncation of the evaluated identities (1: none)")
    group.add_argument("--inference_samples", type=int, default=gen.INFERENCE_SAMPLES,
                       help="samples per ray of the renderer (published inference: 64)")
    group.add_argument("--render_batch", type=int, default=8, help="images rendered at once")
    group.add_argument("--inception", type=str, default="", help="local Inception-v3 file for fid/kid")
    group.add_argument("--kid_subsets", type=int, default=100, help="random subsets averaged by KID")
    group.add_argument("--parser", type=str, default="",
                       help="face parser file: tools/train_parser.py, BiSeNet state dict or TorchScript (else one is "
                            "trained on the LMDB)")
    group.add_argument("--parser_size", type=int, default=0,
                       help="input size of a TorchScript parser (default: the images' size) or a BiSeNet (default 512)")
    group.add_argument("--parser_epochs", type=int, default=10, help="epochs of a parser trained here")
    group.add_argument("--n_diversity", type=int, default=64, help="identities (and dataset label maps) for diversity")
    group.add_argument("--n_pairs", type=int, default=20, help="identity pairs for locality")
    group.add_argument("--locality_attributes", type=str, default="texture,shape", help="swapped codes: texture, shape")
    group.add_argument("--min_area", type=float, default=0.01, help="smallest region area (fraction) locality counts")
    group.add_argument("--n_consistency", type=int, default=20, help="identities for view consistency")
    group.add_argument("--consistency_azim", type=float, default=0.3, help="the two views' azimuths are -a and +a (rad)")
    group.add_argument("--n_inversions", type=int, default=20, help="dataset portraits to invert")
    group.add_argument("--inversion_steps", type=int, default=200, help="Adam steps per inversion")
    group.add_argument("--invert_lr", type=float, default=0.03, help="learning rate of the codes")
    group.add_argument("--inversion_dataset", type=str, default="", help="LMDB of portraits to invert (default --dataset_path)")


def parse_metrics(spec):
    chosen = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        raise UsageError(f"--metrics {spec!r}: unknown {', '.join(unknown) or '(none given)'}; valid: {', '.join(METRICS)}")
    return [m for m in METRICS if m in chosen]


def check_settings(own, chosen):
    check_ranges({f"--{name}": (own[name], ">= 1") for name in ("n", "render_batch", "kid_subsets", "n_pairs",
                                                                "n_consistency", "n_inversions", "inversion_steps",
                                                                "n_diversity", "parser_epochs")})
    if ("fid" in chosen or "kid" in chosen) and own.n < 2:
        raise UsageError("--n must be at least 2 for fid/kid")
    check_ranges({"--psi": (own.psi, "(0, 1]"), "--min_area": (own.min_area, "[0, 1)"),
                  "--consistency_azim": (own.consistency_azim, "> 0")})
    attributes = [a.strip() for a in own.locality_attributes.split(",") if a.strip()]
    if not attributes or any(a not in ("texture", "shape") for a in attributes):
        raise UsageError(f"--locality_attributes {own.locality_attributes!r}: give texture and/or shape")
    return attributes


def open_dataset(path, size, masks, why):
    try:
        return MultiResolutionDataset(path, resolution=size, masks=masks)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(f"{why}: {error}") from None


def get_parser(own, dataset_path, size, out_dir, device):
    """The face parser: --parser, else one trained on the LMDB's label maps at `size` (cached in out_dir)."""
    if own.parser:
        try:
            return face_parser.load_parser(own.parser, device, size=own.parser_size or None)
        except face_parser.ParserError as error:
            raise UsageError(f"--parser {error}") from None
    data = open_dataset(dataset_path, size, True,
                        "miou (and fid/kid without --inception) need a face parser: pass --parser FILE or an LMDB "
                        "with label maps to train one")
    cached = os.path.join(out_dir, "parser.pt")
    if os.path.isfile(cached):
        try:
            parser = face_parser.load_parser(cached, device)
            if parser.size == size and (parser.held_out or {}).get("dataset") == os.path.abspath(data.path):
                print(f"face parser: reusing {cached} (delete it to retrain)")
                return parser
        except face_parser.ParserError:
            pass
    if size % 2 ** len(face_parser.DEFAULT_WIDTHS):
        raise UsageError(f"--size {size}: a parser is trained at the output size, which must be divisible by "
                         f"{2 ** len(face_parser.DEFAULT_WIDTHS)}; pass --parser FILE")
    train_idx, held_idx = face_parser.split(len(data), 0.1)
    images, labels = face_parser.load_images(data, range(len(data)))
    model = face_parser.train(images[train_idx], labels[train_idx], epochs=own.parser_epochs, device=device)
    parser = face_parser.Parser(model, cached, size=size, own=True)
    ious, miou = face_parser.evaluate(parser, images[held_idx], labels[held_idx], device=device)
    parser.held_out = {"miou": miou, "iou": ious, "images": len(held_idx), "dataset": os.path.abspath(data.path)}
    face_parser.save_parser(cached, model, size, parser.held_out)
    print(f"face parser trained on {len(train_idx)} images, held-out mIoU {miou:.3f}: {cached}")
    return parser


# --------------------------------------------------------------------------------------- output


def clean(value):
    """JSON-safe: NaN and infinities become null, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def fmt(value, digits=4):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown(report):
    r = report["results"]
    lines = [f"checkpoint: {report['checkpoint']}", "", "| metric | value | notes |", "|---|---|---|"]
    for name in ("fid", "fid_parser"):
        if name in r:
            e = r[name]
            lines.append(f"| {name} | {fmt(e['value'], 3)} | data-vs-data floor {fmt(e['data_vs_data'], 3)}; "
                         f"{e['images']} images per set; {e['features']} features |")
    for name in ("kid", "kid_parser"):
        if name in r:
            e = r[name]
            lines.append(f"| {name} | {fmt(e['value'], 5)} ± {fmt(e['std'], 5)} | data-vs-data floor "
                         f"{fmt(e['data_vs_data'], 5)}; {e['subsets']} subsets of {e['subset_size']} |")
    if "miou" in r:
        e = r["miou"]
        ceiling = e.get("parser_ceiling")
        lines.append(f"| miou (parser vs generator seg) | {fmt(e['value'], 3)} | {e['samples']} samples; parser "
                     f"held-out mIoU {fmt(ceiling, 3) if ceiling is not None else 'unknown'} |")
    if "locality" in r:
        for attribute, e in r["locality"].items():
            lines.append(f"| locality ({attribute} swap) | {fmt(e['mean_ratio'], 3)} | mean of the regions' "
                         f"outside/inside ratios (max {fmt(e['max_ratio'], 3)}), {e['pairs']} pairs, regions "
                         f">= {e['min_area']:.0%} of the image |")
    if "consistency" in r:
        e = r["consistency"]
        lines.append(f"| consistency colour error | {fmt(e['colour_error'])} | ±{e['azimuth']} rad, "
                     f"{e['identities']} identities, {fmt(e['visible'], 2)} of the image seen in both views; "
                     f"renderer RGB {fmt(e['colour_error_renderer'])} |")
        lines.append(f"| consistency seg agreement | {fmt(e['seg_agreement'], 3)} | fraction of co-visible pixels |")
    if "inversion" in r:
        e = r["inversion"]
        lines.append(f"| inversion PSNR (dB) | {fmt(e['psnr'], 2)} | min {fmt(e['psnr_min'], 2)}, max "
                     f"{fmt(e['psnr_max'], 2)}; {len(e['images'])} portraits, {e['steps']} steps |")
        lines.append(f"| inversion SSIM | {fmt(e['ssim'], 3)} | |")
        lines.append(f"| inversion seg mIoU | {fmt(e['miou'], 3)} | rendered seg vs true label map |")
    if "diversity" in r:
        e = r["diversity"]
        pairs = e["pairwise_difference"]
        lines.append(f"| diversity: least spread ratio (model/data, {', '.join(DIVERSITY_REGIONS)}) | "
                     f"{fmt(e['spread_ratio_min'], 3)} | std of each region's area over {e['identities']} identities "
                     f"at training cameras, over the same number of dataset label maps |")
        lines.append(f"| diversity: pairwise difference | {fmt(pairs['model'], 3)} | fraction of pixels whose region "
                     f"differs between two identities; frontal {fmt(pairs['model_frontal'], 3)}, data "
                     f"{fmt(pairs['data'], 3)} |")
    columns, rows = ["region"], [[name] for name in REGION_NAMES]
    if "miou" in r:
        columns += ["miou IoU", "parser held-out IoU"]
        ceiling = r["miou"].get("parser_ceiling_per_region") or {}
        for row, name in zip(rows, REGION_NAMES):
            row += [fmt(r["miou"]["per_region"][name], 3), fmt(ceiling.get(name), 3)]
    if "locality" in r:
        for attribute, e in r["locality"].items():
            columns += [f"{attribute}: pairs", "area", "|Δ| out", "|Δ| in", "out/in"]
            for row, name in zip(rows, REGION_NAMES):
                p = e["per_region"][name]
                row += [str(p["pairs"]), fmt(p["area"], 3), fmt(p["outside"]), fmt(p["inside"]), fmt(p["ratio"], 3)]
    if "diversity" in r:
        columns += ["area std: model", "data", "ratio"]
        for row, name in zip(rows, REGION_NAMES):
            s = r["diversity"]["spread"][name]
            row += [fmt(s["model"], 4), fmt(s["data"], 4), fmt(s["ratio"], 2)]
    if "inversion" in r:
        columns.append("inversion IoU")
        for row, name in zip(rows, REGION_NAMES):
            row.append(fmt(r["inversion"]["per_region"][name], 3))
    if len(columns) > 1:
        lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items())
    lines += ["", f"time: {seconds}"]
    return "\n".join(lines) + "\n"


def per_region(values):
    return {name: v for name, v in zip(REGION_NAMES, values)}


# ----------------------------------------------------------------------------------------- main


def output_dir(opt, own):
    return (own.out or os.path.join(opt.inference.results_dir, "metrics")), "--out"


@command
def main(argv=None):
    opt, own = gen.parse_options(argv, add_arguments, "calc_metrics", output_dir)
    out_dir = output_dir(opt, own)[0]
    chosen = parse_metrics(own.metrics)
    attributes = check_settings(own, chosen)
    device = devices.select_device(opt.experiment.device)
    extractor = None
    if own.inception and ("fid" in chosen or "kid" in chosen):
        extractor = measures.InceptionFeatures(own.inception, device)
    # The model first: its output size (from the flags or the checkpoint) sets the data's size.
    _, generator = gen.load_for_editing(opt, own.inference_samples)
    size = generator.size
    need_parser = "miou" in chosen or (extractor is None and ("fid" in chosen or "kid" in chosen))
    data = None
    if "fid" in chosen or "kid" in chosen:
        data = open_dataset(opt.dataset.dataset_path, size, False, "fid/kid need dataset images")
        if len(data) < 4:
            raise UsageError(f"{opt.dataset.dataset_path}: fid/kid need at least 4 dataset images, found {len(data)}")
    inversion_data = None
    if "inversion" in chosen:
        path = own.inversion_dataset or opt.dataset.dataset_path
        inversion_data = open_dataset(path, size, True, "inversion needs portraits with label maps")
        if len(inversion_data) < own.n_inversions:
            raise UsageError(f"{path}: --n_inversions {own.n_inversions} but the LMDB holds {len(inversion_data)}")
    diversity_data = None
    if "diversity" in chosen:
        diversity_data = open_dataset(opt.dataset.dataset_path, size, True, "diversity needs label maps")
        if own.n_diversity < 2 or len(diversity_data) < own.n_diversity:
            raise UsageError(f"--n_diversity {own.n_diversity}: needs at least 2 and at most the "
                             f"{len(diversity_data)} label maps of {opt.dataset.dataset_path}")
    parser = get_parser(own, opt.dataset.dataset_path, size, out_dir, device) if need_parser else None
    if extractor is None and ("fid" in chosen or "kid" in chosen):
        extractor = measures.ParserFeatures(parser)

    seed = opt.experiment.seed or 0
    seed_everything(seed)
    psi = own.psi
    mean = mean_latent(generator, opt.inference.truncation_mean)
    results, seconds = {}, {}
    print(f"checkpoint {opt.training.trained_ckpt}; metrics {', '.join(chosen)}; output {out_dir}")

    if {"fid", "kid", "miou"} & set(chosen):
        start = time.time()
        want_features = "fid" in chosen or "kid" in chosen
        count = own.n
        if want_features:
            m = min(own.n, len(data) // 2)
        samples = measures.sample_set(generator, opt, mean, psi, count, own.render_batch,
                                      extractor if want_features else None,
                                      parser if "miou" in chosen else None)
        seconds["generated samples"] = time.time() - start
        if want_features:
            start = time.time()
            half_a, half_b = measures.data_halves(len(data), m, seed)
            real_a = measures.dataset_features(data, half_a, extractor, desc="dataset half A")
            real_b = measures.dataset_features(data, half_b, extractor, desc="dataset half B")
            fake = samples["features"][:m]
            label = "" if extractor.name == "inception" else "_parser"
            described = ("Inception-v3 pool (2048-d)" if extractor.name == "inception"
                         else f"parser bottleneck ({fake.shape[1]}-d)")
            if "fid" in chosen:
                results["fid" + label] = {"value": metrics.fid(fake, real_a), "data_vs_data": metrics.fid(real_b, real_a),
                                          "images": m, "features": described}
            if "kid" in chosen:
                value, std = metrics.kid(fake, real_a, own.kid_subsets, seed=seed)
                floor, floor_std = metrics.kid(real_b, real_a, own.kid_subsets, seed=seed)
                results["kid" + label] = {"value": value, "std": std, "data_vs_data": floor,
                                          "data_vs_data_std": floor_std, "subsets": own.kid_subsets,
                                          "subset_size": min(m, 1000), "images": m, "features": described}
            seconds["fid/kid dataset features"] = time.time() - start
        if "miou" in chosen:
            ious = metrics.iou_per_class(samples["confusion"])
            held = parser.held_out or {}
            results["miou"] = {"value": metrics.mean_iou(ious), "per_region": per_region(ious), "samples": count,
                               "parser": parser.label, "parser_ceiling": held.get("miou"),
                               "parser_ceiling_per_region": per_region(held["iou"]) if held.get("iou") else None}
        kept = samples["kept"]
        rows = [[imaging.to_uint8(x) for x in kept["rgb"]], [imaging.seg_row_image(s[None]) for s in kept["seg"]]]
        if kept["parsed"]:
            rows.append([imaging.seg_row_image(s[None]) for s in kept["parsed"]])
        imaging.save_image(os.path.join(out_dir, "samples.png"), imaging.image_grid(rows))

    if "locality" in chosen:
        start = time.time()
        summary, example = measures.locality(generator, opt, mean, psi, own.n_pairs, attributes, own.min_area,
                                             own.render_batch)
        results["locality"] = {}
        for attribute in attributes:
            ratios = [e["ratio"] for e in summary[attribute] if e["ratio"] is not None]
            results["locality"][attribute] = {
                "mean_ratio": float(np.mean(ratios)) if ratios else None,
                "max_ratio": float(np.max(ratios)) if ratios else None,
                "pairs": own.n_pairs, "min_area": own.min_area,
                "per_region": per_region(summary[attribute])}
        rgb, source_seg, deltas = example
        top = [imaging.to_uint8(rgb[0])] + list(imaging.to_uint8(rgb[1:]))
        bottom = [imaging.seg_row_image(source_seg[None])] + [measures.heat(d) for d in deltas]
        imaging.save_image(os.path.join(out_dir, "locality.png"), imaging.image_grid([top, bottom]))
        seconds["locality"] = time.time() - start

    if "consistency" in chosen:
        start = time.time()
        values, (rgb, seg) = measures.consistency(generator, opt, mean, psi, own.n_consistency,
                                                  own.consistency_azim)
        results["consistency"] = {k: float(np.nanmean(v)) if not all(map(math.isnan, v)) else None
                                  for k, v in values.items()}
        results["consistency"].update(identities=own.n_consistency, azimuth=own.consistency_azim)
        imaging.save_image(os.path.join(out_dir, "consistency.png"), imaging.image_grid(
            [list(imaging.to_uint8(rgb)), [imaging.seg_row_image(s[None]) for s in seg]]))
        seconds["consistency"] = time.time() - start

    if "inversion" in chosen:
        start = time.time()
        indices = list(range(len(inversion_data) - own.n_inversions, len(inversion_data)))
        rows, confusion, pictures = measures.inversion(generator, opt, mean, psi, inversion_data, indices,
                                                       own.inversion_steps, own.invert_lr)
        ious = metrics.iou_per_class(confusion)
        psnrs = [r["psnr"] for r in rows]
        results["inversion"] = {"psnr": float(np.mean(psnrs)), "psnr_min": float(np.min(psnrs)),
                                "psnr_max": float(np.max(psnrs)), "ssim": float(np.mean([r["ssim"] for r in rows])),
                                "miou": metrics.mean_iou(ious), "per_region": per_region(ious),
                                "steps": own.inversion_steps, "dataset": os.path.abspath(inversion_data.path),
                                "images": rows}
        shown = pictures[:8]
        grid = [[imaging.to_uint8(t) for t, _, _, _ in shown], [imaging.to_uint8(r) for _, r, _, _ in shown],
                [measures.region_image(lab) for _, _, lab, _ in shown],
                [imaging.seg_row_image(s[None]) for _, _, _, s in shown]]
        imaging.save_image(os.path.join(out_dir, "inversions.png"), imaging.image_grid(grid))
        seconds["inversion"] = time.time() - start

    if "diversity" in chosen:
        start = time.time()
        training, frontal = measures.diversity_labels(generator, opt, mean, psi, own.n_diversity, own.render_batch)
        indices = np.random.default_rng(seed).permutation(len(diversity_data))[:own.n_diversity]
        _, data_labels = face_parser.load_images(diversity_data, indices.tolist())
        summaries = {"model": measures.diversity_summary(training), "model_frontal": measures.diversity_summary(frontal),
                     "data": measures.diversity_summary(data_labels)}
        spread = {name: {"model": summaries["model"]["area_std"][k], "data": summaries["data"]["area_std"][k]}
                  for k, name in enumerate(REGION_NAMES)}
        for entry in spread.values():
            entry["ratio"] = entry["model"] / entry["data"] if entry["data"] > 0 else None
        results["diversity"] = {
            "identities": own.n_diversity, "spread": spread,
            "spread_ratio_min": min(spread[name]["ratio"] for name in DIVERSITY_REGIONS
                                    if spread[name]["ratio"] is not None) if any(
                spread[name]["ratio"] is not None for name in DIVERSITY_REGIONS) else None,
            "pairwise_difference": {key: value["pairwise_difference"] for key, value in summaries.items()},
            "area_mean": {key: per_region(value["area_mean"]) for key, value in summaries.items()}}
        shown = slice(0, 8)
        imaging.save_image(os.path.join(out_dir, "diversity.png"), imaging.image_grid(
            [[measures.region_image(lab) for lab in labels[shown]] for labels in (frontal, training, data_labels)]))
        seconds["diversity"] = time.time() - start

    report = clean({"checkpoint": opt.training.trained_ckpt,
                    "settings": {"metrics": chosen, "n": own.n, "psi": psi, "seed": seed,
                                 "inference_samples": own.inference_samples, "size": size,
                                 "dataset": opt.dataset.dataset_path,
                                 "parser": parser.label if parser is not None else None,
                                 "inception": own.inception or None},
                    "results": results, "seconds": {k: round(v, 1) for k, v in seconds.items()}})
    write_text(os.path.join(out_dir, "metrics.json"), json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    write_text(os.path.join(out_dir, "metrics.md"), text)
    print(text)
    print(f"written: {os.path.join(out_dir, 'metrics.json')}, metrics.md and pictures")


if __name__ == "__main__":
    main()
