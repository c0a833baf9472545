"""Compile time: the first call of torch.compile(backend="fxsparse") against Inductor's default on
the same masked model, cold and warm.

    PYTHONPATH=. python benchmarks/compile_time.py [--models resnet50,resnet18,mobilenet_v2] [--keep 0.5]
        [--batch 64] [--no-table] [--workers 8]

Each measurement runs in a fresh process (Python, torch and the model already loaded when the clock
starts; the clock covers the first call: tracing, compiling, tuning, running). Cold: empty
TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR and FXSPARSE_CACHE_DIR (fxsparse still reads the table of
tuned launches shipped with it; --no-table adds a column without it; --workers N one with
settings.compile_workers = N: each shape's candidates compiled on N threads before timing, and the
launches the cache holds compiled on background threads during the graph's compile). Warm: a second
process on
the caches the cold one filled. fxsparse's columns also say where its first call went: seconds in
the selector's timing of launches (`tune s`, shapes timed / read from the shipped table) and of the
lowering's triton-vs-aten choices (`pick s`). The table is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def child(args) -> None:
    """One first call, timed; prints one JSON line."""
    import torch

    from models import masked_problem

    cuda = args.device == "cuda"
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
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled(x)
    sync()
    print(json.dumps(dict(stats, compile_s=time.perf_counter() - t0)), flush=True)


def measure(backend: str, model: str, keep: float, batch: int, dirs: dict, table: bool, timeout: float,
            device: str = "cuda", workers: int = 0) -> dict:
    env = dict(os.environ, TRITON_CACHE_DIR=dirs["triton"], TORCHINDUCTOR_CACHE_DIR=dirs["inductor"],
               FXSPARSE_CACHE_DIR=dirs["fxsparse"], FXSPARSE_SHIPPED_TABLE="1" if table else "0",
               FXSPARSE_COMPILE_WORKERS=str(workers),
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    env.pop("FXSPARSE_TUNE", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--backend", backend, "--model", model,
           "--keep", str(keep), "--batch", str(batch), "--device", device]
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f"over {timeout:.0f} s")
    lines = [l for l in run.stdout.splitlines() if l.startswith("{")]
    if run.returncode != 0 or not lines:
        return dict(error=(run.stderr.strip().splitlines() or ["no output"])[-1][:160])
    return json.loads(lines[-1])


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
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    import common

    rows = []
    for model in args.models.split(","):
        row = dict(model=model, keep=args.keep, batch=args.batch)
        for backend, label in (("inductor", "ind"), ("fxsparse", "fx")):
            dirs = fresh_dirs()
            cold = measure(backend, model, args.keep, args.batch, dirs, True, args.timeout, args.device)
            warm = measure(backend, model, args.keep, args.batch, dirs, True, args.timeout, args.device)
            row[f"{label}_cold"], row[f"{label}_warm"] = cold.get("compile_s"), warm.get("compile_s")
            if backend == "fxsparse":
                row.update(tune_s=cold.get("tune_s"), pick_s=cold.get("pick_s"), timed=cold.get("timed"),
                           shipped=cold.get("shipped"), warm_timed=warm.get("timed"))
            errors = [f"{label} {k}: {r['error']}" for k, r in (("cold", cold), ("warm", warm)) if "error" in r]
            if errors:
                row["note"] = "; ".join(filter(None, [row.get("note"), *errors]))
        if args.no_table:
            bare = measure("fxsparse", model, args.keep, args.batch, fresh_dirs(), False, args.timeout, args.device)
            row["fx_cold_bare"], row["bare_tune_s"], row["bare_timed"] = (bare.get("compile_s"), bare.get("tune_s"),
                                                                          bare.get("timed"))
        if args.workers:
            par = measure("fxsparse", model, args.keep, args.batch, fresh_dirs(), not args.no_table, args.timeout,
                          args.device, args.workers)
            row["fx_cold_par"], row["par_tune_s"] = par.get("compile_s"), par.get("tune_s")
        row["cold_ratio"] = common.ratio(row.get("fx_cold"), row.get("ind_cold"))
        row["warm_ratio"] = common.ratio(row.get("fx_warm"), row.get("ind_warm"))
        print(row, flush=True)
        rows.append(row)
    env = common.environment()
    columns = [("model", "model"), ("keep", "keep"), ("batch", "B"), ("ind_cold", "Ind cold s"),
               ("fx_cold", "fx cold s"), ("cold_ratio", "cold fx/Ind"), ("ind_warm", "Ind warm s"),
               ("fx_warm", "fx warm s"), ("warm_ratio", "warm fx/Ind"), ("tune_s", "fx cold: tune s"),
               ("timed", "shapes timed"), ("shipped", "from table"), ("pick_s", "pick s"),
               ("warm_timed", "warm: timed")]
    if args.no_table:
        columns += [("fx_cold_bare", "fx cold, no table s"), ("bare_tune_s", "tune s"), ("bare_timed", "timed")]
    if args.workers:
        columns += [("fx_cold_par", f"fx cold, {args.workers} compile threads s"), ("par_tune_s", "tune s")]
    columns.append(("note", "note"))
    common.print_table(rows, columns, title=f"\ncompile time of the first call | {env['device']} | torch {env['torch']} "
                                            f"| triton {env['triton']} | fp16 channels_last, no_grad")
    return 0


if __name__ == "__main__":
    sys.exit(main())
