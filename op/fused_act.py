"""Fused bias + leaky ReLU + gain (StyleGAN2's `fused_leaky_relu`)."""
import torch
import torch.nn.functional as F
from torch import nn


def fused_leaky_relu_ref(input, bias=None, negative_slope=0.2, scale=2 ** 0.5):
    """Plain-PyTorch reference: leaky_relu(input + bias on dim 1) * scale.

    Built only from differentiable torch ops, so gradients of any order work.
    """
    if bias is not None:
        input = input + bias.view(1, -1, *([1] * (input.ndim - 2)))
    return F.leaky_relu(input, negative_slope) * scale


def fused_leaky_relu(input, bias=None, negative_slope=0.2, scale=2 ** 0.5):
    return fused_leaky_relu_ref(input, bias, negative_slope, scale)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channel, bias=True, negative_slope=0.2, scale=2 ** 0.5):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel)) if bias else None
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, input):
        return fused_leaky_relu(input, self.bias, self.negative_slope, self.scale)
