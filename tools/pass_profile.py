"""Where fxsparse's own compile time goes, stage by stage, on one masked model's dynamo graph.

    PYTHONPATH=. python tools/pass_profile.py --model resnet50 --image-size 64 --batch 2 --repeat 3
    PYTHONPATH=. python tools/pass_profile.py --model resnet50 --image-size 64 --cprofile 40

Dynamo traces the model once (a backend that keeps the graph and its inputs); then fxsparse's
rewrite (capture -> sparsity -> compaction -> lowering -> report) runs on that graph `--repeat`
times in the same process, each stage timed (benchmarks/compile_time.py's stage clock), and the
table gives each stage's median, and the median process CPU time of the whole pass (steadier
than the clock where other jobs share the cores). Inductor is left out: its compile of the rewritten graph is the
same work plain Inductor does on the dynamo graph, and benchmarks/compile_time.py times both.
`--cprofile N` adds one more rewrite under cProfile, its top N functions by cumulative and by own
time (cProfile inflates Python calls: read it for shares). fp32 on the CPU, fp16 channels_last on
CUDA.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # common.py, models.py, compile_time.py
sys.path.insert(0, ROOT)

import common  # noqa: E402
import compile_time  # noqa: E402
import models  # noqa: E402

from fxsparse import backend as B  # noqa: E402
from fxsparse.options import Options  # noqa: E402

STAGES = ("capture", "sparsity", "compaction", "lowering", "report")


def dynamo_graph(model: torch.nn.Module, x: torch.Tensor) -> tuple:
    """(graph module, example inputs) of the one graph dynamo hands a backend for `model(x)`."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=keep)(x)
    if len(graphs) != 1:
        raise SystemExit(f"dynamo made {len(graphs)} graphs of the model, this tool profiles one")
    return graphs[0]


def timed_rewrite(gm, example_inputs, opts: Options) -> dict:
    """{stage: seconds} of one rewrite of `gm` (grad off, as the inference compile runs), and
    its process CPU time (`cpu`: steadier than the clock on a shared machine)."""
    cpu = time.process_time()
    with compile_time.stage_clock() as seconds, torch.no_grad():
        B.rewrite(gm, example_inputs, opts, 0)
    cpu = time.process_time() - cpu
    return {**{s: seconds[s] for s in STAGES}, "cpu": cpu}


def profile_table(gm, example_inputs, opts: Options, top: int) -> str:
    prof = cProfile.Profile()
    with torch.no_grad():
        prof.enable()
        B.rewrite(gm, example_inputs, opts, 0)
        prof.disable()
    out = io.StringIO()
    for key in ("cumulative", "tottime"):
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(top)
    return out.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--image-size", type=int, default=0, help="torchvision models' input size (default 224)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cprofile", type=int, default=0, metavar="N", help="also the top N functions of one rewrite")
    args = p.parse_args(argv)
    if args.image_size:
        models.IMAGE_SIZE["torchvision"] = args.image_size
    cuda = args.device == "cuda"
    model, x, how = models.masked_problem(args.model, args.keep, args.batch, device=args.device,
                                          dtype=torch.half if cuda else torch.float32)
    gm, example_inputs = dynamo_graph(model, x)
    opts = Options.parse(None)
    runs = [timed_rewrite(gm, example_inputs, opts) for _ in range(args.repeat)]
    if args.cprofile:
        print(profile_table(gm, example_inputs, opts, args.cprofile))
    row = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    row.update(model=args.model, batch=args.batch, nodes=len(gm.graph.nodes),
               total=statistics.median(sum(r[s] for s in STAGES) for r in runs))
    columns = [("model", "model"), ("batch", "B"), ("nodes", "graph nodes"),
               *[(s, f"{s} s") for s in STAGES], ("total", "pass s"), ("cpu", "pass CPU s")]
    env = common.environment()
    common.print_table([row], columns, floatfmt=".3f",
                       title=f"\nfxsparse's pass, median of {args.repeat} | {how} | keep {args.keep} | "
                             f"{env['device']} | torch {env['torch']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
