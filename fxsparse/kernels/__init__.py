"""Triton kernels behind the `torch.ops.fxsparse.*` ops."""
from .conv2d import conv2d_triton

__all__ = ["conv2d_triton"]
