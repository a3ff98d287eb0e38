"""The sample grids both stages write every --sample_every iterations: fixed identities under sweep cameras,
drawn without touching the training RNGs, as images beside their coloured segmentations."""
import numpy as np
import torch

from common import imaging
from common.regions import color_segmap
from rendering.camera import generate_camera_params
from training.randomness import isolated_rng

SAMPLE_VIEWS = 8  # generate_camera_params(sweep=True) gives 8 azimuths per identity



def image_seg_tiles(images, segs, size=None):
    """Per sample: the image beside its coloured segmentation, both at `size` (nearest upscaling)."""
    size = size or max(images.shape[-1], 64)  # tiny test renders stay visible
    colours = color_segmap(segs)  # [B,H,W,3]
    return [np.concatenate([imaging.resize_nearest(imaging.to_uint8(img), size),
                            imaging.resize_nearest(col, size)], 1)
            for img, col in zip(images, colours)]


def save_grid(path, rows, pad=2):
    """Write rows of uint8 [H,W,3] tiles as one PNG (atomically), `pad` white pixels between tiles."""
    imaging.save_image(path, imaging.image_grid(rows, pad))


class Sampler:
    """Fixed identities and sweep cameras for the sample grids, drawn without touching training RNGs."""

    def __init__(self, opt, device, seed, resolution):
        self.opt = opt
        self.device = device
        n = opt.training.val_n_sample
        with isolated_rng(device, seed=seed + 12345):
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
        with isolated_rng(self.device, seed=self.seed + 54321):
            return g_ema.mean_latent(self.opt.inference.truncation_mean, self.device)
