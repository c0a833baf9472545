"""Dynamic shapes: one dynamic=True compile of a masked model against a static compile per size.

    PYTHONPATH=. python benchmarks/dynamic_shapes.py --quick        # small ResNet, CPU (CI)
    PYTHONPATH=. python benchmarks/dynamic_shapes.py --models resnet50 --batch 1,32 --size 224,160   # CUDA fp16

Masks: `prune.ln_structured` per conv (every conv but the stem), so pruned channels reach the
next, zero-padding conv as constants. With a static size these fold into a constant bias map;
under dynamic=True the graph computes the map on every call from the call's size. Both compiles
read the same input channels ("kept in": summed over the rewritten convs of each compile's
graphs) and count the same MACs (at the first call's size for the dynamic one). ms = plain
call (CUDA: `triton.testing.do_bench`, fp16 channels_last, CUDA graphs off for both; CPU:
wall-clock); err = max |out - eager| / max(1, max |eager|).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import models  # noqa: E402

import fxsparse  # noqa: E402

COLUMNS = [("model", "model"), ("batch", "B"), ("size", "HxW"), ("static_ms", "static ms"),
           ("dynamic_ms", "dynamic ms"), ("ratio", "dynamic / static"), ("static_gmacs", "static GMACs"),
           ("dynamic_gmacs", "dynamic GMACs"), ("static_in", "static kept in"), ("dynamic_in", "dynamic kept in"),
           ("err", "dynamic err")]


def compile_fxsparse(model, dynamic: bool):
    """(compiled, graphs' reports so far): a fresh compile (dynamo reset) with CUDA graphs off."""
    torch._dynamo.reset()
    report = fxsparse.report.current_report(None)
    before = len(report.graphs)
    compiled = torch.compile(model, backend="fxsparse", options={"cudagraphs": False}, dynamic=dynamic)
    return compiled, lambda: report.graphs[before:]


def summary(graphs) -> tuple:
    """(GMACs after compaction of the first graph, kept input channels over every graph's rewritten convs)."""
    rewritten = [c for g in graphs for c in g.convs if c.lowering != "unchanged"]
    macs = sum(c.macs_after for c in graphs[0].convs) / 1e9 if graphs else None
    return macs, sum(c.kept_in_channels for c in rewritten)


def time_call(fn, x, cuda: bool) -> float:
    return common.time_plain(lambda: fn(x)) if cuda else common.time_cpu(lambda: fn(x), repeat=5)


def rows_for(name: str, keep: float, batches: list, sizes: list, cuda: bool) -> list:
    _, shape = models.build(name)
    masked, _, _ = models.masked_models(name, keep, torch.randn(1, *shape), masks="ln")
    device, dtype = ("cuda", torch.half) if cuda else ("cpu", torch.float32)
    masked = masked.to(device, dtype)
    if cuda:
        masked = masked.to(memory_format=torch.channels_last)
    examples = {}
    for b in batches:
        for s in sizes:
            x = torch.randn(b, shape[0], s, s, device=device, dtype=dtype)
            examples[(b, s)] = x.to(memory_format=torch.channels_last) if cuda else x
    rows = []
    with torch.no_grad():
        dynamic, graphs = compile_fxsparse(masked, dynamic=True)
        for (b, s), x in examples.items():  # one compile serves every size (batch 1: a graph of its own)
            want, got = masked(x), dynamic(x)
            err = float((got.float() - want.float()).abs().max() / max(1.0, float(want.abs().max())))
            rows.append({"model": name, "batch": b, "size": f"{s}x{s}", "err": err,
                         "dynamic_ms": time_call(dynamic, x, cuda)})
        macs, kept_in = summary(graphs()[:1])  # (MACs at the first call's size)
        rows[0]["dynamic_gmacs"] = macs
        for row, x in zip(rows, examples.values()):
            row["dynamic_in"] = kept_in
            static, static_graphs = compile_fxsparse(masked, dynamic=False)
            static(x)
            row["static_gmacs"], row["static_in"] = summary(static_graphs())
            row["static_ms"] = time_call(static, x, cuda)
            row["ratio"] = common.ratio(row["dynamic_ms"], row["static_ms"])
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small_resnet")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--batch", default="2,8")
    ap.add_argument("--size", default="32,24")
    ap.add_argument("--quick", action="store_true", help="small ResNet, batch 2, sizes 32 and 24, CPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    common.raise_dynamo_recompile_limit()
    cuda = torch.cuda.is_available() and not args.quick
    names = ["small_resnet"] if args.quick else args.models.split(",")
    batches = [2] if args.quick else [int(b) for b in args.batch.split(",")]
    sizes = [32, 24] if args.quick else [int(s) for s in args.size.split(",")]
    rows = [r for name in names for r in rows_for(name, args.keep, batches, sizes, cuda)]
    if args.json:
        common.write_json(args.json, rows)
    for r in rows:
        assert r["err"] < (2e-2 if cuda else 1e-4), r
        assert r["dynamic_in"] == r["static_in"], r  # the constants folded as in the static compile
    common.print_table(rows, COLUMNS, title=f"dynamic=True vs static compiles, keep {args.keep}, "
                                            f"{'CUDA fp16' if cuda else 'CPU fp32'}")


if __name__ == "__main__":
    main()
