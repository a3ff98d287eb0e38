"""The trained parameters between steps: requires_grad toggles and the EMA generator's update (published
decay 0.5 ** (32 / 10000) per iteration unless --ema_decay)."""
import torch

EMA_DECAY = 0.5 ** (32 / (10 * 1000))  # published, per iteration


def ema_decay(opt):
    """--ema_decay, or the published 0.5 ** (32 / 10000) per iteration."""
    return EMA_DECAY if opt.training.ema_decay is None else opt.training.ema_decay


def requires_grad(model, flag=True):
    for p in model.parameters():
        p.requires_grad = flag


def accumulate(ema, model, decay=0.999, prefixes=None, fused=None):
    """ema ← decay·ema + (1-decay)·model for parameters (optionally only those under `prefixes`).

    Restricting to the trained sub-modules keeps frozen parts bit-identical: a·d + a·(1-d) is not
    always exactly a in floating point. `fused` (default: on accelerators) updates all parameters with
    two multi-tensor ops instead of two ops per parameter: one launch each on a GPU instead of hundreds.
    On the CPU the per-parameter loop is faster (each tensor is still in cache for its second op).
    Either way each element gets the same operations in the same order: the same bits.
    """
    ema_params = dict(ema.named_parameters())
    targets, sources = [], []
    for name, param in model.named_parameters():
        if prefixes is None or name.startswith(tuple(prefixes)):
            targets.append(ema_params[name])
            sources.append(param.detach())
    if not targets:
        return
    if fused is None:
        fused = targets[0].device.type != "cpu"
    with torch.no_grad():
        if fused:
            torch._foreach_mul_(targets, decay)
            torch._foreach_add_(targets, sources, alpha=1 - decay)
        else:
            for target, source in zip(targets, sources):
                target.mul_(decay).add_(source, alpha=1 - decay)
