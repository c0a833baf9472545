"""Channel moves that keep a tensor's memory format: selecting channels and scattering them
into a wider channel layout (used by the kernels' launcher, the lowering's graph code and its
timing, so that all three build the same layout); and the bias map of a conv's constant input
channels, which the lowered graph computes on every call where the spatial size is symbolic."""
from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    # (a 1x1-spatial tensor is both layouts; either path is then the same copy)
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def evenly_strided_rows(t: torch.Tensor) -> bool:
    """Pixel (n, h, w) of NCHW-indexed `t` sits at (n*H*W + h*W + w) * stride(3): rows of a
    plain GEMM. True for dense channels_last tensors and for channel slices of them."""
    n, _, h, w = t.shape
    sn, _, sh, sw = t.stride()
    return (h == 1 or sh == w * sw) and (n == 1 or sn == h * w * sw)


def select_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[:, index] in x's memory format. `index_select` on dim 1 returns a contiguous (NCHW)
    tensor whatever x is: a channels_last activation selected that way reaches the next conv,
    or our kernel's residual read, with a channel stride of H*W (uncoalesced; ResNet-50 with
    per-conv masks ran at 0.6x of Inductor on the H100 with it). On a channels_last x this
    selects along the innermost axis of the NHWC view, so the result is channels_last too."""
    if is_channels_last(x):
        return x.permute(0, 2, 3, 1).index_select(3, index).permute(0, 3, 1, 2)
    return x.index_select(1, index)


def relayout(x: torch.Tensor, src_pos: torch.Tensor, dst_pos: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """A tensor whose channel dst_pos[i] is x's channel src_pos[i]; other channels hold fill.
    It has x's memory format (channels_last in, channels_last out; see select_channels).

    The base is materialised (a copy of the expanded fill, `_filled`), never an expanded view:
    Inductor (seen on torch 2.13, CPU) miscompiles index_copy into a base expanded from a 0-d tensor, and a
    training graph built on a gather with repeated indices or on cat + gather got wrong
    gradients (or heap corruption) from it; this form matches eager, forward and backward."""
    if is_channels_last(x):
        nhwc = x.permute(0, 2, 3, 1)
        base = _filled((*nhwc.shape[:3], fill.shape[0]), fill, 3, x.dtype)
        return base.index_copy(3, dst_pos, nhwc.index_select(3, src_pos)).permute(0, 3, 1, 2)
    base = _filled((x.shape[0], fill.shape[0], *x.shape[2:]), fill, 1, x.dtype)
    return base.index_copy(1, dst_pos, x.index_select(1, src_pos))


def _filled(shape, fill: torch.Tensor, dim: int, dtype) -> torch.Tensor:
    """A new tensor of `shape` holding `fill` along `dim`: the fill expanded to the full shape,
    then copied. No broadcast against a symbolic size: where the guards know a dim to be 1 (a
    4-pixel-wide input after a stride-2 3x3 conv, under dynamic shapes), fake tensors and
    Inductor broadcast `[1, C, 1, 1] + [N, C, H, W]` to the literal 1 or to W by operand order,
    each its own way, and a flatten of the result then failed to lower (N*C*H*1 against
    N*C*H*W: ValueRangeError). (Not `zeros + expanded`: Inductor drops an add of zeros, leaving
    the expanded view as the base.)"""
    view = [1] * len(shape)
    view[dim] = -1
    return fill.to(dtype).reshape(view).expand(shape).clone(memory_format=torch.contiguous_format)


def constant_input_map(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """[rows, Ho, Wo]: what a conv's constant input channels add to its output for an input of
    x's spatial size (only x's size is read). `weight` is [rows, 1, kh, kw]: each output row's
    weight columns of those channels, times their constants, summed. Convolved over an all-ones
    image with the conv's stride, padding and dilation, it is exact where the filters meet the
    zero padding: one 1-channel conv at batch 1."""
    ones = weight.new_ones((1, 1, x.shape[-2], x.shape[-1]))
    return torch.conv2d(ones, weight, None, stride, padding, dilation)[0]
