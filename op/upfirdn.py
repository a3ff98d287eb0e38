"""upfirdn2d: upsample (zero insertion), pad, FIR filter, downsample (StyleGAN2 semantics)."""
import torch
import torch.nn.functional as F

from . import build


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
    x = input
    if up > 1:  # zero insertion: up-1 zeros after each sample along both axes
        x = F.pad(x.reshape(b, c, h, 1, w, 1), [0, up - 1, 0, 0, 0, up - 1]).reshape(b, c, h * up, w * up)
    # Positive pads first, then crop for negative ones.
    if max(x0, 0) or max(x1, 0) or max(y0, 0) or max(y1, 0):
        x = F.pad(x, [max(x0, 0), max(x1, 0), max(y0, 0), max(y1, 0)])
    x = x[:, :, max(-y0, 0): x.shape[2] - max(-y1, 0), max(-x0, 0): x.shape[3] - max(-x1, 0)]
    # conv2d is a correlation, so flip to get a true convolution; stride = keep every down-th. One
    # filter per channel (groups = channels): the CPU's depthwise kernels are 20-60x faster than a
    # one-channel convolution over a [B*C, 1, H, W] batch, forward and backward (same values).
    weight = torch.flip(kernel, [0, 1]).to(x.dtype).reshape(1, 1, kh, kw).expand(c, 1, kh, kw)
    return F.conv2d(x, weight, stride=down, groups=c)


def _grad_pad(kernel_shape, in_shape, out_shape, up, down, pad):
    """Pads (x0, x1, y0, y1) of the upfirdn2d that maps the output gradient to the input gradient.

    The adjoint of (zero-insert by up, pad p0, convolve with k, keep every down-th) is (zero-insert by
    down, pad k-1-p0, convolve with the flipped k, keep every up-th): along an axis, input i and
    output o meet at tap t = i*up + p0 - o*down of the forward (kernel entry k-1-t) and at tap
    o*down + (k-1-p0) - i*up = k-1-t of the adjoint, whose flipped kernel holds the same entry there.
    The trailing pad makes the result exactly `in` long: it reads (in-1)*up + k padded samples.
    """
    (kh, kw), (h, w), (oh, ow), (x0, _, y0, _) = kernel_shape, in_shape, out_shape, pad
    gx0, gy0 = kw - 1 - x0, kh - 1 - y0
    return gx0, (w - 1) * up + kw - ow * down - gx0, gy0, (h - 1) * up + kh - oh * down - gy0


class _UpFirDn2d(torch.autograd.Function):
    """CUDA upfirdn2d. Its input gradient is again an upfirdn2d (see backward), applied through this
    same Function, so gradients of every order use the kernel. The filter gets no gradient."""

    @staticmethod
    def forward(ctx, input, kernel, up, down, pad):
        out = build.get_extension("upfirdn2d").upfirdn2d(input.contiguous(), kernel, up, down, *pad)
        ctx.save_for_backward(kernel)
        ctx.cfg = (input.shape[2:], up, down, pad)
        return out

    @staticmethod
    def backward(ctx, grad):
        (kernel,) = ctx.saved_tensors
        in_shape, up, down, pad = ctx.cfg
        gpad = _grad_pad(kernel.shape, in_shape, grad.shape[2:], up, down, pad)
        grad_input = _UpFirDn2d.apply(grad, kernel.flip([0, 1]), down, up, gpad)
        return grad_input, None, None, None, None


def upfirdn2d(input, kernel, up=1, down=1, pad=(0, 0)):
    """input [B, C, H, W], kernel [kh, kw]; up/down for both axes; pad = (p0, p1) for both axes or
    (x0, x1, y0, y1). Output size per axis: (in*up + p0 + p1 - k) // down + 1."""
    pad = _parse_pad(pad)
    # The CUDA path does not differentiate w.r.t. the filter; a trainable filter uses the reference.
    if build.use_cuda(input) and not kernel.requires_grad:
        if build.get_extension("upfirdn2d", input.device) is not None:
            kernel = kernel.to(device=input.device, dtype=input.dtype).contiguous()
            return _UpFirDn2d.apply(input, kernel, int(up), int(down), pad)
    return upfirdn2d_ref(input, kernel, up, down, pad)
