"""The fused op's launcher: `conv2d_triton(args)` runs `torch.ops.fxsparse.conv2d` on CUDA (or on
CPU tensors through the Triton interpreter).

It reads the kept input channels (a view where in_index is a contiguous run, else one gather
copy: choices.select_input), allocates the channels_last output, asks the selector for the
shape's launch (select.py: remembered, cached on disk, or timed among the peers of choices.py)
and runs it, then writes the output channels out_index leaves out (pointer.launch_fill). A
launch chosen for tensors a TMA descriptor could address runs as the same tile of the pointer
kernel on a later call whose tensors it cannot. Under the interpreter one fixed small tile runs.
"""
from __future__ import annotations

from typing import Optional

import torch

from fxsparse.kernels import choices as C
from fxsparse.kernels import pointer
from fxsparse.kernels.problem import ConvArgs, ConvCall, output_size
from fxsparse.kernels.select import Selection, selector
from fxsparse.kernels.tensor_cache import TensorCache
from fxsparse.options import split_k_setting

Tensor = torch.Tensor


def _complement(out_index: Tensor, out_channels: int) -> Tensor:
    """The output channels out_index does not name, ascending, built without a host sync.

    Built on every call, never cached: a tensor kept across calls that was allocated inside
    Inductor's CUDA-graph memory pool is a live allocation the pool does not track, which
    cudagraph trees reject."""
    kept = torch.zeros(out_channels, dtype=torch.int32, device=out_index.device)
    kept.index_fill_(0, out_index.long(), 1)
    # Stable sort puts the unkept (0) channels first, in ascending order; no nonzero() sync.
    return torch.sort(kept, stable=True).indices[: out_channels - out_index.numel()].to(torch.int32)


# in_index -> ("range", start) for a contiguous run (a view of x) or ("gather", 0). Decided once per
# index tensor (one host sync), like the op's checks.
_in_plans = TensorCache()


def _in_plan(in_index: Tensor) -> tuple:
    hit = _in_plans.get(in_index)
    if hit is not None and hit[0] == in_index._version:
        return hit[1]
    if in_index.is_cuda and torch.cuda.is_current_stream_capturing():
        return ("gather", 0)  # no sync inside a capture; decide on a later eager call
    k = in_index.numel()
    start = int(in_index[0]) if k else 0
    run = torch.arange(start, start + k, device=in_index.device, dtype=in_index.dtype)
    plan = ("range", start) if bool(torch.equal(in_index, run)) else ("gather", 0)
    _in_plans.put(in_index, (in_index._version, plan))  # (never holding in_index itself)
    return plan


def select_channels(x: Tensor, in_index: Tensor) -> Tensor:
    """x[:, in_index] as the launches read it (a view for a contiguous run, else one copy)."""
    return C.select_input(x, in_index, _in_plan(in_index))


def _new_output(shape, x: Tensor) -> Tensor:
    # A seam for tests, which swap in a NaN-poisoned allocation to prove every element is written.
    return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)


def conv_call(args: ConvArgs, out: Optional[Tensor] = None) -> ConvCall:
    """`args` as the launches take them (the kept input channels read, the output allocated)."""
    x, weight = args.x, args.weight
    if args.in_index is not None:
        x = select_channels(x, args.in_index)
    n, _, h, w = x.shape
    _, _, kh, kw = weight.shape
    s, p, d = args.stride, args.padding, args.dilation
    stride, padding, dilation = (int(s[0]), int(s[1])), (int(p[0]), int(p[1])), (int(d[0]), int(d[1]))
    shape = (n, args.out_channels, output_size(h, kh, stride[0], padding[0], dilation[0]),
             output_size(w, kw, stride[1], padding[1], dilation[1]))
    if out is None:
        out = _new_output(shape, x)
    elif tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"fxsparse.conv2d: out must be {shape} {x.dtype} on {x.device}")
    return ConvCall(x, weight, args.bias, args.bias_map, args.residual, args.out_index, args.fill, out,
                    stride, padding, dilation, args.activation, bool(args.residual_after_activation))


def _runnable(sel: Selection, call: ConvCall) -> Selection:
    """`sel`, or the same tile of the pointer kernel where this call's tensors do not allow it."""
    if sel.choice is C.POINTER or sel.choice.addressable(call):
        return sel
    cfg = {k: v for k, v in sel.config.items() if k != "maxnreg"}
    return Selection(C.POINTER, cfg, sel.split_k if sel.choice.splits else 1, "as the pointer kernel")


def conv2d_triton(args: ConvArgs, *, out: Optional[Tensor] = None, launch: Optional[Selection] = None,
                  split_k: Optional[int] = None) -> Tensor:
    """Runs the fused conv (`args` already checked by the op).

    `out` (tests): a preallocated output, written in full. `launch` (tests, benchmarks): a fixed
    Selection, bypassing the selector. `split_k`: a forced split-K factor (default: the setting)."""
    call = conv_call(args, out)
    out = call.out
    n, _, ho, wo = out.shape
    nch = call.weight.shape[0]
    if n * ho * wo == 0 or args.out_channels == 0:
        return out
    if nch > 0:
        if split_k is None:
            split_k = split_k_setting()
        if launch is None and not out.is_cuda:  # the interpreter: one small tile, nothing to time
            cfg = dict(pointer.INTERPRET_CONFIG, BLOCK_K=C.block_k(call.weight.shape[1]))
            launch = Selection(C.POINTER, cfg, split_k or 1)
        if launch is None:
            if selector._pending:
                selector.wait()
            launch = selector.launch(call, split_k)[1]
        elif split_k is not None and launch.split_k != split_k:
            launch = Selection(launch.choice, launch.config, split_k, launch.note)
        launch = _runnable(launch, call)
        launch.choice.run(call, launch.config, launch.split_k)
    if args.out_index is not None and nch < args.out_channels:
        pointer.launch_fill(call, _complement(args.out_index, args.out_channels))
    return out
