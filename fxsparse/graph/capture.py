"""Stage 1, capture: what each node of a dynamo graph means to fxsparse.

Dynamo hands the backend a torch-level FX graph: parameters and buffers are
placeholders (their real tensors are among the example inputs) and modules
appear as calls such as `torch.conv2d`, `F.batch_norm`, `F.relu(inplace=True)`
or `operator.iadd`. `view(node)` binds each call once to the signature of the
function it stands for and names its role (`OpView.kind`), so the later stages
never index positional arguments or compare targets themselves.

Kinds:
  conv2d       2-D convolution (`conv`: the bound ConvArgs)
  conv_other   conv1d/3d, transposed convs: never rewritten (reason given)
  batch_norm   F.batch_norm / torch.batch_norm
  pointwise    channel-independent elementwise op of one tensor (activations,
               scalar arithmetic, eval-mode dropout): `fn` recomputes it
  add          tensor + tensor of the same shape (residual add)
  cat          concatenation along the channel dimension
  pool         max/avg/adaptive pooling (channel-independent)
  flatten      flatten of (N, C, H, W) into (N, C*H*W) (static H, W)
  linear       F.linear (on the last dim: a head, or a 1x1 conv in channels-last layout)
  mul          tensor * tensor (a channel gate such as squeeze-excite, or a scale)
  add_broadcast  tensor + tensor of another shape (a per-channel bias)
  layer_norm   F.layer_norm
  permute      permute of dims (e.g. NCHW <-> NHWC)
  split        split / chunk (a tuple; its `split_item` getitems are the tensors)
  split_item   one tensor of a split: a slice of its input's channels
  shuffle      view -> transpose(1, 2) -> view: ShuffleNet's channel shuffle
  unknown      anything else: the pass keeps every channel it touches
How each kind maps channels is fxsparse/compaction/rules.py.
"""
from __future__ import annotations

import functools
import inspect
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxsparse.ops.activations import ACTIVATIONS
from fxsparse.stages import check_graph


@dataclass
class ConvArgs:
    input: fx.Node
    weight: fx.Node
    bias: Optional[fx.Node]
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    unsupported: Optional[str] = None  # why the conv cannot be rewritten, if it cannot


@dataclass
class OpView:
    kind: str
    node: fx.Node
    args: dict = field(default_factory=dict)
    # the activation name (a key of fxsparse.ops.ACTIVATIONS) where the op is one
    activation: Optional[str] = None
    # recomputes a pointwise op on a tensor standing in for its tensor operand
    fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    conv: Optional[ConvArgs] = None
    inplace: bool = False

    @property
    def channel_input(self) -> Optional[fx.Node]:
        """The operand whose channels this op maps to its output's (None where there is none)."""
        if self.kind == "conv2d":
            return self.conv.input
        if self.kind == "pointwise":
            return self.node.args[0] if self.node.args else None
        return self.args.get("input")


# -- signatures, bound once per target -------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sig(fn):
    return inspect.signature(fn)  # (slow to build: one per signature function, kept)


def _conv2d_sig(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...
def _convolution_sig(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups): ...
def _fbn_sig(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5): ...
def _tbn_sig(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled=True): ...
def _unary_sig(input, *args, **kwargs): ...
def _add_sig(input, other, *, alpha=1, out=None): ...
def _cat_sig(tensors, dim=0, *, out=None): ...
def _flatten_sig(input, start_dim=0, end_dim=-1): ...
def _linear_sig(input, weight, bias=None): ...
def _max_pool_sig(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False): ...
def _avg_pool_sig(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None): ...
def _adaptive_sig(input, output_size, *args, **kwargs): ...
def _dropout_sig(input, p=0.5, training=True, inplace=False): ...
def _layer_norm_sig(input, normalized_shape, weight=None, bias=None, eps=1e-5, *args): ...
def _interpolate_sig(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                     recompute_scale_factor=None, antialias=False): ...


_CONV2D_TARGETS = {torch.conv2d, F.conv2d, torch.ops.aten.conv2d.default}
_OTHER_CONV_TARGETS = {
    torch.conv1d: "conv1d", F.conv1d: "conv1d", torch.conv3d: "conv3d", F.conv3d: "conv3d",
    torch.conv_transpose1d: "transposed conv", torch.conv_transpose2d: "transposed conv",
    torch.conv_transpose3d: "transposed conv", F.conv_transpose1d: "transposed conv",
    F.conv_transpose2d: "transposed conv", F.conv_transpose3d: "transposed conv",
}
_BN_TARGETS = {F.batch_norm: _fbn_sig, torch.batch_norm: _tbn_sig}

# activation targets -> (activation name, extra arguments to check)
_ACTIVATION_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
    F.relu6: "relu6", F.silu: "silu", F.gelu: "gelu", F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.tanh: "tanh", F.tanh: "tanh",
}
_ACTIVATION_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
                       "tanh": "tanh", "tanh_": "tanh"}
_INPLACE_METHODS = {"relu_", "sigmoid_", "tanh_", "add_", "mul_", "hardtanh_", "clamp_"}
_ADD_TARGETS = {operator.add, operator.iadd, torch.add}
_POOL_TARGETS = {
    F.max_pool2d: ("max", _max_pool_sig), torch.max_pool2d: ("max", _max_pool_sig),
    F.avg_pool2d: ("avg", _avg_pool_sig), torch._C._nn.avg_pool2d: ("avg", _avg_pool_sig),
    F.adaptive_avg_pool2d: ("adaptive", _adaptive_sig), torch._C._nn.adaptive_avg_pool2d: ("adaptive", _adaptive_sig),
    F.adaptive_max_pool2d: ("adaptive", _adaptive_sig),
    F.interpolate: ("interpolate", _interpolate_sig),
}
_SPLIT_TARGETS = {torch.split, torch.chunk, torch.tensor_split}
_SPLIT_METHODS = {"split", "chunk", "tensor_split", "split_with_sizes"}
_SCALAR_ARITH = {operator.mul: torch.mul, operator.truediv: torch.div, operator.sub: torch.sub,
                 operator.add: torch.add, torch.mul: torch.mul, torch.div: torch.div, operator.imul: torch.mul,
                 "add": torch.add, "add_": torch.add, "mul": torch.mul, "mul_": torch.mul}


def _bind(sig_fn, node: fx.Node) -> Optional[dict]:
    try:
        bound = _sig(sig_fn).bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _pair(v) -> tuple:
    if isinstance(v, int):
        return (v, v)
    return tuple(int(a) for a in v)


def _is_tensor_node(a) -> bool:
    return isinstance(a, fx.Node) and isinstance(a.meta.get("example_value"), torch.Tensor)


# -- the classifier -----------------------------------------------------------------------

def view(node: fx.Node) -> OpView:
    """What `node` means to fxsparse (`unknown` where it is not sure)."""
    if node.op == "call_function":
        return _view_function(node)
    if node.op == "call_method":
        return _view_method(node)
    return OpView("unknown", node)


def _view_function(node: fx.Node) -> OpView:
    t = node.target
    if t in _CONV2D_TARGETS:
        return _view_conv(node, _bind(_conv2d_sig, node))
    if t is torch.ops.aten.convolution.default:
        args = _bind(_convolution_sig, node)
        if args is None or args["transposed"]:
            return OpView("conv_other", node, args={"reason": "transposed conv"})
        if len(args["stride"]) != 2:
            return OpView("conv_other", node, args={"reason": f"conv{len(args['stride'])}d"})
        return _view_conv(node, args)
    if t in _OTHER_CONV_TARGETS:
        return OpView("conv_other", node, args={"reason": _OTHER_CONV_TARGETS[t]})
    if t in _BN_TARGETS:
        args = _bind(_BN_TARGETS[t], node)
        return OpView("batch_norm", node, args) if args else OpView("unknown", node)
    if t in _ACTIVATION_FUNCTIONS:
        return _view_activation(node, _ACTIVATION_FUNCTIONS[t])
    if t in (F.hardtanh, torch._C._nn.hardtanh):
        args = node.args[1:3] + tuple(node.kwargs.get(k) for k in ("min_val", "max_val") if k in node.kwargs)
        # under dynamic=True dynamo may pass the bounds as symbolic inputs (graph nodes)
        if all(isinstance(a, (int, float)) for a in args[:2]) and tuple(map(float, args[:2])) == (0.0, 6.0):
            return _view_activation(node, "relu6")
        return OpView("unknown", node)
    if t in (F.leaky_relu, F.elu, F.mish, F.softplus):
        return _pointwise(node, lambda z, n=node: n.target(z, *n.args[1:], **_no_inplace(n.kwargs)))
    if t in (F.dropout, F.dropout2d):
        args = _bind(_dropout_sig, node)
        if args is not None and args["training"] is False:
            return OpView("pointwise", node, fn=lambda z: z, inplace=bool(args["inplace"]))
        return OpView("unknown", node)
    if t in _ADD_TARGETS or t in _SCALAR_ARITH:
        return _view_arith(node)
    if t is torch.cat:
        args = _bind(_cat_sig, node)
        if args is None or args["dim"] not in (1, -3):
            return OpView("unknown", node)
        if not all(_is_tensor_node(a) and a.meta["example_value"].dim() == 4 for a in args["tensors"]):
            return OpView("unknown", node)
        return OpView("cat", node, args)
    if t in _POOL_TARGETS:
        kind, sig = _POOL_TARGETS[t]
        args = _bind(sig, node)
        if args is None or args.get("return_indices"):
            return OpView("unknown", node)
        args["pool"] = kind
        return OpView("pool", node, args)
    if t is torch.flatten:
        return _view_flatten(node, _bind(_flatten_sig, node))
    if t is torch.mean:
        return _view_spatial_mean(node)
    if t in (F.layer_norm, torch.layer_norm):
        args = _bind(_layer_norm_sig, node)
        return OpView("layer_norm", node, args) if args else OpView("unknown", node)
    if t is torch.permute:
        return _view_permute(node, node.args[1:] if len(node.args) > 1 else (node.kwargs.get("dims"),))
    if t in _SPLIT_TARGETS:
        return _view_split(node)
    if t is operator.getitem:
        return _view_split_item(node)
    if t is F.linear or t is torch._C._nn.linear:
        args = _bind(_linear_sig, node)
        return OpView("linear", node, args) if args else OpView("unknown", node)
    return OpView("unknown", node)


def _view_method(node: fx.Node) -> OpView:
    name = node.target
    inplace = name in _INPLACE_METHODS
    if name in _ACTIVATION_METHODS:
        return OpView("pointwise", node, activation=_ACTIVATION_METHODS[name],
                      fn=ACTIVATIONS[_ACTIVATION_METHODS[name]], inplace=inplace)
    if name in ("add", "add_", "mul", "mul_"):
        return _view_arith(node, inplace=inplace)
    if name == "flatten":
        return _view_flatten(node, _bind(_flatten_sig, node))
    if name == "permute":
        return _view_permute(node, node.args[1:])
    if name in _SPLIT_METHODS:
        return _view_split(node)
    if name == "contiguous" and _is_tensor_node(node.args[0]):
        return OpView("pointwise", node, fn=lambda z: z)
    if name in ("view", "reshape"):
        return _view_shuffle(node)
    if name == "mean":
        return _view_spatial_mean(node)
    return OpView("unknown", node)


def _view_spatial_mean(node: fx.Node) -> OpView:
    """x.mean([2, 3]) (keepdim or not) of a 4-D activation: a global average pool."""
    x = node.args[0] if node.args else None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if not _is_tensor_node(x) or x.meta["example_value"].dim() != 4 or not isinstance(dims, (list, tuple)):
        return OpView("unknown", node)
    if sorted(d % 4 for d in dims) != [2, 3] or set(node.kwargs) - {"dim", "keepdim"} or len(node.args) > 3:
        return OpView("unknown", node)
    return OpView("pool", node, {"input": x, "pool": "mean"})


def _no_inplace(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k != "inplace"}


def _pointwise(node: fx.Node, fn, activation=None) -> OpView:
    return OpView("pointwise", node, activation=activation, fn=fn,
                  inplace=bool(node.kwargs.get("inplace", False)))


def _view_activation(node: fx.Node, name: str) -> OpView:
    extra = [a for a in node.args[1:] if not isinstance(a, bool)]
    if name != "relu6" and (extra or set(node.kwargs) - {"inplace", "approximate"}):
        return OpView("unknown", node)
    if name == "gelu" and node.kwargs.get("approximate", "none") == "tanh":
        name = "gelu_tanh"
    inplace = bool(node.kwargs.get("inplace", False)) or node.target in (torch.relu_, F.relu_) or (
        len(node.args) > 1 and node.args[1] is True)
    return OpView("pointwise", node, activation=name, fn=ACTIVATIONS[name], inplace=inplace)


def _view_arith(node: fx.Node, inplace: bool = False) -> OpView:
    args = _bind(_add_sig, node) if node.op == "call_function" else None
    if node.op == "call_method" or args is None:
        if len(node.args) != 2 or node.kwargs:
            return OpView("unknown", node)
        args = {"input": node.args[0], "other": node.args[1], "alpha": 1}
    a, b = args["input"], args["other"]
    inplace = inplace or node.target in (operator.iadd, operator.imul)
    is_add = node.target in _ADD_TARGETS or node.target in ("add", "add_")
    if args.get("alpha", 1) != 1:
        return OpView("unknown", node)
    if is_add and _is_tensor_node(a) and _is_tensor_node(b):
        sa, sb = a.meta["example_value"].shape, b.meta["example_value"].shape
        if sa == sb and len(sa) in (2, 4):
            return OpView("add", node, {"a": a, "b": b}, inplace=inplace)
        if tuple(node.meta["example_value"].shape) in (tuple(sa), tuple(sb)):  # e.g. x + bias[C, 1, 1]
            return OpView("add_broadcast", node, {"a": a, "b": b}, inplace=inplace)
        return OpView("unknown", node)
    if node.target in (operator.mul, operator.imul, torch.mul, "mul", "mul_") and _is_tensor_node(a) and _is_tensor_node(b):
        sa, sb = a.meta["example_value"].shape, b.meta["example_value"].shape
        if tuple(node.meta["example_value"].shape) in (tuple(sa), tuple(sb)):
            return OpView("mul", node, {"a": a, "b": b}, inplace=inplace)
        return OpView("unknown", node)
    # one tensor and a Python scalar: channel-independent
    if _is_tensor_node(a) and isinstance(b, (int, float)):
        op = _SCALAR_ARITH.get(node.target, torch.add)
        return OpView("pointwise", node, fn=lambda z, s=b, op=op: op(z, s), inplace=inplace)
    if _is_tensor_node(b) and isinstance(a, (int, float)) and node.target in (operator.add, operator.mul, torch.add, torch.mul):
        op = _SCALAR_ARITH[node.target]
        return OpView("pointwise", node, fn=lambda z, s=a, op=op: op(s, z), inplace=inplace)
    return OpView("unknown", node)


def _view_flatten(node: fx.Node, args: Optional[dict]) -> OpView:
    if args is None:
        return OpView("unknown", node)
    src = args["input"]
    if not _is_tensor_node(src):
        return OpView("unknown", node)
    shape = src.meta["example_value"].shape
    if len(shape) == 4 and args["start_dim"] == 1 and args["end_dim"] in (-1, 3) and all(
            isinstance(d, int) for d in shape[2:]):
        return OpView("flatten", node, args)
    return OpView("unknown", node)


def _view_permute(node: fx.Node, dims) -> OpView:
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    x = node.args[0] if node.args else node.kwargs.get("input")
    if not _is_tensor_node(x) or not all(isinstance(d, int) for d in dims):
        return OpView("unknown", node)
    ndim = x.meta["example_value"].dim()
    dims = [d % ndim for d in dims]
    if sorted(dims) != list(range(ndim)):
        return OpView("unknown", node)
    return OpView("permute", node, {"input": x, "dims": dims})


def _view_split(node: fx.Node) -> OpView:
    x = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("tensor"))
    parts = node.meta.get("example_value")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if not _is_tensor_node(x) or not isinstance(parts, (tuple, list)) or not isinstance(dim, int):
        return OpView("unknown", node)
    dim %= x.meta["example_value"].dim()
    sizes = [p.shape[dim] for p in parts]
    if not all(isinstance(c, int) for c in sizes) or sum(sizes) != x.meta["example_value"].shape[dim]:
        return OpView("unknown", node)
    return OpView("split", node, {"input": x, "dim": dim, "sizes": sizes})


def _view_split_item(node: fx.Node) -> OpView:
    src, i = node.args
    if not isinstance(src, fx.Node) or not isinstance(i, int) or src.op not in ("call_function", "call_method"):
        return OpView("unknown", node)
    sv = view(src)
    if sv.kind != "split":
        return OpView("unknown", node)
    sizes = sv.args["sizes"]
    return OpView("split_item", node, {"input": sv.args["input"], "dim": sv.args["dim"],
                                       "start": sum(sizes[:i]), "size": sizes[i], "split": src})


def _shape_args(node: fx.Node) -> Optional[tuple]:
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


def _view_shuffle(node: fx.Node) -> OpView:
    """x.view(N, g, C/g, H, W).transpose(1, 2)[.contiguous()].view(N, C, H, W): out channel j is
    in channel (j % g) * (C / g) + j // g (the final view is the op; the others are its parts)."""
    out = node.meta.get("example_value")
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        return OpView("unknown", node)
    prev = node.args[0]
    if isinstance(prev, fx.Node) and prev.op == "call_method" and prev.target == "contiguous":
        prev = prev.args[0]
    if not (isinstance(prev, fx.Node) and (prev.target in ("transpose", torch.transpose))
            and tuple(a % 5 for a in prev.args[1:3]) in ((1, 2), (2, 1))):
        return OpView("unknown", node)
    split = prev.args[0]
    if not (isinstance(split, fx.Node) and split.op == "call_method" and split.target in ("view", "reshape")):
        return OpView("unknown", node)
    x = split.args[0]
    if not _is_tensor_node(x):
        return OpView("unknown", node)
    xs, mid = x.meta["example_value"].shape, split.meta["example_value"].shape
    if (x.meta["example_value"].dim() != 4 or len(mid) != 5 or tuple(out.shape) != tuple(xs)
            or (mid[0], mid[1] * mid[2], mid[3], mid[4]) != tuple(xs)
            or not all(isinstance(d, int) for d in mid)):
        return OpView("unknown", node)
    parts = [p for p in (split, prev, node.args[0]) if p is not node]
    return OpView("shuffle", node, {"input": x, "groups": int(mid[1]), "parts": parts})


def _view_conv(node: fx.Node, args: Optional[dict]) -> OpView:
    if args is None:
        return OpView("unknown", node)
    if any(isinstance(a, fx.Node) for k in ("stride", "padding", "dilation", "groups")
           for a in (args[k] if isinstance(args[k], (tuple, list)) else (args[k],))):
        # e.g. under FSDP2, whose modules dynamo does not specialise: their ints are graph inputs
        return OpView("conv_other", node, args={"reason": "stride, padding, dilation or groups given as graph values"})
    x = args["input"]
    stride, dilation = _pair(args["stride"]), _pair(args["dilation"])
    padding = args["padding"]
    unsupported = None
    weight_val = args["weight"].meta.get("example_value") if isinstance(args["weight"], fx.Node) else None
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif weight_val is not None and all(
            (d * (k - 1)) % 2 == 0 for d, k in zip(dilation, weight_val.shape[2:])
        ):
            padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, weight_val.shape[2:]))
        else:
            unsupported, padding = "padding='same' with an even kernel (asymmetric padding)", (0, 0)
    padding = _pair(padding)
    if weight_val is None or weight_val.dim() != 4:
        unsupported = unsupported or "the weight is not a 4-D tensor of the graph"
    conv = ConvArgs(x, args["weight"], args["bias"], stride, padding, dilation, int(args["groups"]), unsupported)
    return OpView("conv2d", node, args, conv=conv)


# -- where a node came from -------------------------------------------------------------

_SOURCE_PREFIX = re.compile(r"^L\['[^']+'\]\.?")


def module_path(node: fx.Node) -> str:
    """The source module path of a call node, e.g. `layer1.0.conv1` (else the node's name)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        path = _SOURCE_PREFIX.sub("", path)
        path = re.sub(r"\[(\d+)\]", r".\1", path).strip(".")
        path = re.sub(r"\._modules\['([^']+)'\]", r".\1", "." + path).strip(".")
        if path:
            return path
    return node.name


def placeholder_source(node: fx.Node) -> Optional[str]:
    """`conv1.weight_orig` for a lifted parameter or buffer placeholder; None for user inputs."""
    # dynamo deletes meta["grapharg"] once the backend returns, but a recompaction at call
    # time still needs to know which inputs are parameters: remember the answer on the node
    if _SOURCE_KEY in node.meta:
        return node.meta[_SOURCE_KEY]
    node.meta[_SOURCE_KEY] = _source_path(node)
    return node.meta[_SOURCE_KEY]


_SOURCE_KEY = "_fxsparse_source"


def _source_path(node: fx.Node) -> Optional[str]:
    name = _source_name(node)
    if name is None:
        return None
    if "_parameters[" not in name and "_buffers[" not in name and "." not in _SOURCE_PREFIX.sub("", name):
        return None
    path = _SOURCE_PREFIX.sub("", name)
    path = re.sub(r"_(modules|parameters|buffers)\['([^']+)'\]", r"\2", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".") or None


# -- BatchNorm statistics that change without a version bump ----------------------------

# aten's batch_norm updates running_mean / running_var in place without bumping their
# `_version` (its schema does not mark them mutated), so a train-mode forward run eagerly
# is invisible to a version check of the statistics themselves. The same forward increments
# the module's `num_batches_tracked` with `add_`, which is a versioned write: that counter
# is what the guard watches in their place.
_RUNNING_STAT = re.compile(r"^(?P<buffers>.+\._buffers)\['running_(?:mean|var)'\]$")
_COUNTER_KEY = "_fxsparse_bn_counter"


def running_stat_counter(node: fx.Node) -> tuple:
    """(whether placeholder or attribute `node` holds a BatchNorm running mean or variance, the
    `num_batches_tracked` buffer beside it or None). The buffer is looked up in the frame
    dynamo is compiling, so only while it compiles; the answer is kept on the node for
    recompactions at call time."""
    if _COUNTER_KEY not in node.meta:
        name = _source_name(node)
        match = _RUNNING_STAT.match(name) if name else None
        node.meta[_COUNTER_KEY] = (match is not None, _find_counter(match["buffers"]) if match else None)
    return node.meta[_COUNTER_KEY]


def _source_name(node: fx.Node) -> Optional[str]:
    """Dynamo's source expression for a placeholder, or for an attribute it installed (under
    Inductor's freezing, parameters and buffers arrive as attributes)."""
    if node.op == "get_attr":
        sources = getattr(node.graph.owning_module, "_param_name_to_source", None) or {}
        source = sources.get(node.target)
    else:  # (a piece of a graph DDPOptimizer split keeps the source on the node)
        source = getattr(node.meta.get("grapharg"), "source", None) or getattr(node, "_dynamo_source", None)
    name = getattr(source, "name", None)
    if callable(name):  # older torch: a method
        name = name()
    return name if isinstance(name, str) else None


def _in_compiled_frame(source: str):
    """The value of dynamo's source expression in the frame being compiled (raises where there
    is none, or the expression cannot be evaluated)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    # the source is dynamo's own guard expression over the frame's locals (L) and globals (G)
    return eval(source, {"__builtins__": {}}, {"L": tx.f_locals, "G": tx.f_globals})


def _find_counter(buffers_source: str) -> Optional[torch.Tensor]:
    try:
        counter = _in_compiled_frame(buffers_source).get("num_batches_tracked")
    except Exception:  # noqa: BLE001 - no frame being compiled, or a source we cannot evaluate
        return None
    return counter if isinstance(counter, torch.Tensor) else None


def real_example_inputs(gm: fx.GraphModule, example_inputs) -> list:
    """`example_inputs` with each fake parameter or buffer replaced by the real tensor it stands
    for. DDPOptimizer compiles every piece of the graph it splits with fake example inputs;
    masks and weights must be read from the real ones (looked up by the placeholder's source
    in the frame dynamo is compiling). Activations stay fake; so does a tensor not found."""
    from torch._subclasses.fake_tensor import FakeTensor

    out = list(example_inputs)
    for i, p in enumerate(gm.graph.find_nodes(op="placeholder")[:len(out)]):
        if not isinstance(out[i], FakeTensor) or placeholder_source(p) is None:
            continue
        try:
            real = _in_compiled_frame(_source_name(p))
        except Exception:  # noqa: BLE001 - not found: the value stays unknown (fake)
            continue
        if isinstance(real, torch.Tensor) and not isinstance(real, FakeTensor) and real.shape == out[i].shape:
            out[i] = real
    return out


@dataclass
class Capture:
    """The graph's placeholders with their real tensors, and a view of every call node."""
    gm: fx.GraphModule
    values: dict  # placeholder node -> example input (real tensor, SymInt or other)
    views: dict  # call node -> OpView
    read: dict = field(default_factory=dict)  # placeholders whose values a decision used
    # placeholders the graph itself writes (a BatchNorm's step counter, a module's own
    # `self.count.add_(1)`): their values change every call, so nothing folds them
    written: frozenset = frozenset()
    # what every stage computes once about the (unchanging) graph and its values: node -> the
    # evaluated tensor of a parameter-only subgraph (sparsity.read.evaluate), node -> whether
    # it depends on parameters and buffers only (param_only)
    evaluated: dict = field(default_factory=dict, repr=False)
    param_only: dict = field(default_factory=dict, repr=False)

    def value(self, node) -> Any:
        """The real tensor behind a placeholder, remembered as a value the result depends on."""
        self.read[node] = True
        return self.values.get(node)

    def is_param(self, node) -> bool:
        return node in self.values and node not in self.written and placeholder_source(node) is not None

    def convs(self) -> list:
        return [v for v in self.views.values() if v.kind in ("conv2d", "conv_other")]


def capture(gm: fx.GraphModule, example_inputs) -> Capture:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for p in placeholders:  # at compile time, while dynamo's grapharg metadata still exists
        placeholder_source(p)
    values = dict(zip(placeholders, example_inputs))
    check_graph("capture", gm)
    return Capture(gm, values, view_all(gm.graph), written=written_placeholders(gm.graph))


def view_all(graph: fx.Graph) -> dict:
    """{call node: OpView} for a graph; the inner nodes of a channel shuffle whose only user is
    the next are its `shuffle_part`s (the shuffle reads their input itself)."""
    views = {n: view(n) for n in graph.nodes if n.op in ("call_function", "call_method")}
    for v in list(views.values()):
        if v.kind == "shuffle" and all(len(p.users) == 1 for p in v.args["parts"]):
            for p in v.args["parts"]:
                views[p] = OpView("shuffle_part", p)
    return views


# -- in-place writes ------------------------------------------------------------------------

def written_args(node: fx.Node) -> list:
    """The nodes whose tensors `node` writes in place: the first argument of an in-place method
    or function (`add_`, `operator.iadd`, `setitem`, `F.relu(inplace=True)`), an `out=`, the
    running statistics of a train-mode batch_norm, a mutable aten schema's written arguments."""
    if node.op not in ("call_function", "call_method"):
        return []
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        schema_args = target._schema.arguments
        return [a for a, s in zip(_bound_args(node, schema_args), schema_args)
                if isinstance(a, fx.Node) and s.alias_info is not None and s.alias_info.is_write]
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    first = node.args[0] if node.args else None
    out = [node.kwargs["out"]] if isinstance(node.kwargs.get("out"), fx.Node) else []
    if (name.endswith("_") and not name.endswith("__")) or node.kwargs.get("inplace") is True or target in (
            operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
            operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
            operator.irshift, operator.imatmul, "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"):
        out.append(first)
    if name in ("batch_norm", "instance_norm") and _bn_training(node):
        out.extend(a for a in node.args[1:3] + tuple(node.kwargs.get(k) for k in ("running_mean", "running_var")))
    return [a for a in out if isinstance(a, fx.Node)]


def _bound_args(node: fx.Node, schema_args) -> list:
    return [node.args[i] if i < len(node.args) else node.kwargs.get(s.name) for i, s in enumerate(schema_args)]


def _bn_training(node: fx.Node) -> bool:
    # F.batch_norm(input, running_mean, running_var, weight, bias, training, ...); the
    # torch.batch_norm / instance_norm positions differ, so anything not provably False counts
    training = node.kwargs.get("training", node.kwargs.get("use_input_stats"))
    if training is None:
        training = node.args[5] if len(node.args) > 5 else None
    return training is not False


# Ops whose result is a new tensor, never a view of an argument: a write to their result does
# not reach the argument (torchvision's ConvNeXt: `result = layer_scale * x; result += input`).
_FRESH_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.matmul, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.matmul, torch.cat, torch.stack, torch.clone,
    torch.conv2d, F.conv2d, F.linear, torch._C._nn.linear})
_FRESH_METHODS = frozenset({"add", "sub", "mul", "div", "matmul", "clone",
                            "__add__", "__sub__", "__mul__", "__truediv__", "__matmul__"})


def _fresh_result(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS
    return node.op == "call_method" and node.target in _FRESH_METHODS


def written_placeholders(graph: fx.Graph) -> frozenset:
    """Placeholders some node of `graph` writes, directly or through a view or an in-place
    op's result (`buf.mul_(2).add_(1)`, `buf[1:].fill_(0)`): each written node is traced back
    through first arguments to the placeholder it aliases, stopping at an op known to return a
    new tensor (an over-approximation otherwise)."""
    written = set()
    for node in graph.nodes:
        for a in written_args(node):
            while isinstance(a, fx.Node) and a.op != "placeholder":
                a = None if _fresh_result(a) else (a.args[0] if a.args else None)
            if isinstance(a, fx.Node):
                written.add(a)
    return frozenset(written)
