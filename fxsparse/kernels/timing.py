"""GPU timing shared by the kernel tuner, the lowering's chooser and the benchmark helpers."""
from __future__ import annotations

from typing import Callable

import torch


def cuda_graph_time_ms(fn: Callable[[], object], calls: int = 20, warmup_calls: int = 3,
                       warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median ms per call of `fn` replayed from one CUDA graph holding `calls` calls (kernel time,
    launch gaps hidden). `fn` first runs `warmup_calls` times on a side stream: autotuning, lazy
    initialisation and cuDNN's benchmark mode must finish outside the capture."""
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
