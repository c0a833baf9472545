"""A 1x1 conv as a GEMM whose tiles move through Hopper's tensor memory accelerator (TMA).

A 1x1, stride-1, unpadded conv on dense channels_last tensors is a plain GEMM:

    out[M, NCH] = x[M, CIN] @ weight[NCH, CIN]^T,   M = N * H * W

Here the A and B tiles are loaded, and the finished output tile stored, by TMA descriptors
(`triton.tools.tensor_descriptor.TensorDescriptor`) instead of per-thread pointers: no
address arithmetic or masks per element, bounds handled by the copy engine (rows and
channels past the tensor read as zeros, stores past it are dropped). The epilogue is the
conv kernel's (bias, folded BatchNorm scale and shift, residual before or after the
activation), with the residual tile loaded by TMA too.

Only for what a descriptor can address (`eligible`): fp16/bf16, channels innermost, row
strides and base addresses 16-byte aligned, the output written in full (no channel scatter).
conv2d.py offers these launches to its tuner beside its own kernel's, and falls back to its
own kernel wherever a tensor of a later call is not eligible.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fxsparse.kernels.epilogue import activation

Tensor = torch.Tensor

try:  # triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the launches are never offered
    TensorDescriptor = None


@triton.jit
def _pointwise_tma_kernel(
    x_desc, w_desc, out_desc, res_desc,
    bias_ptr, scale_ptr, shift_ptr,
    M, NCH, CIN,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RESIDUAL_AFTER: tl.constexpr, ACTIVATION: tl.constexpr,
    OUT_BF16: tl.constexpr,
    DOT_UPCAST: tl.constexpr,  # the interpreter's tl.dot mishandles bf16 (as in conv2d.py)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order, as in conv2d._conv_tile: GROUP_M row tiles share a weight column tile.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(NCH, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(CIN, BLOCK_K)):
        a = x_desc.load([row0, k * BLOCK_K])
        b = w_desc.load([col0, k * BLOCK_K])
        if DOT_UPCAST:
            acc = tl.dot(a.to(tl.float32), b.T.to(tl.float32), acc)
        else:
            acc = tl.dot(a, b.T, acc)

    offs_n = col0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < NCH
    z = acc
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        z *= tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        z += tl.load(shift_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        r = res_desc.load([row0, col0]).to(tl.float32)
        if not RESIDUAL_AFTER:
            z += r
    z = activation(z, ACTIVATION)
    if HAS_RESIDUAL:
        if RESIDUAL_AFTER:
            z += r
    if OUT_BF16:
        out_desc.store([row0, col0], z.to(tl.bfloat16))
    else:
        out_desc.store([row0, col0], z.to(tl.float16))


def _rows(t: Tensor) -> Optional[tuple]:
    """(base, rows, channels, row stride) of an NCHW-indexed tensor whose pixels are evenly
    strided rows of contiguous channels (dense channels_last, or a channel slice of one)."""
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if sc != 1 and c > 1:
        return None
    if not ((h == 1 or sh == w * sw) and (n == 1 or sn == h * w * sw)):
        return None
    return t, n * h * w, c, sw


def _addressable(t: Tensor, row_stride: int) -> bool:
    """What a TMA descriptor needs: 16-byte aligned base and row stride."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and (row_stride * size) % 16 == 0


def eligible(x: Tensor, weight: Tensor, out: Tensor, residual: Optional[Tensor],
             out_index: Optional[Tensor], bias_map: Optional[Tensor]) -> bool:
    """Whether this 1x1 stride-1 unpadded conv can run as a TMA GEMM (see the module doc)."""
    if TensorDescriptor is None or out_index is not None or bias_map is not None:
        return False
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype or out.dtype != x.dtype:
        return False
    nch, cin = weight.shape[:2]
    if weight.stride(1) != 1 and cin > 1:
        return False
    if not _addressable(weight, weight.stride(0)):
        return False
    for t in (x, out) + ((residual,) if residual is not None else ()):
        r = _rows(t)
        if r is None or not _addressable(t, r[3]) or t.dtype != x.dtype:
            return False
    return True


def launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
           shift: Optional[Tensor], residual: Optional[Tensor], activation_code: int,
           residual_after_activation: bool, out: Tensor, cfg: dict) -> None:
    """Runs the conv with tile config `cfg` (BLOCK_M/N/K, GROUP_M, num_warps, num_stages).
    The caller has checked `eligible`."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    _, m, cin, sxw = _rows(x)
    _, _, nch, sow = _rows(out)
    x_desc = TensorDescriptor(x, [m, cin], [sxw, 1], [bm, bk])
    w_desc = TensorDescriptor(weight, [nch, cin], [weight.stride(0), 1], [bn, bk])
    out_desc = TensorDescriptor(out, [m, nch], [sow, 1], [bm, bn])
    res_desc = out_desc
    if residual is not None:
        res_desc = TensorDescriptor(residual, [m, nch], [_rows(residual)[3], 1], [bm, bn])
    dummy = out
    grid = ((-(-m // bm)) * (-(-nch // bn)),)  # (triton.cdiv costs ~4 us from Python)
    _pointwise_tma_kernel[grid](
        x_desc, w_desc, out_desc, res_desc,
        bias if bias is not None else dummy, scale if scale is not None else dummy,
        shift if shift is not None else dummy,
        m, nch, cin,
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        HAS_RESIDUAL=residual is not None, RESIDUAL_AFTER=bool(residual_after_activation),
        ACTIVATION=activation_code, OUT_BF16=out.dtype == torch.bfloat16,
        DOT_UPCAST=x.device.type == "cpu" and x.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.get("GROUP_M", 8),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
