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
from munch import Munch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import distributed as dist_utils
from common import perf_utils, precision
from common.checkpoint import generator_state, load_checkpoint, load_state_strict
from common.draws import seed_everything
from dataset import MultiResolutionDataset
from options import BaseOptions, check_ranges
from training import data_order, loop, params, randomness, samples, steps

STAGE = "full_pipeline"


def renderer_path(opt):
    """The stage-1 renderer this stage starts from: --pretrain_render_path, else the stage-1 final file."""
    if opt.training.pretrain_render_path:
        path = opt.training.pretrain_render_path
        if not os.path.isfile(path):
            raise loop.TrainingError(f"--pretrain_render_path {path}: file not found")
        return path
    path = os.path.join(opt.training.checkpoints_dir, opt.experiment.expname, f"{opt.experiment.expname}_vol_renderer.pt")
    if not os.path.isfile(path):
        raise loop.TrainingError(f"no stage-1 renderer at {path}: train stage 1 first (train_CNeRF.py --expname "
                                 f"{opt.experiment.expname}) or pass --pretrain_render_path")
    return path


def load_renderer(g, path, device):
    """Copy the stage-1 EMA mapping (`style.*`) and renderer (`renderer.*`) into the full generator."""
    state = generator_state(load_checkpoint(path, map_location=device), path)
    load_state_strict(g.style, state, path, "renderer mapping (style.*)", prefix="style.")
    load_state_strict(g.renderer, state, path, "volume renderer (renderer.*)", prefix="renderer.")


def write_samples(sampler, g_ema, path, psi=0.7):
    """One row per identity: per view, high-res image | its seg | low-res image | its seg (EMA, ψ = 0.7)."""
    rows = []
    size = None
    with torch.no_grad(), randomness.isolated_rng(sampler.device, seed=sampler.seed):
        mean = sampler.mean_latent(g_ema)
        for k in range(sampler.z.shape[0]):
            z, (cam, focal, near, far) = sampler.identity_inputs(k)
            (high, seg_high), low, seg_low = g_ema([z], cam, focal, near, far, truncation=psi,
                                                   truncation_latent=mean, randomize_noise=False)
            size = size or max(high.shape[-1], 64)
            row = []
            for hi_tile, lo_tile in zip(samples.image_seg_tiles(high, seg_high, size), samples.image_seg_tiles(low, seg_low, size)):
                row += [hi_tile, lo_tile]
            rows.append(row)
    samples.save_grid(path, rows)


def train(argv=None):
    opt = BaseOptions().parse(argv)
    loop.validate(opt)
    t = opt.training
    if opt.model.size <= opt.model.renderer_spatial_output_dim:
        raise loop.TrainingError(f"--size {opt.model.size} must be larger than --renderer_spatial_output_dim "
                                 f"{opt.model.renderer_spatial_output_dim} (the decoder upsamples)")
    check_ranges({f"--{name}": (t[name], ">= 1") for name in ("d_reg_every", "g_reg_every", "path_batch_shrink")},
                 loop.TrainingError)
    run = loop.start_run(opt, STAGE, 2, ("g", "d", "g_ema", "g_optim", "d_optim", "iter"))
    device, distributed, rank, main = run.device, run.distributed, run.rank, run.main
    logger = run.logger
    ckpt, resume_path = run.ckpt, run.resume_path

    resolution = opt.model.renderer_spatial_output_dim
    if ckpt is None:
        stage1_path = renderer_path(opt)
    seed = loop.run_seed(opt, ckpt)
    seed_everything(seed, rank)

    try:
        dataset = MultiResolutionDataset(opt.dataset.dataset_path, resolution=opt.model.size,
                                         nerf_resolution=resolution)
    except (OSError, ValueError) as error:
        raise loop.TrainingError(f"--dataset_path: {error}") from None

    g, g_ema, d = steps.build_stage2(opt, device)
    if ckpt is None:
        load_renderer(g, stage1_path, device)
    g_optim, d_optim = steps.stage2_optimizers(opt, g, d)
    precision.from_options(opt, device, g, g_ema, d)  # --precision; fp32 changes nothing

    start_iter = 0
    # Running path-length mean: starts at 0 (the published script used it before defining it).
    mean_path_length = 0.0
    if ckpt is not None:
        load_state_strict(g, ckpt["g"], resume_path, "generator")
        load_state_strict(g_ema, ckpt["g_ema"], resume_path, "EMA generator")
        load_state_strict(d, ckpt["d"], resume_path, "discriminator")
        loop.restore_optimizers(opt, ckpt, resume_path, {"g_optim": g_optim, "d_optim": d_optim})
        start_iter = int(ckpt["iter"]) + 1
        mean_path_length = float(ckpt.get("mean_path_length", 0.0))
        if not opt.experiment.reseed:
            randomness.restore_rng(ckpt, seed, start_iter)
        del ckpt

    g.train()
    d.train()
    g_module, d_module = g, d
    m = Munch(g=g, g_module=g, d=d, g_optim=g_optim, d_optim=d_optim, device=device, resolution=resolution,
              guard=loop.FiniteGuard())
    if distributed:
        ddp = dict(device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
                   find_unused_parameters=True)
        m.g, m.d = DDP(g, **ddp), DDP(d, **ddp)
    if start_iter == 0:
        g_ema.load_state_dict(g_module.state_dict())  # also copies the decoder's fixed noise buffers

    workers = data_order.loader_workers(t.num_workers, device, opt.experiment.deterministic)
    loader = data_order.make_loader(dataset, t.batch, seed, start_iter, workers, device)
    data_iter = iter(loader)
    sampler = samples.Sampler(opt, device, seed, resolution) if main else None
    last = t.iter - 1
    shown_r1 = shown_path = shown_lengths = torch.zeros((), device=device)
    bar = tqdm(range(start_iter, t.iter), initial=start_iter, total=t.iter, desc="stage 2", disable=not main,
               dynamic_ncols=True, smoothing=0.01)
    for i in bar:
        real_img, _, real_mask = next(data_iter)
        # From pinned memory (CUDA), the copies overlap the work queued before them.
        real_img, real_mask = real_img.to(device, non_blocking=True), real_mask.to(device, non_blocking=True)
        records, mean_path_length = steps.stage2_iteration(m, opt, real_img, real_mask, mean_path_length, i)
        params.accumulate(g_ema, g_module, params.ema_decay(opt), prefixes=steps.STAGE2_TRAINED)

        by_name = {}
        for name, record in records:
            by_name.setdefault(name, []).append(record)
        if i % t.d_reg_every == 0:
            shown_r1 = sum(r["r1_loss"] for r in by_name["d_loss"])
        if "weighted_path_loss" in by_name:
            path_record = by_name["weighted_path_loss"][0]
            shown_path, shown_lengths = path_record["path_loss"], path_record["path_lengths"].mean()
        if not loop.sync_due(i, start_iter, last, t):
            continue  # nothing read back from the device: it runs ahead until the next check

        m.guard.check()
        shown = dist_utils.reduce_loss_dict({"d": by_name["d_loss"][-1]["d_gan_loss"], "r1": shown_r1,
                                             "g": by_name["g_loss"][-1]["g_loss"], "path": shown_path,
                                             "path_length": shown_lengths}, device=device)
        if main:
            bar.set_postfix(d=f"{shown['d']:.3f}", g=f"{shown['g']:.3f}", r1=f"{shown['r1']:.3f}",
                            path=f"{shown['path']:.3f}", mean_path=f"{mean_path_length:.3f}")
            logger.log({**shown, "mean_path_length": mean_path_length}, step=i)
        loop.end_of_iteration(run, i, last, t, lambda path: write_samples(sampler, g_ema, path),
                              lambda rng: {"g": g_module.state_dict(), "d": d_module.state_dict(),
                                           "g_ema": g_ema.state_dict(), "g_optim": g_optim.state_dict(),
                                           "d_optim": d_optim.state_dict(), "iter": i,
                                           "mean_path_length": mean_path_length, "seed": seed, "rng": rng,
                                           "opt": loop.plain(opt)})
    bar.close()
    return loop.finish_run(run, opt, g_ema, max(start_iter, t.iter) - 1, f"{opt.experiment.expname}_full_pipeline.pt")


def main(argv=None):
    perf_utils.configure_allocator()  # before the big allocations (issue 6)
    loop.run_training(train, argv)


if __name__ == "__main__":
    main()
