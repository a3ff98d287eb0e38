"""Stage 1 (SPEC §12): train the compositional volume renderer at R×R with the global and semantic
discriminators.

    python train_CNeRF.py --expname ffhq --dataset_path ./datasets/FFHQ_lmdb        (one GPU or CPU)
    torchrun --nproc_per_node 4 train_CNeRF.py --expname ffhq ...                      (DDP)

Writes, under <checkpoints_dir>/<expname>/:
    volume_renderer/sdf_init_models_0000000.pt   after the sphere initialisation
    volume_renderer/models_{i:07d}.pt            {g, gd, sd, g_ema, g_optim, gd_optim, sd_optim, iter, seed, rng, opt}
    volume_renderer/samples/{i:07d}.png           EMA samples, ψ=0.7, 8-view sweep per identity, image | seg
    <expname>_vol_renderer.pt                     final {g_ema, iter}; what train_Full.py starts from
Checkpoint i holds the state after iteration i (0-based); `--continue_training --ckpt i` resumes at i+1.
"""
import os

import torch
from munch import Munch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import distributed as dist_utils
from common import perf_utils, precision
from common.checkpoint import load_state_strict, save_checkpoint
from common.draws import seed_everything
from dataset import MultiResolutionDataset
from options import BaseOptions
from training import data_order, loop, params, randomness, samples, steps

STAGE = "volume_renderer"


def sphere_init(m, opt, path, show):
    """Regress the initial SDF network onto a sphere (SPEC §7) with the GAN optimiser m.g_optim, whose
    state carries into GAN training (published); writes `path` (rank 0).

    Under DDP every rank runs it on its own draws; rank 0's generator and optimiser state then go to
    every rank, so that all start GAN training from the same Adam moments. The loss is checked (and
    shown) every --sync_every steps and at the end, not at every step."""
    last = opt.training.sphere_init_iter - 1
    bar = tqdm(range(opt.training.sphere_init_iter), desc="sphere init", disable=not show, dynamic_ncols=True)
    for step in bar:
        record = steps.sphere_init_step(m, opt, step)
        if (step + 1) % opt.training.sync_every == 0 or step == last:
            m.guard.check()
            bar.set_postfix(l1=f"{record['loss'].item():.4f}")
    dist_utils.broadcast_training_state(m.g_module, m.g_optim)
    if dist_utils.is_main_process():
        save_checkpoint({"g": m.g_module.state_dict(), "iter": opt.training.sphere_init_iter}, path)


def write_samples(sampler, g_ema, path, psi=0.7):
    """One row per identity: the 8 sweep views, each as image | coloured seg (EMA, ψ = 0.7)."""
    rows = []
    with torch.no_grad(), randomness.isolated_rng(sampler.device, seed=sampler.seed):
        mean = sampler.mean_latent(g_ema)
        for k in range(sampler.z.shape[0]):
            z, (cam, focal, near, far) = sampler.identity_inputs(k)
            out = g_ema([z], cam, focal, near, far, truncation=psi, truncation_latent=mean)
            rows.append(samples.image_seg_tiles(out[1], out[-1]))
    samples.save_grid(path, rows)


def train(argv=None):
    opt = BaseOptions().parse(argv)
    loop.validate(opt)
    t = opt.training
    run = loop.start_run(opt, STAGE, 1, ("g", "gd", "sd", "g_ema", "g_optim", "gd_optim", "sd_optim", "iter"))
    device, distributed, rank, main = run.device, run.distributed, run.rank, run.main
    stage_dir, logger = run.stage_dir, run.logger
    ckpt, resume_path = run.ckpt, run.resume_path

    resolution = opt.model.renderer_spatial_output_dim
    seed = loop.run_seed(opt, ckpt)
    seed_everything(seed, rank)

    try:
        dataset = MultiResolutionDataset(opt.dataset.dataset_path, resolution=resolution, nerf_resolution=resolution)
    except (OSError, ValueError) as error:
        raise loop.TrainingError(f"--dataset_path: {error}") from None

    g, g_ema, gd, sd = steps.build_stage1(opt, device)
    g_optim, gd_optim, sd_optim = steps.stage1_optimizers(opt, g, gd, sd)
    m = Munch(g=g, g_module=g, gd=gd, sd=sd, g_optim=g_optim, gd_optim=gd_optim, sd_optim=sd_optim,
              device=device, resolution=resolution, guard=loop.FiniteGuard())
    if t.area_lambda > 0:
        m.area_target = steps.area_target(dataset, t.chunk, device, progress=main)
    precision.from_options(opt, device, g, g_ema, gd, sd)  # --precision; fp32 changes nothing

    start_iter = 0
    if ckpt is not None:
        load_state_strict(g, ckpt["g"], resume_path, "generator")
        load_state_strict(g_ema, ckpt["g_ema"], resume_path, "EMA generator")
        load_state_strict(gd, ckpt["gd"], resume_path, "global discriminator")
        load_state_strict(sd, ckpt["sd"], resume_path, "semantic discriminator")
        loop.restore_optimizers(opt, ckpt, resume_path, {"g_optim": g_optim, "gd_optim": gd_optim, "sd_optim": sd_optim})
        start_iter = int(ckpt["iter"]) + 1
        if not opt.experiment.reseed:
            randomness.restore_rng(ckpt, seed, start_iter)
        del ckpt
    elif not t.no_sphere_init:
        sphere_init(m, opt, os.path.join(stage_dir, "sdf_init_models_0000000.pt"), main)

    g.train()
    gd.train()
    sd.train()
    g_module, gd_module, sd_module = g, gd, sd
    if distributed:
        ddp = dict(device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
                   find_unused_parameters=True)  # the initial SDF network takes no part in the training pass
        m.g, m.gd, m.sd = DDP(g, **ddp), DDP(gd, **ddp), DDP(sd, **ddp)
    if start_iter == 0:  # the EMA starts as a copy of the (rank 0, after DDP's broadcast) generator
        g_ema.load_state_dict(g_module.state_dict())

    workers = data_order.loader_workers(t.num_workers, device, opt.experiment.deterministic)
    loader = data_order.make_loader(dataset, t.batch, seed, start_iter, workers, device)
    data_iter = iter(loader)
    sampler = samples.Sampler(opt, device, seed, resolution) if main else None
    last = t.iter - 1
    bar = tqdm(range(start_iter, t.iter), initial=start_iter, total=t.iter, desc="stage 1", disable=not main,
               dynamic_ncols=True, smoothing=0.01)
    for i in bar:
        real_img, _, real_mask = next(data_iter)
        # From pinned memory (CUDA), the copies overlap the work queued before them.
        real_img, real_mask = real_img.to(device, non_blocking=True), real_mask.to(device, non_blocking=True)
        records = steps.stage1_iteration(m, opt, real_img, real_mask, i)
        params.accumulate(g_ema, g_module, params.ema_decay(opt), prefixes=steps.STAGE1_EMA)
        if not loop.sync_due(i, start_iter, last, t):
            continue  # nothing read back from the device: it runs ahead until the next check

        m.guard.check()
        d, sd_record, g_last = records[0][1], records[1][1], records[-1][1]
        shown = {
            "d": d["d_loss"], "d_r1": d["r1_loss"], "d_view": d["d_view_loss"], "sd": sd_record["sd_loss"],
            "sd_cls": sd_record["s_d_class_loss"], "g": g_last["g_loss"], "g_view": g_last["g_view_loss"],
            "eikonal": g_last["g_eikonal"], "min_surf": g_last["g_minimal_surface"],
            "g_sem": g_last["g_class_loss"] + g_last["g_gan_semantic_loss"]}
        for extra in ("g_diversity", "g_area"):
            if extra in g_last:
                shown[extra] = g_last[extra]
        shown = dist_utils.reduce_loss_dict(shown, device=device)
        if main:
            bar.set_postfix(d=f"{shown['d']:.3f}", sd=f"{shown['sd']:.3f}", g=f"{shown['g']:.3f}",
                            view=f"{shown['g_view']:.3f}", eik=f"{shown['eikonal']:.3f}")
            logger.log(shown, step=i)
        loop.end_of_iteration(run, i, last, t, lambda path: write_samples(sampler, g_ema, path),
                              lambda rng: {"g": g_module.state_dict(), "gd": gd_module.state_dict(),
                                           "sd": sd_module.state_dict(), "g_ema": g_ema.state_dict(),
                                           "g_optim": g_optim.state_dict(), "gd_optim": gd_optim.state_dict(),
                                           "sd_optim": sd_optim.state_dict(), "iter": i, "seed": seed, "rng": rng,
                                           "opt": loop.plain(opt)})
    bar.close()
    return loop.finish_run(run, opt, g_ema, max(start_iter, t.iter) - 1, f"{opt.experiment.expname}_vol_renderer.pt")


def main(argv=None):
    perf_utils.configure_allocator()  # before the big allocations (issue 6)
    loop.run_training(train, argv)


if __name__ == "__main__":
    main()
