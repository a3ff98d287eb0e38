"""Stage 2 (SPEC §13): train the StyleGAN2 decoder (and the feature transfer) on top of the frozen
stage-1 renderer, at the output size.

    python train_Full.py --expname ffhq --size 256 --dataset_path ./datasets/FFHQ_lmdb
    torchrun --nproc_per_node 4 train_Full.py --expname ffhq --size 256 ...

Starts from the stage-1 EMA renderer and mapping at <checkpoints_dir>/<expname>/<expname>_vol_renderer.pt
(or --pretrain_render_path). Writes, under <checkpoints_dir>/<expname>/:
    full_pipeline/models_{i:07d}.pt      {g, d, g_ema, g_optim, d_optim, iter, mean_path_length, seed, rng, opt}
    full_pipeline/samples/{i:07d}.png    EMA samples (ψ=0.7, 8-view sweep): high-res | seg | low-res | seg
    <expname>_full_pipeline.pt            final {g_ema, iter}; loads with checkpoint.load_generator
Checkpoint i holds the state after iteration i (0-based); `--continue_training --ckpt i` resumes at i+1.
"""
import os

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import distributed as dist_utils
import perf_utils
import training_utils as tu
from checkpoint import CheckpointError, generator_state, load_checkpoint, load_state_strict
from dataset import MultiResolutionDataset
from losses import d_logistic_loss, g_nonsaturating_loss, g_path_regularize, r1_image_and_mask
from model import Discriminator, Generator
from options import BaseOptions
from train_CNeRF import (Sampler, ema_decay, camera, choose_seed, end_of_iteration, finish_run, model_options,
                         restore_rng, validate)

STAGE = "full_pipeline"
TRAINED = ("decoder.", "feature_transfer.")  # the only parameters stage 2 optimises


def renderer_path(opt):
    """The stage-1 renderer this stage starts from: --pretrain_render_path, else the stage-1 final file."""
    if opt.training.pretrain_render_path:
        path = opt.training.pretrain_render_path
        if not os.path.isfile(path):
            raise tu.TrainingError(f"--pretrain_render_path {path}: file not found")
        return path
    path = os.path.join(opt.training.checkpoints_dir, opt.experiment.expname, f"{opt.experiment.expname}_vol_renderer.pt")
    if not os.path.isfile(path):
        raise tu.TrainingError(f"no stage-1 renderer at {path}: train stage 1 first (train_CNeRF.py --expname "
                               f"{opt.experiment.expname}) or pass --pretrain_render_path")
    return path


def load_renderer(g, path, device):
    """Copy the stage-1 EMA mapping (`style.*`) and renderer (`renderer.*`) into the full generator."""
    state = generator_state(load_checkpoint(path, map_location=device), path)
    load_state_strict(g.style, state, path, "renderer mapping (style.*)", prefix="style.")
    load_state_strict(g.renderer, state, path, "volume renderer (renderer.*)", prefix="renderer.")


def trained_parameters(g):
    return [p for name, p in g.named_parameters() if name.startswith(TRAINED)]


def set_trainable(g, flag):
    for p in trained_parameters(g):
        p.requires_grad = flag


def write_samples(sampler, g_ema, path, psi=0.7):
    """One row per identity: per view, high-res image | its seg | low-res image | its seg (EMA, ψ = 0.7)."""
    rows = []
    size = None
    with torch.no_grad(), tu.isolated_rng(sampler.device, seed=sampler.seed):
        mean = sampler.mean_latent(g_ema)
        for k in range(sampler.z.shape[0]):
            z, (cam, focal, near, far) = sampler.identity_inputs(k)
            (high, seg_high), low, seg_low = g_ema([z], cam, focal, near, far, truncation=psi,
                                                    truncation_latent=mean, randomize_noise=False)
            size = size or max(high.shape[-1], 64)
            row = []
            for hi_tile, lo_tile in zip(tu.image_seg_tiles(high, seg_high, size), tu.image_seg_tiles(low, seg_low, size)):
                row += [hi_tile, lo_tile]
            rows.append(row)
    tu.save_grid(path, rows)


def train(argv=None):
    opt = BaseOptions().parse(argv)
    validate(opt)
    t = opt.training
    if opt.model.size <= opt.model.renderer_spatial_output_dim:
        raise tu.TrainingError(f"--size {opt.model.size} must be larger than --renderer_spatial_output_dim "
                               f"{opt.model.renderer_spatial_output_dim} (the decoder upsamples)")
    for name in ("d_reg_every", "g_reg_every", "path_batch_shrink"):
        if t[name] < 1:
            raise tu.TrainingError(f"--{name} must be at least 1 (got {t[name]})")
    run = tu.start_run(opt, STAGE, 2, ("g", "d", "g_ema", "g_optim", "d_optim", "iter"))
    device, distributed, rank, main = run.device, run.distributed, run.rank, run.main
    logger = run.logger
    ckpt, resume_path = run.ckpt, run.resume_path

    resolution = opt.model.renderer_spatial_output_dim
    if ckpt is None:
        stage1_path = renderer_path(opt)
    seed = int(ckpt["seed"]) if ckpt is not None and "seed" in ckpt else choose_seed(opt)
    tu.seed_all(seed, rank)

    try:
        dataset = MultiResolutionDataset(opt.dataset.dataset_path, resolution=opt.model.size,
                                         nerf_resolution=resolution)
    except (OSError, ValueError) as error:
        raise tu.TrainingError(f"--dataset_path: {error}") from None

    model_opt, renderer_opt = model_options(opt)
    g = Generator(model_opt, renderer_opt, full_pipeline=True).to(device)
    g_ema = Generator(model_opt, renderer_opt, ema=True, full_pipeline=True).to(device)
    d = Discriminator(model_opt).to(device)
    g_ema.eval()
    tu.requires_grad(g_ema, False)
    if ckpt is None:
        load_renderer(g, stage1_path, device)
    g.freeze_renderer()

    # Lazy regularisation rescales Adam's hyper-parameters (StyleGAN2).
    g_ratio = t.g_reg_every / (t.g_reg_every + 1)
    d_ratio = t.d_reg_every / (t.d_reg_every + 1)
    g_optim = torch.optim.Adam(trained_parameters(g), lr=t.lr * g_ratio, betas=(0.0, 0.99 ** g_ratio))
    d_optim = torch.optim.Adam(d.parameters(), lr=t.lr * d_ratio, betas=(0.0, 0.99 ** d_ratio))

    start_iter = 0
    # Running path-length mean: starts at 0 (the published script used it before defining it).
    mean_path_length = 0.0
    if ckpt is not None:
        load_state_strict(g, ckpt["g"], resume_path, "generator")
        load_state_strict(g_ema, ckpt["g_ema"], resume_path, "EMA generator")
        load_state_strict(d, ckpt["d"], resume_path, "discriminator")
        try:
            g_optim.load_state_dict(ckpt["g_optim"])
            d_optim.load_state_dict(ckpt["d_optim"])
        except (ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"{resume_path}: optimiser state does not fit ({error})") from None
        start_iter = int(ckpt["iter"]) + 1
        mean_path_length = float(ckpt.get("mean_path_length", 0.0))
        restore_rng(ckpt, seed, start_iter)
        del ckpt

    g.train()
    d.train()
    g_module, d_module = g, d
    if distributed:
        ddp = dict(device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
                   find_unused_parameters=True)
        g, d = DDP(g, **ddp), DDP(d, **ddp)
    if start_iter == 0:
        g_ema.load_state_dict(g_module.state_dict())  # also copies the decoder's fixed noise buffers

    loader = tu.make_loader(dataset, t.batch, seed, start_iter, t.num_workers, device)
    data_iter = iter(loader)
    sampler = Sampler(opt, device, seed, resolution) if main else None
    style_dim = opt.model.style_dim
    last = t.iter - 1
    path_loss = torch.zeros((), device=device)
    path_lengths_mean = torch.zeros((), device=device)
    r1 = torch.zeros((), device=device)
    bar = tqdm(range(start_iter, t.iter), initial=start_iter, total=t.iter, desc="stage 2", disable=not main,
               dynamic_ncols=True, smoothing=0.01)
    for i in bar:
        real_img, _, real_mask = next(data_iter)
        real_img, real_mask = real_img.to(device), real_mask.to(device)

        # -- discriminator ----------------------------------------------------------------------
        set_trainable(g_module, False)
        tu.requires_grad(d, True)
        noise = tu.mixing_noise(t.batch, style_dim, t.mixing, device)
        cam, focal, near, far, _ = camera(opt, t.batch, device, resolution)
        with torch.no_grad():
            (fake_img, fake_seg), _, _ = g(noise, cam, focal, near, far)
        fake_pred = d(fake_img, fake_seg)
        real_pred = d(real_img, real_mask)
        d_loss = d_logistic_loss(real_pred, fake_pred)
        tu.check_finite({"d": d_loss}, i)
        d.zero_grad(set_to_none=True)
        d_loss.backward()
        d_optim.step()

        if i % t.d_reg_every == 0:
            # Lazy R1 on image and mask. SPEC §13 names no weights for stage 2: the stage-1 pair
            # (--r1_img on the image, --r1_seg on the mask) is used, times d_reg_every.
            img_r = real_img.detach().requires_grad_(True)
            seg_r = real_mask.detach().requires_grad_(True)
            real_pred = d(img_r, seg_r)
            r1, _, _ = r1_image_and_mask(real_pred, img_r, seg_r, t.r1_img, t.r1_seg)
            tu.check_finite({"r1": r1}, i)
            d.zero_grad(set_to_none=True)
            (r1 * t.d_reg_every + 0 * real_pred[0, 0]).backward()
            d_optim.step()

        # -- generator (decoder + feature transfer), gradients accumulated over chunks --------------
        set_trainable(g_module, True)
        tu.requires_grad(d, False)
        g.zero_grad(set_to_none=True)
        for start in range(0, t.batch, t.chunk):
            n = min(t.chunk, t.batch - start)
            noise = tu.mixing_noise(n, style_dim, t.mixing, device)
            cam, focal, near, far, _ = camera(opt, n, device, resolution)
            (fake_img, fake_seg), _, _ = g(noise, cam, focal, near, far)
            g_loss = g_nonsaturating_loss(d(fake_img, fake_seg))
            tu.check_finite({"g": g_loss}, i)
            g_loss.backward()
        g_optim.step()

        if i % t.g_reg_every == 0:
            path_batch = max(1, t.batch // t.path_batch_shrink)
            noise = tu.mixing_noise(path_batch, style_dim, t.mixing, device)
            cam, focal, near, far, _ = camera(opt, path_batch, device, resolution)
            # On the unwrapped generator: DDP's output wrapper cuts the graph between its outputs
            # (image and latents), so gradients are averaged across ranks by hand below.
            fake_img, _, latents = g_module(noise, cam, focal, near, far, return_latents=True)
            path_loss, mean_path, path_lengths = g_path_regularize(fake_img, latents, mean_path_length)
            weighted = t.path_regularize * t.g_reg_every * path_loss
            tu.check_finite({"path_length": path_loss}, i)
            g.zero_grad(set_to_none=True)
            # The zero term keeps the image in the graph even when the penalty does not reach it.
            (weighted + 0 * fake_img[0, 0, 0, 0]).backward()
            dist_utils.average_gradients(trained_parameters(g_module))
            g_optim.step()
            # The running mean is kept identical on every rank.
            mean_path_length = float(dist_utils.reduce_sum(mean_path.detach().reshape(1))) / \
                dist_utils.get_world_size()
            path_lengths_mean = path_lengths.detach().mean()

        tu.accumulate(g_ema, g_module, ema_decay(opt), prefixes=TRAINED)

        shown = dist_utils.reduce_loss_dict({"d": d_loss, "r1": r1, "g": g_loss, "path": path_loss,
                                             "path_length": path_lengths_mean}, device=device)
        if main:
            bar.set_postfix(d=f"{shown['d']:.3f}", g=f"{shown['g']:.3f}", r1=f"{shown['r1']:.3f}",
                            path=f"{shown['path']:.3f}", mean_path=f"{mean_path_length:.3f}")
            logger.log({**shown, "mean_path_length": mean_path_length}, step=i)
        end_of_iteration(run, i, last, t, lambda path: write_samples(sampler, g_ema, path),
                         lambda rng: {"g": g_module.state_dict(), "d": d_module.state_dict(),
                                      "g_ema": g_ema.state_dict(), "g_optim": g_optim.state_dict(),
                                      "d_optim": d_optim.state_dict(), "iter": i,
                                      "mean_path_length": mean_path_length, "seed": seed, "rng": rng,
                                      "opt": tu.plain(opt)})
    bar.close()
    return finish_run(run, opt, g_ema, max(start_iter, t.iter) - 1, f"{opt.experiment.expname}_full_pipeline.pt")


def main(argv=None):
    perf_utils.configure_allocator()  # before the big allocations (issue 6)
    tu.run_training(train, argv)


if __name__ == "__main__":
    main()
