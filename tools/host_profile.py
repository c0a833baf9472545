"""Where a plain call's time goes: host vs device, fxsparse (CUDA graphs) vs Inductor
freezing + reduce-overhead, on the same masked model (on a machine without a GPU: the host
cost per call alone, fp32, without the CUDA-graph variants).

    PYTHONPATH=. python tools/host_profile.py --model resnet50 --keep 0.5 --batch 1

Per variant: the plain call timed on the host (perf_counter over many calls, then one
synchronize: the host-side cost when the GPU keeps up), the same with do_bench (device
events), the CUDA-graph replay (kernel time) where the variant does not run under CUDA graphs
itself, and for the CUDA-graph variants the profiler's CPU-side ops of 5 calls sorted by self
time. fxsparse's call is also split into its layers (GuardedGraph, value guard, compiled graph).

Host-bound timings drift between processes and over a run (clocks, allocator, GC), so the
variants are compared in `--rounds` interleaved rounds (every variant once per round, all
compiled and alive together) and the table shows each column's median over rounds with its
spread. The GPU kernels of one call of each CUDA-graph variant are listed by name and count.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # common.py and models.py live there
sys.path.insert(0, ROOT)

import common  # noqa: E402
import models  # noqa: E402

import fxsparse  # noqa: E402,F401  (registers the backend when not installed)


def cpu_ops(fn, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=70)


def python_profile(fn, calls: int, top: int) -> str:
    """cProfile over `calls` plain calls, top functions by own time: which Python layer of the
    call (dynamo's wrappers, Inductor's CUDA-graph tree, ours) costs what. cProfile inflates
    every Python call, so read it for shares, not absolute times."""
    import cProfile
    import io
    import pstats

    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    return text[text.find("   ncalls"):] if "   ncalls" in text else text


def captured_graph_call(compiled, x):
    """The GuardedGraph fxsparse returned for the model's one graph and the arguments dynamo
    hands it, caught on one call."""
    from fxsparse.runtime.guards import GuardedGraph

    seen = []
    real = GuardedGraph.__call__

    def spy(self, *args):
        seen.append((self, args))
        return real(self, *args)

    GuardedGraph.__call__ = spy
    try:
        compiled(x)
    finally:
        GuardedGraph.__call__ = real
    return seen[-1]


def captured_inductor_call(compiled, x):
    """Inductor's compiled graph (CompiledFxGraph, CUDA-graph tree included) of the model's
    graph, caught on one call, as a callable of no arguments: what a call costs below dynamo."""
    from torch._inductor.output_code import CompiledFxGraph

    seen = []
    real = CompiledFxGraph.__call__

    def spy(self, inputs):
        seen.append((self, list(inputs)))
        return real(self, inputs)

    CompiledFxGraph.__call__ = spy
    try:
        compiled(x)
    finally:
        CompiledFxGraph.__call__ = real
    graph, inputs = seen[-1]
    return lambda: graph(list(inputs))  # boxed: the callee clears the list it is given


def kernel_counts(fn) -> str:
    """The GPU kernels of one call, by name and count (what a CUDA graph replays)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names, us = Counter(), Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            names[e.name[:90]] += 1
            us[e.name[:90]] += e.time_range.elapsed_us()
    lines = [f"{n:4d}  {us[name]:9.1f} us  {name}" for name, n in sorted(names.items(), key=lambda kv: -us[kv[0]])]
    return f"{sum(names.values())} kernels, {sum(us.values()):.1f} us\n" + "\n".join(lines)


def spread(samples: list) -> str:
    import statistics

    return f"{statistics.median(samples):.4g} [{min(samples):.4g}-{max(samples):.4g}]"


def variants(on_gpu: bool) -> list:
    """(name, compile, runs under CUDA graphs itself). A variant under CUDA graphs cannot be
    captured again, so its kernel time is read off its twin compiled without them. "+ freezing":
    `torch._inductor.config.freezing` on while the model is traced, under which dynamo hands
    the backend parameters and buffers as graph attributes instead of ~300 inputs to gather on
    every call (fxsparse's guard then watches them as attributes)."""
    out = [("fxsparse", lambda m: torch.compile(m, backend="fxsparse", options={"cudagraphs": False}), False)]
    if on_gpu:
        out.append(("fxsparse default (CUDA graphs)", lambda m: torch.compile(m, backend="fxsparse"), True))
    out.append(("fxsparse default + freezing", lambda m: models.with_freezing(torch.compile(m, backend="fxsparse")),
                on_gpu))
    out.append(("Inductor freezing", lambda m: models.compile_inductor(m, freezing=True, reset=False), False))
    if on_gpu:
        out.append(("Inductor freezing+reduce-overhead",
                    lambda m: models.compile_inductor(m, freezing=True, cudagraphs=True, reset=False), True))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--top", type=int, default=18)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--masks", default="groups", choices=("groups", "ln"))
    p.add_argument("--image-size", type=int, help="input size (default: the model's own; small: host cost alone)")
    p.add_argument("--cprofile", type=int, default=0, metavar="CALLS",
                   help="also profile the Python side of CALLS plain calls of each CUDA-graph variant")
    args = p.parse_args()
    if args.image_size:
        models.IMAGE_SIZE[args.model if args.model in models.IMAGE_SIZE else "torchvision"] = args.image_size
    common.raise_dynamo_recompile_limit()
    on_gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.half) if on_gpu else ("cpu", torch.float32)
    torch.backends.cudnn.benchmark = True
    masked, x, how = models.masked_problem(args.model, args.keep, args.batch, args.masks, device, dtype)
    calls, rows, tables = {}, [], []
    with torch.no_grad():
        ref = masked(x)
        # No dynamo reset between variants: it would make every variant compiled before it
        # recompile on its next call, and the rounds below call them all again.
        torch._dynamo.reset()
        for name, make, graphed in variants(on_gpu):
            compiled = make(copy.deepcopy(masked))
            call = calls[name] = (lambda c=compiled: c(x))
            for _ in range(3):
                call()
            row = {"variant": name, "err": common.max_abs_err(call(), ref)}
            if on_gpu and not graphed:
                row["graph_ms"] = common.time_cuda_graph(call)
            elif graphed:
                tables.append(f"--- {name}: CPU-side ops of 5 calls\n{cpu_ops(call, args.top)}")
                tables.append(f"--- {name}: GPU kernels of one call\n{kernel_counts(call)}")
                if args.cprofile:
                    tables.append(f"--- {name}: Python functions over {args.cprofile} calls (cProfile, own time)\n"
                                  f"{python_profile(call, args.cprofile, args.top)}")
            rows.append(row)
            if name.startswith("fxsparse") and not name.endswith("freezing"):
                # what the backend did: graphs (a graph break makes several), per conv lowering
                tables.append(f"--- {name}: fxsparse report\n{fxsparse.report.current_report(None)}")
            if name.startswith("fxsparse") and graphed == on_gpu and not name.endswith("freezing"):
                # the layers of one call: dynamo + guard + wrapper + Inductor's graph
                graph, graph_args = captured_graph_call(compiled, x)
                for label, part in (("  GuardedGraph call", lambda: graph(*graph_args)),
                                    ("  value guard", lambda: graph.guard.holds(graph_args)),
                                    ("  compiled graph (Inductor)", lambda: graph.fn(*graph_args)),
                                    ("  CompiledFxGraph", captured_inductor_call(compiled, x))):
                    calls[label] = part
            if name.startswith("Inductor") and graphed:
                calls[f"  CompiledFxGraph ({name})"] = captured_inductor_call(compiled, x)
        samples = {name: {"host_us": [], "plain_ms": []} for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                samples[name]["host_us"].append(common.time_host_us(call))
                if on_gpu and not name.startswith("  "):
                    samples[name]["plain_ms"].append(common.time_plain(call))
    by_name = {r["variant"]: r for r in rows}
    table = []
    for name in calls:
        row = by_name.get(name, {"variant": name})
        row["host_us"] = spread(samples[name]["host_us"])
        if samples[name]["plain_ms"]:
            row["plain_ms"] = spread(samples[name]["plain_ms"])
        table.append(row)
    for t in tables:
        print(t)
    print(common.model_run_title(args.model, args.keep, args.batch, how,
                                 f"median [min-max] of {args.rounds} interleaved rounds"))
    common.print_table(table, [("variant", "variant"), ("host_us", "host us/call"), ("plain_ms", "plain ms"),
                               ("graph_ms", "graph ms"), ("err", "err")])


if __name__ == "__main__":
    main()
