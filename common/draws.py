"""Every random draw of a training step, through one small replaceable object.

A training iteration draws latent codes (`mixing_noise`), cameras, semantic labels, and, inside the
generator, the per-region style-mixing choices, the decoder's style-mixing crossover, the renderer's
sample jitter and the decoder's noise; stage 2 also draws the path-length noise. All of them go
through `current()`. Normally that is `Draws`, which makes exactly the calls the code made before
this object existed (same functions, same order, same RNG streams), so runs and their resumption
are unchanged. The training-step conformance check (tools/check_training_conformance.py) installs
an object with the same methods that returns recorded draws instead (`using`).
"""
import contextlib
import random

import numpy as np
import torch


def seed_everything(seed=None, rank=0):
    """Seed Python, NumPy and torch (all devices) with seed + rank (ranks get different streams);
    without a seed, draw one. Returns the seed, so that a run can be repeated."""
    if seed is None:
        seed = random.SystemRandom().randrange(2 ** 31)
    seed = int(seed) + int(rank)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    return seed


class Draws:
    """The global RNGs (Python's `random` and torch's default generators)."""

    def mixing_noise(self, batch, latent_dim, prob, device):
        """One z [B,D], or two (style mixing) with probability `prob`."""
        if prob > 0 and random.random() < prob:
            return list(torch.randn(2, batch, latent_dim, device=device).unbind(0))
        return [torch.randn(batch, latent_dim, device=device)]

    def camera(self, camera_opt, batch, device, resolution):
        """(extrinsics, focal, near, far, viewpoint) of `batch` random cameras (SPEC §3)."""
        from rendering.camera import generate_camera_params  # camera.py draws its ray jitter through this module

        c = camera_opt
        return generate_camera_params(resolution, device, batch=batch, uniform=c.uniform, azim_range=c.azim,
                                      elev_range=c.elev, fov_ang=c.fov, dist_radius=c.dist_radius)

    def labels(self, n_regions, batch, device):
        """One random region label per sample (the semantic discriminator's class)."""
        return torch.randint(0, n_regions, (batch,), device=device)

    def region_mix(self, batch, n_regions, device):
        """Per sample and region: 0 → (shape, texture) = (w1,w1), 1 → (w1,w2), 2 → (w2,w2); [B,K]."""
        return torch.randint(0, 3, (batch, n_regions), device=device)

    def inject_index(self, n_latent):
        """The decoder's style-mixing crossover layer."""
        return random.randint(1, n_latent - 1)

    def ray_jitter(self, shape, dtype, device):
        """Uniform sample jitter u (one per ray for offset sampling, one per sample for stratified).

        The reference renderer asks chunk by chunk, in ray order; the fast one once per call.
        """
        return torch.rand(shape, device=device, dtype=dtype)

    def decoder_noise(self, image):
        """The decoder's per-layer noise [B,1,H,W] for `image` [B,C,H,W] (randomize_noise)."""
        batch, _, height, width = image.shape
        return image.new_empty(batch, 1, height, width).normal_()

    def path_noise(self, image):
        """N(0,1) like `image`, the path-length regulariser's projection (before / sqrt(H·W))."""
        return torch.randn_like(image)


_DEFAULT = Draws()
_current = _DEFAULT


def current():
    """The draws object the training step and the generator use now."""
    return _current


@contextlib.contextmanager
def using(draws):
    """Run a block with `draws` in place of the global RNGs (restored afterwards)."""
    global _current
    previous, _current = _current, draws
    try:
        yield draws
    finally:
        _current = previous
