"""Custom ops: fused bias + leaky ReLU and upfirdn2d.

Each has a plain-PyTorch reference (`*_ref`) and CUDA kernels compiled lazily the first time a CUDA
tensor needs them (see op/build.py); CPU tensors, a failed build or first launch, or CNERF_OPS=ref use the
reference. `python -m op` builds them ahead (e.g. before torchrun).
"""
from .fused_act import FusedLeakyReLU, fused_leaky_relu, fused_leaky_relu_ref
from .upfirdn import upfirdn2d, upfirdn2d_ref

__all__ = ["FusedLeakyReLU", "fused_leaky_relu", "fused_leaky_relu_ref", "upfirdn2d", "upfirdn2d_ref"]
