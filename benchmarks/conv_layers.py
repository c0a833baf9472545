"""Single conv layers: fxsparse's Triton conv vs cuDNN and Inductor, dense and compacted.

Layers: the seed layer 64->128 3x3 56x56 (B=16, B=128) and ResNet-50 layers at B=32. Each at
output-channel keep 1.0 / 0.5 / 0.25 with the weight physically compacted (what a perfect
channel-compacting compiler would run), plus one row with half the input channels kept, read
by fxsparse through `in_index` from the uncompacted input (the cuDNN/Inductor baselines get the
input already compacted, the gather untimed).

Times are per-call medians of CUDA-graph replays (20 calls per graph; benchmarks/common.py),
fp16, channels_last, cudnn.benchmark on. "speedup" = cuDNN channels_last time / other time
(> 1: faster than cuDNN). "% floor" = roofline floor / fxsparse time, floor = max(FLOPs /
700 TFLOP/s, bytes moved once / 2.7 TB/s).

    PYTHONPATH=. python benchmarks/conv_layers.py [--json out.json] [--no-autotune-baseline]
                                                  [--layers 512,seed] [--quick]

`--quick`: tiny shapes on the CPU (aten path, wall-clock), no Inductor: a CI smoke test.
Inductor max-autotune (Triton conv template only) compiles for a long time: it runs for keep
1.0 and 0.25, never at B=128, and stops once `--budget-s` seconds have gone (marked "-").
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402

import fxsparse.ops  # noqa: E402,F401
from fxsparse.kernels.problem import ConvArgs  # noqa: E402

# name, batch, cin, cout, kernel, H=W, stride
LAYERS = [
    ("seed 64-128 3x3 @56", 16, 64, 128, 3, 56, 1),
    ("seed 64-128 3x3 @56", 128, 64, 128, 3, 56, 1),
    ("r50 64-64 3x3 @56", 32, 64, 64, 3, 56, 1),
    ("r50 64-256 1x1 @56", 32, 64, 256, 1, 56, 1),
    ("r50 128-128 3x3 @28", 32, 128, 128, 3, 28, 1),
    ("r50 256-256 3x3 @14", 32, 256, 256, 3, 14, 1),
    ("r50 512-512 3x3 @7", 32, 512, 512, 3, 7, 1),
    ("r50 128-128 3x3/2 @56", 32, 128, 128, 3, 56, 2),
]
QUICK_LAYERS = [
    ("tiny 8-16 3x3 @8", 2, 8, 16, 3, 8, 1),
    ("tiny 8-16 1x1 @8", 2, 8, 16, 1, 8, 1),
]
# (keep of output channels, keep of input channels)
VARIANTS = [(1.0, 1.0), (0.5, 1.0), (0.25, 1.0), (1.0, 0.5)]
MAX_AUTOTUNE_KEEPS = (1.0, 0.25)

COLUMNS = [
    ("layer", "layer"), ("batch", "B"), ("keep", "keep out/in"),
    ("cudnn_nchw_us", "cuDNN NCHW us"), ("cudnn_cl_us", "cuDNN CL us"), ("inductor_us", "Inductor us"),
    ("inductor_ma_us", "Ind max-AT us"), ("fxsparse_us", "fxsparse us"), ("speedup", "fx speedup"),
    ("ma_speedup", "Ind-MA speedup"), ("pct_floor", "fx % floor"), ("floor_us", "floor us"),
    ("fx_bias_relu_us", "fx +bias+relu us"), ("cudnn_bias_relu_us", "cuDNN+bias+relu us"),
    ("fused_speedup", "fused speedup"), ("max_err", "max err"), ("rel_l2", "rel l2"),
]


def _inductor_default(stride, padding):
    def conv(x, w):
        return F.conv2d(x, w, None, stride, padding)

    return torch.compile(conv, dynamic=False)


def _inductor_max_autotune(stride, padding):
    def conv_ma(x, w):
        return F.conv2d(x, w, None, stride, padding)

    return torch.compile(conv_ma, dynamic=False)


def _op(x, w, bias, stride, padding, in_index, cout, activation):
    return torch.ops.fxsparse.conv2d(*ConvArgs.of(x, w, bias, stride, padding, in_index=in_index, out_channels=cout,
                                                  activation=activation))


def make_tensors(spec, keep_out, keep_in, device):
    """One row's inputs, seeded (every script that calls this builds the same tensors): the full
    input x_full, the compacted input x_c (x_full itself unless keep_in < 1, then its kept channels
    gathered; in_index names them), the compacted weight w and a bias, channels_last."""
    name, batch, cin, cout, k, hw, s = spec
    dtype = torch.float16 if device == "cuda" else torch.float32
    cout_k = max(1, round(cout * keep_out))
    cin_k = max(1, round(cin * keep_in))
    stride, padding = (s, s), (k // 2, k // 2)
    g = torch.Generator(device=device).manual_seed(0)
    x_full = torch.randn(batch, cin, hw, hw, device=device, generator=g).to(dtype).contiguous(
        memory_format=torch.channels_last)
    in_index = None
    x_c = x_full
    if cin_k < cin:
        in_index = torch.randperm(cin, device=device, generator=g)[:cin_k].sort().values
        x_c = x_full[:, in_index].contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout_k, cin_k, k, k, device=device, generator=g) / (cin_k * k * k) ** 0.5).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(cout_k, device=device, generator=g).to(dtype)
    return SimpleNamespace(x_full=x_full, x_c=x_c, in_index=in_index, w=w, bias=bias, stride=stride,
                           padding=padding, cout_k=cout_k, cin_k=cin_k)


def fxsparse_call(t, fused=False):
    """fxsparse's op as the table times it: the full input (read through in_index), the compacted
    weight; fused: with the bias and ReLU in its epilogue."""
    if fused:
        return lambda: _op(t.x_full, t.w, t.bias, t.stride, t.padding, t.in_index, t.cout_k, "relu")
    return lambda: _op(t.x_full, t.w, None, t.stride, t.padding, t.in_index, t.cout_k, "none")


def cudnn_call(t, fused=False):
    """cuDNN (channels_last) as the table times it: the compacted input and weight; fused: conv
    with bias, then ReLU."""
    if fused:
        return lambda: torch.relu(F.conv2d(t.x_c, t.w, t.bias, t.stride, t.padding))
    return lambda: F.conv2d(t.x_c, t.w, None, t.stride, t.padding)


def run_row(spec, keep_out, keep_in, args, device, started):
    name, batch, cin, cout, k, hw, s = spec
    method = "graph" if device == "cuda" else "cpu"
    timing = dict(calls=20) if method == "graph" else dict(repeat=3)
    t = make_tensors(spec, keep_out, keep_in, device)
    x_full, x_c, in_index, w, bias = t.x_full, t.x_c, t.in_index, t.w, t.bias
    stride, padding, cout_k, cin_k = t.stride, t.padding, t.cout_k, t.cin_k
    x_nchw, w_nchw = x_c.contiguous(), w.contiguous()

    ho = (hw + 2 * padding[0] - k) // s + 1
    m = batch * ho * ho
    flops = 2.0 * m * cout_k * cin_k * k * k
    elt = x_full.element_size()
    bytes_moved = elt * (x_c.numel() + w.numel() + batch * cout_k * ho * ho)
    row = dict(layer=name, batch=batch, keep=f"{keep_out:g}/{keep_in:g}", keep_out=keep_out, keep_in=keep_in,
               M=m, N=cout_k, K=cin_k * k * k, flops=flops, bytes=bytes_moved,
               floor_us=common.roofline_floor_ms(flops, bytes_moved) * 1e3)
    errors = {}

    def timed(col, fn):
        ms, err = common.try_time(fn, method, **timing)
        row[col] = None if ms is None else ms * 1e3
        if err:
            errors[col] = err

    timed("cudnn_nchw_us", lambda: F.conv2d(x_nchw, w_nchw, None, stride, padding))
    timed("cudnn_cl_us", cudnn_call(t))
    timed("cudnn_bias_relu_us", cudnn_call(t, fused=True))
    timed("fxsparse_us", fxsparse_call(t))
    timed("fx_bias_relu_us", fxsparse_call(t, fused=True))

    if device == "cuda" and not args.quick:
        elapsed = time.time() - started
        if elapsed < args.budget_s:
            ind = _inductor_default(stride, padding)
            timed("inductor_us", lambda: ind(x_c, w))
        else:
            errors["inductor_us"] = "skipped: time budget"
        want_ma = args.autotune_baseline and keep_out in MAX_AUTOTUNE_KEEPS and keep_in == 1.0 and batch <= 64
        if want_ma and time.time() - started < args.budget_s * 0.75:
            patch, dropped = common.inductor_config_patch(
                max_autotune=True, max_autotune_conv_backends="TRITON", max_autotune_gemm_backends="TRITON")
            if dropped:
                errors["inductor_ma_options_dropped"] = ",".join(dropped)
            ma = _inductor_max_autotune(stride, padding)
            with patch:
                timed("inductor_ma_us", lambda: ma(x_c, w))
        elif want_ma:
            errors["inductor_ma_us"] = "skipped: time budget"

    ref = F.conv2d(x_c.float(), w.float(), None, stride, padding)
    y = _op(x_full, w, None, stride, padding, in_index, cout_k, "none")
    row["max_err"] = common.max_abs_err(y, ref)
    row["rel_l2"] = common.rel_l2(y, ref)
    y_br = _op(x_full, w, bias, stride, padding, in_index, cout_k, "relu")
    row["max_err_bias_relu"] = common.max_abs_err(y_br, torch.relu(ref + bias.float()[None, :, None, None]))

    row["speedup"] = common.ratio(row.get("cudnn_cl_us"), row.get("fxsparse_us"))
    row["ma_speedup"] = common.ratio(row.get("cudnn_cl_us"), row.get("inductor_ma_us"))
    row["ind_speedup"] = common.ratio(row.get("cudnn_cl_us"), row.get("inductor_us"))
    row["fused_speedup"] = common.ratio(row.get("cudnn_bias_relu_us"), row.get("fx_bias_relu_us"))
    fx = row.get("fxsparse_us")
    row["pct_floor"] = None if not fx else 100.0 * row["floor_us"] / fx
    if errors:
        row["errors"] = errors
    return row


def compare(before_path: str, after_path: str) -> list:
    """fxsparse's time per row of two runs (e.g. two versions of the kernels), and after / before."""
    import json

    def rows_of(path):
        with open(path) as f:
            return {(r["layer"], r["batch"], r["keep"]): r for r in json.load(f)["rows"]}

    before, after = rows_of(before_path), rows_of(after_path)
    rows = []
    for key, a in after.items():
        b = before.get(key, {})
        rows.append(dict(layer=key[0], batch=key[1], keep=key[2], before_us=b.get("fxsparse_us"),
                         after_us=a.get("fxsparse_us"), ratio=common.ratio(a.get("fxsparse_us"), b.get("fxsparse_us")),
                         cudnn_before=b.get("cudnn_cl_us"), cudnn_after=a.get("cudnn_cl_us"),
                         speedup_before=b.get("speedup"), speedup_after=a.get("speedup")))
    rows.append(dict(layer="geomean", ratio=common.geomean(r["ratio"] for r in rows),
                     speedup_before=common.geomean(r["speedup_before"] for r in rows),
                     speedup_after=common.geomean(r["speedup_after"] for r in rows)))
    common.print_table(rows, [("layer", "layer"), ("batch", "B"), ("keep", "keep"), ("before_us", "fx before us"),
                              ("after_us", "fx after us"), ("ratio", "after/before"),
                              ("cudnn_before", "cuDNN before us"), ("cudnn_after", "cuDNN after us"),
                              ("speedup_before", "vs cuDNN before"), ("speedup_after", "vs cuDNN after")],
                       title=f"fxsparse before ({before_path}) and after ({after_path})")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (aten path), no Inductor")
    p.add_argument("--json", metavar="PATH", help="write rows and environment as JSON")
    p.add_argument("--no-autotune-baseline", dest="autotune_baseline", action="store_false",
                   help="skip Inductor max-autotune (its compile time is large)")
    p.add_argument("--layers", default="", help="comma-separated substrings; run only layers whose name matches")
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="after this many seconds, skip the Inductor columns of the remaining rows")
    p.add_argument("--plot", metavar="PNG", help="bar chart of the times, if matplotlib is installed")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                   help="print fxsparse's times of two --json runs side by side (no GPU needed)")
    args = p.parse_args(argv)
    if args.compare:
        compare(*args.compare)
        return 0

    if args.quick:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        p.error("no CUDA GPU: use --quick for the CPU smoke version")
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        common.raise_dynamo_recompile_limit()

    layers = QUICK_LAYERS if args.quick else LAYERS
    if args.layers:
        wanted = [w.strip() for w in args.layers.split(",") if w.strip()]
        layers = [l for l in layers if any(w in l[0] or w == f"B{l[1]}" for w in wanted)]
        if not layers:
            p.error(f"--layers {args.layers!r} matches no layer")
    started = time.time()
    rows = []
    for spec in layers:
        for keep_out, keep_in in VARIANTS:
            row = run_row(spec, keep_out, keep_in, args, device, started)
            rows.append(row)
            print(f"[{time.time() - started:6.1f}s] {row['layer']} B={row['batch']} keep {row['keep']}: "
                  f"fxsparse {row.get('fxsparse_us')} us, cuDNN CL {row.get('cudnn_cl_us')} us, "
                  f"speedup {row.get('speedup')}" + (f"  errors: {row['errors']}" if row.get("errors") else ""),
                  flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()

    dense = [r["speedup"] for r in rows if r["keep_out"] == 1.0 and r["keep_in"] == 1.0]
    every = [r["speedup"] for r in rows if r.get("speedup") is not None]
    summary = [
        dict(layer="geomean fx speedup, dense (keep 1/1)", speedup=common.geomean(dense)),
        dict(layer="geomean fx speedup, all rows", speedup=common.geomean(every),
             fused_speedup=common.geomean(r.get("fused_speedup") for r in rows),
             ma_speedup=common.geomean(r.get("ma_speedup") for r in rows)),
        dict(layer="min fx speedup", speedup=min(every) if every else None),
    ]
    meta = dict(common.environment(), script="benchmarks/conv_layers.py", quick=args.quick,
                dtype="float16" if device == "cuda" else "float32", timing="cuda-graph replay median, 20 calls"
                if device == "cuda" else "cpu wall-clock median", wall_s=round(time.time() - started, 1),
                summary=summary)
    if args.json:
        common.write_json(args.json, rows, meta)
    if args.plot:
        common.maybe_plot(args.plot, rows, "layer", ["cudnn_cl_us", "inductor_us", "fxsparse_us"],
                          title="conv layers", ylabel="us per call", log_y=True)
    print(f"\n{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['timing']} | "
          f"{meta['wall_s']} s")
    common.print_table(rows + summary, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
