"""Semantic manipulation and inversion: the logic shared by edit_semantics.py, invert.py and
calc_metrics.py (evaluation.py).

Codes are the generator's per-region codes [N, 2K, D] (already mapped and truncated once, as the
inference script builds them by hand): code 2k is region k's shape code, 2k+1 its texture code.
They are rendered like inference_Full.py renders them: `input_is_latent`, truncation ψ towards the
renderer mean (a second time, as the published script does), the global style `styles_global` for
the decoder, fixed decoder noise. Editing only ever changes codes, so everything not edited renders
exactly as before.
"""
import io
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.cli import UsageError
from common.regions import CELEBAMASK_CLASSES, NUM_REGIONS, label19_to_regions
from rendering.camera import cameras, sweep_locations, view_locations
from rendering.inference import render_codes, render_views
from rendering.latents import identity_latents

ATTRIBUTES = ("shape", "texture", "both")


# ------------------------------------------------------------------------------------ code slots


def region_slots(regions, attribute="both", n_regions=NUM_REGIONS):
    """Indices into the 2K codes for `regions` (indices) and attribute 'shape' | 'texture' | 'both'."""
    if attribute not in ATTRIBUTES:
        raise UsageError(f"unknown attribute {attribute!r}; valid: {', '.join(ATTRIBUTES)}")
    slots = []
    for k in regions:
        if not 0 <= int(k) < n_regions:
            raise UsageError(f"region index {k} out of range 0..{n_regions - 1}")
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
        raise UsageError(f"codes must be [N, 2K, D], got {tuple(source.shape)}")
    if source.shape[1:] != reference.shape[1:]:
        raise UsageError(f"source codes {tuple(source.shape)} and reference codes {tuple(reference.shape)} differ")
    if reference.shape[0] not in (1, source.shape[0]):
        raise UsageError(f"reference batch {reference.shape[0]} must be 1 or the source's {source.shape[0]}")


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
        raise UsageError(f"--interpolate needs at least 2 steps, got {steps}")
    mask = slot_mask(source, regions, attribute).view(1, -1, 1)
    reference = reference.to(source.dtype).expand_as(source)
    out = []
    for t in torch.linspace(0, 1, steps).tolist():
        # t = 0 and t = 1 are exact copies, not lerp results (which could differ in the last bit).
        blended = source if t == 0 else reference if t == 1 else torch.lerp(source, reference, t)
        out.append(torch.where(mask, blended, source))
    return torch.stack(out)


# -------------------------------------------------------------------------------- seeds and codes


def z_from_seed(seed, style_dim, device, dtype=torch.float32):
    """z ~ N(0, I) drawn on the CPU from `seed`, so a seed means the same identity on every device."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(1, style_dim, generator=gen).to(device=device, dtype=dtype)


def latents_from_seeds(generator, seeds, mean, psi):
    """(codes [N,2K,D], styles_global [N,D]) of seed identities: z ~ N(0, I) from each seed, then the
    published by-hand truncation (latents.identity_latents)."""
    device, dtype = mean[0].device, mean[0].dtype
    # One seed at a time: a batched matmul may round differently, and a seed must always give the
    # same codes bit for bit, alone or with others.
    pairs = [identity_latents(generator, z_from_seed(s, generator.style_dim, device, dtype), mean, psi)
             for s in seeds]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


@torch.no_grad()
def resample_codes(generator, source, regions, attribute, k, mean, psi, seed=0):
    """K copies of `source` [1, 2K, D] whose chosen slots hold fresh codes (one new w per sample,
    truncated like any identity's, used for each chosen region's shape and/or texture)."""
    rng = torch.Generator().manual_seed(int(seed))
    z = torch.randn(k, generator.style_dim, generator=rng).to(device=source.device, dtype=source.dtype)
    fresh, _ = identity_latents(generator, z, mean, psi)
    return swap_region_codes(source.expand(k, -1, -1), fresh, regions, attribute)


# -------------------------------------------------------------------------------------- rendering


def render_identities(generator, codes, styles_global, locations, opt, mean_latent, psi=None, semantics=None):
    """Every identity of codes [N,2K,D] from every location [V,2], by rendering.render_views:
    (rgb [N,V,3,H,W], seg [N,V,K,H,W])."""
    pairs = [render_views(generator, codes[i:i + 1], styles_global[i:i + 1], locations, opt, mean_latent,
                          semantics=semantics, psi=psi) for i in range(codes.shape[0])]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def edit_locations(opt, n_views, device="cpu"):
    """--n_views N > 0: the published azimuth sweep with N views (one frontal view for N = 1);
    otherwise the inference script's views (camera.view_locations)."""
    if n_views == 1:
        return torch.zeros(1, 2, device=device)
    if n_views > 1:
        return sweep_locations(n_views, opt.camera.azim, opt.camera.elev, device=device)
    return view_locations(opt, device=device)


# -------------------------------------------------------------------------------------- inversion


# VGG16's convolution widths up to relu4_3 ("M" = 2×2 max pool), in torchvision's layer order, so that a
# torchvision VGG16 state dict's "features.<i>.*" entries load by index.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)


def vgg16_features():
    layers, channels = [], 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(torch.nn.MaxPool2d(2, 2))
        else:
            layers += [torch.nn.Conv2d(channels, item, 3, padding=1), torch.nn.ReLU(inplace=False)]
            channels = item
    return torch.nn.Sequential(*layers)


class PerceptualLoss(torch.nn.Module):
    """Mean L1 distance of VGG16 features (relu1_2, relu2_2, relu3_3, relu4_3) of two [-1,1] images.

    The weights come only from a local torchvision-layout VGG16 state dict (its "features.*" entries;
    the classifier is not needed); nothing is downloaded.
    """

    LAYERS = (3, 8, 15, 22)

    def __init__(self, state):
        super().__init__()
        features = vgg16_features()
        needed = features.state_dict()
        missing = [f"features.{k}" for k, v in needed.items()
                   if not torch.is_tensor(state.get(f"features.{k}"))
                   or tuple(state[f"features.{k}"].shape) != tuple(v.shape)]
        if missing:
            raise UsageError(f"not a torchvision VGG16 state dict (missing or misshapen: {', '.join(missing[:3])})")
        features.load_state_dict({k: state[f"features.{k}"] for k in needed})
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
           init_location=(0.0, 0.0), progress=True, callback=None):
    """Fit the 2K region codes, the global style and the camera (azimuth, elevation) to `target`.

    target [1,3,H,W] in [-1,1] at the generator's output size; target_seg [1,K,H,W] one-hot regions
    or None. Starts from the renderer mean latent. Gradients flow through the (frozen) generator into
    the codes and the camera only: torch.autograd.grad on the variables leaves the weights untouched.
    `callback(step, steps, loss)`, when given, is called after every step (the editor's progress bar).
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
        cam = cameras(generator.renderer.out_im_res, location, camera_opt, device)
        (rgb, seg), _, _ = render_codes(generator, codes, styles_global, cam, mean_latent, truncation)
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
        if callback is not None:
            callback(len(losses), steps, losses[-1])
    with torch.no_grad():
        cam = cameras(generator.renderer.out_im_res, location, camera_opt, device)
        (rgb, seg), _, _ = render_codes(generator, codes, styles_global, cam, mean_latent, truncation)
    return {"codes": codes.detach(), "styles_global": styles_global.detach(), "camera": location.detach(),
            "losses": losses, "rgb": rgb, "seg": seg}


# -------------------------------------------------------------------------- portraits and label maps


def _open_source(source, name, what):
    """(file object, label for messages) for a path or the bytes of an upload named `name`."""
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source), name or f"uploaded {what}"
    path = str(source)
    if not os.path.isfile(path):
        raise UsageError(f"{path}: {what} file not found")
    return path, name or path


def load_image(source, size, name=None, max_aspect=None):
    """[1,3,size,size] in [-1,1]: centre-cropped to a square, resized with LANCZOS (as prepare_data).

    `source` is a path or an upload's bytes (`name` then labels the messages). With `max_aspect`,
    an image whose long side exceeds `max_aspect` × its short side is refused instead of cropped.
    """
    from PIL import Image

    handle, label = _open_source(source, name, "image")
    try:
        with Image.open(handle) as image:
            image = image.convert("RGB")
    except Exception as error:
        raise UsageError(f"{label}: not a readable image ({type(error).__name__})") from None
    if max_aspect is not None and max(image.size) > max_aspect * min(image.size):
        raise UsageError(f"{label}: the image is {image.width}×{image.height}; the model's portraits are square "
                         f"(crop it to a square first)")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
    return x / 127.5 - 1


def load_mask(source, size, name=None):
    """Region map [size,size] (long, 0-8) from a 19-class label map PNG / .npy (nearest resize).

    `source` is a path or an upload's bytes (`name`, e.g. "face.npy", then labels the messages and
    tells .npy from an image)."""
    from PIL import Image

    handle, label = _open_source(source, name, "mask")
    try:
        if label.lower().endswith(".npy"):
            label_map = np.load(handle, allow_pickle=False)
        else:
            with Image.open(handle) as image:
                label_map = np.asarray(image)
    except Exception as error:
        raise UsageError(f"{label}: not a readable mask ({type(error).__name__})") from None
    if label_map.ndim == 3:  # a grey PNG saved as RGB: all channels hold the ids
        label_map = label_map[..., 0]
    if label_map.ndim != 2 or not (np.issubdtype(label_map.dtype, np.integer)
                                   or np.all(label_map == np.round(label_map))):
        raise UsageError(f"{label}: expected a 2-D map of class ids, got shape {label_map.shape} "
                         f"dtype {label_map.dtype}")
    if label_map.min() < 0 or label_map.max() >= len(CELEBAMASK_CLASSES):
        raise UsageError(f"{label}: class ids must be 0..{len(CELEBAMASK_CLASSES) - 1}, "
                         f"found {int(label_map.min())}..{int(label_map.max())}")
    side = min(label_map.shape)
    top, left = (label_map.shape[0] - side) // 2, (label_map.shape[1] - side) // 2
    label_map = Image.fromarray(label_map[top:top + side, left:left + side].astype(np.uint8))
    label_map = np.asarray(label_map.resize((size, size), Image.NEAREST)).astype(np.int64)
    return torch.from_numpy(np.asarray(label19_to_regions(label_map), dtype=np.int64))


def one_hot_regions(region_map, n_regions=NUM_REGIONS, size=None):
    """Region indices [H,W] (long) → one-hot [1,K,size,size] float (nearest resize)."""
    onehot = F.one_hot(region_map.long(), n_regions).permute(2, 0, 1).unsqueeze(0).float()
    if size is not None and onehot.shape[-1] != size:
        onehot = F.interpolate(onehot, size=(size, size), mode="nearest")
    return onehot


def delta_image(edited, source):
    """|Δ| map of two renders [3,H,W] in [-1,1]: the mean absolute RGB change per pixel as a grey
    uint8 [H,W,3] image, 0 black and 0.5 or more white."""
    delta = (edited.float() - source.float()).abs().mean(0)
    grey = (delta.clamp(0, 0.5) / 0.5 * 255).round().to(torch.uint8).cpu().numpy()
    return np.repeat(grey[..., None], 3, axis=-1)
