"""An oracle for fxsparse::conv2d written independently of `conv2d_reference`.

F.conv2d in fp64 on the explicitly gathered input, an explicit scatter into the
full output and activation formulas written out here. Differentiable (the op's
gradient tests run eager autograd through it).
"""
import math

import torch
import torch.nn.functional as F

SQRT1_2 = 1 / math.sqrt(2)


def _hsig(z):
    return (z + 3).clamp(0, 6) / 6


ORACLE_ACT = {
    "none": lambda z: z,
    "relu": lambda z: z.clamp_min(0),
    "relu6": lambda z: z.clamp(0, 6),
    "silu": lambda z: z / (1 + torch.exp(-z)),
    "gelu": lambda z: 0.5 * z * (1 + torch.erf(z * SQRT1_2)),
    "gelu_tanh": lambda z: 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
    "hardswish": lambda z: z * _hsig(z),
    "hardsigmoid": _hsig,
    "sigmoid": lambda z: 1 / (1 + torch.exp(-z)),
    "tanh": torch.tanh,
}


def oracle(x, w, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), in_index=None,
           out_index=None, out_channels=None, fill=None, scale=None, shift=None, bias_map=None,
           residual=None, activation="none", residual_after_activation=False, dtype=torch.float64):
    """fp64 by default; the GPU tests use dtype=float32 (cuDNN) on real-size layers."""
    xd = x.to(dtype)
    if in_index is not None:
        xd = xd[:, in_index.long()]
    if w.shape[0] == 0:  # F.conv2d refuses an empty weight
        n, _, h, wi = xd.shape
        ho = (h + 2 * padding[0] - dilation[0] * (w.shape[2] - 1) - 1) // stride[0] + 1
        wo = (wi + 2 * padding[1] - dilation[1] * (w.shape[3] - 1) - 1) // stride[1] + 1
        z = torch.zeros(n, 0, ho, wo, dtype=dtype, device=xd.device)
    else:
        z = F.conv2d(xd, w.to(dtype), None, tuple(stride), tuple(padding), tuple(dilation))
    col = lambda v: v.to(dtype)[None, :, None, None]  # noqa: E731
    if bias is not None:
        z = z + col(bias)
    if bias_map is not None:
        z = z + bias_map.to(dtype)[None]
    if scale is not None:
        z = z * col(scale)
    if shift is not None:
        z = z + col(shift)
    if out_index is not None:
        n, _, ho, wo = z.shape
        full = torch.zeros(n, out_channels, ho, wo, dtype=dtype, device=xd.device)
        if fill is not None:
            full += col(fill)
        full[:, out_index.long()] = z
        z = full
    if residual is not None and not residual_after_activation:
        z = z + residual.to(dtype)
    z = ORACLE_ACT[activation](z)
    if residual is not None and residual_after_activation:
        z = z + residual.to(dtype)
    return z
