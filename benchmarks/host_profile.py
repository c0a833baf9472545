"""Where a plain call's time goes: host vs device, fxsparse (CUDA graphs) vs Inductor
freezing + reduce-overhead, on the same masked model.

    PYTHONPATH=. python benchmarks/host_profile.py --model resnet50 --keep 0.5 --batch 1

Per variant: the plain call timed on the host (perf_counter over many calls, then one
synchronize: the host-side cost when the GPU keeps up), the same with do_bench (device
events), the CUDA-graph replay (kernel time) where the variant does not run under CUDA graphs
itself, and for the CUDA-graph variants the profiler's CPU-side ops of 5 calls sorted by self
time. fxsparse's call is also split into its layers (GuardedGraph, value guard, compiled graph).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="resnet50")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--top", type=int, default=18)
    args = p.parse_args()
    common.raise_dynamo_recompile_limit()
    torch.backends.cudnn.benchmark = True
    model, shape = models.build(args.model)
    masked, _, how = models.masked_models(args.model, args.keep, torch.randn(1, *shape), "groups")
    masked = masked.cuda().half().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, *shape, device="cuda", dtype=torch.half).to(memory_format=torch.channels_last)
    # (name, compile, CUDA graphs inside): a variant that runs under CUDA graphs itself cannot be
    # captured again, so its kernel time is read off its twin compiled without them.
    variants = [
        ("fxsparse", lambda m: torch.compile(m, backend="fxsparse", options={"cudagraphs": False}), False),
        ("fxsparse default (CUDA graphs)", lambda m: torch.compile(m, backend="fxsparse"), True),
        ("Inductor freezing", lambda m: models.compile_inductor(m, freezing=True), False),
        ("Inductor freezing+reduce-overhead", lambda m: models.compile_inductor(m, freezing=True, cudagraphs=True),
         True),
    ]
    rows, tables = [], []
    with torch.no_grad():
        for name, make, graphed in variants:
            torch._dynamo.reset()
            compiled = make(copy.deepcopy(masked))
            call = lambda: compiled(x)  # noqa: E731
            for _ in range(3):
                call()
            row = {"variant": name, "host_us": common.time_host_us(call), "plain_ms": common.time_plain(call)}
            if not graphed:
                row["graph_ms"] = common.time_cuda_graph(call)
            else:
                tables.append(f"--- {name}: CPU-side ops of 5 calls\n{cpu_ops(call, args.top)}")
            rows.append(row)
            if graphed and name.startswith("fxsparse"):
                # the layers of one call: dynamo + guard + wrapper + Inductor's cudagraph tree
                graph, graph_args = captured_graph_call(compiled, x)
                for label, part in (("  GuardedGraph call", lambda: graph(*graph_args)),
                                    ("  value guard", lambda: graph.guard.holds(graph_args)),
                                    ("  compiled graph (Inductor + CUDA graphs)", lambda: graph.fn(*graph_args))):
                    rows.append({"variant": label, "host_us": common.time_host_us(part)})
    for t in tables:
        print(t)
    env = common.environment()
    print(f"{args.model} keep {args.keep} B={args.batch} ({how}) | {env['device']} | torch {env['torch']} | "
          f"triton {env['triton']}")
    common.print_table(rows, [("variant", "variant"), ("host_us", "host us/call"), ("plain_ms", "plain ms"),
                              ("graph_ms", "graph ms")])


if __name__ == "__main__":
    main()
