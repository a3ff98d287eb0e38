"""upfirdn2d: upsample (zero insertion), pad, FIR filter, downsample (StyleGAN2 semantics)."""
import torch
import torch.nn.functional as F


def _parse_pad(pad):
    """(p0, p1) for both axes, or (x0, x1, y0, y1) -> (x0, x1, y0, y1)."""
    pad = tuple(int(p) for p in pad)
    if len(pad) == 2:
        return pad + pad
    if len(pad) == 4:
        return pad
    raise ValueError(f"pad must have 2 or 4 entries, got {pad}")


def upfirdn2d_ref(input, kernel, up=1, down=1, pad=(0, 0)):
    """Plain-PyTorch reference, written with differentiable ops only (any order of gradients).

    Per axis: insert up-1 zeros after every sample, pad (negative = crop), convolve with `kernel`
    (= correlate with the flipped kernel), keep every down-th sample.
    """
    x0, x1, y0, y1 = _parse_pad(pad)
    b, c, h, w = input.shape
    kh, kw = kernel.shape
    x = input.reshape(b * c, 1, h, 1, w, 1)
    # Zero insertion: up-1 zeros after each sample along both axes.
    x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
    x = x.reshape(b * c, 1, h * up, w * up)
    # Positive pads first, then crop for negative ones.
    x = F.pad(x, [max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)])
    x = x[:, :, max(-y0, 0): x.shape[2] - max(-y1, 0), max(-x0, 0): x.shape[3] - max(-x1, 0)]
    # conv2d is a correlation, so flip to get a true convolution; stride = keep every down-th.
    weight = torch.flip(kernel, [0, 1]).reshape(1, 1, kh, kw).to(x.dtype)
    x = F.conv2d(x, weight, stride=down)
    return x.reshape(b, c, x.shape[2], x.shape[3])


def upfirdn2d(input, kernel, up=1, down=1, pad=(0, 0)):
    return upfirdn2d_ref(input, kernel, up, down, pad)
