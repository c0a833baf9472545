"""Compile time: the first call of torch.compile(backend="fxsparse") against Inductor's default on
the same masked model, cold and warm, and where fxsparse's warm first call goes.

    PYTHONPATH=. python benchmarks/compile_time.py [--models resnet50,resnet18,mobilenet_v2] [--keep 0.5]
        [--batch 64] [--no-table] [--workers 8] [--repeat 3] [--image-size 224]

Each measurement runs in a fresh process (Python, torch and the model already loaded when the clock
starts, and Inductor's compile_fx imported: torch.compile(backend="inductor") imports it before the
first call, fxsparse's backend on its first graph; the clock covers the first call: tracing,
compiling, tuning, running). Cold: empty TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR and
FXSPARSE_CACHE_DIR (fxsparse still reads the table of tuned launches shipped with it; --no-table
adds a column without it; --workers N one with settings.compile_workers = N: each shape's
candidates compiled on N threads before timing, and the launches the cache holds compiled on
background threads during the graph's compile, cold and warm). Warm: a second process on the caches
the cold one filled (--repeat N: N such processes, the median; both cold processes run first, then
the warm ones alternate between the backends). fxsparse's columns also say where
its first call went: seconds in the selector's timing of launches (`tune s`, shapes timed / read
from the shipped table), of the lowering's triton-vs-aten choices (`pick s`) and of the value guard
(`guard s`: a fresh machine builds its C++ check in the cold process).

Then, per model, where the warm first call goes, for both backends: dynamo's side (its trace before
the backend is called, then guards and code after it returns),
the compile (Inductor's compile_fx; fxsparse's whole backend, its compile_fx included), the first
run of the compiled graph (kernels loaded, CUDA-graph trees warmed up), the garbage collector's
share of all that, and fxsparse's backend by stage (capture, sparsity, compaction, lowering,
report: the names of fxsparse/stages.py; then the value guard, Inductor, the rest). The main
table is printed last.
"""
from __future__ import annotations

import argparse
import cProfile
import contextlib
import functools
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# fxsparse's stages (the names of fxsparse/stages.py), then what the backend adds around them:
# the value guard, Inductor's compile of the rewritten graph, and whatever else the backend did.
STAGES = ("capture", "sparsity", "compaction", "lowering", "report", "guard", "inductor", "other")
# fxsparse.backend's names for each stage's entry point (report: the rewrite's own bookkeeping
# after lowering, plus recording and dumps).
_STAGE_FUNCTIONS = {"capture": ("capture",), "sparsity": ("read_all",),
                    "compaction": ("propagate",), "lowering": ("lower", "lower_training"),
                    "report": ("_record", "write_dumps"), "guard": ("ValueGuard",), "inductor": ("_inductor",)}


def _clocked(fn, seconds: dict, key: str, first_run: bool = False):
    """`fn`, adding the seconds of its outermost calls to seconds[key] (compile_fx calls itself);
    with `first_run`, what it returns (a compiled graph) adds its first call to seconds["first_run"]."""
    depth = [0]

    @functools.wraps(fn)
    def run(*a, **k):
        t0 = time.perf_counter()
        seconds.setdefault(key + "_entered", t0)
        depth[0] += 1
        try:
            out = fn(*a, **k)
        finally:
            depth[0] -= 1
            if not depth[0]:
                seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
        return _first_call_clocked(out, seconds) if first_run and not depth[0] else out
    return run


def _first_call_clocked(compiled, seconds: dict):
    """`compiled`, adding the seconds of its first call to seconds["first_run"]: the compiled graph's
    first run (kernels loaded, CUDA-graph trees warmed up, the GPU's work finished) inside the first
    call of the model."""
    import torch

    state = {"first": True}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    @functools.wraps(compiled)
    def run(*a, **k):
        if not state["first"]:
            return compiled(*a, **k)
        state["first"] = False
        t0 = time.perf_counter()
        try:
            out = compiled(*a, **k)
            sync()
            return out
        finally:
            seconds["first_run"] = seconds.get("first_run", 0.0) + time.perf_counter() - t0
    return run


@contextlib.contextmanager
def _patched(module, clocks: dict):
    """Module attributes replaced by `clocks` {name: replacement} inside the block."""
    saved = {name: getattr(module, name) for name in clocks}
    for name, fn in clocks.items():
        setattr(module, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


@contextlib.contextmanager
def stage_clock():
    """{stage: seconds} of fxsparse's compile, filled while the block runs: each stage's entry
    point in fxsparse.backend wrapped with a clock. `backend` is the whole of compile_graph and
    `first_run` the first call of the graph it compiled; `report` also takes what rewrite()
    spends beyond its four stages; `other` is the rest of the backend (dropping unused inputs,
    wrappers)."""
    import fxsparse.backend as B

    seconds = dict.fromkeys(STAGES + ("backend", "rewrite"), 0.0)
    clocks = {name: _clocked(getattr(B, name), seconds, stage)
              for stage, names in _STAGE_FUNCTIONS.items() for name in names}
    clocks["rewrite"] = _clocked(B.rewrite, seconds, "rewrite")
    clocks["compile_graph"] = _clocked(B.compile_graph, seconds, "backend", first_run=True)
    with _patched(B, clocks):
        yield seconds
    inner = sum(seconds[s] for s in ("capture", "sparsity", "compaction", "lowering"))
    seconds["report"] += seconds.pop("rewrite") - inner
    seconds["other"] = seconds["backend"] - sum(seconds[s] for s in STAGES if s != "other")


@contextlib.contextmanager
def compile_fx_clock(seconds: dict, first_run: bool = False):
    """Adds the seconds Inductor's compile_fx takes (for either backend) to seconds["compile_fx"]
    and, with `first_run` (Inductor alone), the first call of what it compiled to seconds["first_run"]."""
    import torch._inductor.compile_fx as C

    with _patched(C, {"compile_fx": _clocked(C.compile_fx, seconds, "compile_fx", first_run)}):
        yield


@contextlib.contextmanager
def gc_clock(seconds: dict):
    """Adds the seconds Python's cyclic garbage collector runs inside the block to seconds["gc"]
    (full collections, the costly ones, counted in seconds["gc_full"]): a process holding more
    objects pays more for each, wherever in the first call one happens to fall."""
    import gc

    started = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
            return
        seconds["gc"] = seconds.get("gc", 0.0) + time.perf_counter() - started[0]
        seconds["gc_full"] = seconds.get("gc_full", 0) + (info["generation"] == 2)

    gc.callbacks.append(on_gc)
    try:
        yield
    finally:
        gc.callbacks.remove(on_gc)


def child(args) -> None:
    """One first call, timed; prints one JSON line."""
    import torch
    # torch.compile(backend="inductor") imports Inductor's compile_fx when it is called (0.7 s on
    # a CPU), before the clock; fxsparse's backend imports it on its first graph: imported here,
    # neither first call counts it
    import torch._inductor.compile_fx  # noqa: F401

    import models
    from models import masked_problem

    cuda = args.device == "cuda"
    if args.image_size:
        models.IMAGE_SIZE["torchvision"] = args.image_size
    masked, x, _ = masked_problem(args.model, args.keep, args.batch, device=args.device,
                                  dtype=torch.half if cuda else torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    stats = dict(tune_s=0.0, pick_s=0.0, timed=0, shipped=0, cached=0)
    if args.backend == "fxsparse":
        from fxsparse.kernels import select as S

        tune, pick, launch = S.Selector.tune, S.Selector.pick, S.Selector.launch

        def timed_tune(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return tune(self, *a, **k)
            finally:
                stats["tune_s"] += time.perf_counter() - t0
                stats["timed"] += 1

        def timed_pick(self, *a, **k):
            t0 = time.perf_counter()
            try:
                return pick(self, *a, **k)
            finally:
                stats["pick_s"] += time.perf_counter() - t0

        def counted_launch(self, *a, **k):
            known = len(self.table)
            problem, sel = launch(self, *a, **k)
            if len(self.table) > known:
                stats["shipped" if sel.note == "from the shipped table" else "cached"] += \
                    sel.note.startswith("from the")
            return problem, sel

        S.Selector.tune, S.Selector.pick, S.Selector.launch = timed_tune, timed_pick, counted_launch
        compiled = torch.compile(masked, backend="fxsparse")
    else:
        compiled = torch.compile(masked)
    sync()
    with contextlib.ExitStack() as clocks:
        seconds = clocks.enter_context(stage_clock()) if args.backend == "fxsparse" else {}
        clocks.enter_context(compile_fx_clock(seconds, first_run=args.backend != "fxsparse"))
        clocks.enter_context(gc_clock(seconds))
        profiler = cProfile.Profile() if args.profile_dir else contextlib.nullcontext()
        t0 = time.perf_counter()
        with torch.no_grad(), profiler:
            compiled(x)
        sync()
        total = time.perf_counter() - t0
    # dynamo's side before the backend is called (its trace) and after it returns (guards, code)
    entered = seconds.pop("backend_entered" if args.backend == "fxsparse" else "compile_fx_entered", None)
    for key in [k for k in seconds if k.endswith("_entered")]:
        del seconds[key]
    if entered is not None:
        seconds["trace_before"] = entered - t0
    if args.profile_dir:
        write_profile(profiler, os.path.join(args.profile_dir, f"warm_{args.backend}_{args.model}.txt"))
    print(json.dumps(dict(stats, compile_s=total, stages=seconds)), flush=True)


def write_profile(profiler, path: str, top: int = 40) -> None:
    """The profiled first call's functions, by cumulative and by own time (cProfile's clock adds
    its own cost: read the shares, not the seconds)."""
    with open(path, "w") as f:
        for order in ("cumulative", "tottime"):
            pstats.Stats(profiler, stream=f).sort_stats(order).print_stats(top)
    profiler.dump_stats(os.path.splitext(path)[0] + ".prof")  # the whole profile, for pstats or snakeviz


def measure(backend: str, model: str, keep: float, batch: int, dirs: dict, table: bool, timeout: float,
            device: str = "cuda", workers: int = 0, image_size: int = 0, profile_dir: str = "") -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=dirs["triton"], TORCHINDUCTOR_CACHE_DIR=dirs["inductor"],
               FXSPARSE_CACHE_DIR=dirs["fxsparse"], FXSPARSE_SHIPPED_TABLE="1" if table else "0",
               FXSPARSE_COMPILE_WORKERS=str(workers),
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    env.pop("FXSPARSE_TUNE", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--backend", backend, "--model", model,
           "--keep", str(keep), "--batch", str(batch), "--device", device, "--image-size", str(image_size)]
    if profile_dir:
        os.makedirs(profile_dir, exist_ok=True)
        cmd += ["--profile-dir", os.path.abspath(profile_dir)]
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"over {timeout:.0f} s")
    lines = [l for l in run.stdout.splitlines() if l.startswith("{")]
    if run.returncode != 0 or not lines:
        return dict(error=(run.stderr.strip().splitlines() or ["no output"])[-1][:160])
    return json.loads(lines[-1])


def announced(result: dict, model: str, label: str, kind: str) -> dict:
    """`result`, after printing its first call's time (a run stopped midway keeps what it measured)."""
    print(f"   {model} {label} {kind}: " + (f"{result['compile_s']:.2f} s" if "compile_s" in result
                                           else result.get("error", "no result")), flush=True)
    return result


def median_run(results: list) -> dict:
    """The result whose first call is the median of `results` (the first error where one failed)."""
    errors = [r for r in results if "error" in r]
    if errors:
        return errors[0]
    return sorted(results, key=lambda r: r["compile_s"])[len(results) // 2]


# The rows of the stage table: the warm first call, its parts, then fxsparse's backend by stage.
PARTS = (("first call", "compile_s"), ("  dynamo's trace and guards", "trace"),
         ("    before the backend (trace)", "trace_before"), ("    after it (guards, code)", "trace_after"),
         ("  compile (Ind: compile_fx; fx: backend)", "compile"), ("  first run of the graph", "first_run"),
         ("  garbage collection, within those", "gc"), ("  full collections (count)", "gc_full"),
         ("  Inductor's compile_fx", "compile_fx"))


def stage_parts(result: dict, label: str) -> dict:
    """{part: seconds} of one backend's warm first call (keys of PARTS and, for fxsparse, STAGES)."""
    stages = dict(result.get("stages") or {})
    compile_s = stages.get("backend" if label == "fx" else "compile_fx")
    out = {**stages, "compile_s": result.get("compile_s"), "compile": compile_s}
    if None not in (compile_s, stages.get("first_run"), result.get("compile_s")):
        out["trace"] = result["compile_s"] - compile_s - stages["first_run"]
        if stages.get("trace_before") is not None:
            out["trace_after"] = out["trace"] - stages["trace_before"]
    return out


def stage_table(ind: dict, fx: dict) -> list:
    """Rows (part, Ind s, fx s, fx - Ind s) of the stage table."""
    rows = [dict(part=name, ind=ind.get(key), fx=fx.get(key)) for name, key in PARTS]
    rows += [dict(part=f"    fx {stage}", fx=fx.get(stage)) for stage in STAGES]
    for row in rows:
        if isinstance(row.get("ind"), (int, float)) and isinstance(row.get("fx"), (int, float)):
            row["diff"] = row["fx"] - row["ind"]
    return rows


def fresh_dirs() -> dict:
    return {name: tempfile.mkdtemp(prefix=f"compile-time-{name}-") for name in ("triton", "inductor", "fxsparse")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,resnet18,mobilenet_v2")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--no-table", action="store_true", help="also fxsparse cold without the shipped table")
    p.add_argument("--workers", type=int, default=0,
                   help="also fxsparse cold with this many compile threads (settings.compile_workers)")
    p.add_argument("--timeout", type=float, default=300, help="seconds a single measurement may take")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help="cuda; cpu only to check the script (small_resnet)")
    p.add_argument("--image-size", type=int, default=0, help="torchvision models' input size (default 224)")
    p.add_argument("--repeat", type=int, default=1,
                   help="warm processes per backend: the warm figures and the stage table are their medians")
    p.add_argument("--profile-dir", default="",
                   help="also profile one more warm first call per backend (cProfile: a text summary "
                        "and the .prof), written here")
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    import common

    rows, stage_rows = [], []
    for model in args.models.split(","):
        row = dict(model=model, keep=args.keep, batch=args.batch)
        parts = {}
        backends = (("inductor", "ind"), ("fxsparse", "fx"))
        runs = {label: functools.partial(measure, backend, model, args.keep, args.batch, fresh_dirs(), True,
                                         args.timeout, args.device, image_size=args.image_size)
                for backend, label in backends}
        colds = {label: announced(runs[label](), model, label, "cold") for _, label in backends}
        # warm processes alternate between the backends, so that neither runs in a machine state
        # (page cache, processes the cold runs left) the other does not
        warms = {label: [] for _, label in backends}
        for _ in range(max(1, args.repeat)):
            for _, label in backends:
                warms[label].append(announced(runs[label](), model, label, "warm"))
        for backend, label in backends:
            cold, warm = colds[label], median_run(warms[label])
            if args.profile_dir:  # one more warm process, under cProfile (not in the figures)
                runs[label](profile_dir=args.profile_dir)
            row[f"{label}_cold"], row[f"{label}_warm"] = cold.get("compile_s"), warm.get("compile_s")
            parts[label] = stage_parts(warm, label)
            if backend == "fxsparse":
                row.update(tune_s=cold.get("tune_s"), pick_s=cold.get("pick_s"), timed=cold.get("timed"),
                           shipped=cold.get("shipped"), warm_timed=warm.get("timed"),
                           cold_guard=(cold.get("stages") or {}).get("guard"))
            errors = [f"{label} {k}: {r['error']}" for k, r in (("cold", cold), ("warm", warm)) if "error" in r]
            if errors:
                row["note"] = "; ".join(filter(None, [row.get("note"), *errors]))
        if args.no_table:
            bare = measure("fxsparse", model, args.keep, args.batch, fresh_dirs(), False, args.timeout, args.device)
            row["fx_cold_bare"], row["bare_tune_s"], row["bare_timed"] = (bare.get("compile_s"), bare.get("tune_s"),
                                                                          bare.get("timed"))
        if args.workers:
            run = functools.partial(measure, "fxsparse", model, args.keep, args.batch, fresh_dirs(), not args.no_table,
                                    args.timeout, args.device, args.workers, image_size=args.image_size)
            par = run()
            row["fx_cold_par"], row["par_tune_s"] = par.get("compile_s"), par.get("tune_s")
            row["fx_warm_par"] = median_run([run() for _ in range(max(1, args.repeat))]).get("compile_s")
        row["cold_ratio"] = common.ratio(row.get("fx_cold"), row.get("ind_cold"))
        row["warm_ratio"] = common.ratio(row.get("fx_warm"), row.get("ind_warm"))
        print(row, flush=True)
        rows.append(row)
        stage_rows.append((model, stage_table(parts.get("ind", {}), parts.get("fx", {}))))
    env = common.environment()
    columns = [("model", "model"), ("keep", "keep"), ("batch", "B"), ("ind_cold", "Ind cold s"),
               ("fx_cold", "fx cold s"), ("cold_ratio", "cold fx/Ind"), ("ind_warm", "Ind warm s"),
               ("fx_warm", "fx warm s"), ("warm_ratio", "warm fx/Ind"), ("tune_s", "fx cold: tune s"),
               ("timed", "shapes timed"), ("shipped", "from table"), ("pick_s", "pick s"),
               ("warm_timed", "warm: timed"), ("cold_guard", "fx cold: guard s")]
    if args.no_table:
        columns += [("fx_cold_bare", "fx cold, no table s"), ("bare_tune_s", "tune s"), ("bare_timed", "timed")]
    if args.workers:
        columns += [("fx_cold_par", f"fx cold, {args.workers} compile threads s"), ("par_tune_s", "tune s"),
                    ("fx_warm_par", f"fx warm, {args.workers} compile threads s")]
    columns.append(("note", "note"))
    for model, table in stage_rows:
        common.print_table(table, [("part", "part"), ("ind", "Ind s"), ("fx", "fx s"), ("diff", "fx - Ind s")],
                           title=f"\nwhere the warm first call goes | {model} keep {args.keep} B={args.batch} | "
                                 f"median of {args.repeat} warm processes")
    common.print_table(rows, columns, title=f"\ncompile time of the first call | {env['device']} | torch {env['torch']} "
                                            f"| triton {env['triton']} | fp16 channels_last, no_grad")
    return 0


if __name__ == "__main__":
    sys.exit(main())
