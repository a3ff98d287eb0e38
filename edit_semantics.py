#!/usr/bin/env python
"""Semantic editing: move chosen regions' shape and/or texture codes from a reference to a source.

  python edit_semantics.py --trained_ckpt CKPT --source 3 --reference 7 --regions hair,mouth \
      --attribute texture [--interpolate 6 [--video]] [--resample 4] [--out_dir DIR]

--source / --reference are seeds (integers) or latent files (from invert.py or an earlier edit;
entry FILE@i picks entry i, default 0). For a seed: z ~ N(0, I) drawn from that seed, w = style(z),
truncated with ψ (--truncation_ratio) towards the renderer mean, repeated as the 18 region codes;
the global style (the decoder's input) is the same w.

The edited result keeps the source's global style for every attribute: only the region codes are
edited, so everything outside the chosen slots stays the source's. (The decoder's global style is
shared by all regions; taking the reference's would change the whole image, not the chosen regions.)

Writes into --out_dir (default <results_dir>/edit):
  edit_grid.png           rows: source, its seg, reference, its seg, edited, its seg, |Δ| edited vs source
                          (mean absolute RGB change, black 0, white ≥ 0.5 of the [-1,1] range); columns: views
  edit_latents.pt         the edited codes + global style (inference_Full.py --latents FILE)
  interpolation.png/.pt   with --interpolate N: N steps from source to the full swap (+ .mp4 with --video)
  resample.png/.pt        with --resample K: K fresh codes for the chosen regions
"""
import os

import torch

from common import imaging
from common.cli import UsageError, command
from common.regions import REGION_NAMES, color_segmap, parse_regions
from editing import manipulation
from rendering import loading as gen
from rendering.camera import shape_view_index
from rendering.latents import LatentFileError, latents_from_file, load_latents, mean_latent, save_latents


def add_arguments(group):
    group.add_argument("--source", type=str, default="0", help="source identity: a seed or a latent file")
    group.add_argument("--reference", type=str, default="1", help="reference identity: a seed or a latent file")
    group.add_argument("--regions", type=str, default="", help="regions to edit, e.g. hair,mouth or 7,3")
    group.add_argument("--attribute", type=str, default="both", help="shape | texture | both")
    group.add_argument("--interpolate", type=int, default=0, help="render N steps from source to reference")
    group.add_argument("--video", action="store_true", help="also write the interpolation as an mp4")
    group.add_argument("--resample", type=int, default=0, help="draw K fresh codes for the chosen regions")
    group.add_argument("--resample_seed", type=int, default=0, help="seed of the fresh codes")
    group.add_argument("--n_views", type=int, default=0,
                       help="views per row: N of the azimuth sweep (0: the inference script's views)")
    group.add_argument("--out_dir", type=str, default="", help="output folder (default <results_dir>/edit)")
    group.add_argument("--inference_samples", type=int, default=gen.INFERENCE_SAMPLES,
                       help="samples per ray of the renderer (published inference: 64), as inference_Full.py")


def identity(spec, generator, mean, psi):
    """(codes [1,2K,D], styles_global [1,D]) for a seed or a latent file (FILE or FILE@i)."""
    text = str(spec).strip()
    if text.lstrip("-").isdigit():
        return manipulation.latents_from_seeds(generator, [int(text)], mean, psi)
    path, index = text, 0
    if "@" in text and text.rsplit("@", 1)[1].isdigit():
        path, index = text.rsplit("@", 1)[0], int(text.rsplit("@", 1)[1])
    data = load_latents(path, style_dim=generator.style_dim, n_regions=generator.n_render)
    if index >= data["codes"].shape[0]:
        raise LatentFileError(f"{path}: has {data['codes'].shape[0]} entries, asked for entry {index}")
    like = dict(device=mean[0].device, dtype=mean[0].dtype)
    data = dict(data, codes=data["codes"][index:index + 1].to(**like),
                styles_global=data["styles_global"][index:index + 1].to(**like))
    return latents_from_file(data, mean, psi)


def rows_for(rgb, seg):
    """One identity's views → [rgb row, coloured seg row] of uint8 images."""
    return [list(imaging.to_uint8(rgb)), list(color_segmap(seg))]


def output_dir(opt, own):
    return (own.out_dir or os.path.join(opt.inference.results_dir, "edit")), "--out_dir"


@command
def main(argv=None):
    opt, own = gen.parse_options(argv, add_arguments, "editing", output_dir)
    regions = parse_regions(own.regions)
    if not regions:
        raise UsageError("--regions is empty; name at least one region")
    if own.attribute not in manipulation.ATTRIBUTES:
        raise UsageError(f"--attribute {own.attribute!r} is not one of {', '.join(manipulation.ATTRIBUTES)}")
    if own.interpolate == 1 or own.interpolate < 0:
        raise UsageError(f"--interpolate needs at least 2 steps (or 0 for none), got {own.interpolate}")
    if own.resample < 0 or own.n_views < 0:
        raise UsageError("--resample and --n_views must be >= 0")
    device, generator = gen.load_for_editing(opt, own.inference_samples)
    psi = opt.inference.truncation_ratio
    mean = mean_latent(generator, opt.inference.truncation_mean)  # fixed seed, as inference_Full.py
    source, source_global = identity(own.source, generator, mean, psi)
    reference, reference_global = identity(own.reference, generator, mean, psi)

    edited = manipulation.swap_region_codes(source, reference, regions, own.attribute)
    locations = manipulation.edit_locations(opt, own.n_views, device)
    render = lambda codes, styles: manipulation.render_identities(generator, codes, styles, locations, opt, mean, psi)
    rgb, seg = render(torch.cat([source, reference, edited]),
                      torch.cat([source_global, reference_global, source_global]))
    delta_row = [manipulation.delta_image(rgb[2, v], rgb[0, v]) for v in range(rgb.shape[1])]
    grid = imaging.image_grid(sum((rows_for(rgb[i], seg[i]) for i in range(3)), []) + [delta_row])

    outputs = []  # (kind, path, payload) written together at the end: nothing half-written on errors
    out_dir = output_dir(opt, own)[0]
    note = (f"edit: source {own.source}, reference {own.reference}, regions "
            f"{','.join(REGION_NAMES[k] for k in regions)}, attribute {own.attribute}, psi {psi}")
    outputs.append(("png", os.path.join(out_dir, "edit_grid.png"), grid))
    outputs.append(("latents", os.path.join(out_dir, "edit_latents.pt"), (edited, source_global, note)))

    def series(name, codes, what):
        """Render codes [n,2K,D] with the source's global style: name.png (a row pair each) and name_latents.pt."""
        styles = source_global.expand(codes.shape[0], -1)
        rgb, seg = render(codes, styles)
        rows = sum((rows_for(rgb[i], seg[i]) for i in range(codes.shape[0])), [])
        outputs.append(("png", os.path.join(out_dir, f"{name}.png"), imaging.image_grid(rows)))
        outputs.append(("latents", os.path.join(out_dir, f"{name}_latents.pt"), (codes, styles, f"{note}, {what}")))
        return rgb, seg

    if own.interpolate:
        steps = manipulation.interpolate_codes(source, reference, regions, own.attribute, own.interpolate)[:, 0]
        rgb, seg = series("interpolation", steps, f"{own.interpolate} interpolation steps")
        if own.video:
            middle = shape_view_index(opt, locations.shape[0]) if not own.n_views else own.n_views // 2
            frames = [imaging.image_grid([[imaging.to_uint8(rgb[i, middle]), color_segmap(seg[i, middle])]])
                      for i in range(own.interpolate)]
            frames = frames + frames[::-1]  # there and back, so the loop is seamless
            outputs.append(("mp4", os.path.join(out_dir, "interpolation.mp4"), frames))

    if own.resample:
        fresh = manipulation.resample_codes(generator, source, regions, own.attribute, own.resample, mean, psi,
                                            seed=own.resample_seed)
        series("resample", fresh, f"{own.resample} resampled")

    for kind, path, payload in outputs:
        if kind == "png":
            imaging.save_image(path, payload)
        elif kind == "mp4":
            imaging.save_video(path, payload)
        else:
            codes, styles, text = payload
            save_latents(path, codes, styles, truncated=True, note=text)
        print(path)


if __name__ == "__main__":
    main()
