"""Stage 2, sparsity reading: which channels of each conv's weight are zero.

A conv's weight node is computed from placeholders only (a parameter, or
`mask * weight_orig` from torch.nn.utils.prune, or a parametrization). Two
readings:

* structural zeros, valid whatever the trainable values become: the weight is
  a product in which some factor depends on buffers only (a mask); a channel
  whose mask slice is all zero is zero for any weight. Used in training.
* value zeros, valid for the values seen at compile time: the weight is
  evaluated and its exactly-zero rows and columns are read. Used in inference
  (the runtime guard recompacts when a value changes).

Row and column zeros are what compaction removes (whole output channels,
filter groups, whole input channels). Zeros that form neither (element-wise
masks, 2-D blocks of the (out, in) plane) are left as they are, with the reason.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from fxsparse.graph.capture import Capture, OpView, module_path
from fxsparse.stages import StageError


class SparsityError(ValueError):
    """A mask the user gave cannot be a mask (wrong shape, NaN)."""


@dataclass
class ConvSparsity:
    name: str
    view: OpView
    out_channels: int
    in_channels: int
    kernel_size: tuple
    zero_rows: torch.Tensor  # bool [Cout]: output channel whose whole filter is zero
    zero_cols: torch.Tensor  # bool [Cin / groups]: input channel unused by every filter
    source: str  # "mask", "values" or "none"
    weight: Optional[torch.Tensor] = None  # the evaluated weight (inference)
    bias: Optional[torch.Tensor] = None  # the evaluated bias (inference)
    reason: Optional[str] = None  # why the conv is left unchanged
    notes: list = field(default_factory=list)  # zeros seen but not compacted, and why
    depends_on: list = field(default_factory=list)  # placeholders whose values were read

    @property
    def kind(self) -> str:
        parts = []
        if bool(self.zero_rows.any()):
            parts.append("output channels")
        if bool(self.zero_cols.any()):
            parts.append("input channels")
        return " + ".join(parts) or "none"


# -- evaluating the weight subgraph ------------------------------------------------------

_PASSTHROUGH_METHODS = {"to", "contiguous", "clone", "detach", "type_as", "float", "half", "bfloat16"}


def placeholder_deps(node: fx.Node) -> list:
    seen, stack, deps = set(), [node], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            deps.append(n)
        stack.extend(n.all_input_nodes)
    return deps


def param_only(node: fx.Node, cap: Capture) -> bool:
    """True when `node` depends on parameters and buffers only (not on the model's input)."""
    if not cap.param_only:
        cap.param_only.update(_param_only_nodes(cap.gm.graph, cap))
    known = cap.param_only.get(node)
    return known if known is not None else all(cap.is_param(p) for p in placeholder_deps(node))


def _param_only_nodes(graph: fx.Graph, cap: Capture) -> dict:
    """param_only of every node of `graph`, in one pass in graph order (a node's inputs come
    before it): asked of each activation, a walk back through the graph was quadratic."""
    out = {}
    for n in graph.nodes:
        out[n] = cap.is_param(n) if n.op == "placeholder" else all(out.get(a, False) for a in n.all_input_nodes)
    return out


def evaluate(node, cap: Capture, memo: Optional[dict] = None):
    """Runs the (parameter-only) subgraph that produces `node` on the real tensors, each node
    once per capture (`memo`: the capture's own unless given)."""
    memo = cap.evaluated if memo is None else memo
    if not isinstance(node, fx.Node):
        return node
    if node in memo:
        return memo[node]
    if node.op == "placeholder":
        value = cap.value(node)
    elif node.op in ("call_function", "call_method"):
        args = fx.node.map_arg(node.args, lambda n: evaluate(n, cap, memo))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: evaluate(n, cap, memo))
        with torch.no_grad():
            if node.op == "call_function":
                value = node.target(*args, **kwargs)
            else:
                value = getattr(args[0], node.target)(*args[1:], **kwargs)
    elif node.op == "get_attr":
        value = getattr(cap.gm, node.target)
    else:
        raise ValueError(f"cannot evaluate {node.format_node()}")
    memo[node] = value
    return value


def _structural_zero(node: fx.Node, cap: Capture, shape, name: str) -> Optional[torch.Tensor]:
    """Element mask of zeros that hold whatever the trainable parameters are (None: none known)."""
    if node.op == "call_method" and node.target in _PASSTHROUGH_METHODS:
        return _structural_zero(node.args[0], cap, shape, name)
    if node.op == "call_function" and node.target in (operator.mul, torch.mul):
        zeros = None
        for factor in node.args[:2]:
            if not isinstance(factor, fx.Node):
                if factor == 0:
                    return torch.ones(shape, dtype=torch.bool)
                continue
            if param_only(factor, cap) and not _depends_on_trainable(factor, cap):
                z = _mask_zeros(evaluate(factor, cap), shape, name)
            else:
                z = _structural_zero(factor, cap, shape, name)
            if z is not None:
                zeros = z if zeros is None else zeros | z
        return zeros
    return None


def _depends_on_trainable(node: fx.Node, cap: Capture) -> bool:
    return any(getattr(cap.values.get(p), "requires_grad", False)
               for p in placeholder_deps(node))


def _mask_zeros(mask: torch.Tensor, shape, name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise SparsityError(f"fxsparse: the mask of {name} is not a tensor")
    if torch.isnan(mask).any():
        raise SparsityError(f"fxsparse: the mask of {name} contains NaN")
    try:
        return torch.broadcast_to(mask == 0, shape)  # left on its device: zero_channels reduces it there
    except RuntimeError:
        raise SparsityError(
            f"fxsparse: the mask of {name} has shape {tuple(mask.shape)}, which does not fit its weight {tuple(shape)}"
        ) from None


@dataclass(frozen=True)
class ZeroChannels:
    """A weight's zeros read as channels, on the CPU: its zero rows (output channels) and
    columns (input channels; none for a grouped conv), whether it has any zero, whether any
    is left outside those rows and columns, and whether a mask (`structural`) has any."""
    rows: torch.Tensor
    cols: torch.Tensor
    some: bool
    leftover: bool
    masked: bool


def zero_channels(zero: torch.Tensor, grouped: bool, structural: Optional[torch.Tensor] = None) -> ZeroChannels:
    """Reduces `zero` (the weight's element mask of zeros) where it lives and copies the few
    results to the CPU at once: one sync per conv, and no large tensor work on the host."""
    flat = zero.flatten(2)
    whole, some = flat.all(2), flat.any(2)  # [Cout, Cin / groups]: all / some of the pair's kh * kw are zero
    rows = whole.all(1)
    cols = torch.zeros_like(whole[0]) if grouped else whole.all(0)  # a group's columns are not channels
    flags = torch.stack((some.any(), (some & ~rows[:, None] & ~cols[None, :]).any(),
                         structural.any().to(zero.device) if structural is not None else some.new_zeros(())))
    out = torch.cat((rows, cols, flags)).cpu()
    c = len(rows)
    return ZeroChannels(out[:c], out[c:c + len(cols)], bool(out[-3]), bool(out[-2]), bool(out[-1]))


def _leftover_fraction(zero: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> float:
    """Fraction of the weights still zero once zero rows and columns are removed."""
    rest = zero[~rows.to(zero.device)][:, ~cols.to(zero.device)]
    return float(rest.float().mean())


# -- reading one conv ------------------------------------------------------------------

def other_conv_geometry(node: fx.Node) -> tuple:
    """(out channels, in channels, kernel, stride) of a conv fxsparse leaves alone (conv1d/3d,
    transposed: `torch.conv*`/`F.conv*` or aten.convolution), read for the report; zeros and
    () where the weight has no known shape."""
    def arg(i, name, default=None):
        return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)

    w = arg(1, "weight")
    shape = getattr(w, "meta", {}).get("example_value") if isinstance(w, fx.Node) else None
    if shape is None or not hasattr(shape, "shape"):
        return 0, 0, (), ()
    shape = tuple(int(s) for s in shape.shape)
    if node.target is torch.ops.aten.convolution.default:
        transposed, groups = bool(arg(6, "transposed")), int(arg(8, "groups", 1))
    else:  # conv_transposeNd and convNd both take groups 7th
        transposed, groups = "transpose" in getattr(node.target, "__name__", ""), int(arg(6, "groups", 1))
    cout, cin = (shape[1] * groups, shape[0]) if transposed else (shape[0], shape[1] * groups)
    stride = arg(3, "stride", 1)
    kernel = shape[2:]
    stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride,) * len(kernel)
    return cout, cin, kernel, stride


def read_conv(v: OpView, cap: Capture, inference: bool) -> ConvSparsity:
    name = module_path(v.node)
    conv = v.conv
    wnode = conv.weight if v.kind == "conv2d" else None
    wval = wnode.meta.get("example_value") if isinstance(wnode, fx.Node) else None
    if v.kind != "conv2d" or wval is None:
        reason = v.args.get("reason") if v.kind == "conv_other" else "the weight is not a tensor of the graph"
        empty = torch.zeros(0, dtype=torch.bool)
        cout, cin, kernel, _ = other_conv_geometry(v.node)
        return ConvSparsity(name, v, cout, cin, kernel, empty, empty, "none", reason=f"{reason}: not rewritten")
    cout, cin_g, kh, kw = wval.shape
    sp = ConvSparsity(name, v, cout, cin_g * conv.groups, (kh, kw),
                      torch.zeros(cout, dtype=torch.bool), torch.zeros(cin_g, dtype=torch.bool), "none")
    sp.reason = conv.unsupported and f"{conv.unsupported}: not rewritten"
    if not wval.is_floating_point() or wval.is_complex():
        sp.reason = f"{wval.dtype} weights: not rewritten"
    if not param_only(wnode, cap) or (conv.bias is not None and not param_only(conv.bias, cap)):
        sp.reason = sp.reason or "the weight is computed from the model's inputs (dynamic weight): not rewritten"
    if sp.reason:
        return sp
    structural = _structural_zero(wnode, cap, tuple(wval.shape), name)
    if inference:
        weight = evaluate(wnode, cap)
        sp.weight = weight
        sp.bias = evaluate(conv.bias, cap) if conv.bias is not None else None
        sp.depends_on = placeholder_deps(wnode) + (placeholder_deps(conv.bias) if conv.bias is not None else [])
        zero = weight == 0
    else:
        if structural is None:
            return sp
        zero = structural
        sp.depends_on = [p for p in placeholder_deps(wnode) if not _depends_on_trainable(p, cap)]
    read = zero_channels(zero, conv.groups != 1, structural)
    sp.zero_rows, sp.zero_cols = read.rows, read.cols
    sp.source = "none" if not read.some else "mask" if read.masked else "values"
    if read.leftover:
        leftover = _leftover_fraction(zero, read.rows, read.cols)
        sp.notes.append(f"{leftover:.0%} of the remaining weights are zero but form no whole channel "
                        "(element-wise or 2-D block sparsity): computed as dense")
    return sp


def read_all(cap: Capture, inference: bool) -> dict:
    """Reads every conv of the graph: {conv node: ConvSparsity}."""
    out = {v.node: read_conv(v, cap, inference) for v in cap.convs()}
    for node, sp in out.items():
        check_sparsity(node, sp)
    return out


def check_sparsity(node, sp: ConvSparsity) -> None:
    """One conv's masks agree with its shape (and its evaluated weight and bias, where read).
    A conv left unchanged (a reason) carries no masks."""
    def fail(message):
        raise StageError("sparsity", f"conv {node.name}: {message}", node)

    if sp.reason is not None:
        return

    if tuple(sp.zero_rows.shape) != (sp.out_channels,) or sp.zero_rows.dtype != torch.bool:
        fail(f"zero-row mask {tuple(sp.zero_rows.shape)} {sp.zero_rows.dtype} for {sp.out_channels} output channels")
    if sp.zero_cols.dim() != 1 or sp.zero_cols.dtype != torch.bool:
        fail(f"zero-column mask {tuple(sp.zero_cols.shape)} {sp.zero_cols.dtype} is not a channel mask")
    if sp.weight is not None and tuple(sp.weight.shape[:2]) != (sp.out_channels, len(sp.zero_cols)):
        fail(f"weight {tuple(sp.weight.shape)} does not match its masks "
             f"({sp.out_channels} rows, {len(sp.zero_cols)} columns)")
    if sp.bias is not None and sp.bias.numel() != sp.out_channels:
        fail(f"bias of {sp.bias.numel()} values for {sp.out_channels} output channels")
