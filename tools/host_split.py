"""Where a plain call's host time goes, split at the backend boundary, measured in place.

Each variant's backend is wrapped so that the callable it returns records the time spent
inside it during ordinary calls of the compiled model. Per call, that gives:
- "inside": the backend's compiled graph (for fxsparse: value guard, wrappers, Inductor's
  CUDA-graph tree; for Inductor: its CUDA-graph tree), and for fxsparse the part of it spent
  in the Inductor graph it wraps ("of which Inductor") and in the value guard;
- "dynamo side": the rest of the call (dynamo's guards, gathering the graph's inputs, writing
  back graph outputs such as pruned modules' `weight`).
No profiler runs, so nothing inflates Python calls; the variants alternate in rounds.

"of which gc": time the cyclic garbage collector ran during the timed calls (gc.callbacks).

A plain call's latency (what `do_bench` reports) is the host time *before* the CUDA-graph
launch plus the GPU time; host time after the launch overlaps the kernels. So the split is
also taken at the launch: "before launch" runs from the call to the entry of
`CUDAGraph.replay`, "after launch" from there to the call's return.

    PYTHONPATH=. python tools/host_split.py --model mobilenet_v2 --batch 1
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # common.py and models.py live there
sys.path.insert(0, ROOT)

import common  # noqa: E402
import models  # noqa: E402


class Clock:
    """Seconds spent inside the callables it wraps."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def run(*args):
            t = time.perf_counter()
            out = fn(*args)
            self.seconds += time.perf_counter() - t
            return out

        return run


class GcClock:
    """Seconds the cyclic garbage collector runs while active (gc.callbacks): a process holding
    many objects (Triton kernels compiled by a tuner, say) pays for each of them in every full
    collection."""

    def __init__(self):
        self.seconds, self._start = 0.0, None

    def _callback(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)


class LaunchClock:
    """Host clock at each CUDA-graph replay (cudagraph trees call `CUDAGraph.replay`)."""

    def __init__(self):
        self.marks = []
        self._real = torch.cuda.CUDAGraph.replay

    def __enter__(self):
        real, marks = self._real, self.marks

        def replay(graph):
            marks.append(time.perf_counter())
            return real(graph)

        torch.cuda.CUDAGraph.replay = replay
        return self

    def __exit__(self, *exc):
        torch.cuda.CUDAGraph.replay = self._real


def launch_split(compiled, x, calls: int) -> tuple:
    """Median host us (before the graph launch, after it) per call, and launches per call."""
    before, after = [], []
    with LaunchClock() as clock:
        for _ in range(calls):
            clock.marks.clear()
            t0 = time.perf_counter()
            compiled(x)
            t1 = time.perf_counter()
            if clock.marks:
                before.append(clock.marks[-1] - t0)
                after.append(t1 - clock.marks[-1])
    if not before:
        return None, None, 0
    return statistics.median(before) * 1e6, statistics.median(after) * 1e6, len(clock.marks)


class Timed:
    """A backend whose compiled callables time themselves (`inside`); for fxsparse also the
    Inductor graph it wraps (`inductor`) and its value guard (`guard`)."""

    def __init__(self, backend):
        self.backend = backend
        self.inside, self.inductor, self.guard = Clock(), Clock(), Clock()

    def __call__(self, gm, example_inputs):
        import fxsparse.backend as fb

        real = fb._inductor

        def timed_inductor(*a, **k):
            fn, launches = real(*a, **k)
            return self.inductor.wrap(fn), launches

        fb._inductor = timed_inductor
        try:
            fn = self.backend(gm, example_inputs)
        finally:
            fb._inductor = real
        guard = getattr(fn, "guard", None)
        if guard is not None:
            guard.holds = self.guard.wrap(guard.holds)
        return self.inside.wrap(fn)

    def reset(self):
        for c in (self.inside, self.inductor, self.guard):
            c.seconds = 0.0


def inductor_cudagraphs(gm, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True})


def fxsparse_default(gm, example_inputs):
    from fxsparse.backend import fxsparse_backend

    return fxsparse_backend(gm, example_inputs)


def variants():
    """(name, backend, trace with freezing)."""
    return [("Inductor + CUDA graphs", inductor_cudagraphs, False),
            ("Inductor freezing + CUDA graphs", inductor_cudagraphs, True),
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
    masked, x, how = models.masked_problem(args.model, args.keep, args.batch)
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
            runs[name] = (compiled, timed, err, {k: [] for k in ("total", "inside", "inductor", "guard", "gc")})
        for _ in range(args.rounds):
            for name, (compiled, timed, _, samples) in runs.items():
                torch.cuda.synchronize()
                timed.reset()
                with GcClock() as collector:
                    t = time.perf_counter()
                    for _ in range(args.calls):
                        compiled(x)
                    total = time.perf_counter() - t
                samples["gc"].append(collector.seconds / args.calls * 1e6)
                torch.cuda.synchronize()
                samples["total"].append(total / args.calls * 1e6)
                for k in ("inside", "inductor", "guard"):
                    samples[k].append(getattr(timed, k).seconds / args.calls * 1e6)
        for name, (compiled, _, _, samples) in runs.items():
            samples["before"], samples["after"], samples["launches"] = launch_split(compiled, x, args.calls)
            samples["plain"] = common.time_plain(lambda c=compiled: c(x)) * 1e3
    rows = []
    for name, (_, _, err, s) in runs.items():
        extra = {k: s.pop(k) for k in ("before", "after", "launches", "plain")}
        m = {k: statistics.median(v) for k, v in s.items()}
        fx = name.startswith("fxsparse")
        rows.append(dict(variant=name, total=m["total"], inside=m["inside"], dynamo=m["total"] - m["inside"],
                         inductor=m["inductor"] if fx else None, guard=m["guard"] if fx else None,
                         wrappers=m["inside"] - m["inductor"] - m["guard"] if fx else None,
                         gc=m["gc"], err=err, **extra))
    print(common.model_run_title(args.model, args.keep, args.batch, how,
                                 f"host us per call, median of {args.rounds} rounds of {args.calls} calls")
          + f" | FXSPARSE_TUNE={os.environ.get('FXSPARSE_TUNE', 'cache')} | {len(gc.get_objects())} objects "
          f"tracked by gc, a full collection {_full_collection_ms():.1f} ms")
    common.print_table(rows, [("variant", "variant"), ("total", "host us/call"), ("inside", "inside backend us"),
                              ("inductor", "of which Inductor us"), ("guard", "of which guard us"),
                              ("wrappers", "of which wrappers us"), ("dynamo", "dynamo side us"),
                              ("before", "before launch us"), ("after", "after launch us"),
                              ("launches", "graph launches/call"), ("plain", "do_bench plain us"),
                              ("gc", "of which gc us"), ("err", "err")])


def _full_collection_ms() -> float:
    t = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - t) * 1e3


if __name__ == "__main__":
    main()
