"""The meaning of `fxsparse::conv2d`, written in aten ops.

This is the op's CPU implementation, the formula its backward differentiates,
and the definition the Triton kernel must match. Operands are upcast to fp32
(as the kernel accumulates in fp32) and the result is cast back to x's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxsparse.kernels.problem import ConvArgs

from .activations import apply_activation


def conv2d_reference(args: ConvArgs) -> torch.Tensor:
    (x, weight, bias, stride, padding, dilation, in_index, out_index, out_channels, fill, bias_map, residual,
     activation, residual_after_activation) = args
    acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xs = x if in_index is None else x.index_select(1, in_index.long())
    if weight.shape[0] == 0:
        # Every output channel pruned: F.conv2d refuses an empty weight, and the result is all
        # fill. A one-row zero conv sliced to zero rows gives the right (N, 0, Ho, Wo) shape.
        z = F.conv2d(xs.to(acc_dtype), weight.new_zeros((1,) + tuple(weight.shape[1:])).to(acc_dtype),
                     None, tuple(stride), tuple(padding), tuple(dilation))[:, :0]
    else:
        z = F.conv2d(xs.to(acc_dtype), weight.to(acc_dtype), None, tuple(stride), tuple(padding),
                     tuple(dilation))
    if bias is not None:
        z = z + _per_channel(bias, acc_dtype)
    if bias_map is not None:
        z = z + bias_map.to(acc_dtype)
    if out_index is not None:
        n, _, ho, wo = z.shape
        base = (
            z.new_zeros(out_channels)
            if fill is None
            else fill.to(acc_dtype)
        )
        wide = _per_channel(base, acc_dtype).expand(n, out_channels, ho, wo)
        z = wide.index_copy(1, out_index.long(), z)
    if residual is not None and not residual_after_activation:
        z = z + residual.to(acc_dtype)
    y = apply_activation(activation, z)
    if residual is not None and residual_after_activation:
        y = y + residual.to(acc_dtype)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)


def _per_channel(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(dtype).reshape(1, -1, 1, 1)
