"""Fused bias + leaky ReLU + gain (StyleGAN2's `fused_leaky_relu`)."""
import torch
import torch.nn.functional as F
from torch import nn

from . import build


def fused_leaky_relu_ref(input, bias=None, negative_slope=0.2, scale=2 ** 0.5):
    """Plain-PyTorch reference: leaky_relu(input + bias on dim 1) * scale.

    Built only from differentiable torch ops, so gradients of any order work.
    """
    if bias is not None:
        input = input + bias.view(1, -1, *([1] * (input.ndim - 2)))
    if torch.is_grad_enabled() and input.requires_grad:
        return F.leaky_relu(input, negative_slope) * scale
    # Without a graph the same ops run in place on a fresh tensor: one image-sized temporary instead
    # of three (the 512 px decoder's peak memory; issue 6). Same values.
    out = F.leaky_relu_(input, negative_slope) if bias is not None else F.leaky_relu(input, negative_slope)
    return out.mul_(scale)


class _LeakyReLUGrad(torch.autograd.Function):
    """grad * (out > 0 ? scale : slope*scale). Linear in grad with a piecewise-constant mask, so its
    own backward is the same mask multiply: this gives gradients of every order."""

    @staticmethod
    def forward(ctx, grad, out, slope, scale):
        ctx.save_for_backward(out)
        ctx.slope, ctx.scale = slope, scale
        return build.get_extension("fused_bias_act").lrelu_grad(grad.contiguous(), out, slope, scale)

    @staticmethod
    def backward(ctx, grad2):
        (out,) = ctx.saved_tensors
        # d/d(out) is zero almost everywhere (the mask is piecewise constant).
        return _LeakyReLUGrad.apply(grad2, out, ctx.slope, ctx.scale), None, None, None


class _FusedLeakyReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, bias, slope, scale):
        ext = build.get_extension("fused_bias_act")
        out = ext.fused_lrelu(input.contiguous(), None if bias is None else bias.contiguous(), slope, scale)
        # The output alone tells where input + bias > 0, so nothing else needs saving.
        ctx.save_for_backward(out)
        ctx.slope, ctx.scale = slope, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        grad_input = _LeakyReLUGrad.apply(grad, out, ctx.slope, ctx.scale)
        grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_bias = grad_input.sum([d for d in range(grad_input.ndim) if d != 1])
        return grad_input, grad_bias, None, None


def fused_leaky_relu(input, bias=None, negative_slope=0.2, scale=2 ** 0.5):
    """leaky_relu(input + bias broadcast on dim 1, negative_slope) * scale; bias may be None."""
    # The CUDA backward reads the sign of input + bias off the output: valid for slope >= 0, scale > 0.
    if build.use_cuda(input) and negative_slope >= 0 and scale > 0:
        if build.get_extension("fused_bias_act", input.device) is not None:
            if bias is not None:
                dtype = torch.result_type(input, bias)  # same promotion as the reference
                input, bias = input.to(dtype), bias.to(dtype)
            return _FusedLeakyReLU.apply(input, bias, float(negative_slope), float(scale))
    return fused_leaky_relu_ref(input, bias, negative_slope, scale)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channel, bias=True, negative_slope=0.2, scale=2 ** 0.5):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel)) if bias else None
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, input):
        return fused_leaky_relu(input, self.bias, self.negative_slope, self.scale)
