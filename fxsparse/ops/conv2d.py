"""`torch.ops.fxsparse.conv2d`: one fused, channel-compacting 2-D convolution.

    out = epilogue(conv2d(x[:, in_index], weight))   scattered to out_index

Per kept output channel j (a row of `weight`):
    z_j = acc_j + bias_j + bias_map_j[h, w]
Output channels not named by `out_index` hold `fill_c` (0 if no fill): the
pre-activation constant that a pruned channel still carries. Then
    z += residual            (unless residual_after_activation)
    y  = activation(z)
    y += residual            (if residual_after_activation)
The result is channels_last, in x's dtype; accumulation is fp32.

Implementations: CPU -> aten (`reference.py`), or the Triton kernel inside
`triton_on_cpu()` (needs the Triton interpreter, TRITON_INTERPRET=1: how the
kernel is tested without a GPU); CUDA -> the launch the selector picks among the Triton kernels (`fxsparse/kernels/`). The fake
implementation only computes the output's shape, so the op traces under
torch.compile and make_fx. Backward: a plain conv (bias at most, the form training lowers to
the op) gets aten's own `convolution_backward` on the same tensors, only the gradients asked
for (cuDNN on CUDA, as eager's conv backward); a call with an epilogue differentiates the
reference formula.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional

import torch

from fxsparse.kernels.problem import ConvArgs, output_size
from fxsparse.kernels.tensor_cache import TensorCache

from .activations import check_activation
from .reference import conv2d_reference

Tensor = torch.Tensor


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_cpu_kernel = threading.local()


@contextlib.contextmanager
def triton_on_cpu():
    """Runs the op's Triton kernel on CPU tensors, through the Triton interpreter."""
    if not triton_interpreter_on():
        raise RuntimeError("fxsparse: triton_on_cpu() needs TRITON_INTERPRET=1 set before triton is imported")
    previous = getattr(_cpu_kernel, "triton", False)
    _cpu_kernel.triton = True
    try:
        yield
    finally:
        _cpu_kernel.triton = previous


def _use_triton(x: Tensor) -> bool:
    return x.is_cuda or (x.device.type == "cpu" and getattr(_cpu_kernel, "triton", False))


# Index vectors the backend builds are constants: checking each once keeps the
# range check (a device sync on CUDA) off the hot path.
_checked_indices = TensorCache()


def _fail(problem: str) -> None:
    raise ValueError(f"fxsparse.conv2d: {problem}")


def _check_vector(name: str, v: Optional[Tensor], length, device, float_dtype: bool = True) -> None:
    if v is None:
        return
    if v.dim() != 1 or v.shape[0] != length:
        _fail(f"{name} must be a vector of length {length}, got shape {tuple(v.shape)}")
    if v.device != device:
        _fail(f"{name} is on {v.device} but x is on {device}")
    if float_dtype and not v.is_floating_point():
        _fail(f"{name} must be floating point, got {v.dtype}")


def _check_index(name: str, idx: Optional[Tensor], length, bound, device) -> None:
    if idx is None:
        return
    if idx.dtype not in (torch.int32, torch.int64):
        _fail(f"{name} must be int32 or int64, got {idx.dtype}")
    _check_vector(name, idx, length, device, float_dtype=False)
    if isinstance(idx, torch._subclasses.FakeTensor) or idx.numel() == 0:
        return
    if _checked_indices.get(idx) == idx._version:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= bound:
        _fail(f"{name} has values in [{lo}, {hi}], outside [0, {bound})")
    if name == "out_index" and torch.unique(idx).numel() != idx.numel():
        _fail("out_index has repeated channels")
    _checked_indices.put(idx, idx._version)


def check_conv2d_args(args: ConvArgs) -> tuple:
    """Checks every argument; returns the output shape (N, out_channels, Ho, Wo)."""
    (x, weight, bias, stride, padding, dilation, in_index, out_index, out_channels, fill, bias_map, residual,
     activation, _) = args
    if x.dim() != 4:
        _fail(f"x must be 4-D (N, C, H, W), got {x.dim()}-D")
    if weight.dim() != 4:
        _fail(f"weight must be 4-D (Cout, Cin, KH, KW), got {weight.dim()}-D")
    if not x.is_floating_point() or x.dtype == torch.float64 and x.is_cuda:
        _fail(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if weight.dtype != x.dtype:
        _fail(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if weight.device != x.device:
        _fail(f"weight is on {weight.device} but x is on {x.device}")
    for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(v) != 2:
            _fail(f"{name} must have 2 values, got {list(v)}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        _fail(f"stride and dilation must be >= 1 and padding >= 0, got {list(stride)}, {list(dilation)}, {list(padding)}")
    check_activation(activation)
    n, cx, h, w = x.shape
    cout_k, cin_k, kh, kw = weight.shape
    if in_index is None and cx != cin_k:
        _fail(f"x has {cx} channels but weight expects {cin_k} (pass in_index to read a subset)")
    _check_index("in_index", in_index, cin_k, cx, x.device)
    if out_index is None and out_channels != cout_k:
        _fail(f"out_channels={out_channels} differs from weight's {cout_k} rows and no out_index is given")
    if out_index is not None and out_channels < cout_k:
        _fail(f"out_channels={out_channels} is smaller than weight's {cout_k} rows")
    _check_index("out_index", out_index, cout_k, out_channels, x.device)
    if fill is not None and out_index is None:
        _fail("fill needs out_index (without it every output channel is computed)")
    _check_vector("fill", fill, out_channels, x.device)
    _check_vector("bias", bias, cout_k, x.device)
    ho = output_size(h, kh, stride[0], padding[0], dilation[0])
    wo = output_size(w, kw, stride[1], padding[1], dilation[1])
    if ho <= 0 or wo <= 0:
        _fail(f"the output would be empty ({ho}x{wo}) for input {h}x{w}, kernel {kh}x{kw}")
    if bias_map is not None and tuple(bias_map.shape) != (cout_k, ho, wo):
        _fail(f"bias_map must have shape {(cout_k, ho, wo)}, got {tuple(bias_map.shape)}")
    if bias_map is not None and bias_map.device != x.device:
        _fail(f"bias_map is on {bias_map.device} but x is on {x.device}")
    out_shape = (n, out_channels, ho, wo)
    if residual is not None:
        if tuple(residual.shape) != out_shape:
            _fail(f"residual must have the output's shape {out_shape}, got {tuple(residual.shape)}")
        if residual.device != x.device:
            _fail(f"residual is on {residual.device} but x is on {x.device}")
    return out_shape


# Defined with torch.library.Library rather than torch.library.custom_op: a call goes from the
# dispatcher straight to these functions, without custom_op's Python wrappers (host time per call
# counts wherever CUDA graphs are off). The schema is kernels.problem.ConvArgs's, in its order.
_lib = torch.library.Library("fxsparse", "DEF")
_lib.define(
    "conv2d(Tensor x, Tensor weight, Tensor? bias, SymInt[] stride, SymInt[] padding, SymInt[] dilation, "
    "Tensor? in_index, Tensor? out_index, SymInt out_channels, Tensor? fill, Tensor? bias_map, "
    "Tensor? residual, str activation, bool residual_after_activation) -> Tensor")
conv2d = torch.ops.fxsparse.conv2d.default


def _conv2d(*args) -> Tensor:
    args = ConvArgs(*args)
    check_conv2d_args(args)
    if _use_triton(args.x):
        from fxsparse.kernels.conv2d import conv2d_triton

        return conv2d_triton(args)
    return conv2d_reference(args)


def _conv2d_fake(*args) -> Tensor:
    return args[0].new_empty(check_conv2d_args(ConvArgs(*args))).contiguous(memory_format=torch.channels_last)


for _device in ("CPU", "CUDA"):
    _lib.impl("conv2d", _conv2d, _device)
torch.library.register_fake("fxsparse::conv2d", _conv2d_fake, lib=_lib)


_SLOT = {name: i for i, name in enumerate(ConvArgs._fields)}
# (x, weight, bias first: the order the conv backward reads them in)
_GRAD_INPUTS = {name: _SLOT[name] for name in ("x", "weight", "bias", "fill", "bias_map", "residual")}


def _setup_context(ctx, inputs, output):
    ctx.inputs = inputs
    ctx.save_for_backward(*(inputs[i] for i in _GRAD_INPUTS.values()))


def plain_conv(args: ConvArgs) -> bool:
    """Whether the call is a conv plus bias at most: no channel scatter, fill, bias map,
    residual or activation, and at least one output row."""
    return (args.out_index is None and args.fill is None and args.bias_map is None and args.residual is None
            and args.activation == "none" and args.weight.shape[0] > 0)


def _backward(ctx, grad_out):
    inputs = ConvArgs(*ctx.inputs)
    if plain_conv(inputs):
        return _conv_backward(ctx, grad_out)
    return _reference_backward(ctx, grad_out)


def _conv_backward(ctx, grad_out):
    """aten's conv backward on the tensors the forward read: what eager's conv backward runs,
    with no recompute of the forward."""
    x, weight, bias = ctx.saved_tensors[:3]
    args = ConvArgs(*ctx.inputs)
    need = ctx.needs_input_grad
    need_x, need_w, need_b = need[_SLOT["x"]], need[_SLOT["weight"]], bias is not None and need[_SLOT["bias"]]
    result = [None] * len(ConvArgs._fields)
    if not (need_x or need_w or need_b):
        return tuple(result)
    xs = x if args.in_index is None else x.index_select(1, args.in_index.long())
    gx, gw, gb = torch.ops.aten.convolution_backward(
        grad_out.to(x.dtype), xs, weight, None if bias is None else [bias.shape[0]], list(args.stride),
        list(args.padding), list(args.dilation), False, [0, 0], 1, [need_x, need_w, need_b])
    if need_x and args.in_index is not None:  # back to x's channels (repeated ones add up)
        gx = x.new_zeros(x.shape).index_add(1, args.in_index.long(), gx)
    result[_SLOT["x"]], result[_SLOT["weight"]] = gx, gw
    if need_b:
        result[_SLOT["bias"]] = gb.to(bias.dtype)
    return tuple(result)


def _reference_backward(ctx, grad_out):
    # Differentiating the aten formula gives aten's own conv gradients on the compacted weight
    # and the epilogue's through autograd (one recompute of the conv).
    saved = ctx.saved_tensors
    inputs = list(ctx.inputs)
    wanted = []
    with torch.enable_grad():
        for slot, t in zip(_GRAD_INPUTS.values(), saved):
            if t is not None and ctx.needs_input_grad[slot]:
                t = t.detach().requires_grad_(True)
                wanted.append((slot, t))
            inputs[slot] = t
        out = conv2d_reference(ConvArgs(*inputs))
        grads = torch.autograd.grad(out, [t for _, t in wanted], grad_out, allow_unused=True)
    result = [None] * len(inputs)
    for (slot, _), g in zip(wanted, grads):
        result[slot] = g
    return tuple(result)


torch.library.register_autograd("fxsparse::conv2d", _backward, setup_context=_setup_context, lib=_lib)
