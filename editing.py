"""Semantic manipulation and inversion: the logic shared by edit_semantics.py, invert.py and
tools/measure_editing.py.

Codes are the generator's per-region codes [N, 2K, D] (already mapped and truncated once, as the
inference script builds them by hand): code 2k is region k's shape code, 2k+1 its texture code.
They are rendered like inference_Full.py renders them: `input_is_latent`, truncation ψ towards the
renderer mean (a second time, as the published script does), the global style `styles_global` for
the decoder, fixed decoder noise. Editing only ever changes codes, so everything not edited renders
exactly as before.
"""
import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from camera import generate_camera_params, sweep_locations
from regions import NUM_REGIONS

ATTRIBUTES = ("shape", "texture", "both")


# ------------------------------------------------------------------------------------ code slots


def region_slots(regions, attribute="both", n_regions=NUM_REGIONS):
    """Indices into the 2K codes for `regions` (indices) and attribute 'shape' | 'texture' | 'both'."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; valid: {', '.join(ATTRIBUTES)}")
    slots = []
    for k in regions:
        if not 0 <= int(k) < n_regions:
            raise ValueError(f"region index {k} out of range 0..{n_regions - 1}")
        if attribute in ("shape", "both"):
            slots.append(2 * int(k))
        if attribute in ("texture", "both"):
            slots.append(2 * int(k) + 1)
    return sorted(slots)


def slot_mask(codes, regions, attribute):
    """Boolean [2K] mask of the slots an edit touches, on the codes' device."""
    mask = torch.zeros(codes.shape[1], dtype=torch.bool, device=codes.device)
    mask[region_slots(regions, attribute, codes.shape[1] // 2)] = True
    return mask


def _check_pair(source, reference):
    if source.ndim != 3 or source.shape[1] % 2:
        raise ValueError(f"codes must be [N, 2K, D], got {tuple(source.shape)}")
    if source.shape[1:] != reference.shape[1:]:
        raise ValueError(f"source codes {tuple(source.shape)} and reference codes {tuple(reference.shape)} differ")
    if reference.shape[0] not in (1, source.shape[0]):
        raise ValueError(f"reference batch {reference.shape[0]} must be 1 or the source's {source.shape[0]}")


def swap_region_codes(source, reference, regions, attribute="both"):
    """Source codes with the chosen regions' shape and/or texture codes taken from `reference`.

    source, reference: [N, 2K, D] (reference may have N = 1). Returns a new tensor; every slot not
    chosen is the source's, bit for bit.
    """
    _check_pair(source, reference)
    mask = slot_mask(source, regions, attribute).view(1, -1, 1)
    return torch.where(mask, reference.to(source.dtype).expand_as(source), source)


def interpolate_codes(source, reference, regions, attribute="both", steps=5):
    """The chosen slots moving linearly from source (t=0) to reference (t=1) in `steps` steps.

    Returns [steps, N, 2K, D]; step 0 is the source and the last step the full swap.
    """
    _check_pair(source, reference)
    if steps < 2:
        raise ValueError(f"--interpolate needs at least 2 steps, got {steps}")
    mask = slot_mask(source, regions, attribute).view(1, -1, 1)
    reference = reference.to(source.dtype).expand_as(source)
    out = []
    for t in torch.linspace(0, 1, steps).tolist():
        # t = 0 and t = 1 are exact copies, not lerp results (which could differ in the last bit).
        blended = source if t == 0 else reference if t == 1 else torch.lerp(source, reference, t)
        out.append(torch.where(mask, blended, source))
    return torch.stack(out)


# -------------------------------------------------------------------------------- seeds and codes


def truncate(w, mean_w, truncation):
    """mean_w + ψ (w - mean_w): the renderer-space truncation of SPEC §6."""
    if truncation >= 1:
        return w
    return mean_w + truncation * (w - mean_w)


def z_from_seed(seed, style_dim, device, dtype=torch.float32):
    """z ~ N(0, I) drawn on the CPU from `seed`, so a seed means the same identity on every device."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(1, style_dim, generator=gen).to(device=device, dtype=dtype)


@torch.no_grad()
def latents_from_z(generator, z, mean_w, truncation):
    """z [N, D] → (codes [N, 2K, D], styles_global [N, D]): w = style(z), truncated with ψ towards the
    renderer mean, repeated for every region's shape and texture; the global style is the same w."""
    w = truncate(generator.map_styles(z), mean_w, truncation)
    return w.unsqueeze(1).repeat(1, generator.n_latent, 1), w


def latents_from_seeds(generator, seeds, mean_w, truncation, device):
    z = torch.cat([z_from_seed(s, generator.style_dim, device, mean_w.dtype) for s in seeds])
    return latents_from_z(generator, z, mean_w, truncation)


@torch.no_grad()
def resample_codes(generator, source, regions, attribute, k, mean_w, truncation, seed=0):
    """K copies of `source` [1, 2K, D] whose chosen slots hold fresh codes (one new w per sample,
    truncated like any identity's, used for each chosen region's shape and/or texture)."""
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(k, generator.style_dim, generator=gen).to(device=source.device, dtype=source.dtype)
    fresh, _ = latents_from_z(generator, z, mean_w, truncation)
    return swap_region_codes(source.expand(k, -1, -1), fresh, regions, attribute)


# -------------------------------------------------------------------------------------- rendering


def cameras(generator_or_res, locations, camera_opt, device):
    """(extrinsics, focal, near, far) for locations [V, 2] = (azimuth, elevation); differentiable in
    the locations (inversion optimises them)."""
    resolution = generator_or_res if isinstance(generator_or_res, int) else generator_or_res.renderer.out_im_res
    cam = generate_camera_params(resolution, device, locations=locations.to(device), fov_ang=camera_opt.fov,
                                 dist_radius=camera_opt.dist_radius)
    return cam[:4]


def render(generator, codes, styles_global, cam, mean_latent, truncation, semantics=None):
    """One batch through the generator the inference way. codes [B,2K,D], styles_global [B,D], cam for
    B views. Returns (rgb_high, seg_high, rgb_low, seg_low)."""
    (rgb, seg_high), rgb_low, seg_low = generator(
        [codes], *cam, input_is_latent=True, truncation=truncation, truncation_latent=mean_latent,
        randomize_noise=False, styles_global=[styles_global], semantics=semantics)
    return rgb, seg_high, rgb_low, seg_low


@torch.no_grad()
def render_views(generator, codes, styles_global, locations, camera_opt, mean_latent, truncation,
                 semantics=None, batch=4):
    """Every identity of codes [N,2K,D] from every location [V,2]: (rgb [N,V,3,H,W], seg [N,V,K,H,W])."""
    device = codes.device
    n, v = codes.shape[0], locations.shape[0]
    cam_all = cameras(generator, locations, camera_opt, device)
    rgbs, segs = [], []
    for i in range(n):
        row_rgb, row_seg = [], []
        for start in range(0, v, batch):
            sl = slice(start, start + batch)
            cam = [t[sl] for t in cam_all]
            count = cam[0].shape[0]
            rgb, seg, _, _ = render(generator, codes[i:i + 1].expand(count, -1, -1),
                                    styles_global[i:i + 1].expand(count, -1), cam, mean_latent, truncation,
                                    semantics)
            row_rgb.append(rgb)
            row_seg.append(seg)
        rgbs.append(torch.cat(row_rgb))
        segs.append(torch.cat(row_seg))
    return torch.stack(rgbs), torch.stack(segs)


def view_locations(n_views, camera_opt, device="cpu"):
    """The published inference sweep (a single frontal view when n_views is 1)."""
    if n_views == 1:
        return torch.zeros(1, 2, device=device)
    return sweep_locations(n_views, camera_opt.azim, camera_opt.elev, device=device)


# -------------------------------------------------------------------------------------- inversion


class PerceptualLoss(torch.nn.Module):
    """Mean L1 distance of VGG16 features (relu1_2, relu2_2, relu3_3, relu4_3) of two [-1,1] images.

    The weights come only from a local torchvision-layout VGG16 state dict; nothing is downloaded.
    """

    LAYERS = (3, 8, 15, 22)

    def __init__(self, state):
        super().__init__()
        from torchvision.models import vgg16

        features = vgg16(weights=None).features[: self.LAYERS[-1] + 1]
        own = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        needed = features.state_dict()
        missing = [k for k in needed if k not in own or tuple(own[k].shape) != tuple(needed[k].shape)]
        if missing:
            raise ValueError(f"not a torchvision VGG16 state dict (missing or misshapen: {', '.join(missing[:3])})")
        features.load_state_dict({k: own[k] for k in needed})
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, a, b):
        x = torch.cat([a, b])
        x = ((x + 1) / 2 - self.mean) / self.std
        loss = 0
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.LAYERS:
                fa, fb = x.chunk(2)
                loss = loss + (fa - fb).abs().mean()
        return loss


def invert(generator, target, mean_latent, truncation, camera_opt, target_seg=None, steps=200, lr=0.03,
           camera_lr=0.01, pixel_loss="l2", mask_weight=1.0, perceptual=None, perceptual_weight=1.0,
           init_location=(0.0, 0.0), progress=True):
    """Fit the 2K region codes, the global style and the camera (azimuth, elevation) to `target`.

    target [1,3,H,W] in [-1,1] at the generator's output size; target_seg [1,K,H,W] one-hot regions
    or None. Starts from the renderer mean latent. Gradients flow through the (frozen) generator into
    the codes and the camera only: torch.autograd.grad on the variables leaves the weights untouched.
    Returns dict(codes [1,2K,D], styles_global [1,D], camera [1,2], losses [steps] (total per step),
    rgb, seg (the final reconstruction)).
    """
    device = target.device
    dtype = mean_latent[0].dtype
    mean_w = mean_latent[0].detach()
    codes = mean_w.view(1, 1, -1).repeat(1, generator.n_latent, 1).clone().requires_grad_(True)
    styles_global = mean_w.clone().requires_grad_(True)
    location = torch.tensor([list(init_location)], device=device, dtype=dtype).requires_grad_(True)
    variables = [codes, styles_global, location]
    optimizer = torch.optim.Adam([{"params": [codes, styles_global], "lr": lr},
                                  {"params": [location], "lr": camera_lr}])
    target = target.to(dtype)
    if target_seg is not None:
        target_seg = target_seg.to(dtype)
    losses = []
    bar = tqdm(range(steps), desc="invert", disable=not progress, leave=False)
    for _ in bar:
        cam = cameras(generator, location, camera_opt, device)
        rgb, seg, _, _ = render(generator, codes, styles_global, cam, mean_latent, truncation)
        diff = rgb - target
        loss = diff.abs().mean() if pixel_loss == "l1" else diff.pow(2).mean()
        if target_seg is not None and mask_weight > 0:
            loss = loss + mask_weight * (seg - target_seg).pow(2).mean()
        if perceptual is not None and perceptual_weight > 0:
            loss = loss + perceptual_weight * perceptual(rgb, target)
        grads = torch.autograd.grad(loss, variables)
        optimizer.zero_grad(set_to_none=True)
        for var, grad in zip(variables, grads):
            var.grad = grad
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    with torch.no_grad():
        cam = cameras(generator, location, camera_opt, device)
        rgb, seg, _, _ = render(generator, codes, styles_global, cam, mean_latent, truncation)
    return {"codes": codes.detach(), "styles_global": styles_global.detach(), "camera": location.detach(),
            "losses": losses, "rgb": rgb, "seg": seg}


def psnr(a, b):
    """PSNR in dB of two images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def one_hot_regions(region_map, n_regions=NUM_REGIONS, size=None):
    """Region indices [H,W] (long) → one-hot [1,K,size,size] float (nearest resize)."""
    onehot = F.one_hot(region_map.long(), n_regions).permute(2, 0, 1).unsqueeze(0).float()
    if size is not None and onehot.shape[-1] != size:
        onehot = F.interpolate(onehot, size=(size, size), mode="nearest")
    return onehot


# ------------------------------------------------------- loading, mean latent and images
# (generation.py, being written alongside, will own these; the scripts switch to it once it lands)


def pick_device(opt):
    from devices import default_device

    return default_device(opt.experiment.get("device"))


def load_eval_generator(opt, device):
    """The evaluation generator (ema, full pipeline) with --trained_ckpt loaded strictly.

    Raises checkpoint.CheckpointError with one line when the file is missing or does not fit.
    """
    from checkpoint import CheckpointError, load_generator
    from model import Generator

    if not opt.training.trained_ckpt:
        raise CheckpointError("no --trained_ckpt given")
    generator = Generator(opt.model, opt.rendering, ema=True, full_pipeline=True)
    load_generator(generator, opt.training.trained_ckpt)
    return generator.to(device).eval()


@torch.no_grad()
def mean_latent(generator, n, seed=0):
    """[renderer mean w (1×D), decoder mean (1×2D)] as Generator.mean_latent computes them, from `n`
    latents drawn on the CPU with a fixed seed: reruns, and other devices, use the same means, and
    the global RNG is left alone."""
    param = generator.renderer.sigmoid_beta
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(n, generator.style_dim, generator=gen).to(device=param.device, dtype=param.dtype)
    w = generator.style(z)
    decoder_mean = generator.decoder.mean_latent(w) if generator.full_pipeline else None
    return [w.mean(0, keepdim=True), decoder_mean]


def to_uint8(rgb):
    """[..., 3, H, W] in [-1, 1] → uint8 [..., H, W, 3] numpy."""
    x = ((rgb.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def image_grid(rows):
    """rows: list of lists of uint8 [H,W,3] images (all the same size) → one uint8 grid image."""
    import numpy as np

    return np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)


def save_image(path, image):
    """Write a PNG atomically (a temporary file in the same folder, then rename)."""
    import os
    import tempfile

    import imageio.v2 as imageio

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".img.", suffix=".png", dir=folder)
    os.close(fd)
    try:
        imageio.imwrite(tmp, image, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def parse_options(argv, add_arguments, title):
    """The shared option tree plus this script's own flags (group `title`), as (opt, own Munch)."""
    from munch import Munch

    from options import BaseOptions, group_options

    base = BaseOptions()
    base.initialize()
    group = base.parser.add_argument_group(title)
    add_arguments(group)
    parsed = base.parser.parse_args(argv)
    opt = group_options(base.parser, parsed)
    values = vars(parsed)
    own = Munch({a.dest: values[a.dest] for a in group._group_actions})
    opt.model.n_render = opt.rendering.n_render
    return opt, own
