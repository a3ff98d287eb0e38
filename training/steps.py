"""The training step of both stages (SPEC §12-13) as phase functions, shared by the training scripts
and the training-step conformance check.

Each phase does what the published `train()` does up to and including one optimiser step, in the
published order (draws, chunk slices, sums over chunks), and returns its record: the published
names of the loop's local variables (losses, predictions, a few activations), detached, so that a
loop can log them and tools/check_training_conformance.py can compare them with the recorded run.
Every random draw goes through `draws.current()`.

Stage 1 (`stage1_iteration`): global D (`d_loss`), semantic D (`sd_loss`), generator (`g_loss`, one
record per chunk); `sphere_init_step` is one step of the sphere initialisation. Stage 2
(`stage2_iteration`): D with lazy R1 (`d_loss` per chunk), generator (`g_loss` per chunk), every
g_reg_every iterations path-length regularisation (`weighted_path_loss`). The EMA update stays in the
loops (params.accumulate with `STAGE1_EMA` / `STAGE2_TRAINED` and params.ema_decay).
"""
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import distributed as dist_utils
from common import draws, precision
from common.regions import NUM_REGIONS, label19_to_regions
from evaluation.metrics import area_fractions
from losses import (
    area_distribution_loss,
    classification_loss,
    d_logistic_loss,
    eikonal_loss,
    g_nonsaturating_loss,
    g_path_regularize,
    mode_seeking_loss,
    r1_image_and_mask,
    viewpoints_loss,
)
from model import ComponentDualBranchDiscriminator, Discriminator, Generator, VolumeRenderDiscriminator
from options import model_options
from training import loop, params

STAGE1_EMA = ("style.", "renderer.")  # every stage-1 generator parameter
STAGE2_TRAINED = ("decoder.", "feature_transfer.")  # the only parameters stage 2 optimises


def build_stage1(opt, device):
    """(g, g_ema, gd, sd): the stage-1 generator (no decoder), its EMA copy, the global and semantic D."""
    model_opt, renderer_opt = model_options(opt)
    g = Generator(model_opt, renderer_opt, full_pipeline=False).to(device)
    g_ema = Generator(model_opt, renderer_opt, ema=True, full_pipeline=False).to(device)
    gd = VolumeRenderDiscriminator(model_opt).to(device)
    sd = ComponentDualBranchDiscriminator(model_opt).to(device)
    g_ema.eval()
    params.requires_grad(g_ema, False)
    return g, g_ema, gd, sd


def stage1_optimizers(opt, g, gd, sd):
    """(g_optim, gd_optim, sd_optim): Adam, betas (0, 0.9), lr --vol_g_lr / --vol_d_lr (published 2e-5 / 2e-4)."""
    t = opt.training
    return (torch.optim.Adam(g.parameters(), lr=t.vol_g_lr, betas=(0.0, 0.9)),
            torch.optim.Adam(gd.parameters(), lr=t.vol_d_lr, betas=(0.0, 0.9)),
            torch.optim.Adam(sd.parameters(), lr=t.vol_d_lr, betas=(0.0, 0.9)))


def build_stage2(opt, device):
    """(g, g_ema, d): the full generator with its renderer frozen (weights still to load), its EMA copy,
    the stage-2 discriminator."""
    model_opt, renderer_opt = model_options(opt)
    g = Generator(model_opt, renderer_opt, full_pipeline=True).to(device)
    g_ema = Generator(model_opt, renderer_opt, ema=True, full_pipeline=True).to(device)
    d = Discriminator(model_opt).to(device)
    g_ema.eval()
    params.requires_grad(g_ema, False)
    g.freeze_renderer()
    return g, g_ema, d


def stage2_optimizers(opt, g, d):
    """(g_optim over the decoder and feature transfer, d_optim); lazy regularisation rescales Adam's
    hyper-parameters (StyleGAN2): lr·r, betas (0, 0.99^r), r = every / (every + 1)."""
    t = opt.training
    g_ratio = t.g_reg_every / (t.g_reg_every + 1)
    d_ratio = t.d_reg_every / (t.d_reg_every + 1)
    return (torch.optim.Adam(trained_parameters(g), lr=t.lr * g_ratio, betas=(0.0, 0.99 ** g_ratio)),
            torch.optim.Adam(d.parameters(), lr=t.lr * d_ratio, betas=(0.0, 0.99 ** d_ratio)))


def _check_finite(m, losses, i):
    """The non-finite loss check of a phase: handed to the loop's FiniteGuard (m.guard, checked once per
    iteration or every --sync_every) when there is one, else at once (the conformance check, tests)."""
    guard = m.get("guard")
    if guard is not None:
        guard.watch(losses, i)
    else:
        loop.check_finite(losses, i)


def _record(**values):
    return {k: v.detach() if torch.is_tensor(v) else v for k, v in values.items()}


def penalised_real_pass(discriminator, img, seg):
    """discriminator(img, seg) on real inputs whose gradients the R1 penalty takes: in fp32 under
    --precision bf16 (common/precision.py: a bf16 pass gets the mask penalty 14-19 % low), the same call in fp32."""
    with precision.full_precision():
        return discriminator(img, seg)


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


def chunks(batch, chunk):
    """(start, size) of each generator chunk of a batch."""
    return [(start, min(chunk, batch - start)) for start in range(0, batch, chunk)]


def _view_loss(t, pred, target):
    if t.view_lambda > 0:
        return t.view_lambda * viewpoints_loss(pred, target)
    # The published code fails with --view_lambda 0 (SPEC §17); D then has no viewpoint head.
    return torch.zeros((), device=target.device)


# ------------------------------------------------------------------------------------------- stage 1


AREA_MAPS = 2000  # label maps --area_lambda reads at most (evenly spaced): quantiles of a chunk need no more
AREA_SPREAD_FLOOR = 0.005  # a region the data hardly varies (or lacks) does not get an unbounded weight


def area_target(dataset, n, device, max_maps=AREA_MAPS, progress=True):
    """(new, --area_lambda) What area_distribution_loss compares a generator chunk of n with: the fraction of
    each label map's pixels in each region (common.regions, undilated, as the diversity metric counts them) at
    the quantile levels (i + 1/2)/n, [n, K], and each region's standard deviation over the maps, floored at
    AREA_SPREAD_FLOOR, [K]; from up to max_maps label maps, evenly spaced (flips do not change areas)."""
    picked = np.unique(np.linspace(0, len(dataset) - 1, min(len(dataset), max_maps)).round().astype(np.int64))
    maps = [label19_to_regions(dataset.load(int(index))[1]) for index in
            tqdm(picked, desc="region areas of the label maps", disable=not progress, leave=False)]
    areas = area_fractions(np.stack(maps), NUM_REGIONS).numpy()
    quantiles = np.quantile(areas, (np.arange(n) + 0.5) / n, axis=0)
    spread = np.maximum(areas.std(0), AREA_SPREAD_FLOOR)
    return (torch.as_tensor(quantiles, dtype=torch.float32, device=device),
            torch.as_tensor(spread, dtype=torch.float32, device=device))


def sphere_init_step(m, opt, step):
    """One sphere-initialisation step (SPEC §7) with the generator's GAN optimiser m.g_optim, as published:
    its Adam state (step counts, moments of the mapping and the initial SDF network) carries into GAN
    training."""
    rand = draws.current()
    t = opt.training
    noise = rand.mixing_noise(t.batch, opt.model.style_dim, t.mixing, m.device)
    cam, focal, near, far, _ = rand.camera(opt.camera, t.batch, m.device, m.resolution)
    sdf, target = m.g_module.init_forward(noise, cam, focal, near, far)
    loss = F.l1_loss(sdf, target)
    _check_finite(m, {"sphere_init_l1": loss}, step)
    loss.backward()
    m.g_optim.step()
    m.g_optim.zero_grad(set_to_none=True)  # no stale gradient may reach the first GAN step
    return _record(loss=loss, sdf=sdf, target_values=target)


def global_d_phase(m, opt, real_img, real_mask, i):
    """Global D: fakes generated chunk by chunk from one batch of draws; logistic + R1 + viewpoint; one step."""
    rand = draws.current()
    t = opt.training
    params.requires_grad(m.g, False)
    params.requires_grad(m.gd, True)
    params.requires_grad(m.sd, False)
    m.gd.zero_grad(set_to_none=True)
    noise = rand.mixing_noise(t.batch, opt.model.style_dim, t.mixing, m.device)
    cam, focal, near, far, gt_view = rand.camera(opt.camera, t.batch, m.device, m.resolution)
    gen_imgs, gen_segs = [], []
    with torch.no_grad():
        for start, n in chunks(t.batch, t.chunk):
            part = slice(start, start + n)
            out = m.g([z[part] for z in noise], cam[part], focal[part], near[part], far[part])
            gen_imgs.append(out[1])
            gen_segs.append(out[-1])
    gen_imgs, gen_segs = torch.cat(gen_imgs, 0), torch.cat(gen_segs, 0)

    fake_pred, fake_view = m.gd(gen_imgs, gen_segs)
    d_view = _view_loss(t, fake_view, gt_view)
    img_r = real_img.detach().requires_grad_(True)
    seg_r = real_mask.detach().requires_grad_(True)
    real_pred, _ = penalised_real_pass(m.gd, img_r, seg_r)
    d_gan = d_logistic_loss(real_pred, fake_pred)
    r1, penalty_img, penalty_seg = r1_image_and_mask(real_pred, img_r, seg_r, t.r1_img, t.r1_seg)
    d_loss = d_gan + r1 + d_view
    _check_finite(m, {"d_gan": d_gan, "d_r1": r1, "d_view": d_view}, i)
    d_loss.backward()
    m.gd_optim.step()
    return _record(d_gan_loss=d_gan, grad_penalty_img=penalty_img, grad_penalty_seg=penalty_seg, r1_loss=r1,
                   d_view_loss=d_view, d_loss=d_loss, real_pred=real_pred, fake_pred=fake_pred,
                   fake_viewpoint_pred=fake_view, gen_imgs=gen_imgs, gen_segs=gen_segs)


def semantic_d_phase(m, opt, real_img, real_mask, gen_imgs, gen_segs, i):
    """Semantic D on the global D's fakes: one random region per sample, that channel of the fake and
    the real mask; (CE(real) + CE(fake) + logistic + R1) · Semantic_D_lambda; one step."""
    t = opt.training
    params.requires_grad(m.gd, False)
    params.requires_grad(m.sd, True)
    m.sd.zero_grad(set_to_none=True)
    labels = draws.current().labels(m.g_module.n_render, gen_imgs.shape[0], m.device)
    fake_component = pick_channel(gen_segs, labels)
    img_r = real_img.detach().requires_grad_(True)
    mask_r = pick_channel(real_mask, labels).detach().requires_grad_(True)
    real_part, real_class = penalised_real_pass(m.sd, img_r, mask_r)
    fake_part, fake_class = m.sd(gen_imgs, fake_component)
    class_loss = classification_loss(real_class, labels) + classification_loss(fake_class, labels)
    gan_loss = d_logistic_loss(real_part, fake_part)
    r1, penalty_img, penalty_seg = r1_image_and_mask(real_part, img_r, mask_r, t.r1_img, t.r1_seg)
    sd_loss = (class_loss + gan_loss + r1) * t.Semantic_D_lambda
    _check_finite(m, {"sd_gan": gan_loss, "sd_cls": class_loss, "sd_r1": r1, "sd": sd_loss}, i)
    sd_loss.backward()
    m.sd_optim.step()
    return _record(s_d_class_loss=class_loss, s_d_gan_loss=gan_loss, s_r1_img_loss=penalty_img,
                   s_r1_seg_loss=penalty_seg, s_r1_loss=r1, sd_loss=sd_loss, real_part_pred=real_part,
                   fake_part_pred=fake_part, real_class_pred=real_class, fake_class_pred=fake_class,
                   semantic_label=labels, fake_seg_component=fake_component, real_mask_component=mask_r)


def stage1_g_phase(m, opt, i):
    """Generator: per chunk fresh draws, both discriminators, eikonal and minimal-surface terms;
    gradients summed over chunks, one step. One record per chunk."""
    rand = draws.current()
    t = opt.training
    params.requires_grad(m.g, True)
    params.requires_grad(m.gd, False)
    params.requires_grad(m.sd, False)
    want_sdf, want_eik = t.min_surf_lambda > 0, t.eikonal_lambda > 0
    records = []
    for _ in range(0, t.batch, t.chunk):
        n = t.chunk  # published: every generator chunk has --chunk samples, also when it does not divide --batch
        noise = rand.mixing_noise(n, opt.model.style_dim, t.mixing, m.device)
        cam, focal, near, far, gt_view = rand.camera(opt.camera, n, m.device, m.resolution)
        # Samples that share a camera differ by identity only: the whole chunk for the area term (its areas must
        # not spread by pose), each pair for the mode-seeking term.
        shared = n if t.area_lambda > 0 else 2 if t.diversity_lambda > 0 else 1
        if shared > 1:
            cam, focal, near, far, gt_view = (x[0::shared].repeat_interleave(shared, 0)
                                              for x in (cam, focal, near, far, gt_view))
        out = m.g(noise, cam, focal, near, far, return_sdf=want_sdf, return_eikonal=want_eik)
        fake_img, sdf, eikonal_term, fake_seg = split_outputs(out, want_sdf, want_eik)
        fake_pred, fake_view = m.gd(fake_img, fake_seg)
        g_gan = g_nonsaturating_loss(fake_pred)
        g_view = _view_loss(t, fake_view, gt_view)
        eik, min_surf = eikonal_loss(eikonal_term, sdf=sdf, beta=t.min_surf_beta)
        g_eikonal = t.eikonal_lambda * torch.as_tensor(eik, device=m.device)
        g_min_surf = t.min_surf_lambda * min_surf if want_sdf else min_surf
        labels = rand.labels(m.g_module.n_render, n, m.device)
        fake_component = pick_channel(fake_seg, labels)
        part_pred, class_pred = m.sd(fake_img, fake_component)
        g_class = classification_loss(class_pred, labels)
        g_gan_semantic = g_nonsaturating_loss(part_pred)
        g_loss = g_gan + g_view + g_eikonal + g_min_surf + (g_class + g_gan_semantic) * t.Semantic_D_lambda
        extra = {}
        if t.diversity_lambda > 0:
            extra["g_diversity"] = t.diversity_lambda * mode_seeking_loss(fake_seg, noise)
            g_loss = g_loss + extra["g_diversity"]
        if t.area_lambda > 0:
            extra["g_area"] = t.area_lambda * area_distribution_loss(fake_seg, *m.area_target)
            g_loss = g_loss + extra["g_area"]
        _check_finite(m, {"g_gan": g_gan, "g_view": g_view, "g_eikonal": g_eikonal, "g_min_surf": g_min_surf,
                          "g_semantic": g_class + g_gan_semantic, **extra}, i)
        g_loss.backward()
        records.append(_record(g_gan_loss=g_gan, g_view_loss=g_view, g_eikonal=g_eikonal,
                               g_minimal_surface=g_min_surf, g_class_loss=g_class,
                               g_gan_semantic_loss=g_gan_semantic, g_loss=g_loss, fake_pred=fake_pred,
                               fake_viewpoint_pred=fake_view, fake_part_pred=part_pred,
                               fake_class_pred=class_pred, semantic_label=labels, fake_img=fake_img,
                               fake_seg=fake_seg, sdf=sdf, eikonal_term=eikonal_term, **extra))
    m.g_optim.step()
    m.g.zero_grad(set_to_none=True)
    return records


def stage1_iteration(m, opt, real_img, real_mask, i):
    """One stage-1 iteration before the EMA update: [(phase name, record), ...] in published order."""
    d = global_d_phase(m, opt, real_img, real_mask, i)
    sd = semantic_d_phase(m, opt, real_img, real_mask, d["gen_imgs"], d["gen_segs"], i)
    return [("d_loss", d), ("sd_loss", sd)] + [("g_loss", g) for g in stage1_g_phase(m, opt, i)]


# ------------------------------------------------------------------------------------------- stage 2


def set_trainable(g, flag):
    """requires_grad of the parameters stage 2 trains (decoder, feature transfer); the renderer stays frozen."""
    for p in trained_parameters(g):
        p.requires_grad = flag


def trained_parameters(g):
    return [p for name, p in g.named_parameters() if name.startswith(STAGE2_TRAINED)]


def stage2_d_phase(m, opt, real_img, real_mask, i):
    """D: per chunk, fakes from that slice of one batch of draws, logistic loss, and at every
    d_reg_every-th iteration lazy R1 (× d_reg_every) on the same real prediction, added to the same
    loss; gradients summed over chunks, ONE optimiser step (SPEC §13, as published)."""
    rand = draws.current()
    t = opt.training
    regularize = i % t.d_reg_every == 0
    set_trainable(m.g_module, False)
    params.requires_grad(m.d, True)
    m.d.zero_grad(set_to_none=True)
    noise = rand.mixing_noise(t.batch, opt.model.style_dim, t.mixing, m.device)
    cam, focal, near, far, _ = rand.camera(opt.camera, t.batch, m.device, m.resolution)
    records = []
    for start, n in chunks(t.batch, t.chunk):
        part = slice(start, start + n)
        with torch.no_grad():
            (gen_imgs, gen_segs), _, _ = m.g([z[part] for z in noise], cam[part], focal[part], near[part], far[part])
        fake_pred = m.d(gen_imgs, gen_segs)
        img_r, seg_r = real_img[part].detach(), real_mask[part].detach()
        if regularize:
            img_r.requires_grad_(True)
            seg_r.requires_grad_(True)
        real_pred = penalised_real_pass(m.d, img_r, seg_r) if regularize else m.d(img_r, seg_r)
        d_gan = d_logistic_loss(real_pred, fake_pred)
        values = {}
        if regularize:
            # SPEC §13 names no stage-2 weights: the published script uses the stage-1 pair
            # (--r1_img on the image, --r1_seg on the mask), times d_reg_every.
            r1, penalty_img, penalty_seg = r1_image_and_mask(real_pred, img_r, seg_r, t.r1_img, t.r1_seg)
            r1 = r1 * t.d_reg_every
            values.update(grad_penalty_img=penalty_img, grad_penalty_seg=penalty_seg)
        else:
            r1 = torch.zeros((), device=m.device)
        d_loss = d_gan + r1
        _check_finite(m, {"d": d_gan, "r1": r1}, i)
        d_loss.backward()
        records.append(_record(d_gan_loss=d_gan, r1_loss=r1, d_loss=d_loss, real_pred=real_pred,
                               fake_pred=fake_pred, gen_imgs=gen_imgs, gen_segs=gen_segs, **values))
    m.d_optim.step()
    return records


def stage2_g_phase(m, opt, i):
    """Generator (decoder + feature transfer): per chunk fresh draws, non-saturating loss; one step."""
    rand = draws.current()
    t = opt.training
    set_trainable(m.g_module, True)
    params.requires_grad(m.d, False)
    records = []
    for _ in range(0, t.batch, t.chunk):
        n = t.chunk  # published: every generator chunk has --chunk samples, also when it does not divide --batch
        noise = rand.mixing_noise(n, opt.model.style_dim, t.mixing, m.device)
        cam, focal, near, far, _ = rand.camera(opt.camera, n, m.device, m.resolution)
        (fake_img, fake_seg), _, _ = m.g(noise, cam, focal, near, far)
        fake_pred = m.d(fake_img, fake_seg)
        g_loss = g_nonsaturating_loss(fake_pred)
        _check_finite(m, {"g": g_loss}, i)
        g_loss.backward()
        records.append(_record(g_gan_loss=g_loss, g_loss=g_loss, fake_pred=fake_pred, fake_img=fake_img,
                               fake_seg=fake_seg))
    m.g_optim.step()
    m.g.zero_grad(set_to_none=True)
    return records


def stage2_path_phase(m, opt, mean_path_length, i):
    """Path-length regularisation on batch / path_batch_shrink samples, weighted path_regularize ·
    g_reg_every; one optimiser step. Returns (records, new running mean).

    As published, the pass over the path batch repeats once per --chunk step of it (the whole path
    batch each time, fresh projection noise, the running mean updated each time, gradients summed):
    one pass whenever --chunk ≥ batch / path_batch_shrink, as in the published recipes.
    """
    rand = draws.current()
    t = opt.training
    path_batch = max(1, t.batch // t.path_batch_shrink)
    noise = rand.mixing_noise(path_batch, opt.model.style_dim, t.mixing, m.device)
    cam, focal, near, far, _ = rand.camera(opt.camera, path_batch, m.device, m.resolution)
    records = []
    mean_path = mean_path_length
    for _ in range(0, path_batch, t.chunk):
        # On the unwrapped generator: DDP's output wrapper cuts the graph between its outputs (image
        # and latents), so gradients are averaged across ranks by hand below.
        fake_img, fake_seg, latents = m.g_module(noise, cam, focal, near, far, return_latents=True)
        path_loss, mean_path, path_lengths = g_path_regularize(fake_img, latents, mean_path)
        weighted = t.path_regularize * t.g_reg_every * path_loss
        _check_finite(m, {"path_length": path_loss}, i)
        # The zero terms keep both outputs in the graph, so that every decoder parameter gets a (zero)
        # gradient and Adam counts it, as published.
        (weighted + 0 * fake_img[0, 0, 0, 0] + 0 * fake_seg[0, 0, 0, 0]).backward()
        records.append(_record(path_loss=path_loss, path_lengths=path_lengths, mean_path_length=mean_path,
                               weighted_path_loss=weighted, path_fake_img=fake_img, path_fake_seg=fake_seg,
                               path_latents=latents))
    dist_utils.average_gradients(trained_parameters(m.g_module))
    m.g_optim.step()
    m.g.zero_grad(set_to_none=True)
    # The running mean is kept identical on every rank.
    mean_path_length = float(dist_utils.reduce_sum(mean_path.detach().reshape(1))) / dist_utils.get_world_size()
    return records, mean_path_length


def stage2_iteration(m, opt, real_img, real_mask, mean_path_length, i):
    """One stage-2 iteration before the EMA update: ([(phase name, record), ...], running path mean)."""
    records = [("d_loss", r) for r in stage2_d_phase(m, opt, real_img, real_mask, i)]
    records += [("g_loss", r) for r in stage2_g_phase(m, opt, i)]
    if i % opt.training.g_reg_every == 0:
        path_records, mean_path_length = stage2_path_phase(m, opt, mean_path_length, i)
        records += [("weighted_path_loss", r) for r in path_records]
    return records, mean_path_length
