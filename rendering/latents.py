"""Identity codes: the truncation mean, the published by-hand truncation, and latent files (per-region codes
and global styles that editing, inversion and inference share).

A latent file is a tensors-only torch file:
  {"codes": [N, 2K, D] per-region codes (already mapped; code 2k = region k's shape, 2k+1 its texture),
   "styles_global": [N, D] mapped global styles for the decoder,
   "style_dim": D, "n_regions": K, "truncated": bool (whether the codes already include truncation),
   optional "camera": [N, 2] (azimuth, elevation) and "note": str}
"""

import torch

from common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from common.cli import UsageError


class LatentFileError(UsageError):
    """A latent file that is missing, unreadable or of another configuration (one-line message)."""


def save_latents(path, codes, styles_global, truncated=True, camera=None, note=""):
    codes = codes.detach().cpu().float()
    styles_global = styles_global.detach().cpu().float()
    payload = {"codes": codes, "styles_global": styles_global, "style_dim": int(codes.shape[-1]),
               "n_regions": int(codes.shape[1] // 2), "truncated": bool(truncated), "note": str(note)}
    if camera is not None:
        payload["camera"] = camera.detach().cpu().float()
    save_checkpoint(payload, path)


def load_latents(path, style_dim=None, n_regions=None):
    """Load and validate a latent file; returns the dict. Raises LatentFileError with one line."""
    try:
        data = load_checkpoint(path)
    except CheckpointError as error:
        raise LatentFileError(str(error).replace("checkpoint", "latent file")) from None
    for key in ("codes", "styles_global"):
        if not torch.is_tensor(data.get(key)):
            raise LatentFileError(f"{path}: not a latent file (no tensor {key!r})")
    codes, styles_global = data["codes"], data["styles_global"]
    if not (codes.is_floating_point() and styles_global.is_floating_point()):
        raise LatentFileError(f"{path}: latents must be floating point, got codes {codes.dtype}, "
                              f"styles_global {styles_global.dtype}")
    if codes.ndim != 3 or codes.shape[1] % 2 or styles_global.ndim != 2 or styles_global.shape[0] != codes.shape[0]:
        raise LatentFileError(f"{path}: malformed latents: codes {tuple(codes.shape)}, "
                              f"styles_global {tuple(styles_global.shape)}")
    if style_dim is not None and (codes.shape[2] != style_dim or styles_global.shape[1] != style_dim):
        raise LatentFileError(f"{path}: latents have style_dim {codes.shape[2]}, the model expects {style_dim}")
    if n_regions is not None and codes.shape[1] != 2 * n_regions:
        raise LatentFileError(f"{path}: latents have {codes.shape[1]} codes, the model expects {2 * n_regions} "
                              f"({n_regions} regions)")
    if codes.shape[0] == 0:
        raise LatentFileError(f"{path}: holds no latents (0 entries)")
    camera = data.get("camera")
    if camera is not None and (not torch.is_tensor(camera) or not camera.is_floating_point()
                               or tuple(camera.shape) != (codes.shape[0], 2)):
        shape = tuple(camera.shape) if torch.is_tensor(camera) else type(camera).__name__
        raise LatentFileError(f"{path}: malformed camera {shape} (expected [{codes.shape[0]}, 2] floats: "
                              f"azimuth, elevation)")
    # NaN / Inf would render as noise or black without a word, and poison every blend made from them.
    for key in ("codes", "styles_global", "camera"):
        if data.get(key) is not None and not bool(torch.isfinite(data[key]).all()):
            raise LatentFileError(f"{path}: {key} holds non-finite values (NaN or Inf)")
    data.setdefault("truncated", True)
    return data


# ------------------------------------------------------------- codes of identities


@torch.no_grad()
def mean_latent(generator, n, seed=0):
    """[renderer mean w (1×D), decoder mean (1×2D) or None], as Generator.mean_latent computes them, from
    `n` latents drawn on the CPU with a fixed seed (same means on every device and rerun; global RNG
    untouched)."""
    param = next(generator.parameters())
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(int(n), generator.style_dim, generator=gen).to(device=param.device, dtype=param.dtype)
    w = generator.style(z)
    decoder_mean = generator.decoder.mean_latent(w) if generator.full_pipeline else None
    return [w.mean(0, keepdim=True), decoder_mean]


def truncate(w, mean_w, psi):
    """mean_w + ψ (w - mean_w) (SPEC §6)."""
    if psi >= 1:
        return w
    return mean_w + psi * (w - mean_w)


@torch.no_grad()
def identity_latents(generator, z, mean, psi):
    """z [N,D] → (codes [N,18,D], styles_global [N,D]): the published by-hand truncation of w = style(z)."""
    w = truncate(generator.map_styles(z), mean[0], psi)
    return w.unsqueeze(1).repeat(1, generator.n_latent, 1), w


def latents_from_file(data, mean, psi):
    """Codes and global styles of a loaded latent file, ready for render_views.

    Codes marked truncated are used as given (they already hold the by-hand truncation); otherwise the
    published by-hand truncation is applied to codes and global styles alike.
    """
    codes, styles_global = data["codes"], data["styles_global"]
    if not data.get("truncated", True):
        codes, styles_global = truncate(codes, mean[0], psi), truncate(styles_global, mean[0], psi)
    return codes, styles_global
