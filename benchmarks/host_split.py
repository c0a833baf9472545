"""Where a plain call's host time goes, split at the backend boundary, measured in place.

Each variant's backend is wrapped so that the callable it returns records the time spent
inside it during ordinary calls of the compiled model. Per call, that gives:
- "inside": the backend's compiled graph (for fxsparse: value guard, wrappers, Inductor's
  CUDA-graph tree; for Inductor: its CUDA-graph tree);
- "dynamo side": the rest of the call (dynamo's guards, gathering the graph's inputs, writing
  back graph outputs such as pruned modules' `weight`).
No profiler runs, so nothing inflates Python calls; the variants alternate in rounds.

    PYTHONPATH=. python benchmarks/host_split.py --model mobilenet_v2 --batch 1
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import models  # noqa: E402


class Timed:
    """A backend whose compiled callables add their own run time to `inside`."""

    def __init__(self, backend):
        self.backend, self.inside = backend, 0.0

    def __call__(self, gm, example_inputs):
        fn = self.backend(gm, example_inputs)

        def run(*args):
            t = time.perf_counter()
            out = fn(*args)
            self.inside += time.perf_counter() - t
            return out

        return run


def inductor_cudagraphs(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True})


def fxsparse_default(gm, example_inputs):
    from fxsparse.backend import fxsparse_backend

    return fxsparse_backend(gm, example_inputs)


def variants():
    """(name, backend, trace with freezing)."""
    return [("Inductor freezing + CUDA graphs", inductor_cudagraphs, True),
            ("fxsparse default", fxsparse_default, False),
            ("fxsparse default + freezing", fxsparse_default, True)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    common.raise_dynamo_recompile_limit()
    torch.backends.cudnn.benchmark = True
    model, shape = models.build(args.model)
    masked, _, how = models.masked_models(args.model, args.keep, torch.randn(1, *shape), "groups")
    masked = masked.to("cuda", torch.half).to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, *shape, device="cuda", dtype=torch.half).to(memory_format=torch.channels_last)
    runs = {}
    with torch.no_grad():
        ref = masked(x)
        torch._dynamo.reset()
        for name, backend, freezing in variants():
            timed = Timed(backend)
            compiled = torch.compile(copy.deepcopy(masked), backend=timed)
            patch, _ = common.inductor_config_patch(freezing=freezing)
            with patch:
                out = compiled(x)  # traced (with freezing where asked) and compiled here
            err = common.max_abs_err(out, ref)
            for _ in range(20):
                compiled(x)
            runs[name] = (compiled, timed, err, {"total": [], "inside": []})
        for _ in range(args.rounds):
            for name, (compiled, timed, _, samples) in runs.items():
                torch.cuda.synchronize()
                timed.inside = 0.0
                t = time.perf_counter()
                for _ in range(args.calls):
                    compiled(x)
                total = time.perf_counter() - t
                torch.cuda.synchronize()
                samples["total"].append(total / args.calls * 1e6)
                samples["inside"].append(timed.inside / args.calls * 1e6)
    rows = []
    for name, (_, _, err, s) in runs.items():
        total, inside = statistics.median(s["total"]), statistics.median(s["inside"])
        rows.append(dict(variant=name, total=total, inside=inside, dynamo=total - inside, err=err))
    print(common.model_run_title(args.model, args.keep, args.batch, how,
                                 f"host us per call, median of {args.rounds} rounds of {args.calls} calls"))
    common.print_table(rows, [("variant", "variant"), ("total", "host us/call"), ("inside", "inside backend us"),
                              ("dynamo", "dynamo side us"), ("err", "err")])


if __name__ == "__main__":
    main()
