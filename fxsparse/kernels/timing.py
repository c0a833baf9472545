"""The one way fxsparse times GPU work: the selector's candidates, the lowering's and the `nn`
module's alternatives, `benchmark_module` and the benchmark scripts."""
from __future__ import annotations

from typing import Callable


def cuda_graph_time_ms(fn: Callable[[], object], calls: int = 20, warmup_calls: int = 3,
                       warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median ms per call of `fn` replayed from one CUDA graph holding `calls` calls (kernel time,
    launch gaps hidden). `fn` first runs `warmup_calls` times on a side stream: autotuning, lazy
    initialisation and cuDNN's benchmark mode must finish outside the capture."""
    import torch
    import triton

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup_calls):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    try:
        ms = triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    finally:
        torch.cuda.synchronize()
        del graph
    return ms / calls


def plain_time_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median ms per plain call of `fn` on CUDA (`triton.testing.do_bench`: host overhead, guards
    and launches included)."""
    import triton

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def gpu_time_ms(fn: Callable[[], object], graphed: bool = True, quick: bool = False) -> float:
    """How the selector times an alternative: CUDA-graph replay (GPU time only, as the backend runs
    under CUDA graphs by default), or the plain call where the caller will not run under graphs (host
    launch cost included) or `fn` cannot be captured. `quick`: the short budget of a launch candidate
    (timing on plain calls with L2 flushes counted host time too and let slower launches win)."""
    calls, warmup_calls, warmup_ms, rep_ms = (10, 1, 2, 10) if quick else (10, 2, 10, 30)
    if graphed:
        try:
            return cuda_graph_time_ms(fn, calls, warmup_calls, warmup_ms, rep_ms)
        except Exception:  # noqa: BLE001 - no capture of `fn` (a launch candidate's failure is its own)
            if quick:
                raise
    fn()
    return plain_time_ms(fn, warmup_ms, rep_ms)
