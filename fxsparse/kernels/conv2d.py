"""Triton implicit-GEMM convolution behind `torch.ops.fxsparse.conv2d`.

Decomposition (NHWC implicit GEMM, groups=1):

    rows  M = N * Ho * Wo             one row per output pixel
    cols  NCH = kept output channels  one column per row of the (compacted) weight
    depth K = KH * KW * Cin_kept      taps outer, input channels inner

A program owns a BLOCK_M x BLOCK_N output tile and walks ONE flattened loop
over (tap, channel block) pairs, so Triton's software pipeliner (num_stages)
sees a single loop whatever the kernel size. Input channels are innermost in
K, so for a channels_last `x` each row of the A tile is one contiguous run of
channels; padding is a masked load (zeros). `in_index` is applied as an
indirect channel offset inside the load (no gathered copy of `x`). The weight
is read through its strides; channels_last weights make each column of the B
tile contiguous, which is how the backend pre-packs them.

The epilogue runs on the fp32 accumulator:
    z = (acc + bias + bias_map) * scale + shift; [+ residual]; act(z); [+ residual]
and scatters kept column j to output channel out_index[j].

Output channels that `out_index` does not name are written by a second launch
of the same kernel with SOURCE=2: no K loop, its "channel list" is the
complement of out_index, and its bias is `fill` indexed by output channel, so
pruned channels go through the very same residual/activation code.

Split-K (SOURCE=0 with SPLIT_K>1, then SOURCE=1): when the output has too few
tiles to fill the GPU and K is long (e.g. 512->512 3x3 at 7x7), programs along
grid axis 1 each reduce a slice of the K loop into an fp32 workspace
[SPLIT_K, M, NCH]; a second launch sums the slices (deterministically) and
runs the epilogue.

On CUDA the conv launch is autotuned over a small pruned config set keyed on
the problem shape; under the Triton interpreter (no driver, so no autotuner)
one fixed small config is used.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from fxsparse.ops.activations import ACTIVATION_CODES
from fxsparse.ops.conv2d import TensorCache

Tensor = torch.Tensor

# The epilogue's `if ACTIVATION == k` chain below is written against these codes.
_KERNEL_ACTIVATIONS = ("none", "relu", "relu6", "silu", "gelu", "gelu_tanh", "hardswish",
                       "hardsigmoid", "sigmoid", "tanh")
assert {n: i for i, n in enumerate(_KERNEL_ACTIVATIONS)} == ACTIVATION_CODES, (
    "fxsparse.kernels.conv2d: activation table out of sync with fxsparse.ops.activations")

_SRC_CONV, _SRC_WORKSPACE, _SRC_NONE = 0, 1, 2


@triton.jit
def _tanh(z):
    # tl has no portable tanh across 3.6-3.9 and the interpreter; exact in fp32 up to ~1e-7 abs.
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        z = tl.maximum(z, 0.0)
    elif ACTIVATION == 2:
        z = tl.minimum(tl.maximum(z, 0.0), 6.0)
    elif ACTIVATION == 3:
        z = z * tl.sigmoid(z)
    elif ACTIVATION == 4:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == 5:
        z = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACTIVATION == 6:
        z = z * (tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0)
    elif ACTIVATION == 7:
        z = tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    elif ACTIVATION == 8:
        z = tl.sigmoid(z)
    elif ACTIVATION == 9:
        z = _tanh(z)
    return z


@triton.jit
def _conv2d_kernel(
    # pointers
    x_ptr, w_ptr, out_ptr, ws_ptr,
    bias_ptr, scale_ptr, shift_ptr, bias_map_ptr, res_ptr, in_idx_ptr, chan_ptr,
    # sizes
    M, NCH, CIN, H, W, HO, WO,
    # strides
    sxn, sxc, sxh, sxw,
    swo, swc, swh, sww,
    son, soc, soh, sow,
    srn, src, srh, srw,
    sbc, sbh, sbw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    # compile-time switches
    KH: tl.constexpr, KW: tl.constexpr,
    SOURCE: tl.constexpr,  # 0: conv K loop, 1: sum split-K workspace, 2: none (pruned channels)
    SPLIT_K: tl.constexpr,
    POINTWISE: tl.constexpr,  # 1x1, stride 1, no padding: no spatial masks, no tap arithmetic
    EVEN_K: tl.constexpr,  # CIN % BLOCK_K == 0: no channel mask in the K loop
    HAS_IN_INDEX: tl.constexpr, HAS_CHAN_INDEX: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_BIAS_MAP: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RESIDUAL_AFTER: tl.constexpr,
    ACTIVATION: tl.constexpr, ACC_TYPE: tl.constexpr, IEEE: tl.constexpr,
    DOT_UPCAST: tl.constexpr,  # the interpreter's tl.dot mishandles bf16 (reads raw bits): upcast there
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row-tiles share each weight column-tile while it is in L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(NCH, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

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
        # Image base offsets can pass 2**31 elements on big batches: int64.
        x_rows = x_ptr + n_img.to(tl.int64) * sxn
        w_cols = w_ptr + offs_n.to(tl.int64) * swo
        if POINTWISE:
            x_rows = x_rows + (oh * sxh + ow * sxw)
        else:
            ih0 = oh * stride_h - pad_h
            iw0 = ow * stride_w - pad_w
        ci_blocks = tl.cdiv(CIN, BLOCK_K)
        k_iters = KH * KW * ci_blocks
        if SPLIT_K > 1:
            per_split = tl.cdiv(k_iters, SPLIT_K)
            k_lo = pid_k * per_split
            k_hi = min(k_iters, k_lo + per_split)
        else:
            k_lo = 0
            k_hi = k_iters
        for k in range(k_lo, k_hi):
            tap = k // ci_blocks
            ci = (k - tap * ci_blocks) * BLOCK_K + offs_k
            kh = tap // KW
            kw = tap - kh * KW
            if HAS_IN_INDEX:
                cx = tl.load(in_idx_ptr + ci, mask=ci < CIN, other=0)
            else:
                cx = ci
            if POINTWISE:
                a_ptrs = x_rows[:, None] + cx[None, :] * sxc
                a_mask = mask_m[:, None]
            else:
                ih = ih0 + kh * dil_h
                iw = iw0 + kw * dil_w
                valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a_ptrs = (x_rows + (ih * sxh + iw * sxw))[:, None] + cx[None, :] * sxc
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
    elif SOURCE == 1:
        ws_tile = offs_m.to(tl.int64)[:, None] * NCH + offs_n[None, :]
        ws_mask = mask_m[:, None] & mask_n[None, :]
        for s in range(SPLIT_K):
            acc += tl.load(ws_ptr + (s * M).to(tl.int64) * NCH + ws_tile, mask=ws_mask, other=0.0)

    if SOURCE == 0 and SPLIT_K > 1:
        # Partial sums only; the SOURCE=1 launch reduces them and runs the epilogue.
        ws_ptrs = ws_ptr + (pid_k * M).to(tl.int64) * NCH + offs_m.to(tl.int64)[:, None] * NCH + offs_n[None, :]
        tl.store(ws_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])
    else:
        if HAS_CHAN_INDEX:
            oc = tl.load(chan_ptr + offs_n, mask=mask_n, other=0)
        else:
            oc = offs_n
        z = acc
        if SOURCE == 2:
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
        if HAS_RESIDUAL:
            r_ptrs = res_ptr + (n_img.to(tl.int64) * srn + oh * srh + ow * srw)[:, None] + oc64[None, :] * src
            r = tl.load(r_ptrs, mask=out_mask, other=0.0).to(ACC_TYPE)
            if not RESIDUAL_AFTER:
                z += r
        z = _activation(z, ACTIVATION)
        if HAS_RESIDUAL:
            if RESIDUAL_AFTER:
                z += r
        o_ptrs = out_ptr + (n_img.to(tl.int64) * son + oh * soh + ow * sow)[:, None] + oc64[None, :] * soc
        tl.store(o_ptrs, z.to(out_ptr.dtype.element_ty), mask=out_mask)


# --------------------------------------------------------------------------- configs

_INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=1)
# Reduce/fill launches are memory-bound and tiny: one fixed config.
_EPILOGUE_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=1)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Small-N tiles serve compacted layers;
# BLOCK_K is clipped to Cin by the pruner.
_CUDA_TILES = [
    (128, 128, 64, 4, 3),
    (128, 128, 32, 4, 4),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 4, 5),
    (128, 32, 64, 4, 4),
    (64, 32, 64, 4, 4),
    (128, 16, 64, 4, 4),
    (64, 16, 64, 4, 4),
]


def _pow2_at_least(v: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(v), 1)))


def _prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    m, nch, cin = args["M"], args["NCH"], args["CIN"]
    pointwise = args["POINTWISE"]
    bk_cap = min(64, _pow2_at_least(cin))
    bn_cap = _pow2_at_least(nch)
    bm_cap = _pow2_at_least(m, 64)
    seen, kept = set(), []
    for c in configs:
        kw = dict(c.kwargs)
        bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
        if bn > bn_cap or bm > bm_cap:
            continue
        # 8-warp programs miscompiled the flattened tap loop (triton issue 1254; Inductor
        # caps non-1x1 convs at 4 warps): only the plain-GEMM path gets them.
        if c.num_warps > 4 and not pointwise:
            continue
        kw["BLOCK_K"] = min(bk, bk_cap)
        sig = (bm, bn, kw["BLOCK_K"], c.num_warps, c.num_stages)
        if sig in seen:
            continue
        seen.add(sig)
        kept.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    if not kept:  # tiny problems: the smallest tile always fits
        kept.append(triton.Config(dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=bk_cap, GROUP_M=8),
                                  num_warps=4, num_stages=3))
    return kept


@functools.lru_cache(maxsize=None)
def _autotuned_kernel():
    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in _CUDA_TILES]
    return triton.autotune(
        configs=configs,
        key=["M", "NCH", "CIN", "H", "W", "HO", "WO", "KH", "KW", "SPLIT_K", "POINTWISE",
             "HAS_IN_INDEX", "HAS_CHAN_INDEX", "sxc", "swc"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_conv2d_kernel)


# --------------------------------------------------------------------------- launcher

# Complement of an out_index (the pruned channels): built without a host sync, cached
# per index tensor (the backend's index vectors are constants).
_complements = TensorCache()


def _complement(out_index: Tensor, out_channels: int) -> Tensor:
    hit = _complements.get(out_index)
    if hit is not None and hit[0] == out_index._version and hit[1] == out_channels:
        return hit[2]
    kept = torch.zeros(out_channels, dtype=torch.int32, device=out_index.device)
    kept.index_fill_(0, out_index.long(), 1)
    # Stable sort puts the unkept (0) channels first, in ascending order; no nonzero() sync.
    comp = torch.sort(kept, stable=True).indices[: out_channels - out_index.numel()].to(torch.int32)
    _complements.put(out_index, (out_index._version, out_channels, comp))
    return comp


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _heuristic_split_k(m: int, nch: int, k_total: int, kh: int, kw: int, cin: int, device) -> int:
    forced = os.environ.get("FXSPARSE_SPLIT_K")
    if forced:
        return max(1, int(forced))
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    tiles = triton.cdiv(m, 128) * triton.cdiv(nch, 128)
    k_iters = kh * kw * triton.cdiv(cin, 64)
    if tiles >= sms or k_total < 1024 or k_iters < 8:
        return 1
    split = max(1, min(sms // max(tiles, 1), k_iters // 4, 8))
    return split


def _new_output(shape, x: Tensor) -> Tensor:
    # A seam for tests, which swap in a NaN-poisoned allocation to prove every element is written.
    return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)


# Split-K only pays when its extra workspace pass costs less than the idle SMs it fills; the
# heuristic proposes a factor and the first call of each shape times it against no split.
_split_decisions: dict = {}


def _measured_split_k(key, proposed: int, run) -> int:
    hit = _split_decisions.get(key)
    if hit is not None:
        return hit
    if torch.cuda.is_current_stream_capturing():
        return proposed  # cannot time inside a graph capture; decide on a later eager call
    times = {}
    for s in (1, proposed):
        run(s)  # autotunes this variant first, so the timing below is of the tuned kernel
        times[s] = triton.testing.do_bench(lambda s=s: run(s), warmup=5, rep=25, return_mode="median")
    best = min(times, key=times.get)
    _split_decisions[key] = best
    return best


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
    `config` (tests/benchmarks): a fixed tile config, bypassing the autotuner.
    `split_k`: force the split-K factor (default: a shape heuristic on CUDA, 1 elsewhere).
    """
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
        M=m, H=h, W=w, HO=ho, WO=wo,
        sxn=x.stride(0), sxc=x.stride(1), sxh=x.stride(2), sxw=x.stride(3),
        swo=weight.stride(0), swc=weight.stride(1), swh=weight.stride(2), sww=weight.stride(3),
        son=out.stride(0), soc=out.stride(1), soh=out.stride(2), sow=out.stride(3),
        srn=res_strides[0], src=res_strides[1], srh=res_strides[2], srw=res_strides[3],
        sbc=bm_strides[0], sbh=bm_strides[1], sbw=bm_strides[2],
        stride_h=sh, stride_w=sw, pad_h=ph, pad_w=pw, dil_h=dh, dil_w=dw,
        KH=kh, KW=kw, POINTWISE=pointwise,
        HAS_IN_INDEX=in_index is not None,
        HAS_RESIDUAL=residual is not None, RESIDUAL_AFTER=bool(residual_after_activation),
        ACTIVATION=ACTIVATION_CODES[activation], ACC_TYPE=acc_type,
        IEEE=x.dtype in (torch.float32, torch.float64),
        DOT_UPCAST=interpret and x.dtype == torch.bfloat16,
    )
    ptrs = dict(x_ptr=x, w_ptr=weight, out_ptr=out,
                res_ptr=residual if residual is not None else dummy,
                in_idx_ptr=in_index if in_index is not None else dummy)

    if nch > 0:
        if split_k is None:
            split_k = _heuristic_split_k(m, nch, kh * kw * cin, kh, kw, cin, x.device)
            if split_k > 1 and config is None and not interpret and "FXSPARSE_SPLIT_K" not in os.environ:
                split_k = _measured_split_k(
                    (m, nch, cin, h, w, kh, kw, sh, sw, ph, pw, dh, dw, x.dtype, in_index is not None,
                     x.stride(1), weight.stride(1)),
                    split_k,
                    lambda s: conv2d_triton(x, weight, bias, stride, padding, dilation, in_index, out_index,
                                            out_channels, fill, scale, shift, bias_map, residual, activation,
                                            residual_after_activation, out=out, split_k=s))
        ws = (torch.empty((split_k, m, nch), device=x.device, dtype=torch.float64 if acc_type == tl.float64
                          else torch.float32) if split_k > 1 else dummy)
        conv_args = dict(
            common, **ptrs, ws_ptr=ws,
            bias_ptr=bias if bias is not None else dummy,
            scale_ptr=scale if scale is not None else dummy,
            shift_ptr=shift if shift is not None else dummy,
            bias_map_ptr=bias_map if bias_map is not None else dummy,
            chan_ptr=out_index if out_index is not None else dummy,
            NCH=nch, CIN=cin, HAS_CHAN_INDEX=out_index is not None,
            HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
            HAS_BIAS_MAP=bias_map is not None,
        )

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(nch, meta["BLOCK_N"]), split_k)

        cfg = config if config is not None else (_INTERPRET_CONFIG if interpret else None)
        if cfg is not None:
            cfg = dict(cfg)
            cfg.setdefault("BLOCK_K", min(64, _pow2_at_least(cin)))
            _conv2d_kernel[grid](**conv_args, SOURCE=_SRC_CONV, SPLIT_K=split_k,
                                 EVEN_K=cin % cfg["BLOCK_K"] == 0, **cfg)
        else:
            # EVEN_K must hold for every BLOCK_K the pruner can hand out (see _prune_configs).
            bk_cap = min(64, _pow2_at_least(cin))
            even_k = all(cin % min(bk, bk_cap) == 0 for bk in {t[2] for t in _CUDA_TILES})
            _autotuned_kernel()[grid](**conv_args, SOURCE=_SRC_CONV, SPLIT_K=split_k, EVEN_K=even_k)
        if split_k > 1:
            ecfg = dict(_INTERPRET_CONFIG if interpret else _EPILOGUE_CONFIG)
            _conv2d_kernel[grid(ecfg)](**conv_args, SOURCE=_SRC_WORKSPACE, SPLIT_K=split_k,
                                       EVEN_K=True, **ecfg)

    if out_index is not None and nch < out_channels:
        comp = _complement(out_index, out_channels)
        ncomp = out_channels - nch
        ecfg = dict(_INTERPRET_CONFIG if interpret else _EPILOGUE_CONFIG)
        fill_grid = (triton.cdiv(m, ecfg["BLOCK_M"]) * triton.cdiv(ncomp, ecfg["BLOCK_N"]), 1)
        _conv2d_kernel[fill_grid](
            **common, **ptrs, ws_ptr=dummy,
            bias_ptr=fill if fill is not None else dummy,
            scale_ptr=dummy, shift_ptr=dummy, bias_map_ptr=dummy, chan_ptr=comp,
            NCH=ncomp, CIN=0, HAS_CHAN_INDEX=True,
            HAS_BIAS=fill is not None, HAS_SCALE=False, HAS_SHIFT=False, HAS_BIAS_MAP=False,
            SOURCE=_SRC_NONE, SPLIT_K=1, EVEN_K=True, **ecfg)
    return out
