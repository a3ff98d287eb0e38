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
import torch.nn.functional as F
from munch import Munch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import distributed as dist_utils
import perf_utils
import training_utils as tu
from camera import generate_camera_params
from checkpoint import CheckpointError, architecture_config, load_state_strict, save_checkpoint
from dataset import MultiResolutionDataset
from losses import (classification_loss, d_logistic_loss, eikonal_loss, g_nonsaturating_loss, r1_image_and_mask,
                    viewpoints_loss)
from model import ComponentDualBranchDiscriminator, Generator, VolumeRenderDiscriminator
from options import BaseOptions

STAGE = "volume_renderer"
EMA_DECAY = 0.5 ** (32 / (10 * 1000))
SAMPLE_VIEWS = 8  # generate_camera_params(sweep=True) gives 8 azimuths per identity


def model_options(opt):
    model_opt = Munch(opt.model)
    model_opt.n_render = opt.rendering.n_render
    # The published code fails with --view_lambda 0 (SPEC §17): build D without the viewpoint head instead.
    model_opt.no_viewpoint_loss = opt.training.view_lambda == 0
    renderer_opt = Munch(opt.rendering)
    return model_opt, renderer_opt


def ema_decay(opt):
    """--ema_decay, or the published 0.5 ** (32 / 10000) per iteration."""
    return EMA_DECAY if opt.training.ema_decay is None else opt.training.ema_decay


def validate(opt):
    t = opt.training
    for name in ("vol_g_lr", "vol_d_lr"):
        if t[name] <= 0:
            raise tu.TrainingError(f"--{name} must be positive (got {t[name]})")
    if t.ema_decay is not None and not 0 <= t.ema_decay < 1:
        raise tu.TrainingError(f"--ema_decay must be in [0, 1) (got {t.ema_decay})")
    if opt.model.d_channel_scale <= 0:
        raise tu.TrainingError(f"--d_channel_scale must be positive (got {opt.model.d_channel_scale})")
    for name in ("batch", "chunk", "sample_every", "save_every", "val_n_sample"):
        if t[name] < 1:
            raise tu.TrainingError(f"--{name} must be at least 1 (got {t[name]})")
    if t.iter < 0:
        raise tu.TrainingError(f"--iter must be non-negative (got {t.iter})")
    if t.sphere_init_iter < 0:
        raise tu.TrainingError(f"--sphere_init_iter must be non-negative (got {t.sphere_init_iter})")
    if t.num_workers < 0:
        raise tu.TrainingError(f"--num_workers must be non-negative (got {t.num_workers})")


def camera(opt, batch, device, resolution):
    c = opt.camera
    return generate_camera_params(resolution, device, batch=batch, uniform=c.uniform, azim_range=c.azim,
                                  elev_range=c.elev, fov_ang=c.fov, dist_radius=c.dist_radius)


def choose_seed(opt):
    """--seed, or one random seed shared by all ranks (recorded in the checkpoints)."""
    if opt.experiment.seed is not None:
        return int(opt.experiment.seed)
    return int(dist_utils.all_gather_object(int.from_bytes(os.urandom(4), "little"))[0])


def should_save(i, last, save_every, sample_every):
    """Published schedule: every save_every iterations, more often (every sample_every) before the
    first save_every; plus the last iteration so that every run can be resumed."""
    return i == last or i % save_every == 0 or (i < save_every and i % sample_every == 0)


def gather_rng():
    """Every rank's RNG state (collective), so a resumed multi-process run continues each stream."""
    return dist_utils.all_gather_object(tu.rng_state())


def end_of_iteration(run, i, last, t, write_grid, checkpoint_state):
    """The shared end of a training iteration: the sample grid (main process, every --sample_every
    and at the last iteration; `write_grid(path)`) and the periodic checkpoint (every rank gives its
    RNG state; the main process writes `checkpoint_state(rng)`)."""
    if run.main and (i % t.sample_every == 0 or i == last):
        path = os.path.join(run.samples_dir, f"{i:07d}.png")
        write_grid(path)
        run.logger.log_image("samples", path, step=i)
    if should_save(i, last, t.save_every, t.sample_every):
        rng = gather_rng()
        if run.main:
            save(checkpoint_state(rng), os.path.join(run.stage_dir, f"models_{i:07d}.pt"))


def finish_run(run, opt, g_ema, last_iter, name):
    """The final EMA model <exp_dir>/<name> (main process), then close the logger and wait for every rank.

    It carries its architecture options ("config"), so `--trained_ckpt` alone rebuilds it."""
    if run.main:
        save({"g_ema": g_ema.state_dict(), "iter": last_iter, "config": architecture_config(opt)},
             os.path.join(run.exp_dir, name))
    run.logger.finish()
    dist_utils.synchronize()
    return run.exp_dir


def restore_rng(ckpt, seed, start_iter):
    states = ckpt.get("rng")
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    if isinstance(states, list) and len(states) == world:
        tu.set_rng_state(states[rank])
    else:  # another world size: streams cannot continue exactly; start fresh, reproducible ones
        tu.seed_all(seed + 7919 * start_iter, rank)


def save(obj, path):
    try:
        save_checkpoint(obj, path)
    except OSError as error:
        raise tu.TrainingError(f"could not write checkpoint {path} ({error}); the previous checkpoint is intact") \
            from None


def split_outputs(out, return_sdf, return_eikonal):
    """Generator tuple ((hi, seg_hi), rgb_low, [sdf], [eikonal], seg_low) → (rgb_low, sdf, eikonal, seg_low)."""
    index = 2
    sdf = eikonal = None
    if return_sdf:
        sdf = out[index]
        index += 1
    if return_eikonal:
        eikonal = out[index]
    return out[1], sdf, eikonal, out[-1]


def pick_channel(seg, labels):
    """The labelled region's channel of each sample's mask: [B,K,H,W], [B] → [B,1,H,W]."""
    return seg[torch.arange(seg.shape[0], device=seg.device), labels].unsqueeze(1)


def sphere_init(opt, g_module, g_optim, device, resolution, path, show):
    """Regress the initial SDF network onto a sphere (SPEC §7); writes `path` (rank 0).

    As published, these steps use the generator's GAN optimiser (Adam, --vol_g_lr, betas (0, 0.9)), whose
    state (step count, moments of the initial SDF network and the mapping) GAN training then continues.
    """
    optim = g_optim
    bar = tqdm(range(opt.training.sphere_init_iter), desc="sphere init", disable=not show, dynamic_ncols=True)
    for step in bar:
        noise = tu.mixing_noise(opt.training.batch, opt.model.style_dim, opt.training.mixing, device)
        cam, focal, near, far, _ = camera(opt, opt.training.batch, device, resolution)
        sdf, target = g_module.init_forward(noise, cam, focal, near, far)
        loss = F.l1_loss(sdf, target)
        tu.check_finite({"sphere_init_l1": loss}, step)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        bar.set_postfix(l1=f"{loss.item():.4f}")
    if dist_utils.is_main_process():
        save({"g": g_module.state_dict(), "iter": opt.training.sphere_init_iter}, path)


class Sampler:
    """Fixed identities and sweep cameras for the sample grids, drawn without touching training RNGs."""

    def __init__(self, opt, device, seed, resolution):
        self.opt = opt
        self.device = device
        n = opt.training.val_n_sample
        with tu.isolated_rng(device, seed=seed + 12345):
            self.z = torch.randn(n, opt.model.style_dim, device=device)
            c = opt.camera
            self.cams = generate_camera_params(resolution, device, batch=n, sweep=True, uniform=c.uniform,
                                               azim_range=c.azim, elev_range=c.elev, fov_ang=c.fov,
                                               dist_radius=c.dist_radius)[:4]
        self.seed = seed

    def identity_inputs(self, k):
        views = slice(k * SAMPLE_VIEWS, (k + 1) * SAMPLE_VIEWS)
        z = self.z[k:k + 1].expand(SAMPLE_VIEWS, -1)
        return z, [c[views] for c in self.cams]

    def mean_latent(self, g_ema):
        with tu.isolated_rng(self.device, seed=self.seed + 54321):
            return g_ema.mean_latent(self.opt.inference.truncation_mean, self.device)


def write_samples(sampler, g_ema, path, psi=0.7):
    """One row per identity: the 8 sweep views, each as image | coloured seg (EMA, ψ = 0.7)."""
    rows = []
    with torch.no_grad(), tu.isolated_rng(sampler.device, seed=sampler.seed):
        mean = sampler.mean_latent(g_ema)
        for k in range(sampler.z.shape[0]):
            z, (cam, focal, near, far) = sampler.identity_inputs(k)
            out = g_ema([z], cam, focal, near, far, truncation=psi, truncation_latent=mean)
            rows.append(tu.image_seg_tiles(out[1], out[-1]))
    tu.save_grid(path, rows)


def train(argv=None):
    opt = BaseOptions().parse(argv)
    validate(opt)
    t = opt.training
    run = tu.start_run(opt, STAGE, 1, ("g", "gd", "sd", "g_ema", "g_optim", "gd_optim", "sd_optim", "iter"))
    device, distributed, rank, main = run.device, run.distributed, run.rank, run.main
    stage_dir, logger = run.stage_dir, run.logger
    ckpt, resume_path = run.ckpt, run.resume_path

    resolution = opt.model.renderer_spatial_output_dim
    seed = int(ckpt["seed"]) if ckpt is not None and "seed" in ckpt else choose_seed(opt)
    tu.seed_all(seed, rank)

    try:
        dataset = MultiResolutionDataset(opt.dataset.dataset_path, resolution=resolution, nerf_resolution=resolution)
    except (OSError, ValueError) as error:
        raise tu.TrainingError(f"--dataset_path: {error}") from None

    model_opt, renderer_opt = model_options(opt)
    g = Generator(model_opt, renderer_opt, full_pipeline=False).to(device)
    g_ema = Generator(model_opt, renderer_opt, ema=True, full_pipeline=False).to(device)
    gd = VolumeRenderDiscriminator(model_opt).to(device)
    sd = ComponentDualBranchDiscriminator(model_opt).to(device)
    g_ema.eval()
    tu.requires_grad(g_ema, False)

    g_optim = torch.optim.Adam(g.parameters(), lr=t.vol_g_lr, betas=(0.0, 0.9))
    gd_optim = torch.optim.Adam(gd.parameters(), lr=t.vol_d_lr, betas=(0.0, 0.9))
    sd_optim = torch.optim.Adam(sd.parameters(), lr=t.vol_d_lr, betas=(0.0, 0.9))

    start_iter = 0
    if ckpt is not None:
        load_state_strict(g, ckpt["g"], resume_path, "generator")
        load_state_strict(g_ema, ckpt["g_ema"], resume_path, "EMA generator")
        load_state_strict(gd, ckpt["gd"], resume_path, "global discriminator")
        load_state_strict(sd, ckpt["sd"], resume_path, "semantic discriminator")
        try:
            g_optim.load_state_dict(ckpt["g_optim"])
            gd_optim.load_state_dict(ckpt["gd_optim"])
            sd_optim.load_state_dict(ckpt["sd_optim"])
        except (ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(f"{resume_path}: optimiser state does not fit ({error})") from None
        start_iter = int(ckpt["iter"]) + 1
        restore_rng(ckpt, seed, start_iter)
        del ckpt
    elif not t.no_sphere_init:
        sphere_init(opt, g, g_optim, device, resolution, os.path.join(stage_dir, "sdf_init_models_0000000.pt"),
                    main)

    g.train()
    gd.train()
    sd.train()
    g_module, gd_module, sd_module = g, gd, sd
    if distributed:
        ddp = dict(device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False,
                   find_unused_parameters=True)  # the initial SDF network takes no part in the training pass
        g, gd, sd = DDP(g, **ddp), DDP(gd, **ddp), DDP(sd, **ddp)
    if start_iter == 0:  # the EMA starts as a copy of the (rank 0, after DDP's broadcast) generator
        g_ema.load_state_dict(g_module.state_dict())

    loader = tu.make_loader(dataset, t.batch, seed, start_iter, t.num_workers, device)
    data_iter = iter(loader)
    sampler = Sampler(opt, device, seed, resolution) if main else None
    K = g_module.n_render
    last = t.iter - 1
    bar = tqdm(range(start_iter, t.iter), initial=start_iter, total=t.iter, desc="stage 1", disable=not main,
               dynamic_ncols=True, smoothing=0.01)
    for i in bar:
        real_img, _, real_mask = next(data_iter)
        real_img, real_mask = real_img.to(device), real_mask.to(device)
        losses = {}

        # -- discriminators ------------------------------------------------------------------------
        tu.requires_grad(g, False)
        tu.requires_grad(gd, True)
        tu.requires_grad(sd, True)
        noise = tu.mixing_noise(t.batch, opt.model.style_dim, t.mixing, device)
        cam, focal, near, far, gt_view = camera(opt, t.batch, device, resolution)
        with torch.no_grad():
            fake_img, _, _, fake_seg = split_outputs(g(noise, cam, focal, near, far), False, False)

        fake_pred, fake_view = gd(fake_img, fake_seg)
        img_r = real_img.detach().requires_grad_(True)
        seg_r = real_mask.detach().requires_grad_(True)
        real_pred, _ = gd(img_r, seg_r)
        d_gan = d_logistic_loss(real_pred, fake_pred)
        r1, _, _ = r1_image_and_mask(real_pred, img_r, seg_r, t.r1_img, t.r1_seg)
        d_view = t.view_lambda * viewpoints_loss(fake_view, gt_view) if t.view_lambda > 0 else torch.zeros((), device=device)
        d_loss = d_gan + r1 + d_view
        tu.check_finite({"d_gan": d_gan, "d_r1": r1, "d_view": d_view}, i)
        gd.zero_grad(set_to_none=True)
        d_loss.backward()
        gd_optim.step()

        # Semantic D: one random region per sample; the fake and real masks of that region.
        labels = torch.randint(0, K, (t.batch,), device=device)
        fake_sd_pred, fake_cls = sd(fake_img, pick_channel(fake_seg, labels))
        img_r = real_img.detach().requires_grad_(True)
        mask_r = pick_channel(real_mask, labels).detach().requires_grad_(True)
        real_sd_pred, real_cls = sd(img_r, mask_r)
        sd_gan = d_logistic_loss(real_sd_pred, fake_sd_pred)
        sd_cls = classification_loss(real_cls, labels) + classification_loss(fake_cls, labels)
        sd_r1, _, _ = r1_image_and_mask(real_sd_pred, img_r, mask_r, t.r1_img, t.r1_seg)
        sd_loss = (sd_cls + sd_gan + sd_r1) * t.Semantic_D_lambda
        tu.check_finite({"sd_gan": sd_gan, "sd_cls": sd_cls, "sd_r1": sd_r1, "sd": sd_loss}, i)
        sd.zero_grad(set_to_none=True)
        sd_loss.backward()
        sd_optim.step()
        losses.update(d=d_loss, d_r1=r1, d_view=d_view, sd=sd_loss, sd_cls=sd_cls)

        # -- generator: gradients accumulated over chunks, one step (published: sum of chunk losses) --
        tu.requires_grad(g, True)
        tu.requires_grad(gd, False)
        tu.requires_grad(sd, False)
        g.zero_grad(set_to_none=True)
        want_sdf, want_eik = t.min_surf_lambda > 0, t.eikonal_lambda > 0
        for start in range(0, t.batch, t.chunk):
            n = min(t.chunk, t.batch - start)
            noise = tu.mixing_noise(n, opt.model.style_dim, t.mixing, device)
            cam, focal, near, far, gt_view = camera(opt, n, device, resolution)
            out = g(noise, cam, focal, near, far, return_sdf=want_sdf, return_eikonal=want_eik)
            fake_img, sdf, eikonal_term, fake_seg = split_outputs(out, want_sdf, want_eik)
            fake_pred, fake_view = gd(fake_img, fake_seg)
            g_gan = g_nonsaturating_loss(fake_pred)
            g_view = t.view_lambda * viewpoints_loss(fake_view, gt_view) if t.view_lambda > 0 else torch.zeros((), device=device)
            eik, min_surf = eikonal_loss(eikonal_term, sdf=sdf, beta=t.min_surf_beta)
            eik = torch.as_tensor(eik, device=device)
            labels = torch.randint(0, K, (n,), device=device)
            sd_pred, cls = sd(fake_img, pick_channel(fake_seg, labels))
            g_sem = (classification_loss(cls, labels) + g_nonsaturating_loss(sd_pred)) * t.Semantic_D_lambda
            g_loss = g_gan + g_view + t.eikonal_lambda * eik + t.min_surf_lambda * min_surf + g_sem
            tu.check_finite({"g_gan": g_gan, "g_view": g_view, "g_eikonal": t.eikonal_lambda * eik,
                             "g_min_surf": t.min_surf_lambda * min_surf, "g_semantic": g_sem}, i)
            g_loss.backward()
        g_optim.step()
        tu.accumulate(g_ema, g_module, ema_decay(opt), prefixes=("style.", "renderer."))
        losses.update(g=g_loss, g_view=g_view, eikonal=eik, min_surf=min_surf, g_sem=g_sem)

        shown = dist_utils.reduce_loss_dict(losses, device=device)
        if main:
            bar.set_postfix(d=f"{shown['d']:.3f}", sd=f"{shown['sd']:.3f}", g=f"{shown['g']:.3f}",
                            view=f"{shown['g_view']:.3f}", eik=f"{shown['eikonal']:.3f}")
            logger.log(shown, step=i)
        end_of_iteration(run, i, last, t, lambda path: write_samples(sampler, g_ema, path),
                         lambda rng: {"g": g_module.state_dict(), "gd": gd_module.state_dict(),
                                      "sd": sd_module.state_dict(), "g_ema": g_ema.state_dict(),
                                      "g_optim": g_optim.state_dict(), "gd_optim": gd_optim.state_dict(),
                                      "sd_optim": sd_optim.state_dict(), "iter": i, "seed": seed, "rng": rng,
                                      "opt": tu.plain(opt)})
    bar.close()
    return finish_run(run, opt, g_ema, max(start_iter, t.iter) - 1, f"{opt.experiment.expname}_vol_renderer.pt")


def main(argv=None):
    perf_utils.configure_allocator()  # before the big allocations (issue 6)
    tu.run_training(train, argv)


if __name__ == "__main__":
    main()
