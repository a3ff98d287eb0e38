"""Shared helpers for the scripts that render a trained generator (inference, videos, editing, inversion).

The published inference procedure (SPEC §15), in one place so that every script renders an identity
the same way:
  * w = style(z), truncated once by hand towards the renderer mean with ψ, repeated into the 18
    per-region codes; the decoder's global style is the same w;
  * the generator is called with input_is_latent, truncation=ψ (so the renderer codes are truncated a
    second time, as the published script does), randomize_noise=False, styles_global=[w];
  * evaluation rendering: 64 samples per ray, static view directions, no jitter.
A renderer-only copy of the generator at 128×128 with 128 samples (focal ×2, same weights) provides
the surface points and the SDF volume for shapes and meshes.
"""
import os
import sys

import torch
from munch import Munch

import devices
import perf_utils
from camera import fixed_locations, generate_camera_params, sweep_locations
from checkpoint import CheckpointError, apply_saved_config, load_generator, load_state_strict, saved_config
from draws import seed_everything
from model import Generator
from options import BaseOptions, group_options
from regions import parse_regions

# Evaluation rendering of the published inference script.
INFERENCE_SAMPLES = 64
SURFACE_RESOLUTION = 128
SURFACE_SAMPLES = 128


UsageError = devices.UsageError  # the project's one user-error type (bad command-line input, one line)


# ------------------------------------------------------------------------------------------ options


def parse_options(argv=None, add_arguments=None, title="script"):
    """The shared option tree plus a script's own flags (group `title`): returns (opt, own Munch)."""
    perf_utils.configure_allocator()  # every inference script starts here (issue 6)
    base = BaseOptions()
    base.initialize()
    group = base.parser.add_argument_group(title)
    if add_arguments is not None:
        add_arguments(group)
    parsed = base.parser.parse_args(argv)
    opt = group_options(base.parser, parsed)
    values = vars(parsed)
    own = Munch({a.dest: values[a.dest] for a in group._group_actions})
    if opt.training.trained_ckpt:  # a checkpoint that knows its architecture needs no model flags
        config = saved_config(opt.training.trained_ckpt)
        if config is not None:
            apply_saved_config(opt, config, base.parser.get_default, opt.training.trained_ckpt)
    opt.model.n_render = opt.rendering.n_render
    return opt, own


def eval_rendering_options(rendering, n_samples=INFERENCE_SAMPLES):
    """A copy of the rendering options as the published inference uses them (no jitter, static dirs)."""
    rendering = Munch(rendering)
    rendering.N_samples = int(n_samples)
    rendering.static_viewdirs = True
    rendering.perturb = 0.0
    rendering.raw_noise_std = 0.0
    return rendering


def parse_semantics(spec):
    """--semantics ('2,3', 'eye,mouth' or '') → sorted region indices or None (all regions)."""
    try:
        regions = parse_regions(spec)
    except ValueError as error:
        raise UsageError(f"--semantics: {error}") from None
    return regions or None


# ------------------------------------------------------------------------------------------- models


def model_options(opt):
    model = Munch(opt.model)
    model.n_render = opt.rendering.n_render
    return model


def build_generator(opt, device="cpu", n_samples=INFERENCE_SAMPLES):
    """The evaluation generator (ema, full pipeline) on `device`, weights not loaded."""
    generator = Generator(model_options(opt), eval_rendering_options(opt.rendering, n_samples), ema=True,
                          full_pipeline=True)
    return generator.to(device).eval()


def build_surface_generator(opt, device="cpu", resolution=SURFACE_RESOLUTION, n_samples=SURFACE_SAMPLES):
    """A renderer-only generator at `resolution` with `n_samples` per ray (weights not loaded).

    Cameras for it are the main renderer's with the focal scaled by resolution / R (see surface_cameras).
    """
    model = model_options(opt)
    model.renderer_spatial_output_dim = int(resolution)
    rendering = eval_rendering_options(opt.rendering, n_samples)
    # The last sample takes whatever weight the ray has left: a ray that hits nothing then ends at the
    # far plane with mask (last weight) ≈ 1 instead of summing to ~0 and putting its point at the origin,
    # so depth meshes can tell surface from background. Rays that hit a surface are unchanged.
    rendering.force_background = True
    generator = Generator(model, rendering, ema=True, full_pipeline=False)
    return generator.to(device).eval()


def load_models(opt, device, surface=False, n_samples=INFERENCE_SAMPLES, surface_resolution=SURFACE_RESOLUTION,
                surface_samples=SURFACE_SAMPLES):
    """(generator, surface generator or None) with --trained_ckpt loaded strictly.

    Raises CheckpointError (one line) for a missing file or a checkpoint of another configuration.
    Loading happens on the CPU first so that a bad file never touches the accelerator.
    """
    path = opt.training.trained_ckpt
    if not path:
        raise CheckpointError("no checkpoint given: pass --trained_ckpt FILE")
    generator = build_generator(opt, "cpu", n_samples)
    load_generator(generator, path)  # strict: a full generator must use every weight
    surface_generator = None
    if surface:
        surface_generator = build_surface_generator(opt, "cpu", surface_resolution, surface_samples)
        # Same weights: the renderer-only model takes the mapping and renderer subset.
        load_state_strict(surface_generator, generator.state_dict(), path, what="surface renderer")
        surface_generator = surface_generator.to(device).eval()
    return generator.to(device).eval(), surface_generator


def load_for_editing(opt, n_samples):
    """(device, evaluation generator rendering `n_samples` per ray) for the editing and inversion tools."""
    if n_samples < 2:
        raise UsageError(f"--inference_samples must be at least 2, got {n_samples}")
    device = devices.select_device(opt.experiment.device)
    generator, _ = load_models(opt, device, n_samples=n_samples)
    return device, generator


@torch.no_grad()
def mean_latent(generator, n, seed=0):
    """[renderer mean w (1×D), decoder mean (1×2D) or None], as Generator.mean_latent computes them, from
    `n` latents drawn on the CPU with a fixed seed (same means on every device and rerun; global RNG
    untouched)."""
    param = next(generator.parameters())
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(int(n), generator.style_dim, generator=gen).to(device=param.device, dtype=param.dtype)
    w = generator.style(z)
    decoder_mean = generator.decoder.mean_latent(w) if generator.full_pipeline else None
    return [w.mean(0, keepdim=True), decoder_mean]


# ------------------------------------------------------------------------------------------ latents


def truncate(w, mean_w, psi):
    """mean_w + ψ (w - mean_w) (SPEC §6)."""
    if psi >= 1:
        return w
    return mean_w + psi * (w - mean_w)


@torch.no_grad()
def identity_latents(generator, z, mean, psi):
    """z [N,D] → (codes [N,18,D], styles_global [N,D]): the published by-hand truncation of w = style(z)."""
    w = truncate(generator.map_styles(z), mean[0], psi)
    return w.unsqueeze(1).repeat(1, generator.n_latent, 1), w


def latents_from_file(data, mean, psi):
    """Codes and global styles of a loaded latent file, ready for render_views.

    Codes marked truncated are used as given (they already hold the by-hand truncation); otherwise the
    published by-hand truncation is applied to codes and global styles alike.
    """
    codes, styles_global = data["codes"], data["styles_global"]
    if not data.get("truncated", True):
        codes, styles_global = truncate(codes, mean[0], psi), truncate(styles_global, mean[0], psi)
    return codes, styles_global


def inference_run(opt, generator, latents, device):
    """The shared start of an inference run: seed, truncation mean, output folder and identities.

    Returns (run, n_identities, identity) where run = Munch(seed, rng, psi, mean, out_dir) and
    identity(i) gives (codes [1,18,D], styles_global [1,D]): entry i of the latent file when one is
    given, else a fresh z drawn from the run's generator (so call it once per identity, in order).
    """
    seed = seed_everything(opt.experiment.seed)
    rng = torch.Generator().manual_seed(seed)
    psi = opt.inference.truncation_ratio
    # The truncation mean is a property of the model, not of the run: a fixed seed, like editing uses.
    mean = mean_latent(generator, opt.inference.truncation_mean)
    out_dir = opt.inference.results_dir
    os.makedirs(out_dir, exist_ok=True)
    run = Munch(seed=seed, rng=rng, psi=psi, mean=mean, out_dir=out_dir)
    if latents is not None:
        on_device = dict(latents, codes=latents["codes"].to(device), styles_global=latents["styles_global"].to(device))
        codes_all, styles_all = latents_from_file(on_device, mean, psi)
        return run, codes_all.shape[0], lambda i: (codes_all[i:i + 1], styles_all[i:i + 1])

    def sampled(_):
        z = torch.randn(1, generator.style_dim, generator=rng).to(device)
        return identity_latents(generator, z, mean, psi)

    return run, opt.inference.identities, sampled


# ------------------------------------------------------------------------------------------ cameras


def view_locations(opt, rng=None, device="cpu"):
    """[V,2] (azimuth, elevation) of the views of one identity.

    --fixed_camera_angles: the 13 fixed views; --num_views_per_id N > 1: N random views (sampled like
    training cameras); otherwise the published 10-view azimuth sweep.
    """
    cam = opt.camera
    if opt.inference.fixed_camera_angles:
        return fixed_locations(cam.azim, cam.elev, device=device)
    n = int(opt.inference.num_views_per_id)
    if n > 1:
        if cam.uniform:
            u = torch.rand(n, 2, generator=rng) * 2 - 1
            locs = u * torch.tensor([cam.azim, cam.elev])
        else:
            locs = torch.randn(n, 2, generator=rng) * torch.tensor([cam.azim, cam.elev])
        return locs.to(device)
    return sweep_locations(10, cam.azim, cam.elev, device=device)


def shape_view_index(opt, n_views):
    """The view the shape is rendered from: the sweep's middle view, else the first (frontal when fixed)."""
    if opt.inference.fixed_camera_angles or int(opt.inference.num_views_per_id) > 1:
        return 0
    return n_views // 2


def cameras(resolution, locations, camera_opt, device):
    """(extrinsics [V,3,4], focal [V,1,1], near, far) for `locations` [V,2] at `resolution`."""
    cam = generate_camera_params(resolution, device, locations=locations.to(device), fov_ang=camera_opt.fov,
                                 dist_radius=camera_opt.dist_radius)
    return cam[:4]


def surface_cameras(generator, surface_generator, locations, camera_opt, device):
    """Cameras of the surface renderer: the main renderer's with the focal scaled by the resolution ratio."""
    extrinsics, focal, near, far = cameras(generator.renderer.out_im_res, locations, camera_opt, device)
    scale = surface_generator.renderer.out_im_res / generator.renderer.out_im_res
    return extrinsics, focal * scale, near, far


# ---------------------------------------------------------------------------------------- rendering


@torch.no_grad()
def render_views(generator, codes, styles_global, locations, opt, mean_latent, semantics=None, psi=None,
                 batch=4):
    """Render one identity from every location, the published inference way.

    codes [1,18,D] (already truncated once by hand), styles_global [1,D], locations [V,2].
    `psi` defaults to --truncation_ratio; the generator truncates the codes towards the renderer mean a
    second time and the decoder's mapped style towards the decoder mean. Returns
    (rgb [V,3,H,W] in [-1,1], seg [V,K,H,W]) on the generator's device.
    """
    psi = opt.inference.truncation_ratio if psi is None else psi
    device = codes.device
    cam_all = cameras(generator.renderer.out_im_res, locations, opt.camera, device)
    rgbs, segs = [], []
    for start in range(0, locations.shape[0], batch):
        cam = [t[start:start + batch] for t in cam_all]
        count = cam[0].shape[0]
        (rgb, seg), _, _ = generator(
            [codes[:1].expand(count, -1, -1)], *cam, input_is_latent=True, truncation=psi,
            truncation_latent=mean_latent, randomize_noise=False,
            styles_global=[styles_global[:1].expand(count, -1)], semantics=semantics)
        rgbs.append(rgb)
        segs.append(seg)
    return torch.cat(rgbs), torch.cat(segs)


@torch.no_grad()
def render_surface(generator, surface_generator, codes, location, opt, mean_latent, psi=None, return_sdf=False):
    """The renderer-only pass of the surface copy for one view.

    codes [1,18,D] as for render_views (truncated a second time, like the images), location [1,2].
    Returns a Munch with xyz [3,r,r] surface points, mask [1,r,r] (last sample's weight: rays that hit
    nothing), camera (extrinsics [3,4], focal scalar), near, far, and with return_sdf the SDF volume
    sdf [r,r,S] and the world points of its samples points [r,r,S,3].
    """
    psi = opt.inference.truncation_ratio if psi is None else psi
    device = codes.device
    extrinsics, focal, near, far = surface_cameras(generator, surface_generator, location[:1], opt.camera, device)
    out = surface_generator([codes[:1]], extrinsics, focal, near, far, input_is_latent=True, truncation=psi,
                            truncation_latent=mean_latent, return_xyz=True, return_sdf=return_sdf)
    xyz = out[2]
    result = Munch(xyz=xyz[0], mask=out[-2][0], extrinsics=extrinsics[0], focal=float(focal.reshape(-1)[0]),
                   near=float(near.reshape(-1)[0]), far=float(far.reshape(-1)[0]))
    if return_sdf:
        result.sdf = out[3][0, ..., 0]
        result.points = sample_points(surface_generator.renderer, extrinsics, focal, near, far)[0]
    return result


def sample_points(renderer, extrinsics, focal, near, far):
    """World positions [B,r,r,S,3] of the renderer's evaluation samples (the frustum-aligned SDF grid)."""
    from camera import camera_rays, depths_along_rays

    rays_o, rays_d, _ = camera_rays(renderer.grid_x, renderer.grid_y, focal, extrinsics)
    z = depths_along_rays(renderer.t_vals.to(rays_o.dtype), near.reshape(-1, 1, 1, 1),
                          far.reshape(-1, 1, 1, 1))  # [B,1,1,S]: no jitter at inference
    return rays_o.unsqueeze(-2) + rays_d.unsqueeze(-2) * z.unsqueeze(-1)


def fail(message):
    """Exit with one clear line on stderr and a non-zero status."""
    sys.exit(f"error: {message}")
