"""Triton implicit-GEMM convolution behind `torch.ops.fxsparse.conv2d`.

Decomposition (NHWC implicit GEMM, groups=1):

    rows  M = N * Ho * Wo             one row per output pixel
    cols  NCH = kept output channels  one column per row of the (compacted) weight
    depth K = KH * KW * Cin_kept      taps outer, input channels inner

A program owns a BLOCK_M x BLOCK_N output tile and walks ONE flattened loop
over (tap, channel block) pairs, so Triton's software pipeliner (num_stages)
sees a single loop whatever the kernel size (a nested channel loop has one
iteration per tap when Cin = BLOCK_K = 64: nothing to pipeline). Input channels
are innermost in K, so for a channels_last `x` each row of the A tile is one
contiguous run of channels; padding is a masked load (zeros). Row base pointers
are built once before the loop; a tap adds a scalar offset. Kernel size,
stride, padding and dilation are constexpr (folded offsets; few distinct
values in real networks, so binaries are shared across layers); image sizes
stay run-time values. The weight is read through its strides; channels_last
weights make each column of the B tile contiguous, which is how the backend
pre-packs them.

`in_index` (read a subset of x's channels) is NOT gathered inside the K loop:
an indirect channel offset per element turns every A-tile load into 2-byte
scalar loads, which measured 4-8x slower on H100 than one memory-bound gather
copy plus the dense conv (seed layer B=128 keeping half the inputs: 631 us in
kernel vs cuDNN 74 us on the compacted input). So the launcher gathers the
kept channels into a compact channels_last buffer (`index_select` on the
NHWC view) and runs the dense path; a contiguous run of channels
(in_index == arange(a, a+k)) is just a strided view of x, no copy.

The epilogue runs on the fp32 accumulator:
    z = (acc + bias + bias_map) * scale + shift; [+ residual]; act(z); [+ residual]
and scatters kept column j to output channel out_index[j].

Output channels that `out_index` does not name are written by a second launch
of the same kernel with SOURCE=1: no K loop, its "channel list" is the
complement of out_index, and its bias is `fill` indexed by output channel, so
pruned channels go through the very same residual/activation code.

Split-K (SPLIT, K_SPLITS > 1): when the output has too few tiles to fill the
GPU and K is long (e.g. 512->512 3x3 at 7x7), programs along grid axis 1 each
reduce a slice of the K loop into an fp32 workspace [K_SPLITS, M, NCH] and
count themselves in on the tile's arrival counter (zeroed per call); the last
slice of a tile to arrive sums the slices, in slice order (deterministic), from
L2 and runs the epilogue (tile.last_slice_to_arrive), where a second launch
used to read the whole workspace back. That saved no time on the H100 (the
7x7 layer took 26.9 us before and after, session 7): the K loop, not the
reduction, is what limits those layers. One launch per conv remains, after a
small fill that zeroes the counters.

Persistent launches (PERSISTENT, offered for 1x1 convs with one or two K
steps): a grid of a few programs per SM, each walking tiles in a loop that
Triton's loop fusion flattens with the K loop (`tl.range(..., flatten=True)`),
so the software pipeliner loads the next tile's operands while the current
tile's epilogue runs; a one-tile-per-program launch of such a GEMM has only
other resident programs to hide its loads behind. `_conv_tile` is one tile's
work; `_conv2d_kernel` calls it once per program, or once per tile of its
loop.

TMA launches (kernels/tma.py, Hopper): where the tensors allow a descriptor
(fp16/bf16, 16-byte aligned rows, no channel scatter), 1x1 convs are also
offered as a TMA GEMM and other convs as TMA box loads (strided ones read
phases of the input; on small maps boxes may span images), whose zero fill
outside the image is the padding; on sm90 the same boxes are also offered
warp-specialised (kernels/box_ws.py, Gluon: a loader warp and MMA
warpgroups, persistent), which is what brought the dense layers level with
cuDNN. The tuner keeps whichever launch is fastest, and a later call whose
tensors a descriptor cannot address runs the same tile of this kernel instead.

On CUDA, the first call of each shape times a pruned set of (tile config,
split-K) candidates (`conv_candidates`, `_tune`; by CUDA-graph replay, GPU
time only) and remembers the fastest in `tuned`; later calls are one dict
lookup. Under the Triton interpreter (no driver, nothing to time) one fixed
small config is used.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from fxsparse.kernels import tma as tma_launch
from fxsparse.kernels import tuning_cache
from fxsparse.kernels.layout import evenly_strided_rows, select_channels
from fxsparse.kernels.tile import (grouped_tile, k_slice, last_slice_to_arrive, residual_and_activation,
                                  sm_count, split_workspace, sum_slices)
from fxsparse.kernels.timing import cuda_graph_time_ms
from fxsparse.ops.activations import ACTIVATION_CODES
from fxsparse.ops.conv2d import TensorCache

Tensor = torch.Tensor
log = logging.getLogger(__name__)

_SRC_CONV, _SRC_NONE = 0, 1


@triton.jit
def _conv_tile(
    pid, pid_k,  # this program's output tile and split-K slice
    # pointers
    x_ptr, w_ptr, out_ptr, ws_ptr, arrivals_ptr,
    bias_ptr, scale_ptr, shift_ptr, bias_map_ptr, res_ptr, chan_ptr,
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
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_BIAS_MAP: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RESIDUAL_AFTER: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC_TYPE: tl.constexpr, IEEE: tl.constexpr,
    DOT_UPCAST: tl.constexpr,  # the interpreter's tl.dot mishandles bf16 (reads raw bits): upcast there
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
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
            if HAS_SCALE:
                z *= tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_TYPE)[None, :]
            if HAS_SHIFT:
                z += tl.load(shift_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_TYPE)[None, :]
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



@triton.jit
def _conv2d_kernel(
    # pointers
    x_ptr, w_ptr, out_ptr, ws_ptr, arrivals_ptr,
    bias_ptr, scale_ptr, shift_ptr, bias_map_ptr, res_ptr, chan_ptr,
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
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_BIAS_MAP: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RESIDUAL_AFTER: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC_TYPE: tl.constexpr, IEEE: tl.constexpr,
    DOT_UPCAST: tl.constexpr,  # the interpreter's tl.dot mishandles bf16 (reads raw bits): upcast there
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr = False,  # a grid of a few programs per SM, each walking many tiles
):
    # Two calls of the tile rather than one loop serving both launches: a one-trip loop around
    # the tile hoists its invariants and reorders a quarter of the default launch's PTX (seen
    # offline), and the default launch is what every measured figure ran.
    if PERSISTENT:
        # Flattened with the K loop, the tile loop lets the software pipeliner load the next
        # tile's operands while this tile's epilogue runs: a 1x1 conv with one or two K steps
        # has nothing else to overlap with (no split-K here: SOURCE 0 without SPLIT).
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(NCH, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
            _conv_tile(tile, 0,
                x_ptr=x_ptr, w_ptr=w_ptr, out_ptr=out_ptr, ws_ptr=ws_ptr, arrivals_ptr=arrivals_ptr, bias_ptr=bias_ptr,
                scale_ptr=scale_ptr, shift_ptr=shift_ptr, bias_map_ptr=bias_map_ptr, res_ptr=res_ptr,
                chan_ptr=chan_ptr, M=M, NCH=NCH, CIN=CIN, H=H, W=W, HO=HO, WO=WO, K_SPLITS=K_SPLITS,
                sxn=sxn, sxc=sxc, sxh=sxh, sxw=sxw, swo=swo, swc=swc, swh=swh, sww=sww, son=son,
                soc=soc, soh=soh, sow=sow, srn=srn, src=src, srh=srh, srw=srw, sbc=sbc, sbh=sbh,
                sbw=sbw, KH=KH, KW=KW, STRIDE_H=STRIDE_H, STRIDE_W=STRIDE_W, PAD_H=PAD_H, PAD_W=PAD_W,
                DIL_H=DIL_H, DIL_W=DIL_W, SOURCE=SOURCE, SPLIT=SPLIT, POINTWISE=POINTWISE,
                FLAT_X_ROWS=FLAT_X_ROWS, FLAT_OUT_ROWS=FLAT_OUT_ROWS, EVEN_K=EVEN_K,
                HAS_CHAN_INDEX=HAS_CHAN_INDEX, HAS_BIAS=HAS_BIAS, HAS_SCALE=HAS_SCALE,
                HAS_SHIFT=HAS_SHIFT, HAS_BIAS_MAP=HAS_BIAS_MAP, HAS_RESIDUAL=HAS_RESIDUAL,
                RESIDUAL_AFTER=RESIDUAL_AFTER, ACTIVATION=ACTIVATION, ACC_TYPE=ACC_TYPE, IEEE=IEEE,
                DOT_UPCAST=DOT_UPCAST, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                GROUP_M=GROUP_M)
    else:
        _conv_tile(tl.program_id(0), tl.program_id(1),
            x_ptr=x_ptr, w_ptr=w_ptr, out_ptr=out_ptr, ws_ptr=ws_ptr, arrivals_ptr=arrivals_ptr, bias_ptr=bias_ptr,
            scale_ptr=scale_ptr, shift_ptr=shift_ptr, bias_map_ptr=bias_map_ptr, res_ptr=res_ptr,
            chan_ptr=chan_ptr, M=M, NCH=NCH, CIN=CIN, H=H, W=W, HO=HO, WO=WO, K_SPLITS=K_SPLITS,
            sxn=sxn, sxc=sxc, sxh=sxh, sxw=sxw, swo=swo, swc=swc, swh=swh, sww=sww, son=son, soc=soc,
            soh=soh, sow=sow, srn=srn, src=src, srh=srh, srw=srw, sbc=sbc, sbh=sbh, sbw=sbw, KH=KH,
            KW=KW, STRIDE_H=STRIDE_H, STRIDE_W=STRIDE_W, PAD_H=PAD_H, PAD_W=PAD_W, DIL_H=DIL_H,
            DIL_W=DIL_W, SOURCE=SOURCE, SPLIT=SPLIT, POINTWISE=POINTWISE, FLAT_X_ROWS=FLAT_X_ROWS,
            FLAT_OUT_ROWS=FLAT_OUT_ROWS, EVEN_K=EVEN_K, HAS_CHAN_INDEX=HAS_CHAN_INDEX,
            HAS_BIAS=HAS_BIAS, HAS_SCALE=HAS_SCALE, HAS_SHIFT=HAS_SHIFT, HAS_BIAS_MAP=HAS_BIAS_MAP,
            HAS_RESIDUAL=HAS_RESIDUAL, RESIDUAL_AFTER=RESIDUAL_AFTER, ACTIVATION=ACTIVATION,
            ACC_TYPE=ACC_TYPE, IEEE=IEEE, DOT_UPCAST=DOT_UPCAST, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K, GROUP_M=GROUP_M)


# --------------------------------------------------------------------------- configs

_INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1)
# The fill launch (pruned channels) is memory-bound and tiny: one fixed config.
_FILL_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=1)

# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_K = min(64, Cin rounded up to a power of 2).
# Taken from what wins on H100 in Inductor's conv/mm autotuning of our layer set (run1 log):
# 128x128 with 8 warps and 3 stages wins every dense 3x3 at 56x56/28x28 (21 us vs 25 us for the
# best 4-warp tile on the seed layer): 8 warps halve the fp32 accumulator per thread (64
# registers for 128x128) so 3 stages of 64-deep K tiles fit. 64x128 / 128x64 with 4 warps and 4
# stages are the runners-up and the small-M picks; narrow tiles serve compacted layers.
_TILES = [
    (128, 256, 8, 3),
    (256, 128, 8, 3),
    (128, 128, 8, 3),
    (128, 128, 4, 3),
    (64, 128, 4, 4),
    (128, 64, 8, 3),
    (128, 64, 4, 4),
    (64, 64, 4, 4),
    (128, 32, 8, 3),
    (128, 32, 4, 4),
    (64, 32, 4, 4),
    (128, 16, 4, 4),
    (64, 16, 4, 4),
]
# A 1x1 conv with Cin <= 128 is a GEMM with one or two K steps: nothing to pipeline, the time
# is loads + epilogue stores, so fewer stages (less shared memory, more programs per SM to
# overlap one tile's stores with the next tile's loads) are offered too.
_POINTWISE_SHORT_K_TILES = [
    (128, 256, 8, 2),
    (128, 128, 4, 2),
    (128, 64, 4, 2),
]
# One K step (Cin <= 64): a second stage buffer is never filled, only halves the programs an
# SM holds (256x128 at 3 stages takes 144 KB of shared memory: one program per SM).
_POINTWISE_ONE_K_TILES = [
    (256, 128, 8, 1),
    (128, 256, 8, 1),
    (128, 128, 4, 1),
    (128, 64, 4, 1),
]
# The same short-K GEMMs as persistent launches (a few programs per SM walking the tiles, the
# next tile's loads overlapping this tile's epilogue); offered beside the one-tile-per-program
# launches, never instead: the tuner keeps whichever is faster, after checking its output.
_POINTWISE_PERSISTENT_TILES = [
    (128, 128, 4, 3),
    (128, 256, 8, 3),
    (128, 64, 4, 3),
]
# The same GEMMs through TMA descriptors (tma.py "gemm"), where the tensors allow it.
_POINTWISE_TMA_TILES = [
    (256, 128, 8, 3),
    (128, 256, 8, 3),
    (128, 128, 8, 3),
    (128, 128, 4, 3),
    (128, 64, 4, 3),
    (64, 64, 4, 3),
    (128, 32, 4, 3),
    (64, 32, 4, 3),
    (128, 16, 4, 3),
]
# Convs through TMA box loads (tma.py "box"): BLOCK_M output pixels as a box of one image (or
# of several: IMAGES), whose shape tma.box_shape fits to the map. (Measured and dropped, run
# 40: 256x128 tiles, 156 us against 128x128's 128 us on the seed layer at B=128; 5-8 stage
# pipelines, 31-119 us against 27 us on 512->512 @7: docs/benchmarks.md, session 7.)
_BOX_TMA_TILES = [
    (128, 256, 8, 3),
    (128, 128, 8, 3),
    (128, 128, 4, 3),
    (128, 64, 4, 4),
    (64, 128, 4, 4),
    (64, 64, 4, 4),
    (128, 32, 4, 4),
    (64, 32, 4, 4),
    (64, 16, 4, 4),
]
# The same boxes warp-specialised (box_ws.py, sm90): one program per SM of deep operand stages,
# as cuDNN's sm90 kernels run (session 7's profile); or two of shallow ones, registers capped
# at 128 a thread (maxnreg), whose epilogues overlap each other's K loops.
_BOX_WS_TILES = [
    (128, 256, 8, 3, None),
    (128, 128, 8, 4, None),
    (128, 128, 4, 4, None),
    (128, 128, 4, 2, 128),
    (128, 64, 4, 6, None),
    (128, 64, 4, 3, 128),
    (64, 128, 4, 6, None),
    (64, 64, 4, 8, None),
    (128, 32, 4, 8, None),
    (128, 16, 4, 8, None),
]
_SAFE_TILE = (64, 64, 4, 3)  # the fallback when a tuned 8-warp tile fails its check


def _cdiv(a: int, b: int) -> int:
    # triton.cdiv is a jit function: called from Python it costs ~4 us (constexpr unwrapping),
    # three of them per launch were the largest host cost of the launcher
    return -(-a // b)


def _pow2_at_least(v: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(v), 1)))


def _config(bm, bn, bk, warps, stages, persistent=False, tma=False, images=False, ws=False,
            maxnreg=None) -> dict:
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
               PERSISTENT=persistent)
    if tma:  # (a launch of a tma.py kernel, not _conv2d_kernel: absent elsewhere)
        cfg["TMA"] = True
    if images:  # (a box launch whose boxes span images: tma.box_shape)
        cfg["IMAGES"] = True
    if ws:  # (a warp-specialised box launch: box_ws.py)
        cfg["WS"] = True
    if maxnreg:  # (registers a thread may hold: two programs per SM)
        cfg["maxnreg"] = maxnreg
    return cfg


def _persistent_programs(cfg: dict, tiles: int, sms: int) -> int:
    """Grid of a persistent launch: as many programs as fit on the SMs at once (by the shared
    memory of their operand stages), never more than there are tiles."""
    stage_bytes = (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * 2
    per_sm = max(1, min(4, (227 * 1024) // (stage_bytes * max(1, cfg["num_stages"]))))
    return max(1, min(tiles, per_sm * sms))


def _warp_specialised_offered() -> bool:
    # FXSPARSE_CONV_WS=0 leaves box_ws.py's launches out of the candidates (A/B measurements).
    return os.environ.get("FXSPARSE_CONV_WS", "1") != "0"


def _max_warps() -> int:
    # FXSPARSE_CONV_MAX_WARPS=4 keeps every tap-loop (non-1x1) kernel at 4 warps (see _tune).
    return int(os.environ.get("FXSPARSE_CONV_MAX_WARPS", "8"))


def conv_candidates(m: int, nch: int, cin: int, taps: int, pointwise: bool, sms: int,
                    split_k: Optional[int] = None, tma: Optional[str] = None,
                    box_map: Optional[tuple] = None, ws: bool = False) -> list:
    """(config, split_k) pairs worth timing for one conv shape, pruned by shape class.

    - BLOCK_N: the power of two covering NCH (capped at 256) and half of it, so compacted
      layers (NCH 16..64) get narrow tiles and dense wide layers 128/256-wide ones.
    - BLOCK_M no larger than M needs; 256-row tiles only when there are tiles to spare.
    - Small M, long K (e.g. 512->512 3x3 at 7x7: M = 1568, K = 4608): when a tile count
      leaves SMs idle, split-K by 2/4/8 so the grid lands between 0.5x and 4x the SM count,
      keeping >= 4 K steps per slice.
    `split_k` given: only that factor. `tma`: the TMA launch the tensors allow (tma.eligible:
    "gemm" for 1x1 convs, "box" for the others), whose tiles are offered too; a box tile is
    offered twice where boxes spanning images fit the output map `box_map` (N, HO, WO) with
    fewer rows computed for nothing. `ws`: boxes are also offered warp-specialised
    (tma.warp_specialisable; 1x1 convs too), unsplit, their shape as boxes spanning images.
    """
    bk = min(64, _pow2_at_least(cin))
    k_iters = taps * _cdiv(cin, bk)
    bn_cap = min(256, _pow2_at_least(nch))
    widths = {bn_cap, max(16, bn_cap // 2)}
    bm_cap = _pow2_at_least(m, 64)
    tiles = list(_TILES)
    if pointwise and k_iters <= 2:
        tiles += _POINTWISE_SHORT_K_TILES
    if pointwise and k_iters == 1:
        tiles += _POINTWISE_ONE_K_TILES
    max_warps = 8 if pointwise else _max_warps()

    def split_factors(n_tiles: int) -> list:
        # Only where the tiles leave SMs idle: offered up to two waves of tiles (256->256 at
        # 14x14: 196 tiles on 132 SMs), splits never won among 313 tuned shapes (session 7), and
        # each costs a compile. Up to 4x the SM count in programs: ResNet-50's stem at B=1 (98
        # tiles) takes 4 slices.
        if split_k is not None:
            return [split_k]
        if n_tiles >= sms:
            return [1]
        return [1] + [s for s in (2, 4, 8) if k_iters // s >= 4 and sms // 2 <= n_tiles * s <= 4 * sms]

    out, seen = [], set()
    for bm, bn, warps, stages in tiles:
        if bn not in widths or bm > bm_cap or warps > max_warps:
            continue
        n_tiles = _cdiv(m, bm) * _cdiv(nch, bn)
        if bm == 256 and n_tiles < 2 * sms:
            continue
        cfg = _config(bm, bn, bk, warps, stages)
        for s in split_factors(n_tiles):
            sig = (bm, bn, bk, warps, stages, s)
            if sig not in seen:
                seen.add(sig)
                out.append((cfg, s))
    if pointwise and k_iters <= 2 and split_k in (None, 1):
        for bm, bn, warps, stages in _POINTWISE_PERSISTENT_TILES:
            if bn in widths and bm <= bm_cap and _cdiv(m, bm) * _cdiv(nch, bn) > 2 * sms:
                out.append((_config(bm, bn, bk, warps, stages, persistent=True), 1))
    if tma == "gemm" and split_k in (None, 1):  # (no split-K: a 1x1 conv's K is short)
        out += [(_config(bm, bn, bk, warps, stages, tma=True), 1)
                for bm, bn, warps, stages in _POINTWISE_TMA_TILES if bn in widths and bm <= bm_cap]
    if tma == "box":
        for bm, bn, warps, stages in _BOX_TMA_TILES:
            if bn in widths and bm <= bm_cap:
                splits = split_factors(_cdiv(m, bm) * _cdiv(nch, bn))
                out += [(_config(bm, bn, bk, warps, stages, tma=True), s) for s in splits]
                if box_map is not None and tma_launch.box_shape(bm, *box_map, images=True) != \
                        tma_launch.box_shape(bm, *box_map):
                    out += [(_config(bm, bn, bk, warps, stages, tma=True, images=True), s) for s in splits]
    if ws and split_k in (None, 1):
        out += [(_config(bm, bn, bk, warps, stages, tma=True, images=True, ws=True, maxnreg=regs), 1)
                for bm, bn, warps, stages, regs in _BOX_WS_TILES if bn in widths and bm <= bm_cap]
    if not out:  # tiny problems: the smallest tile always fits
        out.append((_config(64, 16, bk, 4, 3), split_k or 1))
    return out


# --------------------------------------------------------------------------- tuning

class _Choice:
    """The tuned launch of one conv shape: tile config and split-K factor, with its timings."""
    __slots__ = ("config", "split_k", "timings", "note")

    def __init__(self, config, split_k, timings, note=""):
        self.config, self.split_k, self.timings, self.note = config, split_k, timings, note

    def __repr__(self):
        return describe_launch(self.config, self.split_k) + (f" ({self.note})" if self.note else "")


def describe_launch(cfg: dict, split_k: int) -> str:
    """One launch as the tuner tables name it, e.g. "128x128x64 w8 s3 TMA k/4"."""
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"
            + (" persistent" if cfg.get("PERSISTENT") else "") + (" TMA" if cfg.get("TMA") else "")
            + (" images" if cfg.get("IMAGES") else "") + (" WS" if cfg.get("WS") else "")
            + (f" r{cfg['maxnreg']}" if cfg.get("maxnreg") else "")
            + (f" k/{split_k}" if split_k > 1 else ""))


# shape key -> _Choice. Public for benchmarks (benchmarks/kernel_tune.py prints it).
tuned: dict = {}


def _same_output(a: Tensor, b: Tensor) -> bool:
    a, b = a.float(), b.float()
    scale = float(b.abs().nan_to_num(0.0, 0.0, 0.0).amax()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-2, atol=1e-2 * max(scale, 1e-3), equal_nan=True))


# How candidates are timed; part of the tuning cache's signature, so that winners chosen by
# another method are timed again.
TIMING = "cuda-graph replay"
# Split-K launches now end in the kernel (the last slice reduces): shapes that offer a split
# are timed again, those that do not keep their winners.
SPLIT_K_REDUCTION = "; split-K reduced by the last slice"


def _signature(candidates: list) -> str:
    splits = any(s > 1 for _, s in candidates)
    return tuning_cache.signature(candidates, TIMING + (SPLIT_K_REDUCTION if splits else ""))


def _launch_ms(fn) -> float:
    """Median ms of one launch sequence, replayed from a CUDA graph: GPU time only, as the
    backend runs it (CUDA graphs are its default). `do_bench` on plain calls (L2 flushed
    between them) also counted the host time of launches whose Python side outlasted the
    flush: on another H100 host the same TMA launches timed 14-40% slower and lost to slower
    kernels (runs 30-31 in docs/benchmarks.md)."""
    return cuda_graph_time_ms(fn, calls=10, warmup_calls=1, warmup_ms=2, rep_ms=10)


def _tune(key, candidates, run, out: Tensor, pointwise: bool) -> _Choice:
    """Times every candidate launch (its whole launch sequence) and keeps the fastest. Ours
    instead of @triton.autotune: split-K is chosen jointly with the tile (a split only pays
    against the best unsplit tile, not against a fixed one), and the winner can be checked
    before it is trusted.

    The check: 8-warp programs miscompiled the flattened tap loop of Inductor's conv template
    (triton issue 1254; pytorch issue 173068, PRs 177823/183989 cap non-1x1 convs at 4 warps).
    Our loop differs, and 8 warps are the fastest 3x3 tile on H100, so an 8-warp winner for a
    non-1x1 conv is compared once against the best 4-warp candidate on the real inputs; on a
    mismatch the 4-warp one is used (and the note says so). A persistent winner (its tile loop
    flattened with the K loop by Triton's loop fusion) is checked the same way.
    """
    timings = []
    for cfg, s in candidates:
        try:
            run(cfg, s)  # compile outside the timed region
            ms = _launch_ms(lambda cfg=cfg, s=s: run(cfg, s))
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory / resources on a config
            ms = float("inf")
            log.debug("fxsparse conv2d: candidate %s split %d failed: %s", cfg, s, e)
        timings.append((cfg, s, ms))
    timings.sort(key=lambda t: t[2])
    cfg, s, ms = timings[0]
    if ms == float("inf"):
        raise RuntimeError("fxsparse.conv2d: every tile config failed to run")
    note = ""
    kind = ("persistent" if cfg.get("PERSISTENT") else "warp-specialised" if cfg.get("WS") else "TMA" if cfg.get("TMA")
            else "8-warp" if cfg["num_warps"] > 4 and not pointwise else None)
    if kind is not None:
        safe = next(((c, k) for c, k, t in timings if _is_safe(c) and t < float("inf")), None)
        if safe is None:
            safe = (_config(*_SAFE_TILE[:2], cfg["BLOCK_K"], *_SAFE_TILE[2:]), 1)
        run(*safe)
        reference = out.clone()
        run(cfg, s)
        if _same_output(out, reference):
            note = f"{kind} output checked"
        else:
            log.warning("fxsparse conv2d: %s tile %s gave wrong results for %s; using %s", kind, cfg, key, safe)
            cfg, s = safe
            note = f"{kind} MISMATCH, fell back to a 4-warp tile"
    return _Choice(cfg, s, [(c, k, t) for c, k, t in timings], note)


def _is_safe(cfg: dict) -> bool:
    """One tile per program of _conv2d_kernel, 4 warps: the launch every other is checked against."""
    return cfg["num_warps"] <= 4 and not cfg.get("PERSISTENT") and not cfg.get("TMA")


def _safe_candidate(candidates: list) -> tuple:
    return next(((c, k) for c, k in candidates if _is_safe(c)), candidates[0])


@functools.lru_cache(maxsize=None)
def _disk_cache(device_index: int) -> tuning_cache.TuningCache:
    name = torch.cuda.get_device_name(device_index)
    return tuning_cache.TuningCache(tuning_cache.cache_path(name, triton.__version__))


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _choose_launch(key, device, m, nch, cin, taps, pointwise, split_k, run, out, tma=None, ws=False) -> _Choice:
    """The launch for a shape not yet seen by this process: from the disk cache, else timed."""
    index = _device_index(device)
    n, _, ho, wo = out.shape
    candidates = conv_candidates(m, nch, cin, taps, pointwise, sm_count(index), split_k, tma, (n, ho, wo), ws)
    how = tuning_cache.mode()
    if how == "off":
        cfg, s = _safe_candidate(candidates)
        choice = tuned[key] = _Choice(cfg, s, [], "untuned (FXSPARSE_TUNE=off)")
        return choice
    if torch.cuda.is_current_stream_capturing():
        # Cannot time inside a graph capture: a safe 4-warp candidate, not remembered,
        # so the next eager call tunes this shape.
        cfg, s = _safe_candidate(candidates)
        return _Choice(cfg, s, [], "untuned (captured)")
    disk = _disk_cache(index)
    offered = _signature(candidates)
    cached = disk.get(key, offered) if how == "cache" else None
    if cached is not None:
        tuned[key] = _Choice(cached[0], cached[1], [], "from the tuning cache")
        return tuned[key]
    choice = tuned[key] = _tune(key, candidates, run, out, pointwise)
    disk.put(key, choice.config, choice.split_k, offered)
    return choice


# --------------------------------------------------------------------------- launcher

def _complement(out_index: Tensor, out_channels: int) -> Tensor:
    """The output channels out_index does not name, ascending, built without a host sync.

    Built on every call, never cached: a tensor kept across calls that was allocated inside
    Inductor's CUDA-graph memory pool (its warm-up runs allocate there too) is a live
    allocation the pool does not track, which cudagraph trees reject ("tensors in the
    cudagraph pool not tracked as outputs", seen on the H100). Three tiny kernels, and only
    for convs whose output has pruned channels to fill.
    """
    kept = torch.zeros(out_channels, dtype=torch.int32, device=out_index.device)
    kept.index_fill_(0, out_index.long(), 1)
    # Stable sort puts the unkept (0) channels first, in ascending order; no nonzero() sync.
    return torch.sort(kept, stable=True).indices[: out_channels - out_index.numel()].to(torch.int32)


# in_index -> how to read those channels: ("range", start) for a contiguous run (a view of x,
# no copy) or ("gather", index). Decided once per index tensor (one host sync), like the checks.
_in_plans = TensorCache()


def _in_plan(in_index: Tensor):
    hit = _in_plans.get(in_index)
    if hit is not None and hit[0] == in_index._version:
        return hit[1]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return ("gather", 0)  # no sync inside a capture; decide on a later eager call
    k = in_index.numel()
    start = int(in_index[0]) if k else 0
    run = torch.arange(start, start + k, device=in_index.device, dtype=in_index.dtype)
    # (The plan must not hold in_index itself: the cache entry would keep its key alive.)
    plan = ("range", start) if bool(torch.equal(in_index, run)) else ("gather", 0)
    _in_plans.put(in_index, (in_index._version, plan))
    return plan


def _select_channels(x: Tensor, in_index: Tensor) -> Tensor:
    """x[:, in_index] as a dense input for the conv.

    Gathering in the kernel's K loop (an indirect channel offset per element) made every A-tile
    load a 2-byte scalar load: measured on H100, 4-8x slower than this one memory-bound copy
    plus the dense conv (e.g. seed layer B=128, half the inputs: 631 us vs 74 us for cuDNN on
    the compacted input). A contiguous channel run is a strided view: no copy at all.
    """
    kind, start = _in_plan(in_index)
    if kind == "range":
        return x.narrow(1, start, in_index.numel())
    return select_channels(x, in_index)


def _new_output(shape, x: Tensor) -> Tensor:
    # A seam for tests, which swap in a NaN-poisoned allocation to prove every element is written.
    return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)


def _forced_split() -> Optional[int]:
    forced = os.environ.get("FXSPARSE_SPLIT_K")
    return max(1, int(forced)) if forced else None


def conv2d_triton(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride,
    padding,
    dilation,
    in_index: Optional[Tensor],
    out_index: Optional[Tensor],
    out_channels: int,
    fill: Optional[Tensor],
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    bias_map: Optional[Tensor],
    residual: Optional[Tensor],
    activation: str,
    residual_after_activation: bool,
    *,
    out: Optional[Tensor] = None,
    config: Optional[dict] = None,
    split_k: Optional[int] = None,
) -> Tensor:
    """Runs the fused conv. Arguments are as `torch.ops.fxsparse.conv2d` (already checked).

    `out` (tests): a preallocated output of the right shape, written in full.
    `config` (tests/benchmarks): a fixed tile config, bypassing the tuner.
    `split_k`: force the split-K factor (default: FXSPARSE_SPLIT_K, else tuned on CUDA, 1 elsewhere).
    """
    if in_index is not None:
        x = _select_channels(x, in_index)
    n, _, h, w = x.shape
    nch, cin, kh, kw = weight.shape
    sh, sw = int(stride[0]), int(stride[1])
    ph, pw = int(padding[0]), int(padding[1])
    dh, dw = int(dilation[0]), int(dilation[1])
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if out is None:
        out = _new_output((n, out_channels, ho, wo), x)
    elif tuple(out.shape) != (n, out_channels, ho, wo) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"fxsparse.conv2d: out must be {(n, out_channels, ho, wo)} {x.dtype} on {x.device}")
    m = n * ho * wo
    if m == 0 or out_channels == 0:
        return out

    interpret = x.device.type == "cpu"
    acc_type = tl.float64 if x.dtype == torch.float64 else tl.float32
    dummy = out  # never read: its HAS_* flag is off
    pointwise = kh == 1 and kw == 1 and sh == 1 and sw == 1 and ph == 0 and pw == 0
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    bm_strides = bias_map.stride() if bias_map is not None else (0, 0, 0)
    common = dict(
        x_ptr=x, w_ptr=weight, out_ptr=out, res_ptr=residual if residual is not None else dummy,
        M=m, H=h, W=w, HO=ho, WO=wo,
        sxn=x.stride(0), sxc=x.stride(1), sxh=x.stride(2), sxw=x.stride(3),
        swo=weight.stride(0), swc=weight.stride(1), swh=weight.stride(2), sww=weight.stride(3),
        son=out.stride(0), soc=out.stride(1), soh=out.stride(2), sow=out.stride(3),
        srn=res_strides[0], src=res_strides[1], srh=res_strides[2], srw=res_strides[3],
        sbc=bm_strides[0], sbh=bm_strides[1], sbw=bm_strides[2],
        KH=kh, KW=kw, STRIDE_H=sh, STRIDE_W=sw, PAD_H=ph, PAD_W=pw, DIL_H=dh, DIL_W=dw,
        POINTWISE=pointwise,
        FLAT_X_ROWS=pointwise and evenly_strided_rows(x),
        FLAT_OUT_ROWS=evenly_strided_rows(out) and (residual is None or evenly_strided_rows(residual)),
        HAS_RESIDUAL=residual is not None, RESIDUAL_AFTER=bool(residual_after_activation),
        ACTIVATION=ACTIVATION_CODES[activation], ACC_TYPE=acc_type,
        IEEE=x.dtype in (torch.float32, torch.float64),
        DOT_UPCAST=interpret and x.dtype == torch.bfloat16,
    )
    fcfg = _INTERPRET_CONFIG if interpret else _FILL_CONFIG

    if nch > 0:
        conv_args = dict(
            common,
            bias_ptr=bias if bias is not None else dummy,
            scale_ptr=scale if scale is not None else dummy,
            shift_ptr=shift if shift is not None else dummy,
            bias_map_ptr=bias_map if bias_map is not None else dummy,
            chan_ptr=out_index if out_index is not None else dummy,
            NCH=nch, CIN=cin, HAS_CHAN_INDEX=out_index is not None,
            HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
            HAS_BIAS_MAP=bias_map is not None,
        )
        ws_dtype = torch.float64 if acc_type == tl.float64 else torch.float32

        def tma_kind() -> Optional[str]:
            # (a few us of host time: asked only where a TMA launch is offered or chosen)
            return tma_launch.eligible(x, weight, out, residual, out_index, bias_map, pointwise, (sh, sw))

        def warp_specialisable(tma: Optional[str]) -> bool:
            return tma_launch.warp_specialisable(tma, x, weight, out, residual, bias_map, (sh, sw),
                                                 min(64, _pow2_at_least(cin)))

        def run(cfg: dict, splits: int) -> None:
            tma = tma_kind() if cfg.get("TMA") else None
            use_tma = tma is not None and (splits == 1 or tma == "box")
            if cfg.get("TMA") and not use_tma:
                # a tuned TMA tile for tensors a descriptor cannot address: the same tile here
                cfg = {k: v for k, v in cfg.items() if k not in ("TMA", "IMAGES", "WS", "maxnreg")}
            elif cfg.get("WS") and not (splits == 1 and warp_specialisable(tma)):
                # the same box, not warp-specialised
                cfg = {k: v for k, v in cfg.items() if k not in ("WS", "maxnreg")}
            bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
            if use_tma:
                tma_launch.launch(tma, x, weight, bias, scale, shift, bias_map, residual, (sh, sw), (ph, pw), (dh, dw),
                                  ACTIVATION_CODES[activation], residual_after_activation, out, cfg, splits=splits)
                return
            tiles = _cdiv(m, bm) * _cdiv(nch, bn)
            ws, arrivals = split_workspace(splits, m, nch, tiles, x.device, ws_dtype) if splits > 1 else (dummy, dummy)
            if cfg.get("PERSISTENT"):  # (absent from configs that predate persistent launches)
                if splits > 1:
                    raise ValueError("fxsparse conv2d: a persistent launch does not split K")
                grid = (_persistent_programs(cfg, tiles, 2 if interpret else sm_count(_device_index(x.device))), 1)
            else:
                grid = (tiles, splits)
            _conv2d_kernel[grid](**conv_args, ws_ptr=ws, arrivals_ptr=arrivals, K_SPLITS=splits, SOURCE=_SRC_CONV,
                                 SPLIT=splits > 1, EVEN_K=cin % bk == 0, **cfg)

        if split_k is None:
            split_k = _forced_split()
        if config is not None or interpret:
            cfg = dict(config if config is not None else _INTERPRET_CONFIG)
            cfg.setdefault("BLOCK_K", min(64, _pow2_at_least(cin)))
            run(cfg, split_k or 1)
        else:
            key = (m, nch, cin, h, w, kh, kw, sh, sw, ph, pw, dh, dw, x.dtype, x.stride(1), weight.stride(1),
                   split_k)
            choice = tuned.get(key)
            if choice is None:
                tma = tma_kind()
                choice = _choose_launch(key, x.device, m, nch, cin, kh * kw, pointwise, split_k, run, out,
                                        tma, _warp_specialised_offered() and warp_specialisable(tma))
            run(choice.config, choice.split_k)

    if out_index is not None and nch < out_channels:
        comp = _complement(out_index, out_channels)
        ncomp = out_channels - nch
        fill_grid = (_cdiv(m, fcfg["BLOCK_M"]) * _cdiv(ncomp, fcfg["BLOCK_N"]), 1)
        _conv2d_kernel[fill_grid](
            **common, ws_ptr=dummy, arrivals_ptr=dummy,
            bias_ptr=fill if fill is not None else dummy,
            scale_ptr=dummy, shift_ptr=dummy, bias_map_ptr=dummy, chan_ptr=comp,
            NCH=ncomp, CIN=0, K_SPLITS=1, HAS_CHAN_INDEX=True,
            HAS_BIAS=fill is not None, HAS_SCALE=False, HAS_SHIFT=False, HAS_BIAS_MAP=False,
            SOURCE=_SRC_NONE, SPLIT=False, EVEN_K=True, **fcfg)
    return out
