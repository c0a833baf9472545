"""The one selector: which implementation runs each conv, for the fused op, the lowering's choice
between it and aten, the `nn` module's executions and the benchmarks alike.

`selector.launch(call)` picks the op's launch for a conv shape: from this process's table, else
the disk cache (the user's, then the table shipped with fxsparse for the device; a shape found
there only for the other 16-bit type takes that launch, checked as a tuned winner), else by timing
the best-ranked candidates (choices.candidates; `settings.tune_top` of them) with CUDA-graph
replay (timing.gpu_time_ms), the winner checked against a 4-warp pointer launch where it is a
kind that has miscompiled elsewhere (8-warp tap loops, TMA, warp-specialised), and written back.
`selector.pick(key, runs)` times named callables the same way and keeps the fastest (the lowering's
"triton" vs "aten", the module's executions), cached under `key` in memory and on disk.
`selector.chosen()` lists what was picked (fxsparse.report.chosen_launches).
"""
from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from fxsparse.kernels import choices as C
from fxsparse.kernels import timing, tuning_cache
from fxsparse.kernels.problem import ConvCall, ConvProblem
from fxsparse.kernels.tile import sm_count

log = logging.getLogger(__name__)

# How candidates are timed: part of the cache's signature, so that winners timed otherwise are re-timed.
TIMING = "cuda-graph replay"
# A launch tuned for one 16-bit type serves the other until the other is tuned (tune="always").
HALF_TWIN = {"float16": "bfloat16", "bfloat16": "float16"}


@dataclass
class Selection:
    """The launch of one conv shape: an implementation, its config and split-K factor."""
    choice: C.Choice
    config: dict
    split_k: int = 1
    note: str = ""
    timings: list = field(default_factory=list)  # [(choice, config, split_k, ms)] of the timed candidates

    def describe(self) -> str:
        return self.choice.describe(self.config, self.split_k)

    def __repr__(self):
        return self.describe() + (f" ({self.note})" if self.note else "")


def _signature(cands: list) -> str:
    return tuning_cache.signature([(c.name, cfg, s) for c, cfg, s in cands], TIMING)


def same_output(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    scale = float(b.abs().nan_to_num(0.0, 0.0, 0.0).amax()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-2, atol=1e-2 * max(scale, 1e-3), equal_nan=True))


def _checked_kind(sel: Selection, problem: ConvProblem) -> Optional[str]:
    """Why a winner is compared with the safe launch before it is trusted, or None."""
    if sel.choice is C.WS_BOX:
        return "warp-specialised"
    if sel.choice in (C.TMA_BOX, C.TMA_GEMM):
        return "TMA"
    if sel.choice is C.POINTER and not C.is_safe(sel.choice, sel.config, problem):
        return "8-warp"
    return None


class Selector:
    def __init__(self):
        self.table: dict = {}  # ConvProblem -> Selection, this process's choices in first-run order
        self.picks: dict = {}  # key -> name, pick()'s choices
        self._seen: dict = {}  # a call's key tuple -> (ConvProblem, Selection, table): the per-call lookup
        self._pool = None  # prefetch's threads
        self._pending: list = []  # prefetch's futures

    # ---------------------------------------------------------------- the op's launch
    def launch(self, call: ConvCall, split_k: Optional[int] = None) -> tuple:
        """(problem, Selection) for `call` on CUDA: remembered, cached or timed."""
        key = call.key(split_k)
        hit = self._seen.get(key)
        if hit is not None and hit[2] is self.table:  # (a table swapped out, as tests do, is not consulted)
            return hit[:2]
        from fxsparse.options import kernel_settings

        index = _device_index(call.x.device)
        problem = call.problem(sm_count(index), split_k)
        sel = self.table.get(problem)
        if sel is not None:
            self._seen[key] = (problem, sel, self.table)
            return problem, sel
        settings = kernel_settings()
        if settings.tune == "off":
            sel = self.table[problem] = Selection(*C.safe_launch(problem), note="untuned (tune off)")
            return problem, sel
        if torch.cuda.is_current_stream_capturing():
            # nothing can be timed inside a capture: a safe launch, not remembered
            return problem, Selection(*C.safe_launch(problem), note="untuned (captured)")
        cands = C.candidates(problem, call)
        offered = _signature(cands)
        cache = disk_cache(index)
        sel = self._cached(problem, cands, index, call) if settings.tune == "cache" else None
        if sel is None:
            top = cands[:settings.tune_top or len(cands)]
            if settings.compile_workers > 1:
                compile_ahead(call, top, settings.compile_workers)
            sel = self.tune(problem, call, top)
            cache.put(repr(problem), dict(choice=sel.choice.name, config=sel.config, split_k=sel.split_k), offered)
        self.table[problem] = sel
        self._seen[key] = (problem, sel, self.table)
        return problem, sel

    def _cached(self, problem: ConvProblem, cands: list, index: int,
                call: Optional[ConvCall] = None) -> Optional[Selection]:
        """The disk cache's launch for `problem` if it was chosen among `cands`; else the one chosen
        for the same shape in the other 16-bit type (the kernels are the same code for both, with
        the same tiles, bytes and tensor-core rate), checked on `call` as a tuned winner is (its
        check ran in the other type); else None."""
        cache, signature = disk_cache(index), _signature(cands)
        for dtype in filter(None, (problem.dtype, HALF_TWIN.get(problem.dtype))):
            cached = cache.get(repr(replace(problem, dtype=dtype)), signature)
            if cached is None or cached.get("choice") not in C.BY_NAME:
                continue
            sel = Selection(C.BY_NAME[cached["choice"]], dict(cached["config"]), int(cached["split_k"]),
                            note="from the " + cached.get("source", "tuning cache"))
            if dtype == problem.dtype:
                return sel
            sel.note += f", tuned for {dtype}"
            return self.checked(sel, problem, call) if call is not None else sel
        return None

    def known(self, call: ConvCall, split_k: Optional[int] = None) -> bool:
        """Whether `launch(call)` would find its launch without timing anything."""
        from fxsparse.options import kernel_settings

        if self._seen.get(call.key(split_k), (None, None, None))[2] is self.table:
            return True
        index = _device_index(call.x.device)
        problem = call.problem(sm_count(index), split_k)
        settings = kernel_settings()
        if problem in self.table or settings.tune == "off":
            return True
        return settings.tune == "cache" and self._cached(problem, C.candidates(problem, call), index) is not None

    # ---------------------------------------------------------------- compiling ahead of the first call
    def prefetch(self, run: Callable[[], object], workers: int, device: Optional[torch.device] = None) -> None:
        """Runs `run` (a call of the op whose launch is `known`) on a background thread, so that its
        launch compiles while the graph's compile goes on; `wait` (at the next op call or timing on
        the main thread) finishes them all before anything else runs or is timed."""
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fxsparse-compile",
                                            initializer=_mark_worker)
        self._pending.append(self._pool.submit(_quietly, run, device))

    def wait(self) -> None:
        """Finishes the prefetched compiles (a no-op on a prefetch thread, or with none pending)."""
        if not self._pending or getattr(_worker, "on", False):
            return
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()
        if not torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()

    def tune(self, problem: ConvProblem, call: ConvCall, cands: list) -> Selection:
        """Times `cands` (each whole launch, compiled before its timing) and keeps the fastest,
        checked where its kind calls for it."""
        self.wait()  # (no timing beside background compiles)
        timings = []
        for choice, cfg, s in cands:
            try:
                choice.run(call, cfg, s)  # compile outside the timed region
                ms = timing.gpu_time_ms(lambda choice=choice, cfg=cfg, s=s: choice.run(call, cfg, s), quick=True)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory on a config
                ms = float("inf")
                log.debug("fxsparse: candidate %s failed for %s: %s", choice.describe(cfg, s), problem.describe(), e)
            timings.append((choice, cfg, s, ms))
        timings.sort(key=lambda t: t[3])
        choice, cfg, s, ms = timings[0]
        if ms == float("inf"):
            raise RuntimeError(f"fxsparse.conv2d: every candidate launch failed for {problem.describe()}")
        return self.checked(Selection(choice, cfg, s, "", timings), problem, call)

    def checked(self, sel: Selection, problem: ConvProblem, call: ConvCall) -> Selection:
        """`sel`, or a safe launch where `sel` is of a kind that has miscompiled elsewhere and its
        output on `call` differs from the safe launch's (the safe one timed beside it, if any)."""
        kind = _checked_kind(sel, problem)
        if kind is None:
            return sel
        safe = next(((c, k, sk) for c, k, sk, t in sel.timings if C.is_safe(c, k, problem) and t < float("inf")),
                    C.safe_launch(problem))
        safe[0].run(call, safe[1], safe[2])
        reference = call.out.clone()
        sel.choice.run(call, sel.config, sel.split_k)
        if not same_output(call.out, reference):
            log.warning("fxsparse: %s launch %s gave wrong results for %s; using %s", kind, sel.describe(),
                        problem.describe(), safe[0].describe(safe[1], safe[2]))
            return Selection(*safe, f"{kind} MISMATCH, fell back to a 4-warp tile", sel.timings)
        sel.note = ", ".join(filter(None, (sel.note, f"{kind} output checked")))
        return sel

    # ---------------------------------------------------------------- named alternatives
    def pick(self, key, runs: dict, graphed: bool = True, timer: Optional[Callable] = None,
             persist: bool = True) -> tuple:
        """(name, {name: ms}) of the fastest of `runs` ({name: callable}), remembered under `key`
        (and on disk where `persist`: a key whose repr names it across processes). `timer(name, fn)`
        replaces the GPU timing (tests). A callable that fails is not chosen."""
        names = sorted(runs)
        hit = self.picks.get(key) if persist else None
        if hit is not None and hit in runs:
            return hit, {}
        disk = None
        if persist and timer is None and torch.cuda.is_available():
            from fxsparse.options import kernel_settings

            disk = disk_cache(torch.cuda.current_device())
            cached = disk.get(repr(key), tuning_cache.signature([(n,) for n in names], TIMING)) \
                if kernel_settings().tune == "cache" else None
            if cached is not None and cached.get("pick") in runs:
                self.picks[key] = cached["pick"]
                return cached["pick"], {}
        self.wait()
        times, errors = {}, []
        for name in names:
            try:
                times[name] = timer(name, runs[name]) if timer is not None else timing.gpu_time_ms(
                    runs[name], graphed=graphed)
            except Exception as e:  # noqa: BLE001 - a run that fails is not chosen
                log.debug("fxsparse: %s failed while timing %r: %s", name, key, e)
                errors.append(e)
        if not times:
            raise errors[0]
        best = min(times, key=times.get)
        if persist:
            self.picks[key] = best
        if disk is not None:
            disk.put(repr(key), dict(pick=best), tuning_cache.signature([(n,) for n in names], TIMING))
        return best, times

    # ---------------------------------------------------------------- what was chosen
    def chosen(self) -> list:
        """[(ConvProblem, Selection)] of every conv shape this process launched on CUDA, in order."""
        return list(self.table.items())

    def forget(self) -> None:
        """Empties this process's tables (the disk cache stays): the next call of each shape looks again."""
        self.table.clear()
        self.picks.clear()
        self._seen.clear()


_worker = threading.local()


def _mark_worker() -> None:
    _worker.on = True


def _quietly(run: Callable[[], object], device: Optional[torch.device]) -> None:
    try:
        if device is None:
            run()
        else:
            with torch.cuda.device(device):  # (the current device is per thread)
                run()
    except Exception as e:  # noqa: BLE001 - the same call on the main thread meets it and reports it
        log.debug("fxsparse: compiling ahead failed: %s", e)


def _warm(call: ConvCall, cand: tuple) -> None:
    choice, cfg, s = cand
    try:
        with torch.cuda.device(call.x.device):  # (the current device is per thread)
            choice.run(call, cfg, s)
    except Exception as e:  # noqa: BLE001 - the timing loop meets the same failure and skips it
        log.debug("fxsparse: compiling %s failed: %s", choice.describe(cfg, s), e)


def compile_ahead(call: ConvCall, cands: list, workers: int) -> None:
    """Compiles (by a first launch) every candidate on `workers` threads, as Inductor compiles its
    autotuning choices in parallel: Triton's compile runs mostly outside the GIL (the MLIR passes,
    ptxas), so each shape's compiles overlap. Each kernel's first candidate runs alone first, so
    that its per-device caches exist before threads share them."""
    from concurrent.futures import ThreadPoolExecutor

    firsts = {}
    for cand in cands:
        firsts.setdefault(cand[0].name, cand)
    for cand in firsts.values():
        _warm(call, cand)
    rest = [c for c in cands if not any(c is f for f in firsts.values())]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda c: _warm(call, c), rest))
    torch.cuda.synchronize(call.x.device)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _disk_cache(name: str, capability: tuple, sms: int, cache_dir: Optional[str],
                shipped: bool) -> tuning_cache.TuningCache:
    import triton

    cache = tuning_cache.TuningCache.for_device(name, capability, sms, triton.__version__, cache_dir)
    if not shipped:
        cache.shipped = None
    return cache


def disk_cache(device_index: int) -> tuning_cache.TuningCache:
    """The tuning cache of a device: the user's file over the table shipped with fxsparse."""
    from fxsparse.options import kernel_settings

    props = torch.cuda.get_device_properties(device_index)
    settings = kernel_settings()
    return _disk_cache(props.name, (props.major, props.minor), props.multi_processor_count, settings.cache_dir,
                       settings.shipped_table)


selector = Selector()
