"""Which tile configs win: fxsparse's conv tuner on the conv_layers shapes, next to cuDNN.

For every layer of benchmarks/conv_layers.py, dense (keep 1.0) and compacted (keep 0.25 of the
output channels), this runs the fxsparse conv once (which tunes that shape: every candidate
(tile, split-K) launch is timed by CUDA-graph replay, conv2d._launch_ms) and prints each
candidate's time, the chosen one, the best 4-warp and 8-warp ones, then the CUDA-graph replay
time of the tuned conv (the conv_layers method) next to cuDNN channels_last. 1x1 rows also show
cuBLAS `torch.mm` on the same GEMM (M x Cin @ Cin x Cout): a plain-GEMM yardstick. Each layer
also times the in_index gather alone (half the input channels, random order), the copy that
replaced the in-kernel gather.

    PYTHONPATH=. python benchmarks/kernel_tune.py [--layers 512,seed] [--keeps 1,0.25]

Runs in about 2 minutes on an H100 (most of it Triton compiles; a warm ~/.triton cache halves it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

# This script shows the tuner's timings: every shape is timed, never read from the tuning cache.
os.environ["FXSPARSE_TUNE"] = "always"

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
from conv_layers import LAYERS  # noqa: E402

import fxsparse.ops  # noqa: E402,F401
from fxsparse.kernels import conv2d as K  # noqa: E402


def _op(x, w, stride, padding, in_index=None):
    return torch.ops.fxsparse.conv2d(x, w, None, list(stride), list(padding), [1, 1], in_index, None, w.shape[0],
                                     None, None, None, None, None, "none", False)


def run_shape(spec, keep, rows):
    name, batch, cin, cout, k, hw, s = spec
    cout_k = max(1, round(cout * keep))
    stride, padding = (s, s), (k // 2, k // 2)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, cin, hw, hw, device="cuda", generator=g).half().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout_k, cin, k, k, device="cuda", generator=g) / (cin * k * k) ** 0.5).half()
    w = w.contiguous(memory_format=torch.channels_last)

    cudnn_us = common.time_cuda_graph(lambda: F.conv2d(x, w, None, stride, padding)) * 1e3
    before = set(K.tuned)
    t0 = time.time()
    y = _op(x, w, stride, padding)
    torch.cuda.synchronize()
    tune_s = time.time() - t0
    new = [key for key in K.tuned if key not in before]
    choice = K.tuned[new[0]] if new else None
    fx_us = common.time_cuda_graph(lambda: _op(x, w, stride, padding)) * 1e3
    # the same tuned launch addressing rows through (n, h, w) divisions, as before FLAT_*_ROWS
    flat_rows = K.evenly_strided_rows
    K.evenly_strided_rows = lambda t: False
    try:
        _op(x, w, stride, padding)
        div_us = common.time_cuda_graph(lambda: _op(x, w, stride, padding)) * 1e3
    finally:
        K.evenly_strided_rows = flat_rows
    ref = F.conv2d(x.float(), w.float(), None, stride, padding)
    err = common.rel_l2(y, ref)

    mm_us = None
    if k == 1 and s == 1:
        a = x.permute(0, 2, 3, 1).reshape(-1, cin)
        b = w.reshape(cout_k, cin).t()
        mm_us = common.time_cuda_graph(lambda: torch.mm(a, b)) * 1e3

    # the in_index path: gather half the input channels (random order) into a compact buffer
    idx = torch.randperm(cin, device="cuda", generator=g)[: cin // 2]
    gather_us = common.time_cuda_graph(lambda: K._select_channels(x, idx)) * 1e3

    print(f"\n== {name} B={batch} keep {keep:g}: M={y.shape[0] * y.shape[2] * y.shape[3]} N={cout_k} "
          f"K={cin * k * k}  cuDNN {cudnn_us:.1f} us | fxsparse {fx_us:.1f} us (x{cudnn_us / fx_us:.2f}) | "
          f"rows by division {div_us:.1f} us | rel_l2 {err:.1e} | first call {tune_s:.1f} s" + (f" | cuBLAS mm {mm_us:.1f} us" if mm_us else "")
          + f" | gather Cin/2 {gather_us:.1f} us", flush=True)
    best4 = best8 = None
    if choice is not None:
        print(f"   chosen: {choice!r}")
        for cfg, split, ms in choice.timings:
            mark = " <=" if cfg == choice.config and split == choice.split_k else ""
            print(f"   {K.describe_launch(cfg, split):28s} {ms * 1e3:8.1f} us{mark}")
            if cfg["num_warps"] <= 4 and best4 is None:
                best4 = (cfg, split, ms)
            if cfg["num_warps"] > 4 and best8 is None:
                best8 = (cfg, split, ms)
    fmt = lambda b: "-" if b is None else f"{K.describe_launch(b[0], b[1])} {b[2] * 1e3:.1f}"  # noqa: E731
    rows.append(dict(
        layer=f"{name} B{batch}", keep=f"{keep:g}", cudnn_us=cudnn_us, fx_us=fx_us,
        speedup=cudnn_us / fx_us, div_us=div_us, chosen=(K.describe_launch(choice.config, choice.split_k) + (" !" if "MISMATCH" in choice.note else ""))
        if choice else "(cached)", best4=fmt(best4), best8=fmt(best8), mm_us=mm_us, gather_us=gather_us,
        rel_l2=err))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="", help="comma-separated substrings of layer names (or B128)")
    p.add_argument("--keeps", default="1,0.25", help="output-channel keeps to run")
    p.add_argument("--json", metavar="PATH", help="write rows and environment as JSON")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    layers = LAYERS
    if args.layers:
        wanted = [t.strip() for t in args.layers.split(",") if t.strip()]
        layers = [l for l in layers if any(t in l[0] or t == f"B{l[1]}" for t in wanted)]
    keeps = [float(v) for v in args.keeps.split(",")]
    started = time.time()
    rows = []
    for spec in layers:
        for keep in keeps:
            try:
                run_shape(spec, keep, rows)
            except Exception as e:  # noqa: BLE001 - one bad shape must not hide the rest
                print(f"\n== {spec[0]} B={spec[1]} keep {keep:g}: FAILED {type(e).__name__}: {e}", flush=True)
            torch.cuda.empty_cache()
    env = common.environment()
    print(f"\n{env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"{time.time() - started:.0f} s | candidate times: {K.TIMING} median; "
          f"cuDNN/fx/mm/gather: CUDA-graph replay median per call")
    rows += [dict(layer=f"geomean keep {keep:g}",
                  speedup=common.geomean([r["speedup"] for r in rows if r.get("keep") == f"{keep:g}"]))
             for keep in keeps]
    if args.json:
        common.write_json(args.json, rows, env)
    common.print_table(rows, [("layer", "layer"), ("keep", "keep"), ("cudnn_us", "cuDNN CL us"),
                              ("fx_us", "fx us"), ("div_us", "fx rows by division us"), ("speedup", "speedup"), ("chosen", "chosen"),
                              ("best4", "best 4-warp (us)"), ("best8", "best 8-warp (us)"),
                              ("mm_us", "cuBLAS mm us"), ("gather_us", "gather us"), ("rel_l2", "rel l2")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
