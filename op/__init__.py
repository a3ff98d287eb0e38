"""Custom ops: fused bias+leaky ReLU and upfirdn2d (CUDA when available, PyTorch reference otherwise)."""
from .fused_act import FusedLeakyReLU, fused_leaky_relu, fused_leaky_relu_ref
from .upfirdn2d import upfirdn2d, upfirdn2d_ref

__all__ = ["FusedLeakyReLU", "fused_leaky_relu", "fused_leaky_relu_ref", "upfirdn2d", "upfirdn2d_ref"]
