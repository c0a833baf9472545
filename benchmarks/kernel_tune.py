"""Which launches win: the selector's timings of every candidate, and the table of tuned launches
shipped with fxsparse.

Layer mode (default): for every layer of benchmarks/conv_layers.py, dense (keep 1.0) and compacted
(keep 0.25 of the output channels), the fxsparse op's first call times every candidate launch of the
shape (tune "always", tune_top 0) and this prints each candidate's time, the chosen one, then the
CUDA-graph replay time of the chosen launch next to cuDNN channels_last, and last the winners by
launch kind.

    PYTHONPATH=. python benchmarks/kernel_tune.py [--layers 512,seed] [--keeps 1,0.25]

Table mode: compiles each masked model (benchmarks/models.py's masks) with backend="fxsparse" at
each batch, timing every candidate of every conv shape the table does not hold yet, and merges the
winners (and the lowering's triton/aten picks) into the device's table under --table-dir after each
model (one that does not fit --budget-s is left for the next call, which adds to the same table).
Prints winners by launch kind.

    PYTHONPATH=. python benchmarks/kernel_tune.py --write-table --models resnet50,resnet18,mobilenet_v2 \\
        --keep 0.5,1.0 --batch 1,32,64 --table-dir fxsparse/kernels/tuned
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
from conv_layers import LAYERS  # noqa: E402

import fxsparse  # noqa: E402,F401
from fxsparse import options  # noqa: E402
from fxsparse.kernels import tuning_cache  # noqa: E402
from fxsparse.kernels.conv2d import select_channels  # noqa: E402
from fxsparse.kernels.problem import ConvArgs  # noqa: E402
from fxsparse.kernels.select import TIMING, disk_cache, selector  # noqa: E402


def _op(x, w, stride, padding):
    return torch.ops.fxsparse.conv2d(*ConvArgs.of(x, w, stride=stride, padding=padding))


def _kind(sel) -> str:
    return sel.choice.name + (" split-K" if sel.split_k > 1 else "")


def run_shape(spec, keep, rows):
    name, batch, cin, cout, k, hw, s = spec
    cout_k = max(1, round(cout * keep))
    stride, padding = (s, s), (k // 2, k // 2)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(batch, cin, hw, hw, device="cuda", generator=g).half().contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout_k, cin, k, k, device="cuda", generator=g) / (cin * k * k) ** 0.5).half()
    w = w.contiguous(memory_format=torch.channels_last)

    cudnn_us = common.time_cuda_graph(lambda: F.conv2d(x, w, None, stride, padding)) * 1e3
    before = len(selector.table)
    t0 = time.time()
    y = _op(x, w, stride, padding)
    torch.cuda.synchronize()
    tune_s = time.time() - t0
    chosen = selector.chosen()[before:]
    sel = chosen[0][1] if chosen else None
    fx_us = common.time_cuda_graph(lambda: _op(x, w, stride, padding)) * 1e3
    err = common.rel_l2(y, F.conv2d(x.float(), w.float(), None, stride, padding))
    idx = torch.randperm(cin, device="cuda", generator=g)[: cin // 2]
    gather_us = common.time_cuda_graph(lambda: select_channels(x, idx)) * 1e3
    print(f"\n== {name} B={batch} keep {keep:g}: M={y.shape[0] * y.shape[2] * y.shape[3]} N={cout_k} "
          f"K={cin * k * k}  cuDNN {cudnn_us:.1f} us | fxsparse {fx_us:.1f} us (x{cudnn_us / fx_us:.2f}) | "
          f"rel_l2 {err:.1e} | first call {tune_s:.1f} s | gather Cin/2 {gather_us:.1f} us", flush=True)
    if sel is not None:
        print(f"   chosen: {sel!r}")
        for choice, cfg, split, ms in sel.timings:
            mark = " <=" if (choice, cfg, split) == (sel.choice, sel.config, sel.split_k) else ""
            print(f"   {choice.describe(cfg, split):34s} {ms * 1e3:8.1f} us{mark}")
    rows.append(dict(layer=f"{name} B{batch}", keep=f"{keep:g}", cudnn_us=cudnn_us, fx_us=fx_us,
                     speedup=cudnn_us / fx_us, kind=_kind(sel) if sel else "-",
                     chosen=(sel.describe() + (" !" if "MISMATCH" in sel.note else "")) if sel else "(cached)",
                     candidates=len(sel.timings) if sel else 0, gather_us=gather_us, rel_l2=err))


def winners_table(selections) -> list:
    """Rows: launch kind, how many shapes it won, of how many tuned (per batch size)."""
    by_kind = collections.Counter()
    by_batch = collections.defaultdict(collections.Counter)
    for problem, sel in selections:
        by_kind[_kind(sel)] += 1
        by_batch[problem.batch][_kind(sel)] += 1
    batches = sorted(by_batch)
    return [dict(kind=kind, won=n, **{f"B={b}": by_batch[b][kind] for b in batches})
            for kind, n in by_kind.most_common()]


def layers_main(args) -> int:
    layers = LAYERS
    if args.layers:
        wanted = [t.strip() for t in args.layers.split(",") if t.strip()]
        layers = [l for l in layers if any(t in l[0] or t == f"B{l[1]}" for t in wanted)]
    keeps = [float(v) for v in args.keeps.split(",")]
    started = time.time()
    rows = []
    with options.configure(tune="always", tune_top=0):
        for spec in layers:
            for keep in keeps:
                try:
                    run_shape(spec, keep, rows)
                except Exception as e:  # noqa: BLE001 - one bad shape must not hide the rest
                    print(f"\n== {spec[0]} B={spec[1]} keep {keep:g}: FAILED {type(e).__name__}: {e}", flush=True)
                torch.cuda.empty_cache()
    env = common.environment()
    print(f"\n{env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"{time.time() - started:.0f} s | candidates: {TIMING} median; cuDNN/fx/gather: CUDA-graph replay median")
    rows += [dict(layer=f"geomean keep {keep:g}",
                  speedup=common.geomean([r["speedup"] for r in rows if r.get("keep") == f"{keep:g}"]))
             for keep in keeps]
    if args.json:
        common.write_json(args.json, rows, env)
    common.print_table(winners_table(selector.chosen()), ["kind", "won"], title="\nwinners by launch kind")
    common.print_table(rows, [("layer", "layer"), ("keep", "keep"), ("cudnn_us", "cuDNN CL us"), ("fx_us", "fx us"),
                              ("speedup", "speedup"), ("kind", "kind"), ("chosen", "chosen"),
                              ("candidates", "timed"), ("gather_us", "gather us"), ("rel_l2", "rel l2")])
    return 0


def merge_into_table(cache_file: str, table_file: str) -> int:
    """Adds the entries of the tuning cache `cache_file` to the shipped table `table_file`; returns
    how many entries the table holds."""
    table = {}
    if os.path.exists(table_file):
        with open(table_file) as f:
            table = json.load(f)
    with open(cache_file) as f:
        table.update(json.load(f))
    os.makedirs(os.path.dirname(os.path.abspath(table_file)), exist_ok=True)
    with open(table_file, "w") as f:
        json.dump(table, f, indent=0, sort_keys=True)
    return len(table)


def table_main(args) -> int:
    from models import masked_problem

    started = time.time()
    cache_dir = tempfile.mkdtemp(prefix="fxsparse-table-")
    rows, table_file = [], None
    # A fresh cache over the table as it is: shapes the table already holds (for the candidates
    # offered now) are not timed again, so calls under a time limit add to it one after another.
    with options.configure(tune="cache", tune_top=args.top, cache_dir=cache_dir, shipped_table=True):
        for model in args.models.split(","):
            for keep in (float(k) for k in args.keep.split(",")):
                for batch in (int(b) for b in args.batch.split(",")):
                    if time.time() - started > args.budget_s:
                        rows.append(dict(model=model, keep=keep, batch=batch, note="left for the next call"))
                        continue
                    t0, before = time.time(), len(selector.table)
                    masked = x = None
                    try:
                        masked, x, how = masked_problem(model, keep, batch)
                        torch._dynamo.reset()
                        compiled = torch.compile(masked, backend="fxsparse")
                        with torch.no_grad():
                            compiled(x)
                        torch.cuda.synchronize()
                        note = how
                    except Exception as e:  # noqa: BLE001 - one model must not hide the rest
                        note = f"FAILED {type(e).__name__}: {str(e)[:120]}"
                    new = selector.chosen()[before:]
                    cache = disk_cache(torch.cuda.current_device())
                    if os.path.exists(cache.path):
                        table_file = os.path.join(args.table_dir, os.path.basename(cache.path).replace("conv2d-tuning-", ""))
                        entries = merge_into_table(cache.path, table_file)
                    else:
                        entries = 0
                    rows.append(dict(model=model, keep=keep, batch=batch, shapes=len(new), seconds=time.time() - t0,
                                     table=entries, note=note,
                                     winners=", ".join(f"{k} {n}" for k, n in collections.Counter(
                                         _kind(s) for _, s in new).most_common())))
                    print(rows[-1], flush=True)
                    del masked, x
                    torch.cuda.empty_cache()
    env = common.environment()
    print(f"\n{env['device']} | torch {env['torch']} | triton {env['triton']} | {time.time() - started:.0f} s | "
          f"table {table_file}")
    common.print_table(winners_table(selector.chosen()), ["kind", "won"] + sorted(
        {f"B={p.batch}" for p, _ in selector.chosen()}), title="\nwinners by launch kind (every shape tuned here)")
    common.print_table(rows, ["model", "keep", "batch", "shapes", "seconds", "table", "winners", "note"])
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="", help="layer mode: comma-separated substrings of layer names (or B128)")
    p.add_argument("--keeps", default="1,0.25", help="layer mode: output-channel keeps to run")
    p.add_argument("--json", metavar="PATH", help="layer mode: write rows and environment as JSON")
    p.add_argument("--write-table", action="store_true", help="table mode (module doc)")
    p.add_argument("--models", default="resnet50,resnet18,mobilenet_v2")
    p.add_argument("--keep", default="0.5,1.0", help="table mode: fractions of channels kept")
    p.add_argument("--batch", default="64,32,1", help="table mode: batch sizes")
    p.add_argument("--top", type=int, default=0, help="table mode: time this many best-ranked candidates (0: all)")
    p.add_argument("--budget-s", type=float, default=480, help="table mode: start no model after this many seconds")
    p.add_argument("--table-dir", default=tuning_cache.SHIPPED_DIR, help="table mode: where the table is written")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    return table_main(args) if args.write_table else layers_main(args)


if __name__ == "__main__":
    sys.exit(main())
