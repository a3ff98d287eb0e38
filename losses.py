"""Losses and regularisers (SPEC §11)."""
import math

import torch
import torch.nn.functional as F
from torch import autograd

from common import draws


def d_logistic_loss(real_pred, fake_pred):
    return F.softplus(-real_pred).mean() + F.softplus(fake_pred).mean()


def g_nonsaturating_loss(fake_pred):
    return F.softplus(-fake_pred).mean()


def d_r1_loss(real_pred, real_inputs):
    """R1 penalties, one per real input: (grad²) summed per sample, averaged over the batch."""
    grads = autograd.grad(outputs=real_pred.sum(), inputs=list(real_inputs), create_graph=True)
    return [g.pow(2).reshape(g.shape[0], -1).sum(1).mean() for g in grads]


def r1_image_and_mask(real_pred, real_img, real_seg, r1_img, r1_seg):
    """The two-input R1 term: r1_img/2 · P_img + r1_seg/2 · P_seg, and both penalties."""
    penalty_img, penalty_seg = d_r1_loss(real_pred, (real_img, real_seg))
    return r1_img * 0.5 * penalty_img + r1_seg * 0.5 * penalty_seg, penalty_img, penalty_seg


def viewpoints_loss(viewpoint_pred, viewpoint_target):
    return F.smooth_l1_loss(viewpoint_pred, viewpoint_target)


def eikonal_loss(eikonal_term, sdf=None, beta=100):
    """(eikonal, minimal surface): ((|∇sdf| - 1)²).mean() and exp(-β |sdf|).mean()."""
    eik = ((eikonal_term.norm(dim=-1) - 1) ** 2).mean() if eikonal_term is not None else 0.0
    if sdf is None:
        device = eikonal_term.device if eikonal_term is not None else None
        return eik, torch.tensor(0.0, device=device)
    return eik, torch.exp(-beta * torch.abs(sdf)).mean()


def mode_seeking_loss(seg, noise):
    """(new, not in the published method) Mode seeking on the rendered masks: minus the mean, over the
    pairs of samples (0, 1), (2, 3), ..., of how far their region maps are apart per unit of latent
    distance, mean |p_a - p_b| / mean |z_a - z_b| (the ratio of mode-seeking GANs, Mao et al. 2019, kept
    linear: the gradient of their inverse form grows as 1/ratio² when the maps coincide, as after a collapse).
    p is the per-pixel softmax of the masks over the regions: the rendered masks are raw and unbounded,
    and on them the term grows by scaling the masks up instead of moving the regions. seg: [B, K, R, R]
    with B even; noise: the list of latent tensors [B, D] that drew them (two with style mixing; both
    count)."""
    z = torch.cat(noise, 1)
    p = seg.softmax(1)
    map_gap = (p[0::2] - p[1::2]).abs().flatten(1).mean(1)
    z_gap = (z[0::2] - z[1::2]).abs().mean(1)
    return -(map_gap / z_gap).mean()


AREA_TEMPERATURE = 0.1  # the rendered masks sit near 0/1: at 1 a softmax gives every region about a ninth


def area_distribution_loss(seg, quantiles, spread):
    """(new, not in the published method) How far a chunk's region areas are from the data's, as a
    distribution: per region, the chunk's areas -- the fraction of pixels each region wins, softly: a softmax
    over the regions of the masks / AREA_TEMPERATURE, averaged over the pixels, so that only moving a region's
    border changes its area, not a faint haze of it everywhere (raw channel means can be matched that way) --
    sorted, against the data's area quantiles at the levels (i + 1/2)/B (a one-dimensional Wasserstein-1
    distance between the chunk and the data), divided by the data's spread of that region, then averaged over
    the regions. A batch of one head for every latent is far from the data's spread however realistic each
    head is, which no per-sample judgement sees.
    seg: [B, K, R, R] raw masks; quantiles: [B, K]; spread: [K] (positive)."""
    area = (seg / AREA_TEMPERATURE).softmax(1).mean((2, 3))
    return ((area.sort(0).values - quantiles).abs().mean(0) / spread).mean()


def classification_loss(logits, labels):
    return F.cross_entropy(logits, labels)


def g_path_regularize(fake_img, latents, mean_path_length, decay=0.01):
    """Path-length penalty w.r.t. the decoder latents; returns (penalty, new running mean, lengths)."""
    noise = draws.current().path_noise(fake_img) / math.sqrt(fake_img.shape[2] * fake_img.shape[3])
    grad, = autograd.grad(outputs=(fake_img * noise).sum(), inputs=latents, create_graph=True)
    path_lengths = torch.sqrt(grad.pow(2).sum(2).mean(1))
    path_mean = mean_path_length + decay * (path_lengths.mean() - mean_path_length)
    path_penalty = (path_lengths - path_mean).pow(2).mean()
    return path_penalty, path_mean.detach(), path_lengths
