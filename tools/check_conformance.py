#!/usr/bin/env python
"""Check this implementation against the published model's conformance vectors or checkpoint layout.

  python tools/check_conformance.py ../shared/reference/conformance_vectors.pt
  python tools/check_conformance.py --layout ../shared/reference/state_dict_layout.json

The vectors check rebuilds every module at the file's configuration with the reference weight
recipe, runs every case in float64 (bound 1e-6 · max(1, max|b|)) and float32 (2e-2 · ...), prints
one line per output and exits 0 only if all pass. --device runs the modules there (e.g. cuda: the CUDA
ops and kernels); cameras are made on the CPU as recorded, and the outputs are compared on the CPU.
The layout check builds the five modules at the file's configuration and compares every key and shape.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common.cli import UsageError  # noqa: E402
from common.devices import select_device  # noqa: E402
from losses import eikonal_loss  # noqa: E402
from model import ComponentDualBranchDiscriminator, Discriminator, Generator, VolumeRenderDiscriminator  # noqa: E402
from options import default_options, sync_region_count  # noqa: E402
from rendering.camera import generate_camera_params  # noqa: E402
from tools.reference_weights import fill_recipe  # noqa: E402

TOLERANCE = {torch.float64: 1e-6, torch.float32: 2e-2}


def options_for(config, **rendering):
    """Option tree for a vectors/layout configuration."""
    opt = default_options()
    for key in ("size", "channel_multiplier", "style_dim", "renderer_spatial_output_dim", "n_wcode"):
        if key in config:
            opt.model[key] = config[key]
    for key in ("n_render", "depth", "width", "N_samples"):
        if key in config:
            opt.rendering[key] = config[key]
    opt.rendering.update(rendering)
    sync_region_count(opt)
    return opt


def build_modules(config, eval_rendering=None, train_rendering=None):
    """The five published modules at a configuration, named as in the reference files."""
    eval_opt = options_for(config, **(eval_rendering or {}))
    train_opt = options_for(config, **(train_rendering or {}))
    return {
        "generator": Generator(eval_opt.model, eval_opt.rendering, ema=True, full_pipeline=True),
        "volume_generator": Generator(train_opt.model, train_opt.rendering, full_pipeline=False),
        "global_discriminator": VolumeRenderDiscriminator(train_opt.model),
        "semantic_discriminator": ComponentDualBranchDiscriminator(train_opt.model),
        "discriminator": Discriminator(train_opt.model),
    }


def run_cases(vectors, dtype, device="cpu"):
    config = vectors["config"]
    inputs = vectors["inputs"]
    modules = build_modules(config, eval_rendering={"static_viewdirs": True, "perturb": 0.0},
                            train_rendering={"perturb": 0.0})
    for name, module in modules.items():
        fill_recipe(module, vectors["weight_stats"][name], vectors["weight_seed"], name)
        module.to(device=device, dtype=dtype)
    cast = lambda t: t.to(device=device, dtype=dtype)
    results = {}

    locations = inputs["locations"].float()
    camera = generate_camera_params(config.get("renderer_spatial_output_dim", 64), "cpu", locations=locations,
                                    fov_ang=inputs["fov"].float(), dist_radius=config.get("dist_radius", 0.12))
    results["camera"] = dict(zip(["extrinsics", "focal", "near", "far", "viewpoint"], camera))
    cam = [cast(t) for t in camera[:4]]
    mean_latent = [cast(t) for t in inputs["mean_latent"]]
    psi = config.get("truncation", 0.7)

    generator = modules["generator"].eval()
    with torch.no_grad():
        (rgb, seg_high), thumb, seg = generator([cast(inputs["z"])], *cam, truncation=psi,
                                                truncation_latent=mean_latent, randomize_noise=False)
        results["inference"] = {"rgb": rgb, "seg_high": seg_high, "thumb_rgb": thumb, "seg": seg}
        (rgb, seg_high), thumb, seg = generator([cast(inputs["w_regions"])], *cam, input_is_latent=True,
                                                truncation=psi, truncation_latent=mean_latent,
                                                randomize_noise=False, styles_global=[cast(inputs["w_global"])],
                                                semantics=config.get("semantics"))
        results["inference_regions_semantics"] = {"rgb": rgb, "seg_high": seg_high, "thumb_rgb": thumb, "seg": seg}

        volume = modules["volume_generator"].train()
        n = config.get("volume_train_batch", 1)
        _, thumb, sdf, eikonal, seg = volume([cast(inputs["z"][:n])], *[t[:n] for t in cam], return_sdf=True,
                                             return_eikonal=True)
        eik, min_surf = eikonal_loss(eikonal, sdf, beta=100)
        results["volume_train"] = {"thumb_rgb": thumb, "sdf": sdf, "eikonal_term": eikonal, "seg": seg,
                                   "eikonal_loss": eik, "minimal_surface_loss": min_surf}

        global_d = modules["global_discriminator"].eval()
        semantic_d = modules["semantic_discriminator"].eval()
        full_d = modules["discriminator"].eval()
        gan, viewpoint = global_d(cast(inputs["img_lo"]), cast(inputs["seg_lo"]))
        sem, sem_class = semantic_d(cast(inputs["img_lo"]), cast(inputs["part_lo"]))
        full = full_d(cast(inputs["img_hi"]), cast(inputs["seg_hi"]))
        results["discriminators"] = {"global": gan, "global_viewpoint": viewpoint, "semantic": sem,
                                     "semantic_class": sem_class, "full": full}
    return results


def compare(expected, actual, dtype):
    rows = []
    for case, outputs in expected.items():
        for name, reference in outputs.items():
            value = actual.get(case, {}).get(name)
            reference = reference.double()
            bound = TOLERANCE[dtype] * max(1.0, reference.abs().max().item())
            if value is None or tuple(value.shape) != tuple(reference.shape):
                shape = None if value is None else tuple(value.shape)
                rows.append((case, name, float("inf"), bound, False, f"shape {shape} != {tuple(reference.shape)}"))
                continue
            error = (value.detach().cpu().double() - reference).abs().max().item()
            rows.append((case, name, error, bound, error <= bound, ""))
    return rows


def check_vectors(path, dtypes, device="cpu"):
    vectors = torch.load(path, weights_only=True)
    ok = True
    where = "" if torch.device(device).type == "cpu" else f"{device} "
    for dtype in dtypes:
        torch.manual_seed(0)
        rows = compare(vectors["outputs"], run_cases(vectors, dtype, device), dtype)
        for case, name, error, bound, passed, note in rows:
            print(f"{where}{str(dtype).replace('torch.', ''):8s} {case:28s} {name:22s} worst={error:.3e} "
                  f"bound={bound:.3e} {'pass' if passed else 'FAIL'} {note}".rstrip())
            ok &= passed
    return ok


def check_layout(path):
    layout = json.load(open(path))
    config = layout["config"]
    modules = build_modules(config)
    names = {"generator_full": "generator", "generator_volume": "volume_generator",
             "global_discriminator": "global_discriminator", "semantic_discriminator": "semantic_discriminator",
             "discriminator_full": "discriminator"}
    ok = True
    for section, name in names.items():
        expected = {k: list(v) for k, v in layout[section].items()}
        actual = {k: list(v.shape) for k, v in modules[name].state_dict().items()}
        differences = [f"missing {k} {v}" for k, v in expected.items() if k not in actual]
        differences += [f"unexpected {k} {v}" for k, v in actual.items() if k not in expected]
        differences += [f"shape {k}: {actual[k]} != {v}" for k, v in expected.items() if k in actual and actual[k] != v]
        print(f"{section:24s} {len(expected)} keys: {'pass' if not differences else 'FAIL'}")
        for line in differences:
            print(f"    {line}")
        ok &= not differences
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vectors", nargs="?", help="conformance_vectors.pt")
    parser.add_argument("--layout", help="state_dict_layout.json to compare key and shapes with")
    parser.add_argument("--dtype", choices=["float64", "float32", "both"], default="both")
    parser.add_argument("--device", default="cpu", help="where the modules run (default cpu), e.g. cuda")
    args = parser.parse_args(argv)
    if not args.vectors and not args.layout:
        parser.error("give a vectors file and/or --layout FILE")
    try:
        device = select_device(args.device)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in filter(None, [args.vectors, args.layout]):
        if not os.path.isfile(path):
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
    ok = True
    if args.layout:
        ok &= check_layout(args.layout)
    if args.vectors:
        dtypes = {"float64": [torch.float64], "float32": [torch.float32],
                  "both": [torch.float64, torch.float32]}[args.dtype]
        ok &= check_vectors(args.vectors, dtypes, device)
    print("all outputs pass" if ok else "conformance FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
