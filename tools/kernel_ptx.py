"""What the conv kernel compiles to on Hopper, without a GPU: the PTX of `pointer.conv_kernel` for
sm90, built offline by Triton's own compiler (its bundled ptxas), and how its global memory
accesses are vectorized (`st.global.v4` moves 16 bytes, `st.global.b16` one fp16).

    PYTHONPATH=. python tools/kernel_ptx.py

Tile-level facts (vector widths, wgmma vs mma, async copies) need no device; timings do
(`benchmarks/kernel_tune.py`, `conv_layers.py` on the GPU). Triton's offline compile API moved
across 3.6-3.9: where this Triton's is not the one used here, `memory_instructions` raises
`OfflineCompileUnavailable`. Run it without TRITON_INTERPRET (the interpreter replaces the
kernel with a Python function that cannot be compiled).
"""
from __future__ import annotations

import inspect
import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PATTERNS = ("st.global.v4", "st.global.v2", "st.global.b16", "ld.global.v4", "ld.global.v2", "ld.global.b16",
            "wgmma", "mma.sync", "cp.async")
_POINTERS = ("x_ptr", "w_ptr", "out_ptr", "ws_ptr", "arrivals_ptr", "bias_ptr", "bias_map_ptr", "res_ptr",
             "chan_ptr")
_POINTER_TYPES = {"ws_ptr": "*fp32", "bias_map_ptr": "*fp32", "arrivals_ptr": "*i32", "chan_ptr": "*i32"}
# How split-K slices meet (tile.last_slice_to_arrive): a CTA barrier, then one acquire-release
# atomic at GPU scope, then the partial sums read through L2.
SPLIT_PATTERNS = ("bar.sync", "atom.global.gpu.acq_rel.add", "ld.global.cg")


class OfflineCompileUnavailable(RuntimeError):
    pass


def memory_instructions(pointwise: bool = True, out_index: bool = False, residual: bool = True,
                        block=(128, 128, 64), num_warps: int = 8, num_stages: int = 3,
                        split: bool = False) -> Counter:
    """Counts of PATTERNS in the sm90 PTX of one fp16 conv launch: 64 -> 256 channels at 56x56
    (channels_last, every stride a multiple of 16, as Triton specializes real launches), 1x1
    (`pointwise`) or 3x3, writing through an output-channel index or not."""
    import triton
    import triton.language as tl

    from fxsparse.kernels.pointer import conv_kernel

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        raise OfflineCompileUnavailable(str(e)) from e
    cin, cout, hw = 64, 256, 56
    k = 1 if pointwise else 3
    sizes = dict(M=32 * hw * hw, NCH=cout // 2 if out_index else cout, CIN=cin, H=hw, W=hw, HO=hw, WO=hw,
                 K_SPLITS=2 if split else 1, sxn=hw * hw * cin, sxc=1, sxh=hw * cin, sxw=cin,
                 swo=cin * k * k, swc=1, swh=k * cin, sww=cin,
                 son=hw * hw * cout, soc=1, soh=hw * cout, sow=cout,
                 srn=hw * hw * cout, src=1, srh=hw * cout, srw=cout, sbc=0, sbh=0, sbw=0)
    bm, bn, bk = block
    constexprs = dict(KH=k, KW=k, STRIDE_H=1, STRIDE_W=1, PAD_H=k // 2, PAD_W=k // 2, DIL_H=1, DIL_W=1,
                      SOURCE=0, SPLIT=split, POINTWISE=pointwise, FLAT_X_ROWS=pointwise, FLAT_OUT_ROWS=True,
                      EVEN_K=True, HAS_CHAN_INDEX=out_index,
                      HAS_BIAS=True, HAS_BIAS_MAP=False,
                      HAS_RESIDUAL=residual, RESIDUAL_AFTER=False, ACTIVATION=1, ACC_TYPE=tl.float32, IEEE=False,
                      DOT_UPCAST=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(inspect.signature(conv_kernel.fn).parameters):
        if name in _POINTERS:
            signature[name] = _POINTER_TYPES.get(name, "*fp16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in constexprs or sizes.get(name) == 1:  # Triton specializes ints equal to 1
            signature[name] = "constexpr"
            consts[(i,)] = constexprs.get(name, 1)
        else:
            signature[name] = "i32"
            if sizes[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        src = ASTSource(fn=conv_kernel, signature=signature, constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
    except (TypeError, KeyError, AttributeError) as e:  # another Triton's offline API
        raise OfflineCompileUnavailable(f"{type(e).__name__}: {e}") from e
    return _count(compiled.asm["ptx"], PATTERNS + SPLIT_PATTERNS)


def _count(ptx: str, patterns) -> Counter:
    return Counter({p: len(re.findall(re.escape(p) + r"\b", ptx)) for p in patterns})


TMA_PATTERNS = ("wgmma", "cp.async.bulk.tensor", "ld.shared", "st.shared")
TMA_KINDS = ("gemm", "box", "box/2", "box/split", "box/row")
# Warp specialisation on sm90: the partitions hand registers to each other (setmaxnreg).
WS_PATTERNS = ("setmaxnreg",)


def k_loop_sync(ptx: str) -> dict:
    """What the K loop waits on: the basic block that holds the wgmma instructions, with its
    wgmma count, the wgmma.wait_group depths it uses, its mbarrier waits (TMA arrivals) and CTA
    barriers. A loop that waits with depth 1 once per step keeps one step's MMAs in flight
    while the next step's operands land; depth N-1 after each of N wgmmas does not."""
    body = max(re.split(r"^\$L__BB\d+_\d+:", ptx, flags=re.M), key=lambda b: b.count("wgmma.mma_async"))
    depths = re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", body)
    return {"wgmma": body.count("wgmma.mma_async"), "wait_group": " ".join(depths) or "-",
            "mbarrier waits": body.count("mbarrier.try_wait"), "bar.sync": len(re.findall(r"bar\.sync\b", body))}


def _descriptor_signature(fn, consts: dict, descs: dict) -> tuple:
    """(signature, constexprs) for Triton's offline compile of a launch of `fn`: `consts` by
    name, tensor descriptors typed as `descs` says, pointers fp16 (or as _POINTER_TYPES), the
    rest i32."""
    signature, constexprs = {}, {}
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in consts:
            signature[name] = "constexpr"
            constexprs[(i,)] = consts[name]
        elif name in descs:
            signature[name] = descs[name]
        else:
            signature[name] = _POINTER_TYPES.get(name, "*fp16") if name.endswith("_ptr") else "i32"
    return signature, constexprs


def tma_ptx(kind: str) -> str:
    """The sm90 PTX of a kernels/tma.py launch (fp16, residual, relu): "gemm" (1x1, 256x128x64
    tile), "box" (3x3, a 2x64-pixel box, 128 channels, 64-deep K) or "box/2" (the same box at
    stride 2, reading phases of the input) or "box/split" (the box with its K loop split) or "box/row" (one row of 64 pixels: the box's
    leading dimensions all 1). main() counts TMA_PATTERNS in it: box loads reshaped to GEMM
    tiles should feed wgmma from shared memory directly, with no ld.shared/st.shared round
    trip through registers."""
    import triton

    from fxsparse.kernels import tma

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        raise OfflineCompileUnavailable(str(e)) from e
    epi = dict(HAS_BIAS=True, HAS_RESIDUAL=True, RESIDUAL_AFTER=False,
               ACTIVATION=1, OUT_BF16=False, DOT_UPCAST=False, GROUP_M=8)
    if kind == "gemm":
        fn, (bm, bn, bk) = tma._gemm_kernel, (256, 128, 64)
        descs = dict(x_desc=f"tensordesc<fp16[{bm}, {bk}]>", w_desc=f"tensordesc<fp16[{bn}, {bk}]>",
                     out_desc=f"tensordesc<fp16[{bm}, {bn}]>", res_desc=f"tensordesc<fp16[{bm}, {bn}]>")
        consts = dict(epi, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    else:
        bh, bw = {"box/row": (1, 64)}.get(kind, (2, 64))
        fn, bn, bk = tma._box_kernel, 128, 64
        stride = 2 if kind == "box/2" else 1
        box_n = 1
        box = f"{box_n}, {bh}, {bw}"
        descs = dict(x_desc=f"tensordesc<fp16[{box_n}, {bh}, 1, {bw}, {bk}]>",
                     w_desc=f"tensordesc<fp16[{bn}, 1, {bk}]>",
                     out_desc=f"tensordesc<fp16[{box}, {bn}]>", res_desc=f"tensordesc<fp16[{box}, {bn}]>")
        consts = dict(epi, KH=3, KW=3, STRIDE_H=stride, STRIDE_W=stride, PAD_H=1, PAD_W=1, DIL_H=1, DIL_W=1,
                      HAS_BIAS_MAP=False, SPLIT=kind == "box/split", EVEN_CIN=True, BOX_N=box_n, BOX_H=bh, BOX_W=bw,
                      BLOCK_N=bn, BLOCK_K=bk)
    signature, constexprs = _descriptor_signature(fn, consts, descs)
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs={})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=3))
    except (TypeError, KeyError, AttributeError, ValueError) as e:  # another Triton's offline API
        raise OfflineCompileUnavailable(f"{type(e).__name__}: {e}") from e
    return compiled.asm["ptx"]


def ws_ptx() -> str:
    """The sm90 PTX of the warp-specialised box launch (kernels/box_ws.py, Gluon): 3x3, a box of
    2 images x 8x8 pixels, 128 channels, 64-deep K, 4 MMA warps, 4 stages, residual and relu."""
    import torch
    import triton

    from fxsparse.kernels import box_ws

    try:
        from triton.backends.compiler import GPUTarget
        from triton.experimental.gluon._runtime import GluonASTSource
        from triton.runtime.jit import mangle_type
    except ImportError as e:
        raise OfflineCompileUnavailable(str(e)) from e
    if not box_ws.available():
        raise OfflineCompileUnavailable("this Triton has no Gluon Hopper API")
    (bn_img, bh, bw), bn, bk, warps, stages = (2, 8, 8), 128, 64, 4, 4
    x = torch.zeros(8, 56, 1, 56, 64, dtype=torch.float16)  # [N, H, phase, W, C] (tma._phased)
    w = torch.zeros(bn, 9, 64, dtype=torch.float16)
    out = torch.zeros(8, 56, 56, bn, dtype=torch.float16)
    x_block, w_block, out_block = [bn_img, bh, 1, bw, bk], [bn, 1, bk], [bn_img, bh, bw, bn]
    descs = {name: box_ws.GluonDescriptor(t, list(t.shape), list(t.stride()), block, box_ws._layout(block))
             for name, t, block in (("x_desc", x, x_block), ("w_desc", w, w_block), ("out_desc", out, out_block))}
    consts = dict(KH=3, KW=3, STRIDE_H=1, STRIDE_W=1, PAD_H=1, PAD_W=1, DIL_H=1, DIL_W=1, HAS_BIAS=True,
                  HAS_RESIDUAL=True, RESIDUAL_AFTER=False, ACTIVATION=1,
                  BOX_N=bn_img, BOX_H=bh, BOX_W=bw, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, STAGES=stages,
                  num_warps=warps)
    fn = box_ws._box_ws_kernel
    signature, constexprs = _descriptor_signature(fn, consts, {k: mangle_type(d) for k, d in descs.items()})
    try:
        src = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs={})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    except (TypeError, KeyError, AttributeError, ValueError) as e:  # another Triton's offline API
        raise OfflineCompileUnavailable(f"{type(e).__name__}: {e}") from e
    return compiled.asm["ptx"]


def main() -> None:
    import argparse
    import json

    from tabulate import tabulate

    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true", help="print {case: counts} as JSON (for tests)")
    args = p.parse_args()
    rows, cases = [], {}
    for pointwise in (True, False):
        for out_index in (False, True):
            c = memory_instructions(pointwise=pointwise, out_index=out_index)
            cases[f"{'1x1' if pointwise else '3x3'}{' out_index' if out_index else ''}"] = dict(c)
            rows.append(["1x1" if pointwise else "3x3", "yes" if out_index else "no", *(c[p] for p in PATTERNS)])
    c = memory_instructions(pointwise=False, split=True)
    cases["3x3 split"] = dict(c)
    rows.append(["3x3 split-K", "no", *(c[p] for p in PATTERNS)])
    loops = {}
    for kind in TMA_KINDS:
        ptx = tma_ptx(kind)
        cases[f"tma {kind}"] = dict(_count(ptx, TMA_PATTERNS + SPLIT_PATTERNS))
        loops[kind] = cases[f"loop {kind}"] = k_loop_sync(ptx)
    ptx = ws_ptx()
    cases["tma box/ws"] = dict(_count(ptx, TMA_PATTERNS + SPLIT_PATTERNS + WS_PATTERNS))
    loops["box/ws"] = cases["loop box/ws"] = k_loop_sync(ptx)
    if args.json:
        print(json.dumps(cases))
        return
    import triton

    print(f"pointer.conv_kernel, sm90 PTX (triton {triton.__version__}), fp16 64->256 @56x56, 128x128x64 tile, "
          f"8 warps, residual add; occurrences of each instruction in the PTX")
    print(tabulate(rows, headers=["conv", "out_index", *PATTERNS], tablefmt="github"))
    print("\nkernels/tma.py launches, sm90 PTX (256x128x64 GEMM tile; 3x3 box of 2x64 pixels x 128 channels, "
          "stride 1 and 2)")
    print(tabulate([[k, *(cases[f"tma {k}"].get(p, 0) for p in TMA_PATTERNS)] for k in TMA_KINDS],
                   headers=["launch", *TMA_PATTERNS], tablefmt="github"))
    print("\nTheir K loops (the basic block holding the wgmma instructions): wgmma.wait_group depths in "
          "order, TMA arrivals waited on, CTA barriers")
    print(tabulate([[k, *loops[k].values()] for k in TMA_KINDS + ("box/ws",)], headers=["launch", *loops["gemm"]],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
