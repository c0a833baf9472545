"""What the conv kernel compiles to on Hopper, without a GPU: the PTX of `_conv2d_kernel` for
sm90, built offline by Triton's own compiler (its bundled ptxas), and how its global memory
accesses are vectorized (`st.global.v4` moves 16 bytes, `st.global.b16` one fp16).

    PYTHONPATH=. python benchmarks/kernel_ptx.py

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
_POINTERS = ("x_ptr", "w_ptr", "out_ptr", "ws_ptr", "bias_ptr", "scale_ptr", "shift_ptr", "bias_map_ptr",
             "res_ptr", "chan_ptr")


class OfflineCompileUnavailable(RuntimeError):
    pass


def memory_instructions(pointwise: bool = True, out_index: bool = False, residual: bool = True,
                        block=(128, 128, 64), num_warps: int = 8, num_stages: int = 3,
                        persistent: bool = False) -> Counter:
    """Counts of PATTERNS in the sm90 PTX of one fp16 conv launch: 64 -> 256 channels at 56x56
    (channels_last, every stride a multiple of 16, as Triton specializes real launches), 1x1
    (`pointwise`) or 3x3, writing through an output-channel index or not."""
    import triton
    import triton.language as tl

    from fxsparse.kernels.conv2d import _conv2d_kernel

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        raise OfflineCompileUnavailable(str(e)) from e
    cin, cout, hw = 64, 256, 56
    k = 1 if pointwise else 3
    sizes = dict(M=32 * hw * hw, NCH=cout // 2 if out_index else cout, CIN=cin, H=hw, W=hw, HO=hw, WO=hw,
                 K_SPLITS=1, sxn=hw * hw * cin, sxc=1, sxh=hw * cin, sxw=cin,
                 swo=cin * k * k, swc=1, swh=k * cin, sww=cin,
                 son=hw * hw * cout, soc=1, soh=hw * cout, sow=cout,
                 srn=hw * hw * cout, src=1, srh=hw * cout, srw=cout, sbc=0, sbh=0, sbw=0)
    bm, bn, bk = block
    constexprs = dict(KH=k, KW=k, STRIDE_H=1, STRIDE_W=1, PAD_H=k // 2, PAD_W=k // 2, DIL_H=1, DIL_W=1,
                      SOURCE=0, SPLIT=False, POINTWISE=pointwise, FLAT_X_ROWS=pointwise, FLAT_OUT_ROWS=True, EVEN_K=True, HAS_CHAN_INDEX=out_index,
                      HAS_BIAS=True, HAS_SCALE=False, HAS_SHIFT=False, HAS_BIAS_MAP=False,
                      HAS_RESIDUAL=residual, RESIDUAL_AFTER=False, ACTIVATION=1, ACC_TYPE=tl.float32, IEEE=False,
                      DOT_UPCAST=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                      PERSISTENT=persistent)
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(inspect.signature(_conv2d_kernel.fn).parameters):
        if name in _POINTERS:
            signature[name] = {"ws_ptr": "*fp32", "chan_ptr": "*i32"}.get(name, "*fp16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in constexprs or sizes.get(name) == 1:  # Triton specializes ints equal to 1
            signature[name] = "constexpr"
            consts[(i,)] = constexprs.get(name, 1)
        else:
            signature[name] = "i32"
            if sizes[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        src = ASTSource(fn=_conv2d_kernel, signature=signature, constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
    except (TypeError, KeyError, AttributeError) as e:  # another Triton's offline API
        raise OfflineCompileUnavailable(f"{type(e).__name__}: {e}") from e
    ptx = compiled.asm["ptx"]
    return Counter({p: len(re.findall(re.escape(p) + r"\b", ptx)) for p in PATTERNS})


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
    # the persistent launch (tile loop flattened with the K loop), as the tuner offers it
    c = memory_instructions(pointwise=True, block=(128, 128, 64), num_warps=4, num_stages=3, persistent=True)
    cases["1x1 persistent"] = dict(c)
    rows.append(["1x1 persistent (4 warps)", "no", *(c[p] for p in PATTERNS)])
    if args.json:
        print(json.dumps(cases))
        return
    import triton

    print(f"_conv2d_kernel, sm90 PTX (triton {triton.__version__}), fp16 64->256 @56x56, 128x128x64 tile, "
          f"8 warps, residual add; occurrences of each instruction in the PTX")
    print(tabulate(rows, headers=["conv", "out_index", *PATTERNS], tablefmt="github"))


if __name__ == "__main__":
    main()
