#!/usr/bin/env python
"""Bring a portrait into the model: fit the 18 region codes, the global style and the camera.

  python invert.py --trained_ckpt CKPT --image face.png [--mask face_mask.png|.npy] [--steps 200] \
      [--vgg_weights vgg16.pt] [--out_dir DIR]

Starting from the renderer mean latent and a frontal camera, Adam optimises the per-region codes
[1,18,D], the global style [1,D] and the camera's (azimuth, elevation) so that the high-resolution
output matches the image (pixel L2 by default, --pixel_loss l1), plus, when --mask is given (a
CelebAMask-HQ 19-class label map, PNG or .npy, merged into the 9 regions), the squared error of the
rendered high-resolution seg against the one-hot regions. A perceptual loss is used only with
--vgg_weights: a local torchvision VGG16 state dict (tensors-only); nothing is downloaded. LPIPS is
not supported (its learnt linear heads are a separate model), so --lpips_weights is refused.

The codes are rendered as inference renders latent files (truncation ψ applied on top, the
renderer at --inference_samples samples per ray, 64 by default as published), so the saved file
reproduces the reconstruction in edit_semantics.py and inference_Full.py --latents (at the same ψ
and sample count).
Writes into --out_dir (default <results_dir>/invert):
  <name>_inversion.png   row 1: target | reconstruction | novel views; row 2: their segs
                         (the target's mask when given, else black)
  <name>_latents.pt      codes, global style and fitted camera (azimuth, elevation)
"""
import os

import numpy as np

from common import imaging
from common.checkpoint import load_checkpoint
from common.cli import UsageError, command
from common.regions import color_segmap
from editing import manipulation
from editing.manipulation import load_image, load_mask
from evaluation import metrics
from options import check_ranges
from rendering import loading as gen
from rendering.inference import render_views
from rendering.latents import mean_latent, save_latents


def add_arguments(group):
    group.add_argument("--image", type=str, default="", help="the portrait to invert (any format PIL reads)")
    group.add_argument("--mask", type=str, default="", help="its 19-class label map (PNG or .npy), optional")
    group.add_argument("--steps", type=int, default=200, help="Adam steps")
    group.add_argument("--invert_lr", type=float, default=0.03, help="learning rate of the codes and global style")
    group.add_argument("--camera_lr", type=float, default=0.01, help="learning rate of azimuth/elevation")
    group.add_argument("--pixel_loss", type=str, default="l2", help="l1 | l2")
    group.add_argument("--mask_weight", type=float, default=1.0, help="weight of the mask loss")
    group.add_argument("--vgg_weights", type=str, default="", help="local torchvision VGG16 state dict (perceptual loss)")
    group.add_argument("--perceptual_weight", type=float, default=1.0, help="weight of the perceptual loss")
    group.add_argument("--lpips_weights", type=str, default="", help="not supported (refused); use --vgg_weights")
    group.add_argument("--n_views", type=int, default=5,
                       help="novel views: N of the azimuth sweep (0: the inference script's views)")
    group.add_argument("--out_dir", type=str, default="", help="output folder (default <results_dir>/invert)")
    group.add_argument("--inference_samples", type=int, default=gen.INFERENCE_SAMPLES,
                       help="samples per ray of the renderer (published inference: 64), as inference_Full.py")
    group.add_argument("--name", type=str, default="", help="output name prefix (default: the image's name)")


def load_perceptual(path, device):
    state = load_checkpoint(path)
    try:
        return manipulation.PerceptualLoss(state).to(device)
    except UsageError as error:  # a state dict that is not VGG16's
        raise UsageError(f"{path}: {error}") from None


def output_dir(opt, own):
    return (own.out_dir or os.path.join(opt.inference.results_dir, "invert")), "--out_dir"


@command
def main(argv=None):
    opt, own = gen.parse_options(argv, add_arguments, "inversion", output_dir)
    size = opt.model.size
    if own.lpips_weights:
        raise UsageError("--lpips_weights is not supported (LPIPS's learnt heads are not implemented); "
                         "use --vgg_weights with a local torchvision VGG16 state dict")
    if own.pixel_loss not in ("l1", "l2"):
        raise UsageError(f"--pixel_loss {own.pixel_loss!r} is not one of l1, l2")
    check_ranges({"--steps": (own.steps, ">= 1"), "--n_views": (own.n_views, ">= 0")})
    if not own.image:
        raise UsageError("no --image given")
    target = load_image(own.image, size)
    regions = load_mask(own.mask, size) if own.mask else None
    device, generator = gen.load_for_editing(opt, own.inference_samples)
    perceptual = load_perceptual(own.vgg_weights, device) if own.vgg_weights else None

    psi = opt.inference.truncation_ratio
    mean = mean_latent(generator, opt.inference.truncation_mean)  # fixed seed, as inference_Full.py
    dtype = mean[0].dtype
    target = target.to(device=device, dtype=dtype)
    target_seg = None
    if regions is not None:
        target_seg = manipulation.one_hot_regions(regions, generator.n_render).to(device=device, dtype=dtype)
    result = manipulation.invert(generator, target, mean, psi, opt.camera, target_seg=target_seg, steps=own.steps,
                                 lr=own.invert_lr, camera_lr=own.camera_lr, pixel_loss=own.pixel_loss,
                                 mask_weight=own.mask_weight, perceptual=perceptual,
                                 perceptual_weight=own.perceptual_weight)
    locations = manipulation.edit_locations(opt, own.n_views, device)
    views, view_segs = render_views(generator, result["codes"], result["styles_global"], locations, opt, mean,
                                    psi=psi)

    target_seg_image = (color_segmap(target_seg[0]) if target_seg is not None
                        else np.zeros((size, size, 3), dtype=np.uint8))
    rgb_row = [imaging.to_uint8(target[0]), imaging.to_uint8(result["rgb"][0])] + list(imaging.to_uint8(views))
    seg_row = [target_seg_image, color_segmap(result["seg"][0])] + list(color_segmap(view_segs))
    name = own.name or os.path.splitext(os.path.basename(own.image))[0]
    out_dir = output_dir(opt, own)[0]
    image_path = os.path.join(out_dir, f"{name}_inversion.png")
    latent_path = os.path.join(out_dir, f"{name}_latents.pt")
    imaging.save_image(image_path, imaging.image_grid([rgb_row, seg_row]))
    azim, elev = result["camera"][0].tolist()
    save_latents(latent_path, result["codes"], result["styles_global"], truncated=True, camera=result["camera"],
                 note=f"invert {own.image}: {own.steps} steps, psi {psi}, camera azim {azim:.4f} elev {elev:.4f}")
    print(f"loss {result['losses'][0]:.5f} -> {result['losses'][-1]:.5f}; "
          f"PSNR {metrics.psnr(result['rgb'], target):.2f} dB; camera azim {azim:.4f} elev {elev:.4f}")
    print(image_path)
    print(latent_path)


if __name__ == "__main__":
    main()
