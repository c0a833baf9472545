"""The box launch of tma.py, warp-specialised for Hopper (Gluon).

Triton 3.6-3.9 compile `tl.range(..., warp_specialize=True)` on sm90 to the same K loop as
without it: every warp both issues the next step's TMA copies and runs the MMAs, with CTA
barriers between, which Nsight Compute names as the top stall of the box launch. Here the partitions are written out in Gluon, as CUTLASS's sm90
warp-specialised GEMMs do it:

- a **loader** warp walks the K steps (tap, channel block) and issues one TMA box copy of x
  and one of the weight into a ring of STAGES shared-memory slots, each slot with a "ready"
  barrier (the copies' bytes arrive) and an "empty" barrier (the MMAs are done with it);
- the **MMA** warpgroups (the kernel's num_warps) wait on "ready", issue the step's wgmma
  asynchronously, keep one step in flight, and free the slot of the step before.

The grid is persistent (one program per SM; two where registers are capped and shared memory
allows): both partitions walk the program's tiles in the same order, so the loader fills the
next tile's slots while the MMA warps run the epilogue. The box geometry (strided phases, boxes
spanning images, zero fill as padding) is tma.py's; the epilogue (bias, residual,
activation) runs on the accumulator, and the output tile leaves by a TMA store while
the next tile's K loop runs.

Offered beside the other launches (choices.py) where tma.warp_specialisable says so: an sm90
device, a Gluon with this API, and a conv a box addresses, without a bias map or split-K.
"""
from __future__ import annotations

import functools

import torch
import triton

from fxsparse.kernels.tile import box_pixels, box_tap, box_tile_origin, residual_and_activation, sm_count

Tensor = torch.Tensor

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    # triton 3.6 names the TMA copies async_copy_global_to_shared / async_copy_shared_to_global;
    # 3.9 async_load / async_store
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global
except ImportError:  # pragma: no cover - a Triton without Gluon's Hopper API: never offered
    gluon = None


def available() -> bool:
    return gluon is not None


if gluon is not None:

    @gluon.jit
    def _load_partition(x_desc, w_desc, a_bufs, b_bufs, ready, empty, N, HO, WO, NCH, CIN, num_tiles,
                        KH: gl.constexpr, KW: gl.constexpr, STRIDE_H: gl.constexpr, STRIDE_W: gl.constexpr,
                        PAD_H: gl.constexpr, PAD_W: gl.constexpr, DIL_H: gl.constexpr, DIL_W: gl.constexpr,
                        BOX_N: gl.constexpr, BOX_H: gl.constexpr, BOX_W: gl.constexpr, BLOCK_N: gl.constexpr,
                        BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr):
        STAGES: gl.constexpr = a_bufs.shape[0]
        ci_blocks = gl.cdiv(CIN, BLOCK_K)
        k_iters = KH * KW * ci_blocks
        step = 0
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            n0, oh0, ow0, col0 = box_tile_origin(tile, N, HO, WO, NCH, BOX_N, BOX_H, BOX_W, BLOCK_N, GROUP_M)
            for k in range(k_iters):
                s = step % STAGES
                mbarrier.wait(empty.index(s), ((step // STAGES) & 1) ^ 1)
                tap, ci, dh, phase_h, dw, chan = box_tap(k, ci_blocks, CIN, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
                                                         DIL_H, DIL_W, BLOCK_K)
                ready_s = ready.index(s)
                mbarrier.expect(ready_s, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
                _tma_load(x_desc, [n0, oh0 + dh, phase_h, ow0 + dw, chan], ready_s, a_bufs.index(s))
                _tma_load(w_desc, [col0, tap, ci], ready_s, b_bufs.index(s))
                step += 1

    @gluon.jit
    def _mma_partition(a_bufs, b_bufs, ready, empty, out_desc, c_smem, res_ptr, bias_ptr,
                       N, HO, WO, NCH, CIN, num_tiles, srn, srh, srw,
                       KH: gl.constexpr, KW: gl.constexpr,
                       HAS_BIAS: gl.constexpr,
                       HAS_RESIDUAL: gl.constexpr, RESIDUAL_AFTER: gl.constexpr, ACTIVATION: gl.constexpr,
                       BOX_N: gl.constexpr, BOX_H: gl.constexpr, BOX_W: gl.constexpr, BLOCK_N: gl.constexpr,
                       BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, num_warps: gl.constexpr):
        STAGES: gl.constexpr = a_bufs.shape[0]
        BLOCK_M: gl.constexpr = BOX_N * BOX_H * BOX_W
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        k_iters = KH * KW * gl.cdiv(CIN, BLOCK_K)
        step = 0
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, acc_layout)
            for k in range(k_iters):
                s = step % STAGES
                mbarrier.wait(ready.index(s), (step // STAGES) & 1)
                a = a_bufs.index(s).reshape((BLOCK_M, BLOCK_K))
                b = b_bufs.index(s).reshape((BLOCK_N, BLOCK_K)).permute((1, 0))
                acc = warpgroup_mma(a, b, acc, is_async=True)
                # one step's MMAs stay in flight; the step before is done with its slot
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), count=1, pred=k > 0)
                step += 1
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), count=1)
            # The loader already fills the freed slots with the next tile's operands.
            n0, oh0, ow0, col0 = box_tile_origin(tile, N, HO, WO, NCH, BOX_N, BOX_H, BOX_W, BLOCK_N, GROUP_M)
            offs_n = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
            mask_n = offs_n < NCH
            z = acc
            if HAS_BIAS:
                z += gl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(gl.float32)[None, :]
            r = z
            if HAS_RESIDUAL:
                img, oh, ow, inside = box_pixels(gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout)),
                                                 n0, oh0, ow0, N, HO, WO, BOX_H, BOX_W)
                mask = inside[:, None] & mask_n[None, :]
                r_rows = img.to(gl.int64) * srn + oh * srh + ow * srw
                r = gl.load(res_ptr + r_rows[:, None] + offs_n[None, :], mask=mask, other=0.0).to(gl.float32)
            z = residual_and_activation(z, r, HAS_RESIDUAL, RESIDUAL_AFTER, ACTIVATION)
            # The output leaves by a TMA store (rows past the map or batch are dropped by the copy
            # engine) that runs on while the next tile's K loop does; its buffer is reused only
            # once the store before has read it.
            tma.store_wait(0)
            c_smem.reshape((BLOCK_M, BLOCK_N)).store(z.to(c_smem.dtype))
            fence_async_shared()
            _tma_store(out_desc, [n0, oh0, ow0, col0], c_smem)
        tma.store_wait(0)

    @gluon.jit
    def _box_ws_kernel(
        x_desc, w_desc, out_desc, res_ptr, bias_ptr,
        N, HO, WO, NCH, CIN, num_tiles,
        srn, srh, srw,
        KH: gl.constexpr, KW: gl.constexpr, STRIDE_H: gl.constexpr, STRIDE_W: gl.constexpr,
        PAD_H: gl.constexpr, PAD_W: gl.constexpr, DIL_H: gl.constexpr, DIL_W: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        HAS_RESIDUAL: gl.constexpr, RESIDUAL_AFTER: gl.constexpr, ACTIVATION: gl.constexpr,
        BOX_N: gl.constexpr, BOX_H: gl.constexpr, BOX_W: gl.constexpr, BLOCK_N: gl.constexpr,
        BLOCK_K: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr,
    ):
        """Persistent: each program walks tiles pid, pid + programs, ... The two partitions walk
        the same tiles and K steps; a running step count keeps their ring slots and barrier
        phases in step across tiles."""
        a_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
        b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        c_smem = gl.allocate_shared_memory(out_desc.dtype, out_desc.block_type.shape, out_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        fence_async_shared()
        gl.warp_specialize([
            (_mma_partition, (a_bufs, b_bufs, ready, empty, out_desc, c_smem, res_ptr, bias_ptr,
                              N, HO, WO, NCH, CIN, num_tiles, srn, srh, srw, KH, KW,
                              HAS_BIAS, HAS_RESIDUAL, RESIDUAL_AFTER, ACTIVATION,
                              BOX_N, BOX_H, BOX_W, BLOCK_N, BLOCK_K, GROUP_M, num_warps)),
            (_load_partition, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, N, HO, WO, NCH, CIN, num_tiles,
                               KH, KW, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
                               BOX_N, BOX_H, BOX_W, BLOCK_N, BLOCK_K, GROUP_M)),
        ], [1], [40])


def usable(device: torch.device) -> bool:
    """Gluon's Hopper API is importable and the device is an sm90 (asked on every launch that
    may take this one: the device's answer is cached)."""
    return gluon is not None and device.type == "cuda" and _is_sm90(_index(device))


@functools.lru_cache(maxsize=None)
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] == 9


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def programs(cfg: dict, device: torch.device) -> int:
    """A persistent grid: as many programs as the SMs hold at once. One, unless registers are
    capped (cfg "maxnreg") and shared memory fits two: the operand stages and the output
    tile."""
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    smem = (bm + bn) * cfg["BLOCK_K"] * 2 * cfg["num_stages"] + bm * bn * 2 + 1024
    per_sm = max(1, min(2, (227 * 1024) // smem)) if cfg.get("maxnreg") else 1
    return per_sm * sm_count(_index(device))


def _layout(block_shape) -> "gl.NVMMASharedLayout":
    """The shared-memory layout of a TMA block of fp16/bf16: the widest swizzle its rows fill."""
    return gl.NVMMASharedLayout(swizzle_byte_width=min(128, block_shape[-1] * 2), element_bitwidth=16,
                                rank=len(block_shape))


def launch(call, x_shape: list, x_strides: list, cfg: dict, box: tuple) -> None:
    """Runs `call` (a problem.ConvCall that tma.eligible called "box", without a bias map) with tile
    `cfg` and box shape `box` = (BOX_N, BOX_H, BOX_W); x as tma._phased describes it."""
    x, weight, out, residual, bias = call.x, call.weight, call.out, call.residual, call.bias
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    nch, cin, kh, kw = weight.shape
    n, _, ho, wo = out.shape
    box_n, box_h, box_w = box
    x_block = [box_n, box_h, 1, box_w, bk]
    w_block = [bn, 1, bk]
    out_block = [box_n, box_h, box_w, bn]
    x_desc = GluonDescriptor(x, x_shape, x_strides, x_block, _layout(x_block))
    out_desc = GluonDescriptor(out, [n, ho, wo, nch], [out.stride(0), out.stride(2), out.stride(3), 1], out_block,
                               _layout(out_block))
    w_desc = GluonDescriptor(weight, [nch, kh * kw, cin], [weight.stride(0), cin, 1], w_block,
                             _layout(w_block))
    res = residual if residual is not None else out
    tiles = (-(-n // box_n)) * (-(-ho // box_h)) * (-(-wo // box_w)) * (-(-nch // bn))
    (sh, sw), (ph, pw), (dh, dw) = call.stride, call.padding, call.dilation
    _box_ws_kernel[(min(tiles, programs(cfg, out.device)),)](
        x_desc, w_desc, out_desc, res, bias if bias is not None else out,
        n, ho, wo, nch, cin, tiles, res.stride(0), res.stride(2), res.stride(3),
        KH=kh, KW=kw, STRIDE_H=sh, STRIDE_W=sw, PAD_H=ph, PAD_W=pw, DIL_H=dh, DIL_W=dw,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        RESIDUAL_AFTER=bool(call.residual_after_activation), ACTIVATION=call.activation_code,
        BOX_N=box_n, BOX_H=box_h, BOX_W=box_w, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=cfg.get("GROUP_M", 8),
        STAGES=cfg["num_stages"], num_warps=cfg["num_warps"],
        **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}))
