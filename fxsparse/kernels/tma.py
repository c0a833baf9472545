"""Conv launches whose tiles move through Hopper's tensor memory accelerator (TMA).

The A and B tiles are loaded, and the finished output tile stored, by TMA descriptors
(`triton.tools.tensor_descriptor.TensorDescriptor`) instead of per-thread pointers: no
address arithmetic or masks per element, bounds handled by the copy engine (coordinates
past the tensor, negative ones included, read as zeros; stores past it are dropped). The
epilogue is the pointer kernel's (bias, bias map, residual before or after the activation).
Two launches:

- **gemm** (1x1, stride 1, no padding): a plain GEMM over pixel rows,
  out[M, NCH] = x[M, CIN] @ w[NCH, CIN]^T with M = N * H * W.
- **box** (any kernel size and stride): a program computes a BOX_H x BOX_W block of output
  pixels of one image (the warp-specialised launch of box_ws.py: of BOX_N consecutive images,
  `box_shape`). For tap (kh, kw) its
  input is a same-sized block of input pixels sampled every `stride` pixels, starting
  (kh * dil - pad, kw * dil - pad) from the block's origin: one box load, where the copy
  engine's zero fill outside the image *is* the conv's zero padding. A box can only address
  consecutive elements of each dimension, so x is described as [N, H/sh, sh, W/sw, sw*C]
  (pixel (ih, iw) = (sh*i + ph, sw*j + pw): the row phase ph is a dimension of its own, the
  column phase pw selects a channel run of the merged last dimension); a tap's phases and
  offsets are one coordinate each. For stride 1 this is just [N, H, 1, W, C]. The block is a
  rectangle, so maps whose sides are not multiples of the box compute some rows for nothing
  (`box_shape` keeps that small).

Only for what a descriptor can address (`eligible`): fp16/bf16, channels innermost, 16-byte
aligned bases and strides, the output written in full (no channel scatter); strided boxes
also need the input's sides to be multiples of the stride and, across columns, pixels that hold
exactly the conv's channels (the merged last dimension must not run into other data). choices.py
offers these launches beside the pointer kernel's, which runs instead wherever the tensors of a
later call are not eligible.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fxsparse.kernels import box_ws
from fxsparse.kernels.layout import evenly_strided_rows
from fxsparse.kernels.tile import (box_pixels, box_tap, box_tile_origin, grouped_tile, k_slice, last_slice_to_arrive,
                                  residual_and_activation, split_workspace, sum_slices)

Tensor = torch.Tensor

try:  # triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the launches are never offered
    TensorDescriptor = None


@triton.jit
def _epilogue(acc, offs_n, mask_n, bias_ptr, bias_map, r,
              HAS_BIAS: tl.constexpr, HAS_BIAS_MAP: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              RESIDUAL_AFTER: tl.constexpr, ACTIVATION: tl.constexpr):
    """acc + bias + bias map, the residual before or after the activation."""
    z = acc
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS_MAP:
        z += bias_map
    return residual_and_activation(z, r, HAS_RESIDUAL, RESIDUAL_AFTER, ACTIVATION)


@triton.jit
def _gemm_kernel(
    x_desc, w_desc, out_desc, res_desc,
    bias_ptr,
    M, NCH, CIN,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RESIDUAL_AFTER: tl.constexpr, ACTIVATION: tl.constexpr,
    OUT_BF16: tl.constexpr,
    DOT_UPCAST: tl.constexpr,  # the interpreter's tl.dot mishandles bf16 (as in pointer.py)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(NCH, BLOCK_N), GROUP_M)
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
    r = acc
    if HAS_RESIDUAL:
        r = res_desc.load([row0, col0]).to(tl.float32)
    z = _epilogue(acc, offs_n, offs_n < NCH, bias_ptr, acc, r, HAS_BIAS, False, HAS_RESIDUAL, RESIDUAL_AFTER,
                  ACTIVATION)
    if OUT_BF16:
        out_desc.store([row0, col0], z.to(tl.bfloat16))
    else:
        out_desc.store([row0, col0], z.to(tl.float16))


@triton.jit
def _box_kernel(
    x_desc, w_desc, out_desc, res_desc,
    bias_ptr, bias_map_ptr, ws_ptr, arrivals_ptr,
    N, HO, WO, NCH, CIN, K_SPLITS,
    sbc, sbh, sbw,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BIAS_MAP: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, RESIDUAL_AFTER: tl.constexpr, ACTIVATION: tl.constexpr,
    OUT_BF16: tl.constexpr, DOT_UPCAST: tl.constexpr,
    SPLIT: tl.constexpr,  # K_SPLITS > 1 slices meet in an fp32 workspace, as conv2d's SPLIT do
    EVEN_CIN: tl.constexpr,  # CIN % BLOCK_K == 0
    BOX_N: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BOX_N * BOX_H * BOX_W
    # Across columns a box of channel run `phase` may reach past CIN into the next phase's
    # channels: zero weights meet them, but a non-finite input there would still poison the sum.
    MASK_CHANNELS: tl.constexpr = STRIDE_W > 1 and not EVEN_CIN
    n0, oh0, ow0, col0 = box_tile_origin(tl.program_id(0), N, HO, WO, NCH, BOX_N, BOX_H, BOX_W, BLOCK_N, GROUP_M)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flattened loop over (tap, channel block), as in conv2d: one loop to pipeline.
    ci_blocks = tl.cdiv(CIN, BLOCK_K)
    k_lo, k_hi = k_slice(KH * KW * ci_blocks, tl.program_id(1), K_SPLITS, SPLIT)
    for k in range(k_lo, k_hi):
        tap, ci, dh, phase_h, dw, chan = box_tap(k, ci_blocks, CIN, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
                                                 DIL_H, DIL_W, BLOCK_K)
        a = x_desc.load([n0, oh0 + dh, phase_h, ow0 + dw, chan])
        a = tl.reshape(a, (BLOCK_M, BLOCK_K))
        if MASK_CHANNELS:
            a = tl.where((ci + tl.arange(0, BLOCK_K) < CIN)[None, :], a, 0.0)
        b = tl.reshape(w_desc.load([col0, tap, ci]), (BLOCK_N, BLOCK_K))
        if DOT_UPCAST:
            acc = tl.dot(a.to(tl.float32), b.T.to(tl.float32), acc)
        else:
            acc = tl.dot(a, b.T, acc)

    offs_n = col0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < NCH
    img, oh, ow, inside = box_pixels(tl.arange(0, BLOCK_M), n0, oh0, ow0, N, HO, WO, BOX_H, BOX_W)
    finish = True
    if SPLIT:
        # Partial sums into the workspace [K_SPLITS, M, NCH] (rows: output pixels in NHWC order);
        # the tile's last slice to arrive sums them and runs the epilogue, as conv2d's split-K does.
        rows = N * HO * WO
        ws_tile = ((img * HO + oh).to(tl.int64) * WO + ow)[:, None] * NCH + offs_n[None, :]
        ws_mask = inside[:, None] & mask_n[None, :]
        tl.store(ws_ptr + (tl.program_id(1) * rows).to(tl.int64) * NCH + ws_tile, acc, mask=ws_mask)
        finish = last_slice_to_arrive(arrivals_ptr + tl.program_id(0), K_SPLITS)
    if finish:
        if SPLIT:
            acc = sum_slices(ws_ptr, ws_tile, ws_mask, rows, NCH, K_SPLITS)
        bias_map = acc
        if HAS_BIAS_MAP:
            bm_ptrs = bias_map_ptr + offs_n[None, :] * sbc + (oh * sbh + ow * sbw)[:, None]
            bias_map = tl.load(bm_ptrs, mask=inside[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        r = acc
        if HAS_RESIDUAL:
            r = tl.reshape(res_desc.load([n0, oh0, ow0, col0]), (BLOCK_M, BLOCK_N)).to(tl.float32)
        z = _epilogue(acc, offs_n, mask_n, bias_ptr, bias_map, r, HAS_BIAS, HAS_BIAS_MAP, HAS_RESIDUAL,
                      RESIDUAL_AFTER, ACTIVATION)
        if OUT_BF16:
            out_desc.store([n0, oh0, ow0, col0], tl.reshape(z.to(tl.bfloat16), (BOX_N, BOX_H, BOX_W, BLOCK_N)))
        else:
            out_desc.store([n0, oh0, ow0, col0], tl.reshape(z.to(tl.float16), (BOX_N, BOX_H, BOX_W, BLOCK_N)))


# --------------------------------------------------------------------------- host side

def _rows(t: Tensor) -> Optional[tuple]:
    """(rows, channels, row stride) of an NCHW-indexed tensor whose pixels are evenly strided
    rows of contiguous channels (dense channels_last, or a channel slice of one)."""
    n, c, h, w = t.shape
    if (t.stride(1) != 1 and c > 1) or not evenly_strided_rows(t):
        return None
    return n * h * w, c, t.stride(3)


def _addressable(t: Tensor, *strides: int) -> bool:
    """What a TMA descriptor needs: a 16-byte aligned base and outer strides."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in strides)


def _nhwc(t: Tensor) -> Optional[tuple]:
    """The (N, H, W, C) sizes and strides of a tensor whose channels are innermost, if a
    descriptor can address it."""
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if (sc != 1 and c > 1) or not _addressable(t, sn, sh, sw):
        return None
    return [n, h, w, c], [sn, sh, sw, 1]


def _phased(x: Tensor, stride) -> Optional[tuple]:
    """x as the [N, H/sh, sh, W/sw, sw*C] sizes and strides of a box launch (module doc), if a
    descriptor can address it that way."""
    sh, sw = int(stride[0]), int(stride[1])
    nhwc = _nhwc(x)
    if nhwc is None:
        return None
    (n, h, w, c), (sn, sxh, sxw, _) = nhwc
    if h % sh or w % sw or (sw > 1 and sxw != c):
        return None  # (phases past the image, or channel runs into other data: module doc)
    return [n, h // sh, sh, w // sw, sw * c], [sn, sh * sxh, sxh, sw * sxw, 1]


def eligible(x: Tensor, weight: Tensor, out: Tensor, residual: Optional[Tensor], out_index: Optional[Tensor],
             bias_map: Optional[Tensor], pointwise: bool, stride) -> Optional[str]:
    """Which TMA launch ("gemm" or "box") can run this conv, or None (see the module doc)."""
    if TensorDescriptor is None or out_index is not None:
        return None
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype or out.dtype != x.dtype:
        return None
    if residual is not None and residual.dtype != x.dtype:
        return None
    nch, cin, kh, kw = weight.shape
    swo, swc, swh, sww = weight.stride()
    if (swc != 1 and cin > 1) or (kh * kw > 1 and (swh != kw * cin or sww != cin)):
        return None  # the weight as [NCH, KH*KW, CIN] with channels innermost
    if not _addressable(weight, swo, *((cin,) if kh * kw > 1 else ())):
        return None
    if pointwise and bias_map is None:
        for t in (x, out) + ((residual,) if residual is not None else ()):
            r = _rows(t)
            if r is None or not _addressable(t, r[2]):
                return None
        return "gemm"
    if _phased(x, stride) is None:
        return None
    if any(_nhwc(t) is None for t in (out,) + ((residual,) if residual is not None else ())):
        return None
    return "box"


def warp_specialisable(kind: Optional[str], x: Tensor, weight: Tensor, out: Tensor, residual: Optional[Tensor],
                       bias_map: Optional[Tensor], stride, block_k: int) -> bool:
    """Whether a conv that TMA launch `kind` can run (what `eligible` said) may run as a
    warp-specialised box launch (box_ws.py): an sm90 device with Gluon's Hopper API, no bias
    map, no strided box whose channel run reaches into the next phase (the WS launch has no
    register pass to mask them), and tensors a box addresses (`eligible` checked them for
    "box"; a 1x1 conv's "gemm" read them as rows)."""
    if kind is None or bias_map is not None or not box_ws.usable(x.device):
        return False
    if int(stride[1]) > 1 and weight.shape[1] % block_k:
        return False
    return kind == "box" or (_phased(x, stride) is not None and all(
        _nhwc(t) is not None for t in (out,) + ((residual,) if residual is not None else ())))


def box_shape(block_m: int, n: int, ho: int, wo: int, images: bool = False) -> tuple:
    """The (BOX_N, BOX_H, BOX_W) of `block_m` output pixels (powers of two) that computes the
    fewest rows for nothing over n images of ho x wo (ties: the wider box, whose rows are
    longer contiguous runs, then fewer images). BOX_N is 1 unless `images`; then rows of at
    least 8 pixels where the map is that wide (shorter runs make many small copies of a box):
    a 56x56 map takes 2 images of 8x8 blocks, where one image's 2x64 block computes 12.5% of
    its rows for nothing."""
    narrowest = min(8, 1 << max(0, wo - 1).bit_length()) if images else 1
    best = None
    for bw in (1 << e for e in range(block_m.bit_length())):
        for bn in (1 << e for e in range((block_m // bw).bit_length())) if images else (1,):
            bh = block_m // (bw * bn)
            if bw < narrowest or bh * bw * bn != block_m:
                continue
            computed = (-(-n // bn) * bn) * (-(-ho // bh) * bh) * (-(-wo // bw) * bw)
            key = (computed, -bw, bn)
            if best is None or key < best[0]:
                best = (key, (bn, bh, bw))
    return best[1]


def _epilogue_args(call) -> dict:
    dummy = call.out
    return dict(bias_ptr=call.bias if call.bias is not None else dummy, HAS_BIAS=call.bias is not None,
                HAS_RESIDUAL=call.residual is not None, RESIDUAL_AFTER=bool(call.residual_after_activation),
                ACTIVATION=call.activation_code, OUT_BF16=call.out.dtype == torch.bfloat16,
                DOT_UPCAST=call.out.device.type == "cpu" and call.out.dtype == torch.bfloat16)


def launch_gemm(call, cfg: dict) -> None:
    """A 1x1 conv (what `eligible` called "gemm") as a TMA GEMM with tile config `cfg`."""
    x, weight, out, residual = call.x, call.weight, call.out, call.residual
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    nch, cin = weight.shape[:2]
    m, _, sxw = _rows(x)
    out_desc = TensorDescriptor(out, [m, nch], [_rows(out)[2], 1], [bm, bn])
    res_desc = out_desc if residual is None else TensorDescriptor(residual, [m, nch], [_rows(residual)[2], 1], [bm, bn])
    grid = ((-(-m // bm)) * (-(-nch // bn)),)  # (triton.cdiv costs ~4 us from Python)
    _gemm_kernel[grid](
        TensorDescriptor(x, [m, cin], [sxw, 1], [bm, bk]),
        TensorDescriptor(weight, [nch, cin], [weight.stride(0), 1], [bn, bk]),
        out_desc, res_desc, M=m, NCH=nch, CIN=cin, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.get("GROUP_M", 8),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_epilogue_args(call))


def launch_box(call, cfg: dict, splits: int = 1) -> None:
    """A conv (what `eligible` called "box") as TMA box loads of one image each, tile config `cfg`,
    the K loop split `splits` ways."""
    x, weight, out, residual, bias_map = call.x, call.weight, call.out, call.residual, call.bias_map
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    nch, cin, kh, kw = weight.shape
    n, _, ho, wo = out.shape
    box = box_n, box_h, box_w = box_shape(cfg["BLOCK_M"], n, ho, wo)
    out_desc = TensorDescriptor(out, *_nhwc(out), [*box, bn])
    res_desc = out_desc if residual is None else TensorDescriptor(residual, *_nhwc(residual), [*box, bn])
    bm_strides = bias_map.stride() if bias_map is not None else (0, 0, 0)
    grid = ((-(-n // box_n)) * (-(-ho // box_h)) * (-(-wo // box_w)) * (-(-nch // bn)), splits)
    ws, arrivals = split_workspace(splits, n * ho * wo, nch, grid[0], out.device) if splits > 1 else (out, out)
    (sh, sw), (ph, pw), (dh, dw) = call.stride, call.padding, call.dilation
    _box_kernel[grid](
        TensorDescriptor(x, *_phased(x, call.stride), [box_n, box_h, 1, box_w, bk]),
        TensorDescriptor(weight, [nch, kh * kw, cin], [weight.stride(0), cin, 1], [bn, 1, bk]),
        out_desc, res_desc, bias_map_ptr=bias_map if bias_map is not None else out,
        ws_ptr=ws, arrivals_ptr=arrivals, K_SPLITS=splits, SPLIT=splits > 1,
        N=n, HO=ho, WO=wo, NCH=nch, CIN=cin, sbc=bm_strides[0], sbh=bm_strides[1], sbw=bm_strides[2],
        KH=kh, KW=kw, STRIDE_H=sh, STRIDE_W=sw, EVEN_CIN=cin % bk == 0,
        PAD_H=ph, PAD_W=pw, DIL_H=dh, DIL_W=dw, HAS_BIAS_MAP=bias_map is not None,
        BOX_N=box_n, BOX_H=box_h, BOX_W=box_w, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.get("GROUP_M", 8),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **_epilogue_args(call))


def launch_ws(call, cfg: dict) -> None:
    """A conv that `warp_specialisable` allows as box_ws.py's warp-specialised box launch, its
    boxes spanning images where that computes fewer rows for nothing."""
    n, _, ho, wo = call.out.shape
    box_ws.launch(call, *_phased(call.x, call.stride), cfg, box_shape(cfg["BLOCK_M"], n, ho, wo, images=True))
