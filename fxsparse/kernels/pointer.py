"""The pointer conv kernel: implicit GEMM through per-thread pointers, any GPU and the Triton
interpreter (the launch every other is checked against, and the one that scatters channels).

    rows  M = N * Ho * Wo             one row per output pixel
    cols  NCH = kept output channels  one column per row of the (compacted) weight
    depth K = KH * KW * Cin_kept      taps outer, input channels inner

A program owns a BLOCK_M x BLOCK_N output tile and walks ONE flattened loop over (tap, channel
block) pairs, so Triton's software pipeliner sees a single loop whatever the kernel size. Input
channels are innermost in K: for a channels_last `x` each row of the A tile is one contiguous run;
padding is a masked load. The epilogue runs on the fp32 accumulator:
    z = acc + bias + bias_map; [+ residual]; act(z); [+ residual]
and stores kept column j to output channel out_index[j]. Output channels out_index does not name
are written by a second launch with SOURCE=1 (no K loop; its "bias" is `fill`, indexed by output
channel), so pruned channels go through the same residual/activation code.

Split-K (SPLIT, K_SPLITS > 1), offered where the output's tiles leave SMs idle: programs along grid
axis 1 each reduce a slice of the K loop into an fp32 workspace and count themselves in on the
tile's arrival counter; the last slice to arrive sums the slices in slice order (deterministic)
and runs the epilogue (tile.last_slice_to_arrive).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fxsparse.kernels.layout import evenly_strided_rows

from fxsparse.kernels.tile import (grouped_tile, k_slice, last_slice_to_arrive, residual_and_activation,
                                  split_workspace, sum_slices)

SRC_CONV, SRC_FILL = 0, 1


@triton.jit
def conv_kernel(
    # pointers
    x_ptr, w_ptr, out_ptr, ws_ptr, arrivals_ptr,
    bias_ptr, bias_map_ptr, res_ptr, chan_ptr,
    # sizes
    M, NCH, CIN, H, W, HO, WO, K_SPLITS,
    # strides
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    son, soc, soh, sow,
    srn, src, srh, srw,
    sbc, sbh, sbw,
    # compile-time switches. The conv geometry is constexpr: the tap offsets and padding tests
    # then fold to immediates, and the few (kernel, stride, padding) combinations of real
    # networks share binaries across layers, whose sizes (H, W, CIN, M) stay run-time values.
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    SOURCE: tl.constexpr,  # 0: conv K loop, 1: none (the pruned channels' fill)
    SPLIT: tl.constexpr,  # SOURCE 0: K_SPLITS > 1 slices meet in the workspace (module doc)
    POINTWISE: tl.constexpr,  # 1x1, stride 1, no padding: no spatial masks, no tap arithmetic
    # Rows evenly strided (pixel m at m * stride(3): dense channels_last): addressed without
    # dividing m by the image sizes, which costs ~50 integer divisions per thread and tile.
    FLAT_X_ROWS: tl.constexpr,  # POINTWISE and x's rows are
    FLAT_OUT_ROWS: tl.constexpr,  # out's rows are, and the residual's
    EVEN_K: tl.constexpr,  # CIN % BLOCK_K == 0: no channel mask in the K loop
    HAS_CHAN_INDEX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_BIAS_MAP: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RESIDUAL_AFTER: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC_TYPE: tl.constexpr, IEEE: tl.constexpr,
    DOT_UPCAST: tl.constexpr,  # the interpreter's tl.dot mishandles bf16 (reads raw bits): upcast there
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)  # this program's split-K slice
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(NCH, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < NCH
    hw = HO * WO
    n_img = offs_m // hw
    rem = offs_m - n_img * hw
    oh = rem // WO
    ow = rem - oh * WO

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_TYPE)
    if SOURCE == 0:
        offs_k = tl.arange(0, BLOCK_K)
        # Per-row base pointers are built once, outside the K loop: inside it a tap only adds a
        # scalar offset (kh*DIL_H*sxh + kw*DIL_W*sxw) and tests the padding, so the loop body is
        # a few integer ops per row next to the loads and the dot. Image base offsets can pass
        # 2**31 elements on big batches: int64.
        if FLAT_X_ROWS:
            x_rows = x_ptr + offs_m.to(tl.int64) * sxw
        elif POINTWISE:
            x_rows = x_ptr + (n_img.to(tl.int64) * sxn + (oh * sxh + ow * sxw))
        else:
            ih0 = oh * STRIDE_H - PAD_H
            iw0 = ow * STRIDE_W - PAD_W
            # Rows of padded pixels point before/after their image here; they are masked.
            x_rows = x_ptr + (n_img.to(tl.int64) * sxn + (ih0 * sxh + iw0 * sxw))
        w_cols = w_ptr + offs_n.to(tl.int64) * swo
        # ONE flattened loop over (tap, channel block): with Cin = 64 and BLOCK_K = 64 a nested
        # channel loop would have one iteration per tap, and Triton pipelines only innermost loops.
        ci_blocks = tl.cdiv(CIN, BLOCK_K)
        k_lo, k_hi = k_slice(KH * KW * ci_blocks, pid_k, K_SPLITS, SPLIT)
        for k in range(k_lo, k_hi):
            tap = k // ci_blocks
            ci = (k - tap * ci_blocks) * BLOCK_K + offs_k
            kh = tap // KW
            kw = tap - kh * KW
            if POINTWISE:
                a_ptrs = x_rows[:, None] + ci[None, :] * sxc
                a_mask = mask_m[:, None]
            else:
                ih = ih0 + kh * DIL_H
                iw = iw0 + kw * DIL_W
                valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a_ptrs = (x_rows + (kh * (DIL_H * sxh) + kw * (DIL_W * sxw)))[:, None] + ci[None, :] * sxc
                a_mask = valid[:, None]
            b_ptrs = w_cols[None, :] + (ci[:, None] * swc + (kh * swh + kw * sww))
            if EVEN_K:
                a = tl.load(a_ptrs, mask=a_mask, other=0.0)
                b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                kmask = ci < CIN
                a = tl.load(a_ptrs, mask=a_mask & kmask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=kmask[:, None] & mask_n[None, :], other=0.0)
            if DOT_UPCAST:
                acc = tl.dot(a.to(ACC_TYPE), b.to(ACC_TYPE), acc, out_dtype=ACC_TYPE)
            elif IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC_TYPE)
            else:
                acc = tl.dot(a, b, acc, out_dtype=ACC_TYPE)

    finish = True
    if SOURCE == 0 and SPLIT:
        # Every slice stores its partial sums; the last of the tile's slices to finish sums them
        # and runs the epilogue (tile.last_slice_to_arrive).
        ws_tile = offs_m.to(tl.int64)[:, None] * NCH + offs_n[None, :]
        ws_mask = mask_m[:, None] & mask_n[None, :]
        tl.store(ws_ptr + (pid_k * M).to(tl.int64) * NCH + ws_tile, acc, mask=ws_mask)
        finish = last_slice_to_arrive(arrivals_ptr + pid, K_SPLITS)
    if finish:
        if SOURCE == 0 and SPLIT:
            acc = sum_slices(ws_ptr, ws_tile, ws_mask, M, NCH, K_SPLITS).to(ACC_TYPE)
        if HAS_CHAN_INDEX:
            oc = tl.load(chan_ptr + offs_n, mask=mask_n, other=0)
        else:
            oc = offs_n
        z = acc
        if SOURCE == 1:
            if HAS_BIAS:  # `fill`, indexed by output channel
                z += tl.load(bias_ptr + oc, mask=mask_n, other=0.0).to(ACC_TYPE)[None, :]
        else:
            if HAS_BIAS:
                z += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_TYPE)[None, :]
            if HAS_BIAS_MAP:
                bm_ptrs = bias_map_ptr + offs_n[None, :] * sbc + (oh * sbh + ow * sbw)[:, None]
                z += tl.load(bm_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(ACC_TYPE)
        out_mask = mask_m[:, None] & mask_n[None, :]
        oc64 = oc.to(tl.int64)
        if FLAT_OUT_ROWS:
            # (the compiler drops n_img, oh and ow where nothing else uses them)
            r_rows = offs_m.to(tl.int64) * srw
            o_rows = offs_m.to(tl.int64) * sow
        else:
            r_rows = n_img.to(tl.int64) * srn + oh * srh + ow * srw
            o_rows = n_img.to(tl.int64) * son + oh * soh + ow * sow
        r = z
        if HAS_RESIDUAL:
            r_ptrs = res_ptr + r_rows[:, None] + oc64[None, :] * src
            r = tl.load(r_ptrs, mask=out_mask, other=0.0).to(ACC_TYPE)
        z = residual_and_activation(z, r, HAS_RESIDUAL, RESIDUAL_AFTER, ACTIVATION)
        o_ptrs = out_ptr + o_rows[:, None] + oc64[None, :] * soc
        tl.store(o_ptrs, z.to(out_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------- host side

# Under the interpreter (nothing to time) and for the fill launch (memory-bound, tiny): one tile each.
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1)
FILL_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=1)


def _cdiv(a: int, b: int) -> int:
    # triton.cdiv is a jit function: from Python it costs ~4 us (constexpr unwrapping)
    return -(-a // b)


def _common_args(call, interpret: bool) -> dict:
    """What the conv and the fill launch of `call` (a problem.ConvCall) both take."""
    x, weight, out, residual, bias_map = call.x, call.weight, call.out, call.residual, call.bias_map
    _, _, h, w = x.shape
    n, _, ho, wo = out.shape
    kh, kw = weight.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = call.stride, call.padding, call.dilation
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    bm_strides = bias_map.stride() if bias_map is not None else (0, 0, 0)
    return dict(
        x_ptr=x, w_ptr=weight, out_ptr=out, res_ptr=residual if residual is not None else out,
        M=n * ho * wo, H=h, W=w, HO=ho, WO=wo,
        sxn=x.stride(0), sxc=x.stride(1), sxh=x.stride(2), sxw=x.stride(3),
        swo=weight.stride(0), swc=weight.stride(1), swh=weight.stride(2), sww=weight.stride(3),
        son=out.stride(0), soc=out.stride(1), soh=out.stride(2), sow=out.stride(3),
        srn=res_strides[0], src=res_strides[1], srh=res_strides[2], srw=res_strides[3],
        sbc=bm_strides[0], sbh=bm_strides[1], sbw=bm_strides[2],
        KH=kh, KW=kw, STRIDE_H=sh, STRIDE_W=sw, PAD_H=ph, PAD_W=pw, DIL_H=dh, DIL_W=dw,
        POINTWISE=call.pointwise,
        FLAT_X_ROWS=call.pointwise and evenly_strided_rows(x),
        FLAT_OUT_ROWS=evenly_strided_rows(out) and (residual is None or evenly_strided_rows(residual)),
        HAS_RESIDUAL=residual is not None, RESIDUAL_AFTER=bool(call.residual_after_activation),
        ACTIVATION=call.activation_code, ACC_TYPE=tl.float64 if x.dtype == torch.float64 else tl.float32,
        IEEE=x.dtype in (torch.float32, torch.float64),
        DOT_UPCAST=interpret and x.dtype == torch.bfloat16,
    )


def launch(call, cfg: dict, splits: int = 1) -> None:
    """Writes the kept channels of `call` with tile `cfg` ({BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    num_warps, num_stages}), the K loop split `splits` ways."""
    nch, cin = call.weight.shape[:2]
    args = _common_args(call, call.x.device.type == "cpu")
    dummy = call.out
    tiles = _cdiv(args["M"], cfg["BLOCK_M"]) * _cdiv(nch, cfg["BLOCK_N"])
    ws_dtype = torch.float64 if call.x.dtype == torch.float64 else torch.float32
    ws, arrivals = (split_workspace(splits, args["M"], nch, tiles, call.x.device, ws_dtype) if splits > 1
                    else (dummy, dummy))
    conv_kernel[(tiles, splits)](
        **args, ws_ptr=ws, arrivals_ptr=arrivals, K_SPLITS=splits, NCH=nch, CIN=cin,
        bias_ptr=call.bias if call.bias is not None else dummy,
        bias_map_ptr=call.bias_map if call.bias_map is not None else dummy,
        chan_ptr=call.out_index if call.out_index is not None else dummy,
        HAS_CHAN_INDEX=call.out_index is not None, HAS_BIAS=call.bias is not None,
        HAS_BIAS_MAP=call.bias_map is not None, SOURCE=SRC_CONV, SPLIT=splits > 1, EVEN_K=cin % cfg["BLOCK_K"] == 0,
        **cfg)


def launch_fill(call, channels) -> None:
    """Writes the output channels `channels` (those out_index does not name): `fill`, then the
    residual and activation, as for a computed channel."""
    args = _common_args(call, call.x.device.type == "cpu")
    cfg = INTERPRET_CONFIG if call.x.device.type == "cpu" else FILL_CONFIG
    dummy = call.out
    count = channels.numel()
    conv_kernel[(_cdiv(args["M"], cfg["BLOCK_M"]) * _cdiv(count, cfg["BLOCK_N"]), 1)](
        **args, ws_ptr=dummy, arrivals_ptr=dummy, bias_ptr=call.fill if call.fill is not None else dummy,
        bias_map_ptr=dummy, chan_ptr=channels, NCH=count, CIN=0, K_SPLITS=1, HAS_CHAN_INDEX=True,
        HAS_BIAS=call.fill is not None, HAS_BIAS_MAP=False, SOURCE=SRC_FILL, SPLIT=False, EVEN_K=True, **cfg)
