"""Pieces of a tile's work shared by the conv kernels (conv2d.py, tma.py, box_ws.py): which tile a
program owns, where a box launch's K step reads, which K steps a split-K slice takes and how the
slices meet, and the epilogue's activation (specialised at compile time on its code in
`fxsparse.kernels.activations.ACTIVATION_CODES`) and residual add."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fxsparse.kernels.activations import ACTIVATION_CODES


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid`, grouped: GROUP_M row tiles share each weight
    column tile while it is in L2."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def k_slice(k_iters, pid_k, K_SPLITS, SPLIT: tl.constexpr):
    """[k_lo, k_hi): the K steps of split-K slice `pid_k` (all of them without SPLIT)."""
    if SPLIT:
        per_split = tl.cdiv(k_iters, K_SPLITS)
        k_lo = pid_k * per_split
        k_hi = min(k_iters, k_lo + per_split)
    else:
        k_lo = 0
        k_hi = k_iters
    return k_lo, k_hi


@triton.jit
def box_tap(k, ci_blocks, CIN, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
            PAD_H: tl.constexpr, PAD_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """K step k of a box launch (taps outer, channel blocks inner): its tap, first channel, and
    where its input box starts in x as tma._phased describes it, relative to the output box's
    origin: (row steps, row phase, column steps, channel of the merged last dimension)."""
    # A tap's input offset kh * DIL_H - PAD_H = STRIDE_H * row step + row phase. Lifted by a
    # whole number of strides first, so that // and % (which truncate) see no negative value.
    LIFT_H: tl.constexpr = (PAD_H + STRIDE_H - 1) // STRIDE_H
    LIFT_W: tl.constexpr = (PAD_W + STRIDE_W - 1) // STRIDE_W
    tap = k // ci_blocks
    ci = (k - tap * ci_blocks) * BLOCK_K
    kh = tap // KW
    th = kh * DIL_H - PAD_H + LIFT_H * STRIDE_H
    tw = (tap - kh * KW) * DIL_W - PAD_W + LIFT_W * STRIDE_W
    return tap, ci, th // STRIDE_H - LIFT_H, th % STRIDE_H, tw // STRIDE_W - LIFT_W, (tw % STRIDE_W) * CIN + ci


@triton.jit
def box_tile_origin(tile, N, HO, WO, NCH, BOX_N: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr,
                    BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(first image, first output row, first output column, first channel) of a box launch's
    output tile `tile`, in grouped_tile's order."""
    boxes_w = tl.cdiv(WO, BOX_W)
    boxes_per_image = tl.cdiv(HO, BOX_H) * boxes_w
    pid_m, pid_n = grouped_tile(tile, tl.cdiv(N, BOX_N) * boxes_per_image, tl.cdiv(NCH, BLOCK_N), GROUP_M)
    box = pid_m % boxes_per_image
    return ((pid_m // boxes_per_image) * BOX_N, (box // boxes_w) * BOX_H, (box % boxes_w) * BOX_W,
            pid_n * BLOCK_N)


@triton.jit
def box_pixels(i, n0, oh0, ow0, N, HO, WO, BOX_H: tl.constexpr, BOX_W: tl.constexpr):
    """(image, output row, output column, inside the output) of row i of a box tile whose
    origin is (n0, oh0, ow0): rows run over images, then box rows, then box columns."""
    img = n0 + i // (BOX_H * BOX_W)
    oh = oh0 + (i // BOX_W) % BOX_H
    ow = ow0 + i % BOX_W
    return img, oh, ow, (img < N) & (oh < HO) & (ow < WO)


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_workspace(splits: int, m: int, nch: int, tiles: int, device, dtype=torch.float32):
    """What a launch of `tiles` output tiles split `splits` ways along K needs: the workspace
    [splits, m, nch] of partial sums, and one arrival counter per tile, zeroed. Both are the
    call's own (stream-ordered allocations; the zeroing is a small fill kernel, about 2 us under
    Nsight Compute), so launches on other streams or in other graphs never share a counter."""
    ws = torch.empty((splits, m, nch), device=device, dtype=dtype)
    return ws, torch.zeros(tiles, device=device, dtype=torch.int32)


@triton.jit
def last_slice_to_arrive(arrivals_ptr, K_SPLITS):
    """Called by a split-K slice once it has stored its partial sums: True in the one slice of
    the tile that gets there last, which then sums them all and runs the epilogue (no second
    launch, no second pass over the workspace from DRAM). `arrivals_ptr` points at this tile's
    counter, zeroed before the launch.

    The barrier orders every thread's partial-sum stores before the counter's release (the
    increment is one thread's); its acquire, in the last slice, orders the other slices' stores
    before this program's loads of them (`sum_slices` reads through L2, past the SM's L1)."""
    tl.debug_barrier()
    return tl.atomic_add(arrivals_ptr, 1, sem="acq_rel", scope="gpu") == K_SPLITS - 1


@triton.jit
def sum_slices(ws_ptr, offsets, mask, M, NCH, K_SPLITS):
    """The K slices' partial sums at `offsets` of the workspace [K_SPLITS, M, NCH], added in
    slice order: the result does not depend on which slice arrived last."""
    acc = tl.load(ws_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
    for s in range(1, K_SPLITS):
        acc += tl.load(ws_ptr + (s * M).to(tl.int64) * NCH + offsets, mask=mask, other=0.0, cache_modifier=".cg")
    return acc


# `activation`'s `if ACTIVATION == k` chain is written against these codes.
_KERNEL_ACTIVATIONS = ("none", "relu", "relu6", "silu", "gelu", "gelu_tanh", "hardswish",
                       "hardsigmoid", "sigmoid", "tanh")
assert {n: i for i, n in enumerate(_KERNEL_ACTIVATIONS)} == ACTIVATION_CODES, (
    "fxsparse.kernels.tile: activation table out of sync with fxsparse.kernels.activations")


@triton.jit
def tanh(z):
    # tl has no portable tanh across 3.6-3.9 and the interpreter; exact in fp32 up to ~1e-7 abs.
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def activation(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        z = tl.maximum(z, 0.0)
    elif ACTIVATION == 2:
        z = tl.minimum(tl.maximum(z, 0.0), 6.0)
    elif ACTIVATION == 3:
        z = z * tl.sigmoid(z)
    elif ACTIVATION == 4:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == 5:
        z = 0.5 * z * (1.0 + tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACTIVATION == 6:
        z = z * (tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0)
    elif ACTIVATION == 7:
        z = tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    elif ACTIVATION == 8:
        z = tl.sigmoid(z)
    elif ACTIVATION == 9:
        z = tanh(z)
    return z


@triton.jit
def residual_and_activation(z, r, HAS_RESIDUAL: tl.constexpr, RESIDUAL_AFTER: tl.constexpr,
                            ACTIVATION: tl.constexpr):
    """act(z + r), or act(z) + r (RESIDUAL_AFTER: the ResNet block whose add follows its ReLU)."""
    if HAS_RESIDUAL:
        if not RESIDUAL_AFTER:
            z += r
    z = activation(z, ACTIVATION)
    if HAS_RESIDUAL:
        if RESIDUAL_AFTER:
            z += r
    return z
