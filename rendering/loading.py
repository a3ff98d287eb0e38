"""Options, model building and loading for the scripts that render a trained generator (inference, videos,
editing, inversion, metrics), and the shared start of an inference run.

The published inference procedure (SPEC §15), which every script follows through these modules:
  * w = style(z), truncated once by hand towards the renderer mean with ψ, repeated into the 18
    per-region codes; the decoder's global style is the same w (rendering.latents.identity_latents);
  * the generator is called with input_is_latent, truncation=ψ (so the renderer codes are truncated a
    second time, as the published script does), randomize_noise=False, styles_global=[w]
    (rendering.inference.render_codes, from the views of rendering.camera.view_locations);
  * evaluation rendering: 64 samples per ray, static view directions, no jitter (build_generator).
A renderer-only copy of the generator at 128×128 with 128 samples (focal ×2, same weights) provides
the surface points and the SDF volume for shapes and meshes (rendering.inference.render_surface).
"""
import os

import torch
from munch import Munch

from common import devices, perf_utils, precision
from common.checkpoint import CheckpointError, apply_saved_config, load_generator, load_state_strict, saved_config
from common.cli import UsageError, check_output
from common.draws import seed_everything
from common.regions import parse_regions
from model import Generator
from options import BaseOptions, check_ranges, group_options, model_options
from rendering.latents import identity_latents, latents_from_file, mean_latent

# Evaluation rendering of the published inference script.
INFERENCE_SAMPLES = 64
SURFACE_RESOLUTION = 128
SURFACE_SAMPLES = 128




# ------------------------------------------------------------------------------------------ options


def parse_options(argv=None, add_arguments=None, title="script", output=None):
    """The shared option tree plus a script's own flags (group `title`): returns (opt, own Munch).

    `output(opt, own)` gives the script's output folder and its flag, (path, "--flag"): it is checked
    (common.cli.check_output) before anything is read, so an existing file, an unwritable place or a
    folder inside the checkpoint, latents or dataset it reads is one line before any work."""
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
    if output is not None:
        path, flag = output(opt, own)
        check_output(path, flag, "folder", inputs=(opt.training.trained_ckpt, opt.inference.latents,
                                                   opt.dataset.dataset_path))
    if opt.training.trained_ckpt:  # a checkpoint that knows its architecture needs no model flags
        config = saved_config(opt.training.trained_ckpt)
        if config is not None:
            apply_saved_config(opt, config, base.parser.get_default, opt.training.trained_ckpt)
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


def build_generator(opt, device="cpu", n_samples=INFERENCE_SAMPLES, full_pipeline=True):
    """The evaluation generator (ema; the full pipeline, or the renderer alone: a stage-1 model) on
    `device`, weights not loaded."""
    generator = Generator(model_options(opt)[0], eval_rendering_options(opt.rendering, n_samples), ema=True,
                          full_pipeline=full_pipeline)
    return generator.to(device).eval()


def build_surface_generator(opt, device="cpu", resolution=SURFACE_RESOLUTION, n_samples=SURFACE_SAMPLES):
    """A renderer-only generator at `resolution` with `n_samples` per ray (weights not loaded).

    Cameras for it are the main renderer's with the focal scaled by resolution / R (see surface_cameras).
    """
    model = model_options(opt)[0]
    model.renderer_spatial_output_dim = int(resolution)
    rendering = eval_rendering_options(opt.rendering, n_samples)
    # The last sample takes whatever weight the ray has left: a ray that hits nothing then ends at the
    # far plane with mask (last weight) ≈ 1 instead of summing to ~0 and putting its point at the origin,
    # so depth meshes can tell surface from background. Rays that hit a surface are unchanged.
    rendering.force_background = True
    generator = Generator(model, rendering, ema=True, full_pipeline=False)
    return generator.to(device).eval()


def load_models(opt, device, surface=False, n_samples=INFERENCE_SAMPLES, surface_resolution=SURFACE_RESOLUTION,
                surface_samples=SURFACE_SAMPLES, full_pipeline=True):
    """(generator, surface generator or None) with --trained_ckpt loaded strictly (full_pipeline=False:
    the renderer and its mapping only, e.g. from a stage-1 checkpoint).

    Raises CheckpointError (one line) for a missing file or a checkpoint of another configuration.
    Loading happens on the CPU first so that a bad file never touches the accelerator.
    """
    path = opt.training.trained_ckpt
    if not path:
        raise CheckpointError("no checkpoint given: pass --trained_ckpt FILE")
    generator = build_generator(opt, "cpu", n_samples, full_pipeline)
    load_generator(generator, path)  # strict: a full generator must use every weight
    surface_generator = None
    if surface:
        surface_generator = build_surface_generator(opt, "cpu", surface_resolution, surface_samples)
        # Same weights: the renderer-only model takes the mapping and renderer subset.
        load_state_strict(surface_generator, generator.state_dict(), path, what="surface renderer")
        surface_generator = surface_generator.to(device).eval()
    generator = generator.to(device).eval()
    precision.from_options(opt, device, generator, surface_generator)  # --precision; fp32 changes nothing
    return generator, surface_generator


def load_for_editing(opt, n_samples):
    """(device, evaluation generator rendering `n_samples` per ray) for the editing and inversion tools."""
    check_ranges({"--inference_samples": (n_samples, ">= 2")})
    device = devices.select_device(opt.experiment.device)
    generator, _ = load_models(opt, device, n_samples=n_samples)
    return device, generator


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
