"""Kernel launches per call, counted in the code Inductor generates for a graph.

Inductor's wrapper is straight-line code: every kernel it runs per call is one line of its
`call` function (or of a graph partition's function under CUDA graphs). Counting those lines
gives launches per forward without running the model or a profiler. fxsparse's own op
adds the launches it makes beside its conv (the input-channel gather, the fill of removed
output channels), read off the rewritten graph.
"""
from __future__ import annotations

import re
from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.fx as fx

# One pattern per kind of line in Inductor's wrapper that starts work on the device.
_LAUNCH_LINE = {
    "inductor_triton": re.compile(r"^\s*\w+\.run\("),  # a generated Triton kernel
    "inductor_cpp": re.compile(r"^\s*cpp_fused_\w+\("),  # a generated C++ kernel (CPU)
    "extern": re.compile(r"\bextern_kernels\.\w+\("),  # cuDNN / cuBLAS / oneDNN calls
    "fxsparse": re.compile(r"\btorch\.ops\.fxsparse\.\w+\.\w+\("),
    "aten": re.compile(r"\b(?:torch\.ops\.)?aten\.\w+\.\w+\("),  # fallbacks Inductor did not lower
}
_CALL_DEF = re.compile(r"^(\s*)def (?:call|partition_\d+)\(")


def _call_lines(code: str) -> Iterator[str]:
    """The lines of the wrapper's per-call functions (not kernel sources or set-up code)."""
    indent: Optional[int] = None
    for line in code.splitlines():
        m = _CALL_DEF.match(line)
        if m:
            indent = len(m.group(1))
            continue
        if indent is None or not line.strip():
            continue
        if len(line) - len(line.lstrip()) <= indent:
            indent = None
            continue
        yield line


def launch_sites(code: str) -> Counter:
    """{kind: launch lines} in one Inductor wrapper; a line counts once, for its first kind."""
    counts: Counter = Counter()
    for line in _call_lines(code):
        if line.lstrip().startswith("#"):
            continue
        for kind, pattern in _LAUNCH_LINE.items():
            if pattern.search(line):
                counts[kind] += 1
                break
    return counts


def fxsparse_extra_launches(gm: fx.GraphModule) -> int:
    """Launches fxsparse's conv op makes beyond the conv: a gather where it reads a subset of
    input channels, a fill where it writes only some of its output channels."""
    extra = 0
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.fxsparse.conv2d.default):
        weight, in_index, out_index, out_channels = node.args[1], node.args[6], node.args[7], node.args[8]
        extra += in_index is not None
        if out_index is not None and isinstance(weight, fx.Node) and weight.op == "get_attr":
            rows = getattr(gm, weight.target).shape[0]
            extra += rows < out_channels
    return extra


@contextmanager
def captured_inductor_code(sink: list):
    """Appends the wrapper code of every graph Inductor compiles (or loads from its cache)
    inside the block to `sink`, keeping any hook already installed (e.g. run_and_get_code)."""
    from torch._inductor.graph import GraphLowering

    previous = GraphLowering.save_output_code

    def save(code: str) -> None:
        sink.append(code)
        if previous is not None:
            previous(code)

    GraphLowering.save_output_code = save
    try:
        yield sink
    finally:
        GraphLowering.save_output_code = previous


@contextmanager
def triton_codegen_without_gpu():
    """Inside the block Inductor generates Triton kernels for CPU tensors, as it does for a GPU,
    and each kernel is a stub that launches nothing: the wrapper code shows the launches a GPU
    would make, on a machine without one (outputs are meaningless). Reaches into Inductor's
    internals: a counting tool, not a way to run models."""
    import torch._inductor.async_compile as ac
    import torch._inductor.codegen.triton as codegen_triton
    import torch.utils._triton as utils_triton

    class Stub:
        def run(self, *args, **kwargs):
            pass

    guards = torch._C._dynamo.guards
    saved = [(utils_triton, "triton_hash_with_backend"), (codegen_triton, "triton_hash_with_backend"),
             (ac.AsyncCompile, "triton"), (guards, "_empty_strided_cpu")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in saved if hasattr(owner, name)]

    def zeros_strided(size, stride, dtype):
        # buffers the stubs leave unwritten read as zeros (an index fallback such as max-pool's
        # backward scatter would read garbage indices)
        storage = 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else 0
        return torch.zeros(storage, dtype=dtype).as_strided(size, stride)

    stand_ins = {"triton_hash_with_backend": lambda: "codegen-only", "_empty_strided_cpu": zeros_strided,
                 "triton": lambda self, *args, **kwargs: Stub()}
    for owner, name, _ in saved:
        setattr(owner, name, stand_ins[name])
    try:
        with torch._inductor.config.patch(cpu_backend="triton"):
            yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
