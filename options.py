"""The published command-line interface (SPEC §2): one option set for every script.

Parsed with configargparse (`--config FILE` reads the same keys) into a Munch tree grouped as
dataset / experiment / training / inference / model / camera / rendering. Flags and defaults are
the published ones; flags added by this project are marked "(new)".
"""
import argparse
import math
import re

import configargparse
from munch import Munch

from common.cli import UsageError


def finite_float(text):
    """float, refusing nan and inf: a non-finite weight or range would only surface as a NaN loss
    (or nothing at all, for a weight that is compared with 0) hours into a run."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


class BaseOptions:
    def __init__(self):
        self.parser = configargparse.ArgumentParser()
        self.initialized = False

    def initialize(self):
        p = self.parser
        dataset = p.add_argument_group("dataset")
        dataset.add_argument("--dataset_path", type=str, default="./datasets/FFHQ", help="path to the LMDB dataset")

        experiment = p.add_argument_group("experiment")
        experiment.add_argument("--config", is_config_file=True, help="config file path")
        experiment.add_argument("--expname", type=str, default="debug", help="experiment name")
        experiment.add_argument("--ckpt", type=str, default="300000", help="checkpoint iteration to resume from")
        experiment.add_argument("--continue_training", action="store_true", help="resume training from --ckpt")
        experiment.add_argument("--fresh_optimizers", action="store_true",
                                help="(new) with --continue_training: the optimisers start afresh; --ckpt may be a "
                                     "checkpoint without optimiser states (tools/strip_optimizers.py)")
        experiment.add_argument("--seed", type=int, default=None, help="(new) random seed")
        experiment.add_argument("--reseed", action="store_true",
                                help="(new) with --continue_training: the random streams start afresh from --seed "
                                     "(recorded as the run's seed) instead of going on from the checkpoint's; "
                                     "a second run of the same continuation, to measure run-to-run noise")
        experiment.add_argument("--device", type=str, default=None,
                                help="(new) torch device, e.g. cpu or cuda:0 (default: CUDA if available, else CPU)")
        experiment.add_argument("--precision", type=str.lower, default="fp32", choices=["fp32", "bf16", "auto"],
                                help="(new) arithmetic of the convolutions and the renderer's matmuls: fp32 (the "
                                     "published), bf16 (bfloat16 autocast, fp32 master weights, losses and volume "
                                     "integration; see common/precision.py) or auto (bf16 where the device does it "
                                     "natively: AVX-512 BF16 / AMX CPUs, CUDA compute capability 8.0+; else fp32)")
        experiment.add_argument("--deterministic", action="store_true",
                                help="(new) training: reproducible CUDA runs that resume exactly (deterministic "
                                     "cuDNN/cuBLAS algorithms, no TF32, no cuDNN autotuning, data loaded in the "
                                     "main process); slower on a GPU. CPU runs are deterministic without it")

        training = p.add_argument_group("training")
        training.add_argument("--checkpoints_dir", type=str, default="./checkpoints", help="checkpoints directory")
        training.add_argument("--trained_ckpt", type=str, default="", help="trained checkpoint to load")
        training.add_argument("--pretrain_render_path", type=str, default="", help="stage-1 renderer checkpoint")
        training.add_argument("--iter", type=int, default=300000, help="total number of training iterations")
        training.add_argument("--batch", type=int, default=4, help="batch size per GPU")
        training.add_argument("--chunk", type=int, default=4, help="generator chunk size (gradient accumulation)")
        training.add_argument("--val_n_sample", type=int, default=8, help="number of identities in sample grids")
        training.add_argument("--d_reg_every", type=int, default=16, help="lazy R1 interval")
        training.add_argument("--g_reg_every", type=int, default=4, help="path-length regularisation interval")
        training.add_argument("--local_rank", "--local-rank", type=int, default=0, help="local rank (torch.distributed.launch)")
        training.add_argument("--mixing", type=finite_float, default=0.9, help="style mixing probability")
        training.add_argument("--lr", type=finite_float, default=0.002, help="learning rate")
        training.add_argument("--Semantic_D_lambda", type=finite_float, default=1, help="semantic discriminator weight")
        training.add_argument("--r1_img", type=finite_float, default=10, help="R1 weight on images")
        training.add_argument("--r1_seg", type=finite_float, default=1000, help="R1 weight on masks")
        training.add_argument("--view_lambda", type=finite_float, default=15, help="viewpoint loss weight")
        training.add_argument("--eikonal_lambda", type=finite_float, default=0.1, help="eikonal loss weight")
        training.add_argument("--min_surf_lambda", type=finite_float, default=0.001, help="minimal surface loss weight")
        training.add_argument("--min_surf_beta", type=finite_float, default=100.0, help="minimal surface loss beta")
        training.add_argument("--diversity_lambda", type=finite_float, default=0.0,
                              help="(new) stage 1: weight of a mode-seeking term on the rendered masks, which "
                                   "pairs the samples of a generator chunk under one camera (0: published)")
        training.add_argument("--area_lambda", type=finite_float, default=0.0,
                              help="(new) stage 1: weight of a term matching, per region, the distribution of the "
                                   "rendered masks' area fractions over a generator chunk to the dataset label "
                                   "maps', the chunk under one camera (needs --chunk >= 2; 0: published)")
        training.add_argument("--path_regularize", type=finite_float, default=2, help="path-length regularisation weight")
        training.add_argument("--path_batch_shrink", type=int, default=2, help="batch shrink for path-length reg.")
        training.add_argument("--wandb", action="store_true", help="log with Weights & Biases")
        training.add_argument("--no_sphere_init", action="store_true", help="skip the SDF sphere initialisation")
        training.add_argument("--sphere_init_iter", type=int, default=10000, help="(new) sphere initialisation iterations")
        training.add_argument("--sample_every", type=int, default=1000, help="(new) iterations between sample grids")
        training.add_argument("--save_every", type=int, default=10000, help="(new) iterations between checkpoints")
        training.add_argument("--num_workers", type=int, default=None,
                              help="(new) data loader workers (default: 0 on the CPU and with --deterministic, "
                                   "where a resumed run continues exactly; else up to 4 per process)")
        training.add_argument("--sync_every", type=int, default=1,
                              help="(new) iterations between the non-finite loss check and the logged losses, "
                                   "each one wait for the device (and an all-reduce under DDP): larger values let "
                                   "a GPU run ahead; a non-finite loss stops training within this many "
                                   "iterations, before any checkpoint or sample grid is written after it")
        training.add_argument("--vol_g_lr", type=finite_float, default=2e-5,
                              help="(new) stage-1 generator learning rate (published: 2e-5, hard-coded)")
        training.add_argument("--vol_d_lr", type=finite_float, default=2e-4,
                              help="(new) stage-1 learning rate of both discriminators (published: 2e-4, hard-coded)")
        training.add_argument("--ema_decay", type=finite_float, default=None,
                              help="(new) EMA decay per iteration, both stages (default: the published 0.5 ** (32 / 10000))")

        inference = p.add_argument_group("inference")
        inference.add_argument("--results_dir", type=str, default="./evaluations", help="results directory")
        inference.add_argument("--semantics", type=str, default="", help="regions whose features reach the decoder, e.g. 2,3 or eye,mouth")
        inference.add_argument("--truncation_ratio", type=finite_float, default=0.7, help="truncation psi")
        inference.add_argument("--truncation_mean", type=int, default=10000, help="latents averaged for the truncation mean")
        inference.add_argument("--identities", type=int, default=16, help="number of identities")
        inference.add_argument("--num_views_per_id", type=int, default=1, help="views per identity")
        inference.add_argument("--no_surface_renderings", action="store_true", help="skip the shape renderings")
        inference.add_argument("--fixed_camera_angles", action="store_true", help="render a fixed set of views")
        inference.add_argument("--azim_video", action="store_true", help="azimuth camera path instead of an ellipse")
        inference.add_argument("--flag", type=str, default="", help="free-form tag")
        inference.add_argument("--latents", type=str, default="", help="(new) latent file from edit_semantics.py / invert.py")

        model = p.add_argument_group("model")
        model.add_argument("--size", type=int, default=256, help="output image size")
        model.add_argument("--style_dim", type=int, default=256, help="style dimension")
        model.add_argument("--channel_multiplier", type=int, default=2, help="decoder channel multiplier")
        model.add_argument("--n_mlp", type=int, default=8, help="mapping layers (unused by CNeRF's mappings)")
        model.add_argument("--lr_mapping", type=finite_float, default=0.01, help="decoder mapping learning-rate multiplier")
        model.add_argument("--renderer_spatial_output_dim", type=int, default=64, help="volume rendering resolution")
        model.add_argument("--project_noise", action="store_true", help="project decoder noise from the mesh")
        model.add_argument("--n_wcode", type=int, default=9, help="number of per-region code pairs")
        model.add_argument("--d_channel_scale", type=finite_float, default=1.0,
                           help="(new) scale of every discriminator's channel widths (1 = the published widths)")
        model.add_argument("--d_pack", type=int, default=1,
                           help="(new) PacGAN: every discriminator judges packs of this many samples (1 = published)")
        model.add_argument("--mbstd_channels", type=int, default=1,
                           help="(new) the stage-1 global discriminator's minibatch-stddev channels, one per group of "
                                "its features (1 = published)")

        camera = p.add_argument_group("camera")
        camera.add_argument("--uniform", action="store_true", help="uniform instead of normal camera sampling")
        camera.add_argument("--azim", type=finite_float, default=0.3, help="azimuth range (rad)")
        camera.add_argument("--elev", type=finite_float, default=0.15, help="elevation range (rad)")
        camera.add_argument("--fov", type=finite_float, default=6, help="half field of view (degrees)")
        camera.add_argument("--dist_radius", type=finite_float, default=0.12, help="near/far distance from the unit sphere")

        rendering = p.add_argument_group("rendering")
        rendering.add_argument("--n_render", type=int, default=9, help="number of semantic regions")
        rendering.add_argument("--depth", type=int, default=3, help="FiLM layers in the shape trunk")
        rendering.add_argument("--width", type=int, default=128, help="SIREN width")
        rendering.add_argument("--no_sdf", action="store_true", help="NeRF density instead of an SDF")
        rendering.add_argument("--no_z_normalize", action="store_true", help="do not scale points by 2/(far-near)")
        rendering.add_argument("--static_viewdirs", action="store_true", help="camera-space view directions")
        rendering.add_argument("--N_samples", type=int, default=24, help="samples per ray")
        rendering.add_argument("--no_offset_sampling", action="store_true", help="stratified instead of offset sampling")
        rendering.add_argument("--perturb", type=finite_float, default=1.0, help="training jitter of samples")
        rendering.add_argument("--raw_noise_std", type=finite_float, default=0.0, help="noise added to the sdf (training)")
        rendering.add_argument("--force_background", action="store_true", help="force the last sample opaque")
        rendering.add_argument("--return_xyz", action="store_true", help="return surface points")
        rendering.add_argument("--return_sdf", action="store_true", help="return the sdf")
        rendering.add_argument("--render_path", type=str, default="fast", choices=["fast", "reference"],
                               help="(new) renderer implementation: fast (default) or the straightforward reference")
        rendering.add_argument("--ray_chunk", type=int, default=256, help="(new) rays per renderer chunk")
        rendering.add_argument("--keep_graph_mib", type=int, default=None,
                               help="(new) fast renderer, training: MiB of chunk graphs kept from the forward pass "
                                    "for backward instead of rendering those chunks again there (default: 2048 on "
                                    "the CPU, half the free memory of a CUDA device; 0: re-render every chunk)")
        self.initialized = True

    def parse(self, args=None):
        if not self.initialized:
            self.initialize()
        parsed = self.parser.parse_args(args)
        return group_options(self.parser, parsed)


_RULE = re.compile(r"^(>=|>)\s*(-?[\d.]+)$|^([(\[])\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*([)\]])$")


def _within(value, rule):
    """(whether `value` obeys `rule`, the rule in words): ">= 1", "> 0" or an interval "(0, 1]", "[0, 1)"."""
    m = _RULE.match(rule)
    if m is None:
        raise ValueError(f"bad range rule {rule!r}")
    if m.group(1):
        bound = float(m.group(2))
        if m.group(1) == ">":
            return value > bound, "positive" if bound == 0 else f"greater than {m.group(2)}"
        return value >= bound, "non-negative" if bound == 0 else f"at least {m.group(2)}"
    low, high = float(m.group(4)), float(m.group(5))
    above = value > low if m.group(3) == "(" else value >= low
    below = value < high if m.group(6) == ")" else value <= high
    return above and below, f"in {m.group(3)}{m.group(4)}, {m.group(5)}{m.group(6)}"


def check_ranges(checks, error=UsageError):
    """The one range check of command-line values: checks {flag: (value, rule)} (rules as in _within),
    in order; the first value out of range raises `error` with one line naming the flag."""
    for flag, (value, rule) in checks.items():
        ok, words = _within(value, rule)
        if not ok:
            raise error(f"{flag} must be {words}, got {value}")


def group_options(parser, parsed):
    """Munch tree {group title: {flag: value}} from a parsed namespace."""
    opt = Munch()
    values = vars(parsed)
    for group in parser._action_groups:
        if group.title not in ("dataset", "experiment", "training", "inference", "model", "camera", "rendering"):
            continue
        opt[group.title] = Munch({a.dest: values[a.dest] for a in group._group_actions if a.dest in values})
    sync_region_count(opt)
    return opt


def sync_region_count(opt):
    """The model options carry the region count of the rendering options (--n_render), which the
    discriminators read: set here, at parse time, and again where a checkpoint's options are applied."""
    if "model" in opt and "rendering" in opt:
        opt.model.n_render = opt.rendering.n_render
    return opt


def model_options(opt):
    """(model options, renderer options) to build a generator or a discriminator from: copies, since the
    modules keep them."""
    model_opt = Munch(opt.model)
    # The published code fails with --view_lambda 0 (SPEC §17): build D without the viewpoint head instead.
    model_opt.no_viewpoint_loss = opt.training.view_lambda == 0
    return model_opt, Munch(opt.rendering)


def default_options(args=()):
    """The option tree with defaults (plus `args`), for library use and tests."""
    return BaseOptions().parse(list(args))
