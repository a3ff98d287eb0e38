"""Videos of identities of a trained CNeRF generator: RGB | coloured segmentation | shaded depth mesh.

  python render_video.py --trained_ckpt checkpoints/final_model.pt --results_dir videos --identities 2 \
      --size 512 [--azim_video] [--semantics eye,mouth] [--latents codes.pt]

Per identity i an mp4 `<i>_video.mp4` in --results_dir, along an ellipse of camera positions (default)
or an azimuth swing (--azim_video). The decoder's noise is the stored fixed noise, so texture does not
flicker between frames. --no_surface_renderings leaves out the shaded-depth panel (faster).
"""
import math
import os

import numpy as np
import torch
from tqdm import tqdm

from common import devices, imaging
from common.cli import UsageError, command
from common.regions import color_segmap
from options import check_ranges
from rendering import loading as gen
from rendering.inference import render_surface, render_views
from rendering.latents import load_latents
from rendering.meshes import shade_surface


def add_arguments(group):
    group.add_argument("--frames", type=int, default=250, help="(new) frames per video")
    group.add_argument("--fps", type=int, default=25, help="(new) frames per second")
    group.add_argument("--inference_samples", type=int, default=gen.INFERENCE_SAMPLES,
                       help="(new) samples per ray of the image renderer (published: 64)")
    group.add_argument("--surface_resolution", type=int, default=gen.SURFACE_RESOLUTION,
                       help="(new) resolution of the renderer-only surface pass (published: 128)")
    group.add_argument("--surface_samples", type=int, default=gen.SURFACE_SAMPLES,
                       help="(new) samples per ray of the surface pass (published: 128)")
    group.add_argument("--frame_batch", type=int, default=4, help="(new) frames rendered together")


def camera_path(n_frames, camera_opt, azim_only=False):
    """[n,2] (azimuth, elevation) along a closed loop: an ellipse, or an azimuth swing at elevation 0.

    The azimuth reaches 1.5 × the range for normally-sampled training cameras (whose range is one
    standard deviation) and the range itself for uniform ones, like the published sweep.
    """
    t = torch.arange(n_frames, dtype=torch.float32) / n_frames * 2 * math.pi
    scale = 1.0 if camera_opt.uniform else 1.5
    azim = scale * camera_opt.azim * torch.cos(t)
    elev = torch.zeros_like(t) if azim_only else camera_opt.elev * torch.sin(t)
    return torch.stack([azim, elev], 1)


def check_arguments(opt, own):
    if opt.model.project_noise:
        # The published --project_noise needs a mesh file that its script never writes (SPEC §17).
        raise UsageError("--project_noise is not supported: the decoder uses its fixed stored noise "
                         "instead (texture still stays put across frames); run without --project_noise")
    check_ranges({"--identities": (opt.inference.identities, ">= 1"),
                  **{f"--{name}": (own[name], ">= 1") for name in ("frames", "fps", "frame_batch")},
                  **{f"--{name}": (own[name], ">= 2") for name in ("inference_samples", "surface_resolution",
                                                                   "surface_samples")},
                  "--truncation_ratio": (opt.inference.truncation_ratio, "(0, 1]")})


def prepare(argv):
    """Everything that can fail on bad input, before anything is written."""
    opt, own = gen.parse_options(argv, add_arguments, "render_video", output=lambda opt, own: (opt.inference.results_dir, "--results_dir"))
    check_arguments(opt, own)
    semantics = gen.parse_semantics(opt.inference.semantics)
    device = devices.select_device(opt.experiment.device)
    generator, surface_generator = gen.load_models(
        opt, device, surface=not opt.inference.no_surface_renderings, n_samples=own.inference_samples,
        surface_resolution=own.surface_resolution, surface_samples=own.surface_samples)
    latents = None
    if opt.inference.latents:
        latents = load_latents(opt.inference.latents, generator.style_dim, generator.n_render)
    return opt, own, semantics, device, generator, surface_generator, latents


def shaded_depth(generator, surface_generator, codes, location, opt, mean, size):
    surface = render_surface(generator, surface_generator, codes, location, opt, mean)
    return shade_surface(surface, size)


def identity_frames(i, opt, own, semantics, generator, surface_generator, codes, styles_global, path, mean):
    """Frames of one identity, rendered frame_batch at a time (memory stays bounded at any length)."""
    size = opt.model.size
    for start in tqdm(range(0, len(path), own.frame_batch), desc=f"identity {i}", unit="batch", leave=False):
        locations = path[start:start + own.frame_batch]
        rgb, seg = render_views(generator, codes, styles_global, locations, opt, mean, semantics=semantics,
                                batch=own.frame_batch)
        rgb_u8, seg_u8 = imaging.to_uint8(rgb), color_segmap(seg)
        for j in range(locations.shape[0]):
            panels = [rgb_u8[j], seg_u8[j]]
            if surface_generator is not None:
                panels.append(shaded_depth(generator, surface_generator, codes, locations[j:j + 1], opt, mean, size))
            yield np.concatenate(panels, axis=1)


@torch.no_grad()
def run(opt, own, semantics, device, generator, surface_generator, latents):
    session, n_identities, identity = gen.inference_run(opt, generator, latents, device)
    mean, out_dir = session.mean, session.out_dir
    path = camera_path(own.frames, opt.camera, azim_only=opt.inference.azim_video).to(device)
    print(f"seed {session.seed}; {n_identities} videos of {own.frames} frames → {out_dir}"
          + (f"; semantics {semantics}" if semantics else ""))
    for i in tqdm(range(n_identities), desc="videos", unit="video"):
        codes, styles_global = identity(i)
        frames = identity_frames(i, opt, own, semantics, generator, surface_generator, codes, styles_global,
                                 path, mean)
        imaging.save_video(os.path.join(out_dir, f"{i}_video.mp4"), frames, own.fps)
    print(f"results in {os.path.abspath(out_dir)}")


@command
def main(argv=None):
    prepared = prepare(argv)
    run(*prepared)


if __name__ == "__main__":
    main()
