"""Render identities of a trained CNeRF generator: views, segmentations, shapes and meshes (SPEC §15).

Published command:
  python inference_Full.py --trained_ckpt checkpoints/final_model.pt --results_dir results \
      --identities 3 --size 512 --truncation_ratio 0.7 --no_surface_renderings [--semantics 2,3]

Per identity i, in --results_dir:
  <i>_img.png         the views side by side (default: the published 10-view azimuth sweep)
  <i>_seg.png         their coloured semantic maps
and unless --no_surface_renderings (from a 128×128, 128-sample renderer-only copy, middle view):
  <i>_shape.png       shaded rendering of the depth-map mesh from the view's camera
  <i>_depth_mesh.obj  the depth-map mesh (Delaunay over the pixel grid of the surface points)
  <i>_mesh.obj        the marching-cubes mesh of the SDF on the frustum grid (.ply with --mesh_format ply)
"""
import os
import sys

import torch
from tqdm import tqdm

from common import devices, imaging
from common.cli import command
from options import check_ranges
from rendering import loading as gen
from rendering.camera import shape_view_index, view_locations
from rendering.inference import render_surface, render_views
from rendering.latents import load_latents
from rendering.meshes import MeshError, depth_mesh, save_mesh, sdf_mesh, shade_surface


def add_arguments(group):
    group.add_argument("--mesh_format", type=str, default="obj", choices=["obj", "ply"],
                       help="(new) file format of the marching-cubes mesh")
    group.add_argument("--inference_samples", type=int, default=gen.INFERENCE_SAMPLES,
                       help="(new) samples per ray of the image renderer (published: 64)")
    group.add_argument("--surface_resolution", type=int, default=gen.SURFACE_RESOLUTION,
                       help="(new) resolution of the renderer-only surface pass (published: 128)")
    group.add_argument("--surface_samples", type=int, default=gen.SURFACE_SAMPLES,
                       help="(new) samples per ray of the surface pass (published: 128)")
    group.add_argument("--shape_size", type=int, default=0,
                       help="(new) size of <i>_shape.png (default: --size)")


def check_arguments(opt, own):
    check_ranges({"--identities": (opt.inference.identities, ">= 1"),
                  "--num_views_per_id": (opt.inference.num_views_per_id, ">= 1"),
                  **{f"--{name}": (own[name], ">= 2") for name in ("inference_samples", "surface_resolution",
                                                                   "surface_samples")},
                  "--shape_size": (own.shape_size, ">= 0"),
                  "--truncation_ratio": (opt.inference.truncation_ratio, "(0, 1]")})


def prepare(argv):
    """Everything that can fail on bad input, before anything is written."""
    opt, own = gen.parse_options(argv, add_arguments, "inference_Full", output=lambda opt, own: (opt.inference.results_dir, "--results_dir"))
    check_arguments(opt, own)
    semantics = gen.parse_semantics(opt.inference.semantics)
    device = devices.select_device(opt.experiment.device)
    surfaces = not opt.inference.no_surface_renderings
    generator, surface_generator = gen.load_models(
        opt, device, surface=surfaces, n_samples=own.inference_samples,
        surface_resolution=own.surface_resolution, surface_samples=own.surface_samples)
    latents = None
    if opt.inference.latents:
        latents = load_latents(opt.inference.latents, generator.style_dim, generator.n_render)
    return opt, own, semantics, device, generator, surface_generator, latents


def write_surfaces(i, opt, own, generator, surface_generator, codes, location, mean, out_dir):
    """<i>_shape.png, <i>_depth_mesh.obj and <i>_mesh.<fmt> for one view of one identity."""
    surface = render_surface(generator, surface_generator, codes, location, opt, mean, return_sdf=True)
    mesh = depth_mesh(surface.xyz, surface.mask)
    size = own.shape_size or opt.model.size
    imaging.save_image(os.path.join(out_dir, f"{i}_shape.png"), shade_surface(surface, size, mesh))
    save_mesh(mesh, os.path.join(out_dir, f"{i}_depth_mesh.obj"))
    try:
        mc_mesh = sdf_mesh(surface.sdf, surface.points)
    except MeshError as error:
        tqdm.write(f"warning: identity {i}: {error}; {i}_mesh.{own.mesh_format} not written", file=sys.stderr)
        return
    save_mesh(mc_mesh, os.path.join(out_dir, f"{i}_mesh.{own.mesh_format}"))


@torch.no_grad()
def run(opt, own, semantics, device, generator, surface_generator, latents):
    session, n_identities, identity = gen.inference_run(opt, generator, latents, device)
    psi, mean, out_dir = session.psi, session.mean, session.out_dir
    print(f"seed {session.seed}; {n_identities} identities → {out_dir}"
          + (f"; semantics {semantics}" if semantics else ""))

    bar = tqdm(range(n_identities), desc="identities", unit="id")
    for i in bar:
        codes, styles_global = identity(i)
        locations = view_locations(opt, session.rng, device)
        bar.set_postfix_str(f"{i}: {locations.shape[0]} views")
        rgb, seg = render_views(generator, codes, styles_global, locations, opt, mean, semantics=semantics,
                                psi=psi)
        imaging.save_row(os.path.join(out_dir, f"{i}_img.png"), rgb)
        imaging.save_seg_row(os.path.join(out_dir, f"{i}_seg.png"), seg)
        if surface_generator is not None:
            bar.set_postfix_str(f"{i}: shape")
            view = shape_view_index(opt, locations.shape[0])
            write_surfaces(i, opt, own, generator, surface_generator, codes, locations[view:view + 1], mean, out_dir)
    print(f"results in {os.path.abspath(out_dir)}")


@command
def main(argv=None):
    prepared = prepare(argv)
    run(*prepared)


if __name__ == "__main__":
    main()
