"""Nsight Compute counters of fxsparse's conv kernels vs cuDNN's on chosen layer-table rows:
what limits a row slower than cuDNN, profiled rather than argued.

Rows (benchmarks/conv_layers.py shapes, fp16, channels_last; built by its `make_tensors`, called
exactly as its table times them, `fxsparse_call` / `cudnn_call`):
  1 r50 512-512 3x3 @7 B=32, dense          2 r50 256-256 3x3 @14 B=32, dense
  3 seed 64-128 3x3 @56 B=128, dense        4 r50 64-64 3x3 @56 B=32, 16 of 64 output channels
                                              kept, bias + ReLU fused (cuDNN: conv+bias, relu)
  5 seed 64-128 3x3 @56 B=16, half the input channels (fxsparse: in_index gather + conv;
    cuDNN: the compacted input, gather untimed)

Phase 1 (plain process): builds the rows and calls each implementation, so fxsparse's tuner times
its candidates now and writes the winner to its disk cache (FXSPARSE_CACHE_DIR), and times each
call by CUDA-graph replay (conv_layers' method). Phase 2: re-runs this script under `ncu` (child
mode, FXSPARSE_TUNE=cache: the launch is read from that cache, nothing is tuned under the
profiler). The child makes one warm-up call per implementation outside any profiled range (cuDNN's
benchmark mode picks its algorithm there; each process has its own), then profiles 2 calls inside
cudaProfilerStart/Stop and an NVTX range "fxp<row>-<impl>". Phase 3: parses ncu's raw CSV and
prints one line per (row, implementation, kernel), the 2 calls' launches of a kernel averaged:
every kernel a call launches gets its line (a split-K helper launch, row 5's gather, cuDNN's
separate ReLU on row 4).

    PYTHONPATH=. python3 tools/profile_kernels.py [--rows 1,2,...] [--json out.json]
    python3 tools/profile_kernels.py --from-csv out.raw.csv     # table from an earlier run

Next to --json it leaves the report (`.ncu-rep`, for the Nsight Compute GUI), the raw CSV and
ncu's log. ncu runs with --clock-control none (the card's own clocks, as the timings) and
--cache-control all (caches flushed before each replay pass: first-touch DRAM traffic, where the
table's CUDA-graph replays run with warm L2). The chip-dependent metric names (tensor sub-pipes,
DRAM throughput's spellings) are asked for where `ncu --query-metrics` lists them; names ncu
still refuses are dropped and the run repeated.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # common.py and conv_layers.py live there
sys.path.insert(0, ROOT)

import common  # noqa: E402

# tag, conv_layers.LAYERS name, batch, output keep, input keep, bias+relu fused
ROWS = [
    ("512@7 B32", "r50 512-512 3x3 @7", 32, 1.0, 1.0, False),
    ("256@14 B32", "r50 256-256 3x3 @14", 32, 1.0, 1.0, False),
    ("seed B128", "seed 64-128 3x3 @56", 128, 1.0, 1.0, False),
    ("64@56 B32 out.25+br", "r50 64-64 3x3 @56", 32, 0.25, 1.0, True),
    ("seed B16 in.5", "seed 64-128 3x3 @56", 16, 1.0, 0.5, False),
]
IMPLS = ("fxsparse", "cudnn")
CALLS = 2  # profiled calls per range
LABEL = re.compile(r"fxp(\d+)-(fxsparse|cudnn)\b")


def label(row: int, impl: str) -> str:
    """The NVTX range of one row and implementation (no '@', '/' or ':', which ncu's filter and
    CSV give meanings)."""
    return f"fxp{row}-{impl}"


# Table column -> candidate metrics; the first one ncu reports is shown (all go to the JSON).
COUNTERS: Dict[str, List[str]] = {
    "us": ["gpu__time_duration.sum"],
    "sm_pct": ["sm__throughput.avg.pct_of_peak_sustained_elapsed"],
    # the tensor pipe, all MMA kinds (mma.sync HMMA and Hopper's wgmma); then the two sub-pipes
    "tensor_pct": ["sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
                   "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
                   "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"],
    "issue_pct": ["smsp__issue_active.avg.pct_of_peak_sustained_active"],
    "mem_pct": ["gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"],
    "dram_pct": ["gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
                 "dram__throughput.avg.pct_of_peak_sustained_elapsed"],
    "dram_read_mb": ["dram__bytes_read.sum"],
    "l2_pct": ["lts__throughput.avg.pct_of_peak_sustained_elapsed"],
    "l2_hit": ["lts__t_sector_hit_rate.pct"],
    "l1_hit": ["l1tex__t_sector_hit_rate.pct"],
    "occ_pct": ["sm__warps_active.avg.pct_of_peak_sustained_active"],
    "occ_max_pct": ["sm__maximum_warps_per_active_cycle_pct"],
    "regs": ["launch__registers_per_thread"],
    "smem_dyn_kib": ["launch__shared_mem_per_block_dynamic"],
    "smem_static_kib": ["launch__shared_mem_per_block_static"],
    "grid": ["launch__grid_size"],
    "block": ["launch__block_size"],
    "waves": ["launch__waves_per_multiprocessor"],
}
# Warp stall reasons asked for (cycles a warp spends stalled per issued instruction). "selected"
# is issuing, not a stall. Reasons ncu lists beyond KNOWN_STALLS (a newer chip's) are added.
STALLS = ["long_scoreboard", "short_scoreboard", "wait", "barrier", "math_pipe_throttle", "mio_throttle",
          "lg_throttle", "not_selected", "dispatch_stall", "no_instruction", "sleeping"]
KNOWN_STALLS = set(STALLS) | {"branch_resolving", "membar", "drain", "imc_miss", "misc", "tex_throttle", "selected"}
STALL_METRIC = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
STALL_RE = re.compile(r"^smsp__average_warps_issue_stalled_([a-z0-9_]+)_per_issue_active(\.ratio)?$")
STALL_SHORT = {"long_scoreboard": "long_sb", "short_scoreboard": "short_sb", "math_pipe_throttle": "math",
               "mio_throttle": "mio", "lg_throttle": "lg", "not_selected": "not_sel", "dispatch_stall": "dispatch",
               "no_instruction": "no_inst", "branch_resolving": "branch", "tex_throttle": "tex"}

TIME_TO_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
              "s": 1e6, "second": 1e6}
# ncu's byte prefixes are decimal (K = 1000)
BYTES = {"byte": 1.0, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9}

COLUMNS = [
    ("layer", "layer"), ("impl", "impl"), ("kernel", "kernel"), ("us", "us"), ("sm_pct", "SM %"),
    ("tensor_pct", "tensor %"), ("dram_pct", "DRAM %"), ("l2_pct", "L2 %"), ("l2_hit", "L2 hit %"),
    ("l1_hit", "L1 hit %"), ("occ", "occ % (max)"), ("regs", "regs"), ("smem_kib", "smem KiB"),
    ("grid", "grid"), ("waves", "waves"), ("stalls", "top stalls (cycles/issue)"),
]
SUMMARY_COLUMNS = [
    ("layer", "layer"), ("impl", "impl"), ("graph_us", "call us (graph replay)"),
    ("ncu_us", "kernels us (ncu, per call)"), ("kernels", "launches/call"), ("launch", "launch"),
]


# --------------------------------------------------------------------------- ncu's output

def to_float(value) -> Optional[float]:
    """A CSV cell as a number: thousands separators dropped; empty, 'n/a' and text are None."""
    if value is None:
        return None
    text = str(value).strip().split(" (")[0].replace(",", "")  # "158 (0: 158)": per-instance detail
    if not text:
        return None
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def read_raw_csv(text: str):
    """`ncu --csv --page raw`: a header row (first cell "ID"), a units row (empty ID), one row per
    profiled launch. Lines ncu writes around it (==PROF==, ==WARNING==) are skipped. Returns
    (launch rows as dicts, {column: unit})."""
    lines = [ln for ln in text.splitlines() if not ln.startswith("==")]
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"') or ln.startswith("ID,")), None)
    if start is None:
        raise ValueError("no ncu raw CSV header (a line starting with \"ID\") in the output")
    table = [r for r in csv.reader(io.StringIO("\n".join(lines[start:]))) if r]
    header, units = [], {}
    for h in table[0]:  # a header cell "metric (unit)" carries its unit itself
        m = re.match(r"^(\S+__\S+) \((.*)\)$", h)
        header.append(m.group(1) if m else h)
        if m:
            units[m.group(1)] = m.group(2)
    body = table[1:]
    if body and to_float(body[0][0]) is None:  # the units row
        units.update({h: u for h, u in zip(header, body[0]) if u})
        body = body[1:]
    return [dict(zip(header, r)) for r in body], units


def nvtx_column(launches: Sequence[dict]) -> Optional[str]:
    """The column holding our NVTX range names ("thread Domain:Push/Pop_Range:PL_Type:..." in the
    ncu versions seen; found by content, not by name)."""
    best, hits = None, 0
    for col in launches[0] if launches else ():
        n = sum(1 for r in launches if LABEL.search(str(r.get(col) or "")))
        if col != "Kernel Name" and n > hits:
            best, hits = col, n
    return best


def kernel_column(header) -> str:
    for name in ("Kernel Name", "Function Name", "Name"):
        if name in header:
            return name
    raise ValueError(f"no kernel name column in ncu's CSV (columns: {list(header)[:12]}...)")


def _scaled(value: Optional[float], unit: str, table: Dict[str, float], default: float) -> Optional[float]:
    if value is None:
        return None
    u = (unit or "").strip().lower().split("/")[0]
    return value * table.get(u, default)


def launch_values(raw: dict, units: Dict[str, str]) -> dict:
    """One launch's metrics, by metric name: durations in us, shared memory and DRAM bytes in bytes
    (whatever units the CSV used), the rest as printed."""
    out = {}
    for col, cell in raw.items():
        if "__" not in col:
            continue
        v = to_float(cell)
        unit = units.get(col, "")
        if col == "gpu__time_duration.sum":
            v = _scaled(v, unit, TIME_TO_US, 1e-3)  # base unit: nsecond
        elif col.startswith("launch__shared_mem") or col.startswith("dram__bytes"):
            v = _scaled(v, unit, BYTES, 1.0)
        out[col] = v
    return out


ABBREVIATIONS = (("sm90_xmma_", "xmma_"), ("implicit_gemm", "igemm"), ("indexed_wo_smem", "idxnosm"),
                 ("tilesize", "t"), ("warpgroupsize", "wg"), ("_execute_segment_k_off", ""),
                 ("execute_segment_k", "segk"), ("warpspecialized", "ws"), ("cooperative", "coop"),
                 ("tensorop_", ""), ("cutlass3x_", "c3x_"), ("_kernel__5x_cudnn", ""), ("_cudnn", ""))
# name tokens that say element types or layouts (f16f16, f32, nhwc, align8): dropped from short names
NOISE = re.compile(r"^(?:(?:[fbsuhi]|bf|tf)\d+)+$|^(?:nhwc|nchw|nhwckrsc|kcrs|krsc|align\d+)$")


def short_kernel_name(full: str, width: int = 40) -> str:
    """A kernel's name in at most `width` characters: no return type, parameters or namespaces; a
    generic wrapper (cutlass device_kernel, Kernel) named by its first template argument; element
    type and layout tokens dropped, long words abbreviated, then the middle cut."""
    s = full.strip()
    if s.startswith("void "):
        s = s[5:]
    if s.endswith(")"):  # drop the parameter list: the last balanced (...) group
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(s[i], 0)
            if depth == 0:
                s = s[:i]
                break
    base, _, targs = s.partition("<")
    base = base.split("::")[-1].strip()
    if targs and base in ("device_kernel", "Kernel", "Kernel2", "kernel", "cutlass_kernel"):
        base = re.split(r"[<,>\s(]", targs.strip(), maxsplit=1)[0].split("::")[-1] or base
    if len(base) > width:
        base = "_".join(t for t in base.split("_") if not NOISE.match(t)) or base
        for long, short in ABBREVIATIONS:
            base = base.replace(long, short)
    if len(base) > width:
        tail = 12
        base = base[: width - tail - 2] + ".." + base[len(base) - tail:]
    return base


def _mean(values) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _first(values: dict, names: Sequence[str]) -> Optional[float]:
    for n in names:
        if values.get(n) is not None:
            return values[n]
    return None


def _group(launches: List[dict], calls: int) -> List[List[dict]]:
    """One range's launches (in launch order) as groups of one kernel each: by position in the call
    where every call launched the same sequence, else by kernel name."""
    names = [l["kernel"] for l in launches]
    n = len(launches)
    if n and n % calls == 0:
        per = n // calls
        if all(names[i] == names[i % per] for i in range(n)):
            return [[launches[i + c * per] for c in range(calls)] for i in range(per)]
    groups: Dict[str, List[dict]] = {}
    for l in launches:
        groups.setdefault(l["kernel"], []).append(l)
    return list(groups.values())


def top_stalls(values: dict, top: int = 3) -> List[tuple]:
    found = []
    for name, v in values.items():
        m = STALL_RE.match(name)
        if m and v and m.group(1) != "selected":
            found.append((v, m.group(1)))
    found.sort(reverse=True)
    return [(reason, v) for v, reason in found[:top]]


def kernel_rows(text: str, calls: int = CALLS, rows: Sequence[tuple] = ROWS) -> List[dict]:
    """ncu's raw CSV -> one dict per (row, implementation, kernel): the metrics of that kernel's
    launches in the range averaged, plus the table's derived columns."""
    launches_raw, units = read_raw_csv(text)
    if not launches_raw:
        raise ValueError("ncu's CSV has no profiled launches")
    col = nvtx_column(launches_raw)
    if col is None:
        raise ValueError("no column of ncu's CSV names our NVTX ranges (fxp<row>-<impl>): was it run with --nvtx?")
    kcol = kernel_column(launches_raw[0])
    by_range: Dict[tuple, List[dict]] = {}
    for raw in sorted(launches_raw, key=lambda r: to_float(r.get("ID")) or 0.0):
        m = LABEL.findall(str(raw.get(col) or ""))
        if not m:
            continue
        row_no, impl = int(m[-1][0]), m[-1][1]  # the innermost of our ranges
        by_range.setdefault((row_no, impl), []).append(
            dict(kernel=raw.get(kcol, "?"), values=launch_values(raw, units)))
    out = []
    for (row_no, impl) in sorted(by_range, key=lambda k: (k[0], IMPLS.index(k[1]))):
        tag = rows[row_no - 1][0] if 0 < row_no <= len(rows) else f"row {row_no}"
        seen: Dict[str, int] = {}
        for group in _group(by_range[(row_no, impl)], calls):
            names = sorted({k for l in group for k in l["values"]})
            values = {k: _mean(l["values"].get(k) for l in group) for k in names}
            full = group[0]["kernel"]
            short = short_kernel_name(full)
            seen[short] = seen.get(short, 0) + 1
            if seen[short] > 1:
                short = f"{short[:37]} #{seen[short]}"
            stalls = top_stalls(values)
            occ, occ_max = _first(values, COUNTERS["occ_pct"]), _first(values, COUNTERS["occ_max_pct"])
            smem = [_first(values, COUNTERS[k]) for k in ("smem_dyn_kib", "smem_static_kib")]
            smem_b = None if all(v is None for v in smem) else sum(v or 0.0 for v in smem)
            r = dict(
                row=row_no, layer=tag, impl=impl, kernel=short, kernel_full=full, launches=len(group),
                per_call=len(group) / calls,
                **{k: _first(values, names_) for k, names_ in COUNTERS.items()},
                smem_kib=None if smem_b is None else smem_b / 1024.0,
                occ=None if occ is None else (f"{occ:.3g}" + ("" if occ_max is None else f" ({occ_max:.3g})")),
                stalls=", ".join(f"{STALL_SHORT.get(s, s)} {v:.2g}" for s, v in stalls) or None,
                top_stalls=[dict(reason=s, cycles_per_issue=v) for s, v in stalls],
                metrics=values,
            )
            for key in ("smem_dyn_kib", "smem_static_kib"):
                if r[key] is not None:
                    r[key] /= 1024.0
            if r["dram_read_mb"] is not None:
                r["dram_read_mb"] /= 1e6
            for key in ("grid", "block", "regs"):
                if r[key] is not None and float(r[key]).is_integer():
                    r[key] = int(r[key])
            out.append(r)
    return out


def summarize(kernels: Sequence[dict], phase1: dict, child: dict, rows: Sequence[tuple] = ROWS) -> List[dict]:
    """One line per (row, implementation): phase 1's CUDA-graph time next to the sum of ncu's
    kernel durations per call, and fxsparse's launch."""
    keys = []
    for k in kernels:
        if (k["row"], k["impl"]) not in keys:
            keys.append((k["row"], k["impl"]))
    for key in phase1.get("graph_us", {}):
        row_no, impl = LABEL.match(key).groups()
        if (int(row_no), impl) not in keys:
            keys.append((int(row_no), impl))
    out = []
    for row_no, impl in sorted(keys, key=lambda k: (k[0], IMPLS.index(k[1]))):
        lab = label(row_no, impl)
        ks = [k for k in kernels if k["row"] == row_no and k["impl"] == impl]
        durations = [k["us"] * k["per_call"] for k in ks if k.get("us") is not None]
        launch = child.get("launch", {}).get(lab) or phase1.get("launch", {}).get(lab)
        out.append(dict(layer=rows[row_no - 1][0] if 0 < row_no <= len(rows) else f"row {row_no}", impl=impl,
                        graph_us=phase1.get("graph_us", {}).get(lab), ncu_us=sum(durations) if durations else None,
                        kernels=sum(k["per_call"] for k in ks) if ks else None, launch=launch))
    return out


# --------------------------------------------------------------------------- choosing metrics

def parse_query_metrics(text: str) -> set:
    """Metric names in `ncu --query-metrics` output: each line's first word, where it looks like
    unit__name (base names; a suffixed listing's names are kept whole too)."""
    names = set()
    for line in text.splitlines():
        m = re.match(r"\s*([a-z][a-z0-9]*__[a-z0-9_]+)(\.[a-z0-9_.]+)?(\s|$)", line)
        if m:
            names.add(m.group(1))
            if m.group(2):
                names.add(m.group(1) + m.group(2))
    return names


def query_metrics(ncu: str, log: List[str]) -> Optional[set]:
    """What this ncu knows for this GPU (then for GH100 by name); None where the query fails."""
    for extra in ([], ["--chip", "gh100"]):
        cmd = [ncu, "--query-metrics", *extra]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.append(f"{' '.join(cmd)}: {e}")
            continue
        names = parse_query_metrics(proc.stdout)
        if proc.returncode == 0 and "gpu__time_duration" in names and "sm__throughput" in names:
            log.append(f"{' '.join(cmd)}: {len(names)} metric names")
            return names
        log.append(f"{' '.join(cmd)}: rc {proc.returncode}, {len(names)} names; {proc.stderr.strip()[-200:]}")
    return None


# Names whose existence on a chip varies (sub-pipes, the DRAM throughput's two spellings,
# theoretical occupancy): asked for only where `ncu --query-metrics` lists them. The rest are in
# ncu's own sections on every chip since Volta; they are kept whatever the listing says (it may
# leave derived metrics out), and a name ncu refuses at run time is dropped then.
LISTED_ONLY = set(COUNTERS["tensor_pct"]) | set(COUNTERS["dram_pct"]) | set(COUNTERS["occ_max_pct"])


def choose_metrics(available: Optional[set]):
    """(metrics to ask for, names dropped as not listed for this GPU)."""
    wanted = [n for names in COUNTERS.values() for n in names] + [STALL_METRIC.format(s) for s in STALLS]
    if available is None:
        return wanted, []
    for name in sorted(available):  # a stall reason this chip has that the list above does not know
        m = STALL_RE.match(name)
        if m and m.group(1) not in KNOWN_STALLS and STALL_METRIC.format(m.group(1)) not in wanted:
            wanted.append(STALL_METRIC.format(m.group(1)))

    def keep(name):
        return name not in LISTED_ONLY or name in available or name.split(".")[0] in available

    return [n for n in wanted if keep(n)], [n for n in wanted if not keep(n)]


def refused_metrics(output: str) -> List[str]:
    """Names in ncu's '==ERROR== Failed to access the following N metrics: a, b' line(s)."""
    names = []
    for m in re.finditer(r"Failed to access the following \d+ metrics?:\s*(.+)", output):
        names += [n.strip() for n in m.group(1).split(",") if n.strip()]
    return names


# --------------------------------------------------------------------------- running the rows

def _selected(spec: str) -> List[int]:
    rows = [int(v) for v in spec.split(",") if v.strip()] if spec else list(range(1, len(ROWS) + 1))
    bad = [r for r in rows if not 1 <= r <= len(ROWS)]
    if bad:
        raise SystemExit(f"--rows: no row {bad} (rows are 1..{len(ROWS)})")
    return rows


def build_row(row_no: int):
    """(tensors, {impl: call}) of one row, through conv_layers' own helpers."""
    import conv_layers as CL  # CUDA-side imports only where rows are run

    tag, name, batch, keep_out, keep_in, fused = ROWS[row_no - 1]
    spec = next(l for l in CL.LAYERS if l[0] == name and l[1] == batch)
    t = CL.make_tensors(spec, keep_out, keep_in, "cuda")
    return t, {"fxsparse": CL.fxsparse_call(t, fused), "cudnn": CL.cudnn_call(t, fused)}


def _tuned_table():
    try:
        from fxsparse.kernels.select import selector

        return selector.table
    except Exception:  # noqa: BLE001 - the launch column is a nicety
        return None


def _new_launches(tuned, before) -> Optional[str]:
    if tuned is None:
        return None
    new = [tuned[k] for k in list(tuned) if k not in before]
    return "; ".join(repr(c) for c in new) if new else None


def run_phase1(rows: List[int], log) -> dict:
    """Tunes (fxsparse) and picks algorithms (cuDNN) in this process; times each call by CUDA-graph
    replay."""
    import torch

    torch.backends.cudnn.benchmark = True
    tuned = _tuned_table()
    out = {"graph_us": {}, "launch": {}, "errors": {}}
    for row_no in rows:
        t, fns = build_row(row_no)
        for impl, fn in fns.items():
            lab = label(row_no, impl)
            before = set(tuned) if tuned is not None else set()
            t0 = time.time()
            try:
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                out["errors"][lab] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                log(f"{lab}: first calls failed: {out['errors'][lab]}")
                continue
            first_s = time.time() - t0
            if impl == "fxsparse":
                out["launch"][lab] = _new_launches(tuned, before)
            ms, err = common.try_time(fn, "graph", calls=20)
            out["graph_us"][lab] = None if ms is None else ms * 1e3
            if err:
                out["errors"][lab] = err
            log(f"{lab} ({ROWS[row_no - 1][0]}): first calls {first_s:.1f} s, graph replay "
                f"{out['graph_us'][lab] and round(out['graph_us'][lab], 1)} us"
                + (f", launch {out['launch'][lab]}" if out["launch"].get(lab) else ""))
        del t, fns
        torch.cuda.empty_cache()
    return out


def run_child(args) -> int:
    """Under ncu: one warm-up call per implementation outside the profiled ranges, then CALLS calls
    inside cudaProfilerStart/Stop and the NVTX range."""
    import torch

    torch.backends.cudnn.benchmark = True
    tuned = _tuned_table()
    out = {"launch": {}, "errors": {}, "tune_mode": os.environ.get("FXSPARSE_TUNE")}
    for row_no in _selected(args.rows):
        t, fns = build_row(row_no)
        for impl, fn in fns.items():
            lab = label(row_no, impl)
            before = set(tuned) if tuned is not None else set()
            try:
                fn()  # warm-up: cuDNN benchmarks its algorithms here; fxsparse reads its launch
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                out["errors"][lab] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                continue
            if impl == "fxsparse":
                out["launch"][lab] = _new_launches(tuned, before)
            torch.cuda.nvtx.range_push(lab)
            torch.cuda.profiler.start()
            try:
                for _ in range(CALLS):
                    fn()
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - the other rows still run
                out["errors"][lab] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            finally:
                torch.cuda.profiler.stop()
                torch.cuda.nvtx.range_pop()
            with open(args.child_out, "w") as f:  # after every range: a crash later keeps what ran
                json.dump(out, f, indent=1)
        del t, fns
        torch.cuda.empty_cache()
    with open(args.child_out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


def find_ncu(explicit: Optional[str]) -> Optional[str]:
    if explicit:
        return explicit if os.path.isfile(explicit) or shutil.which(explicit) else None
    found = shutil.which("ncu")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "ncu")):
            return os.path.join(root, "bin", "ncu")
    return None


def _tail(path_or_text: str, n: int = 1500, is_path: bool = True) -> str:
    text = path_or_text
    if is_path:
        try:
            with open(path_or_text, errors="replace") as f:
                text = f.read()
        except OSError:
            return ""
    text = "\n".join(ln for ln in text.splitlines() if ln.strip())
    return text[-n:]


def run_ncu(ncu: str, metrics: List[str], rows: List[int], outdir: str, args, log):
    """Profiles the child; returns (report path, ncu log path, child report path, metrics used,
    notes). Raises RuntimeError (a one-line reason, then the tail of ncu's log) on failure."""
    rep_base = os.path.join(outdir, "profile_kernels")
    log_path = os.path.join(outdir, "profile_kernels.ncu.log")
    child_out = os.path.join(outdir, "profile_kernels.child.json")
    env = dict(os.environ, FXSPARSE_TUNE="cache",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    notes = []
    use_include = not args.no_nvtx_include
    deadline = time.time() + args.ncu_timeout_s
    for attempt in range(3):
        cmd = [ncu, "--clock-control", "none", "--cache-control", args.cache_control,
               "--target-processes", "all", "--profile-from-start", "off", "--nvtx"]
        if use_include:
            for row_no in rows:
                for impl in IMPLS:
                    cmd += ["--nvtx-include", f"{label(row_no, impl)}/"]
        cmd += ["--launch-count", "400",  # a bound, should a filter fail: about 60 launches are expected
                "--metrics", ",".join(metrics), "--export", rep_base, "--force-overwrite",
                sys.executable, os.path.abspath(__file__), "--child", "--rows", ",".join(map(str, rows)),
                "--child-out", child_out]
        log(f"ncu run {attempt + 1}: {len(metrics)} metrics" + (", NVTX include filter" if use_include else ""))
        for stale in (rep_base + ".ncu-rep", child_out):
            if os.path.exists(stale):
                os.remove(stale)
        t0 = time.time()
        with open(log_path, "w") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(10.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                raise RuntimeError(f"ncu did not finish in {args.ncu_timeout_s:.0f} s (--ncu-timeout-s); "
                                   f"{log_path} ends:\n{_tail(log_path)}")
        log(f"ncu run {attempt + 1}: rc {rc} in {time.time() - t0:.0f} s")
        output = _tail(log_path, 10**7)
        refused = refused_metrics(output)
        if refused:
            drop = {n for n in metrics if n in refused or n.split(".")[0] in {r.split(".")[0] for r in refused}}
            if drop and attempt < 2:
                notes.append(f"ncu refused {sorted(drop)}; dropped and repeated")
                metrics = [n for n in metrics if n not in drop]
                continue
        if "ERR_NVGPUCTRPERM" in output:
            raise RuntimeError("ncu may not read the GPU's performance counters here (ERR_NVGPUCTRPERM); "
                               f"{log_path} ends:\n{_tail(log_path)}")
        rep = rep_base + ".ncu-rep"
        no_kernels = "No kernels were profiled" in output or not os.path.isfile(rep)
        if no_kernels and use_include and rc == 0 and attempt < 2:
            notes.append("the NVTX include filter matched no kernel; repeated with cudaProfilerStart/Stop alone")
            use_include = False
            continue
        if not os.path.isfile(rep):
            raise RuntimeError(f"ncu wrote no report (rc {rc}); {log_path} ends:\n{_tail(log_path)}")
        if rc != 0:
            notes.append(f"ncu exited {rc} but wrote its report; see {log_path}")
        return rep, log_path, child_out, metrics, notes
    raise RuntimeError(f"ncu failed 3 times; {log_path} ends:\n{_tail(log_path)}")


def export_csv(ncu: str, rep: str, csv_path: str) -> str:
    """The report's raw page as CSV (base units); with --nvtx too if the first export shows no
    NVTX column."""
    text = ""
    for extra in ([], ["--nvtx"]):
        cmd = [ncu, "--import", rep, "--csv", "--page", "raw", "--print-units", "base", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (rc {proc.returncode}); its output ends:\n"
                               f"{_tail(proc.stderr + proc.stdout, is_path=False)}")
        text = proc.stdout
        try:
            launches, _ = read_raw_csv(text)
        except ValueError:
            continue
        if launches and nvtx_column(launches) is not None:
            break
    with open(csv_path, "w") as f:
        f.write(text)
    return text


def print_tables(kernels, summary, title=None):
    # (one short name can stand for several kernels, e.g. the elementwise kernels of two rows)
    legend = {}
    for k in kernels:
        if k["kernel"] != k.get("kernel_full"):
            legend.setdefault((k["kernel"], k["kernel_full"]), []).append(f"{k['layer']} {k['impl']}")
    if legend:
        print("\nkernel names:", flush=True)
        for (short, full), where in legend.items():
            print(f"  {short} ({', '.join(where)}): {full}", flush=True)
    if summary:
        common.print_table(summary, SUMMARY_COLUMNS, title="\nper call: CUDA-graph replay (phase 1) vs ncu's kernel "
                                                           "durations (caches flushed, 2 calls averaged)")
    print("\nper kernel (2 calls' launches averaged; tensor %: tensor pipe active, of active cycles; occ: "
          "achieved (theoretical) warps %; stalls: cycles stalled per issued instruction)", flush=True)
    common.print_table(kernels, COLUMNS, title=title)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="", help="comma-separated row numbers 1-5 (default: all); see the module doc")
    p.add_argument("--json", metavar="PATH", help="write per-kernel rows and environment as JSON; the report, raw "
                   "CSV and ncu log go next to it")
    p.add_argument("--ncu", metavar="PATH", help="the ncu binary (default: ncu on PATH, then $CUDA_HOME/bin)")
    p.add_argument("--ncu-timeout-s", type=float, default=200.0, help="give up on the profiled run after this long")
    p.add_argument("--cache-control", choices=("all", "none"), default="all",
                   help="ncu --cache-control: flush caches before each replay pass (all) or not")
    p.add_argument("--no-nvtx-include", action="store_true",
                   help="select the profiled calls by cudaProfilerStart/Stop only (NVTX still names them)")
    p.add_argument("--from-csv", metavar="PATH", help="print the table of an earlier run's raw CSV; no GPU needed")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.from_csv:
        try:
            with open(args.from_csv) as f:
                kernels = kernel_rows(f.read())
        except (OSError, ValueError) as e:
            print(f"profile_kernels: {args.from_csv}: {e}", flush=True)
            return 1
        print_tables(kernels, summarize(kernels, {}, {}), title=f"from {args.from_csv}")
        if args.json:
            common.write_json(args.json, kernels, dict(script="tools/profile_kernels.py", from_csv=args.from_csv))
        return 0

    import torch

    if args.child:
        return run_child(args)
    rows = _selected(args.rows)
    ncu = find_ncu(args.ncu)
    if ncu is None:
        print("profile_kernels: no Nsight Compute: `ncu` is not on PATH nor in $CUDA_HOME/bin (pass --ncu PATH)",
              flush=True)
        return 2
    if not torch.cuda.is_available():
        print("profile_kernels: needs a CUDA GPU", flush=True)
        return 2
    started = time.time()

    def log(msg):
        print(f"[{time.time() - started:6.1f}s] {msg}", flush=True)

    outdir = os.path.dirname(os.path.abspath(args.json)) if args.json else tempfile.mkdtemp(prefix="profile_kernels-")
    os.makedirs(outdir, exist_ok=True)
    try:
        version = subprocess.run([ncu, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"profile_kernels: {ncu} --version failed: {e}", flush=True)
        return 2
    log(f"ncu: {version.splitlines()[-1] if version else '?'} ({ncu}); outputs in {outdir}")
    query_log: List[str] = []
    available = query_metrics(ncu, query_log)
    for line in query_log:
        log(line)
    metrics, dropped = choose_metrics(available)
    if dropped:
        log(f"not offered by this ncu/GPU, dropped: {', '.join(dropped)}")

    phase1 = run_phase1(rows, log)
    env = common.environment()
    meta = dict(env, script="tools/profile_kernels.py", ncu=version, ncu_path=ncu, metrics_dropped=dropped,
                query=query_log, cache_control=args.cache_control, clock_control="none", calls_per_range=CALLS,
                phase1=phase1, rows={label(r, i): ROWS[r - 1][0] for r in rows for i in IMPLS})
    try:
        rep, ncu_log, child_out, metrics, notes = run_ncu(ncu, metrics, rows, outdir, args, log)
        for n in notes:
            log(n)
        text = export_csv(ncu, rep, os.path.join(outdir, "profile_kernels.raw.csv"))
        kernels = kernel_rows(text)
    except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as e:
        if args.json:  # phase 1's timings and what was tried still come back
            common.write_json(args.json, [], dict(meta, metrics=metrics, error=str(e),
                                                  wall_s=round(time.time() - started, 1)))
        print(f"profile_kernels: {e}", flush=True)
        return 1
    child = {}
    try:
        with open(child_out) as f:
            child = json.load(f)
    except (OSError, ValueError) as e:
        log(f"no child report ({e})")
    for lab, launch in child.get("launch", {}).items():
        if launch and "tuning cache" not in launch:
            log(f"WARNING {lab}: the profiled process chose its launch itself ({launch}), not from the cache")
    for lab, err in {**phase1.get("errors", {}), **child.get("errors", {})}.items():
        log(f"error {lab}: {err}")
    summary = summarize(kernels, phase1, child)
    profiled = {(k["row"], k["impl"]) for k in kernels}
    missing = [label(r, i) for r in rows for i in IMPLS if (r, i) not in profiled]
    if missing:
        log(f"WARNING no profiled kernels for {', '.join(missing)}")

    meta.update(metrics=metrics, notes=notes, report=rep, raw_csv=os.path.join(outdir, "profile_kernels.raw.csv"),
                ncu_log=ncu_log, child=child, summary=summary, wall_s=round(time.time() - started, 1))
    if args.json:
        common.write_json(args.json, kernels, meta)
    print(f"\n{env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"{version.splitlines()[-1] if version else 'ncu'} | clocks: not locked | caches: {args.cache_control} | "
          f"{meta['wall_s']} s")
    print_tables(kernels, summary)
    return 0 if not missing else 1


if __name__ == "__main__":
    sys.exit(main())
