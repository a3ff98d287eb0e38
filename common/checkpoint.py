"""The one place that reads and writes checkpoints.

Reading is tensors-only (`torch.load(..., weights_only=True)`) and strict: every key a model needs
must be present with its shape; a renderer-only model takes the subset it needs. Problems raise
CheckpointError with one line naming the file and the first mismatching keys. Writing is atomic.
"""
import os

import torch

from common.cli import UsageError
from common.files import atomic_write
from options import sync_region_count

# Entries of the published checkpoints that hold a generator, in order of preference.
GENERATOR_ENTRIES = ("g_ema", "g")


# The options that fix a generator's architecture and what it was trained to render (its cameras). Final
# checkpoints carry them as "config", so `--trained_ckpt FILE` alone rebuilds the model.
ARCHITECTURE_OPTIONS = {
    "model": ("size", "style_dim", "channel_multiplier", "lr_mapping", "renderer_spatial_output_dim", "n_wcode",
              "d_channel_scale", "d_pack", "mbstd_channels"),
    "rendering": ("n_render", "depth", "width", "no_sdf", "no_z_normalize", "N_samples", "no_offset_sampling"),
    "camera": ("uniform", "azim", "elev", "fov", "dist_radius"),
}


class CheckpointError(UsageError):
    """A checkpoint that is missing, unreadable or of another configuration (one-line message)."""


# Architecture options added after training checkpoints were first written, with the published value that a
# checkpoint written before them was trained with (run 4's committed stage-1 snapshot has no d_pack).
ADDED_LATER = {("model", "d_pack"): 1, ("model", "mbstd_channels"): 1}


def architecture_config(opt):
    """The ARCHITECTURE_OPTIONS of an option tree, as plain values (what a final checkpoint stores); an
    option tree saved before an option of ADDED_LATER existed gets its published value."""
    return {group: {key: opt[group][key] if key in opt[group] or (group, key) not in ADDED_LATER
                    else ADDED_LATER[group, key] for key in keys}
            for group, keys in ARCHITECTURE_OPTIONS.items()}


def saved_config(path):
    """The "config" a checkpoint carries, or None (published checkpoints, unreadable or missing files:
    loading reports those). Memory-mapped, so asking a large checkpoint costs little."""
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) files cannot be mapped; loading will read them
        return None
    config = ckpt.get("config") if isinstance(ckpt, dict) else None
    return config if isinstance(config, dict) else None


def apply_saved_config(opt, config, default_of, path):
    """Fill `opt` with the architecture a checkpoint was trained with.

    An option left at its default takes the checkpoint's value; one given with another value than the
    checkpoint's is an error (the weights could not fit it). `default_of(key)` is the parser default.
    """
    for group, keys in ARCHITECTURE_OPTIONS.items():
        saved = config.get(group) or {}
        for key in keys:
            if key not in saved or opt[group][key] == saved[key]:
                continue
            if opt[group][key] != default_of(key):
                raise CheckpointError(f"--{key} {opt[group][key]}: {path} was trained with --{key} {saved[key]} "
                                      f"(drop the flag: the checkpoint's options are used)")
            opt[group][key] = saved[key]
    return sync_region_count(opt)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint file (tensors and plain containers only) as a dict."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many kinds for non-checkpoint files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable tensors-only checkpoint ({reason[:200]})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(ckpt).__name__}, expected a dict)")
    return ckpt


def generator_state(ckpt, path="checkpoint", entries=GENERATOR_ENTRIES):
    """The generator state dict inside a published-layout checkpoint ({"g_ema": ...}, {"g": ...}) or a bare one."""
    for entry in entries:
        if isinstance(ckpt.get(entry), dict):
            return ckpt[entry]
    if ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        return ckpt
    raise CheckpointError(f"{path}: no generator weights (expected one of the entries {list(entries)}; "
                          f"found {sorted(ckpt)[:8]})")


def state_mismatches(state, expected, prefix="", allow_unused=True):
    """What keeps `state` from loading into a module whose state dict is `expected` (keys under `prefix` in
    `state`): phrases naming the count and the first few missing keys, keys of another shape and (unless
    allow_unused) keys the module does not have; empty when it fits."""
    missing = [prefix + key for key in expected if prefix + key not in state]
    wrong = [f"{prefix + key} {tuple(state[prefix + key].shape)} != {tuple(value.shape)}"
             for key, value in expected.items() if prefix + key in state
             and tuple(state[prefix + key].shape) != tuple(value.shape)]
    unused = [] if allow_unused else [k for k in state if k.startswith(prefix) and k[len(prefix):] not in expected]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches (first: {'; '.join(wrong[:3])})")
    if unused:
        parts.append(f"{len(unused)} keys the model does not have (first: {', '.join(unused[:3])})")
    return parts


def load_state_strict(module, state, path="checkpoint", what="model", prefix="", allow_unused=True):
    """Copy `state` into `module`: every key the module needs must be there with its shape.

    With allow_unused, keys of `state` the module does not have (e.g. the decoder, for a renderer-only
    model) are ignored; without it they are an error too (a model of another configuration, e.g. a
    larger --size whose decoder has more layers). `prefix` selects a sub-tree of `state`.
    """
    own = module.state_dict()
    parts = state_mismatches(state, own, prefix, allow_unused)
    if parts:
        raise CheckpointError(f"{path}: does not fit the {what} at this configuration: {'; '.join(parts)}")
    module.load_state_dict({key: state[prefix + key] for key in own}, strict=True)
    return module


def load_generator(module, path, entries=GENERATOR_ENTRIES, map_location="cpu"):
    """Load a generator checkpoint (published `final_model.pt` or this project's) into `module`.

    A full generator must use every weight of the checkpoint; a renderer-only one takes its subset.
    """
    ckpt = load_checkpoint(path, map_location)
    return load_state_strict(module, generator_state(ckpt, path, entries), path, what="generator",
                             allow_unused=not getattr(module, "full_pipeline", True))


def generator_export(source, half=False):
    """The shippable form of a trained generator: `{"g_ema", "config", "iter", "dtype"}` from a final
    checkpoint of train_Full.py / train_CNeRF.py (which carries "config") or one of their training
    checkpoints `models_NNNNNNN.pt` (the architecture taken from the option tree "opt" it carries). With
    `half` the floating tensors are float16 (loading copies them into the float32 model)."""
    ckpt = load_checkpoint(source)
    state = generator_state(ckpt, source, entries=("g_ema",))
    config = ckpt.get("config")
    if not isinstance(config, dict) and isinstance(ckpt.get("opt"), dict):  # a training checkpoint
        try:
            config = architecture_config(ckpt["opt"])
        except (KeyError, TypeError):
            config = None
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: carries no 'config' (architecture options) nor the 'opt' of a training "
                              f"checkpoint; export a checkpoint written by train_Full.py / train_CNeRF.py")
    dtype = torch.float16 if half else torch.float32
    return {"g_ema": cast_floating(state, dtype), "config": config, "iter": int(ckpt.get("iter", -1)),
            "dtype": str(dtype).replace("torch.", "")}


def cast_floating(state, dtype):
    """A state dict with its floating tensors cast to `dtype` (integer buffers unchanged): float16 on disk
    halves a file, and loading copies the values into the float32 modules."""
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}


def save_checkpoint(obj, path):
    """torch.save through the one atomic writer, fsynced: a crash never leaves a truncated checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp), fsync=True)
