"""Timing, table and report helpers shared by every fxsparse benchmark script.

Timing methods (fxsparse.kernels.timing's, which the selector uses, so numbers are comparable):
  time_cuda_graph  kernel time: `fn` captured `calls` times in one CUDA graph, the median of
                   `triton.testing.do_bench` on replay, divided by `calls` (launch gaps hidden).
  time_plain       what a caller sees: do_bench median on the plain call (host overhead included).
  time_cpu         median wall-clock of plain runs (CPU paths, `--quick` CI runs).
All return milliseconds per call.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import time
from typing import Callable, Iterable, Optional, Sequence

import torch

# Card ceilings used for "% of floor" (H100, measured).
PEAK_FLOPS_FP16 = 700e12
PEAK_BYTES_PER_S = 2.7e12


# --------------------------------------------------------------------------- timing

def time_cuda_graph(fn: Callable[[], object], calls: int = 20, warmup_calls: int = 3, rep_ms: int = 100,
                    warmup_ms: int = 25) -> float:
    """Median ms per call of `fn` replayed from a CUDA graph holding `calls` calls
    (fxsparse.kernels.timing.cuda_graph_time_ms: the library's `benchmark_module` and the conv
    tuner time the same way)."""
    from fxsparse.kernels.timing import cuda_graph_time_ms

    return cuda_graph_time_ms(fn, calls, warmup_calls, warmup_ms, rep_ms)


def time_plain(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median ms per plain call (host overhead, guards and launches included)."""
    from fxsparse.kernels.timing import plain_time_ms

    return plain_time_ms(fn, warmup_ms, rep_ms)


def time_cpu(fn: Callable[[], object], repeat: int = 5, warmup: int = 1, min_time_s: float = 0.0) -> float:
    """Median wall-clock ms of `repeat` runs (at least `min_time_s` of runs in all)."""
    from fxsparse.nn.eval import wall_time_ms

    return wall_time_ms(fn, repeat, warmup, min_time_s)


def time_host_us(fn: Callable[[], object], calls: int = 300, warmup: int = 20) -> float:
    """Microseconds per call on the host clock over `calls` back-to-back calls, synchronized
    once at the end: the host-side cost of a call wherever the device keeps up."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls * 1e6


def time_fn(fn: Callable[[], object], method: str = "graph", **kwargs) -> float:
    """Dispatches to time_cuda_graph / time_plain / time_cpu by name."""
    return {"graph": time_cuda_graph, "plain": time_plain, "cpu": time_cpu}[method](fn, **kwargs)


def try_time(fn: Callable[[], object], method: str = "graph", **kwargs):
    """Like time_fn, but a failure becomes (None, 'ExceptionType: message') instead of an abort."""
    try:
        return time_fn(fn, method, **kwargs), None
    except Exception as e:  # noqa: BLE001 - a benchmark column must not kill the whole table
        if torch.cuda.is_available():
            with contextlib.suppress(Exception):
                torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


# --------------------------------------------------------------------------- metrics

def roofline_floor_ms(flops: float, bytes_moved: float, peak_flops: float = PEAK_FLOPS_FP16,
                      peak_bytes: float = PEAK_BYTES_PER_S) -> float:
    """max(FLOPs / peak, bytes moved once / bandwidth), in ms."""
    return max(flops / peak_flops, bytes_moved / peak_bytes) * 1e3


def geomean(values: Iterable[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or den == 0:
        return None
    return num / den


def rel_l2(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def model_run_title(model: str, keep: float, batch: int, how: str, method: str) -> str:
    """The line above a model run's table: what ran, where, and how it was timed."""
    env = environment()
    return (f"{model} keep {keep} B={batch} ({how}) | {env['device']} | torch {env['torch']} | "
            f"triton {env['triton']} | {method}")


def max_abs_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return (y.double() - ref.double()).abs().max().item()


# --------------------------------------------------------------------------- environment and output

def environment() -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor()})",
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["cudnn"] = torch.backends.cudnn.version()
        env["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    return env


def write_json(path: str, rows: Sequence[dict], meta: Optional[dict] = None) -> None:
    """Writes {"meta": meta, "rows": rows}; non-JSON values become strings."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": meta or {}, "rows": list(rows)}, f, indent=1, default=str)


def _fmt(v, floatfmt: str) -> object:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.2e}"
        return format(v, floatfmt)
    return v


def print_table(rows: Sequence[dict], columns: Sequence, floatfmt: str = ".3g", title: Optional[str] = None,
                tablefmt: str = "github") -> str:
    """Prints rows as a table. `columns`: keys, or (key, header) pairs. Returns the text."""
    from tabulate import tabulate

    cols = [(c, c) if isinstance(c, str) else tuple(c) for c in columns]
    body = [[_fmt(r.get(k), floatfmt) for k, _ in cols] for r in rows]
    text = tabulate(body, headers=[h for _, h in cols], tablefmt=tablefmt, disable_numparse=True)
    if title:
        text = f"{title}\n{text}"
    print(text, flush=True)
    return text


def maybe_plot(path: str, rows: Sequence[dict], x: str, ys: Sequence[str], title: str = "",
               ylabel: str = "", log_y: bool = False) -> Optional[str]:
    """A grouped bar chart of columns `ys` per row label `x`, if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [str(r.get(x)) for r in rows]
    width = 0.8 / max(1, len(ys))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(rows) * max(1, len(ys)) / 2), 4.5))
    for i, y in enumerate(ys):
        vals = [r.get(y) if isinstance(r.get(y), (int, float)) else float("nan") for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], vals, width, label=y)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- torch knobs that move across versions

def inductor_config_patch(**options):
    """torch._inductor.config.patch with only the options this torch knows (names moved across
    2.11-2.14); returns (context manager, list of dropped option names)."""
    import torch._inductor.config as icfg

    known = {k: v for k, v in options.items() if hasattr(icfg, k)}
    dropped = [k for k in options if k not in known]
    return icfg.patch(**known), dropped


def raise_dynamo_recompile_limit(limit: int = 1024) -> None:
    """Benchmarks compile one function at many shapes: lift dynamo's per-code recompile cap."""
    import torch._dynamo.config as dcfg

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(limit, getattr(dcfg, name)))
