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


def accumulate(ema, model, decay=0.999, prefixes=None):
    """ema ← decay·ema + (1-decay)·model for parameters (optionally only those under `prefixes`).

    Restricting to the trained sub-modules keeps frozen parts bit-identical: a·d + a·(1-d) is not
    always exactly a in floating point.
    """
    ema_params = dict(ema.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if prefixes is not None and not name.startswith(tuple(prefixes)):
                continue
            ema_params[name].mul_(decay).add_(param.detach(), alpha=1 - decay)
