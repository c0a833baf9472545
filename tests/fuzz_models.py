"""Random small conv nets, masks and edits for the property tests (tests/test_fuzz.py).

A net is a plain, printable spec (`Net`: input shape + a list of nodes, each reading earlier
nodes by index), so a failing example hypothesis shrinks reads as a model, and `FuzzNet` builds
it as an nn.Module whose forward walks the spec (dynamo unrolls the walk into one graph).
Shapes are tracked while drawing, so every drawn net is valid: convs only with sizes their
padding, dilation and stride allow, adds of equal shapes, concats of equal spatial sizes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune
from hypothesis import strategies as st


# -- the spec --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Conv:
    src: int
    cout: int
    k: tuple  # (kh, kw)
    stride: int = 1
    padding: object = 0  # int, (ph, pw), "same" or "valid"
    padding_mode: str = "zeros"
    dilation: int = 1
    groups: int = 1
    bias: bool = False


@dataclass(frozen=True)
class BN:
    src: int
    affine: bool = True
    momentum: Optional[float] = 0.1  # None: cumulative average (reads num_batches_tracked)
    track_running_stats: bool = True


@dataclass(frozen=True)
class Act:
    src: int
    kind: str
    inplace: bool = False


@dataclass(frozen=True)
class Add:
    a: int
    b: int


@dataclass(frozen=True)
class Cat:
    srcs: tuple


@dataclass(frozen=True)
class Pool:
    src: int
    kind: str  # max | avg | adaptive_avg | adaptive_max
    k: int = 2  # kernel, or output size for the adaptive ones
    stride: int = 2


@dataclass(frozen=True)
class Head:
    """flatten + linear."""
    src: int
    classes: int


@dataclass(frozen=True)
class Net:
    in_shape: tuple  # (N, C, H, W)
    nodes: tuple  # node i + 1 reads earlier nodes by index; node 0 is the input
    outputs: tuple = ()  # the nodes forward returns (a tuple); () returns the last node alone


ACTIVATIONS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "hardswish": nn.Hardswish, "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "hardsigmoid": nn.Hardsigmoid,
    "identity": nn.Identity,
}
INPLACE = ("relu", "relu6", "silu", "hardswish", "leaky_relu", "hardsigmoid")


def out_size(n: int, k: int, stride: int, pad: int, dilation: int = 1) -> int:
    return (n + 2 * pad - dilation * (k - 1) - 1) // stride + 1


def conv_out_hw(spec: Conv, h: int, w: int) -> tuple:
    if spec.padding == "same":
        return h, w
    pad = (0, 0) if spec.padding == "valid" else (
        spec.padding if isinstance(spec.padding, tuple) else (spec.padding, spec.padding))
    return tuple(out_size(n, k, spec.stride, p, spec.dilation) for n, k, p in zip((h, w), spec.k, pad))


def pool_out_hw(spec: Pool, h: int, w: int) -> tuple:
    if spec.kind.startswith("adaptive"):
        return spec.k, spec.k
    return out_size(h, spec.k, spec.stride, 0), out_size(w, spec.k, spec.stride, 0)


def shapes(net: Net) -> list:
    """(C, H, W) of every node, or (features,) after a head."""
    out = [tuple(net.in_shape[1:])]
    for node in net.nodes:
        if isinstance(node, Conv):
            out.append((node.cout, *conv_out_hw(node, *out[node.src][1:])))
        elif isinstance(node, (BN, Act)):
            out.append(out[node.src])
        elif isinstance(node, Add):
            out.append(out[node.a])
        elif isinstance(node, Cat):
            out.append((sum(out[i][0] for i in node.srcs), *out[node.srcs[0]][1:]))
        elif isinstance(node, Pool):
            c, h, w = out[node.src]
            out.append((c, *pool_out_hw(node, h, w)))
        elif isinstance(node, Head):
            out.append((node.classes,))
    return out


# -- the module ------------------------------------------------------------------------------

class FuzzNet(nn.Module):
    """The module a `Net` describes: one submodule per node (`n{i}`), forward walks the nodes."""

    def __init__(self, net: Net):
        super().__init__()
        self.net = net
        dims = shapes(net)
        self.layers = nn.ModuleList(self._layer(node, dims) for node in net.nodes)

    @staticmethod
    def _layer(node, dims) -> nn.Module:
        if isinstance(node, Conv):
            return nn.Conv2d(dims[node.src][0], node.cout, node.k, node.stride, node.padding, node.dilation,
                             node.groups, node.bias, node.padding_mode)
        if isinstance(node, BN):
            return nn.BatchNorm2d(dims[node.src][0], affine=node.affine, momentum=node.momentum,
                                  track_running_stats=node.track_running_stats)
        if isinstance(node, Act):
            cls = ACTIVATIONS[node.kind]
            return cls(inplace=True) if node.inplace else cls()
        if isinstance(node, Pool):
            return {"max": lambda: nn.MaxPool2d(node.k, node.stride), "avg": lambda: nn.AvgPool2d(node.k, node.stride),
                    "adaptive_avg": lambda: nn.AdaptiveAvgPool2d(node.k),
                    "adaptive_max": lambda: nn.AdaptiveMaxPool2d(node.k)}[node.kind]()
        if isinstance(node, Head):
            c, h, w = dims[node.src]
            return nn.Linear(c * h * w, node.classes)
        return nn.Identity()  # Add, Cat: no parameters

    def forward(self, x):
        values = [x]
        for node, layer in zip(self.net.nodes, self.layers):
            if isinstance(node, Add):
                values.append(values[node.a] + values[node.b])
            elif isinstance(node, Cat):
                values.append(torch.cat([values[i] for i in node.srcs], 1))
            elif isinstance(node, Head):
                values.append(layer(torch.flatten(values[node.src], 1)))
            else:
                values.append(layer(values[node.src]))
        return tuple(values[i] for i in self.net.outputs) if self.net.outputs else values[-1]


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (a pruned channel then carries a
    non-zero constant through BN) and biases away from zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.num_batches_tracked.fill_(int(torch.randint(0, 5, (), generator=g)))
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g) + 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / max(1, m.weight[0].numel()) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


# -- drawing nets ------------------------------------------------------------------------------

ALL_ACTS = tuple(ACTIVATIONS)


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pick_src(draw, dims, ok=lambda d: True) -> int:
    """An earlier node whose shape passes `ok`, biased to the latest ones (chains, short skips)."""
    candidates = [i for i, d in enumerate(dims) if len(d) == 3 and ok(d)]
    recent = candidates[-3:]
    return draw(st.sampled_from(recent) if len(recent) == len(candidates) else
                st.one_of(st.sampled_from(recent), st.sampled_from(candidates)))


@st.composite
def conv_nodes(draw, dims, max_channels):
    src = _pick_src(draw, dims)
    cin, h, w = dims[src]
    # dense convs mostly (fxsparse compacts those and depthwise ones; other groupings stay as they are)
    groups = draw(st.sampled_from([1, 1, 1, 1, cin] + _divisors(cin)))
    cout = groups * draw(st.integers(1, max(1, max_channels // groups)))
    kh = draw(st.integers(1, 3))
    kw = draw(st.one_of(st.just(kh), st.integers(1, 3)))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.sampled_from([1, 1, 2]))
    padding = draw(st.one_of(
        st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2)),
        st.sampled_from(["same", "valid"]) if stride == 1 else st.just(0)))
    pads = ((0, 0) if padding == "valid" else ((dilation * (kh - 1) + 1) // 2, (dilation * (kw - 1) + 1) // 2)
            if padding == "same" else padding if isinstance(padding, tuple) else (padding, padding))
    padded = any(pads)
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])) if padded else "zeros"
    if mode == "reflect" and (pads[0] >= h or pads[1] >= w):
        mode = "zeros"
    if mode == "circular" and (pads[0] > h or pads[1] > w):
        mode = "zeros"
    spec = Conv(src, cout, (kh, kw), stride, padding, mode, dilation, groups, draw(st.booleans()))
    oh, ow = conv_out_hw(spec, h, w)
    if oh < 1 or ow < 1:  # too small for this kernel: the smallest valid conv
        spec = Conv(src, cout, (1, 1), 1, 0, "zeros", 1, groups, spec.bias)
    return spec


@st.composite
def other_nodes(draw, dims, features):
    kinds = ["bn", "act", "pool"]
    if any(len(dims[i]) == 3 and dims[i] == dims[j] for i in range(len(dims)) for j in range(i)):
        kinds.append("add")
    kinds.append("cat")
    kind = draw(st.sampled_from(kinds))
    if kind == "bn":
        momentum = draw(st.sampled_from([0.1, 0.5] + ([None] if features.bn_cumulative else [])))
        return BN(_pick_src(draw, dims), draw(st.booleans()), momentum,
                  draw(st.sampled_from([True, True, True, False])))
    if kind == "act":
        src = _pick_src(draw, dims)
        act = draw(st.sampled_from(ALL_ACTS))
        return Act(src, act, act in INPLACE and src > 0 and draw(st.booleans()))
    if kind == "pool":
        src = _pick_src(draw, dims)
        _, h, w = dims[src]
        pool = draw(st.sampled_from(["max", "avg", "adaptive_avg", "adaptive_max"]))
        if pool.startswith("adaptive"):
            return Pool(src, pool, draw(st.integers(1, 2)))
        k = draw(st.integers(1, max(1, min(3, h, w))))
        return Pool(src, pool, k, draw(st.integers(1, 2)))
    if kind == "add":
        pairs = [(j, i) for i in range(len(dims)) for j in range(i) if len(dims[i]) == 3 and dims[i] == dims[j]]
        a, b = draw(st.sampled_from(pairs[-6:]))
        return Add(a, b)
    first = _pick_src(draw, dims)
    same_hw = [i for i, d in enumerate(dims) if len(d) == 3 and d[1:] == dims[first][1:]]
    others = draw(st.lists(st.sampled_from(same_hw), min_size=1, max_size=2))
    return Cat((first, *others))


@dataclass(frozen=True)
class Features:
    """What the generators may produce beyond the common case (a test targeting one turns it on;
    a known bug's trigger can be turned off here until its fix is in)."""
    all_channels: bool = True  # masks removing every output channel of a conv, and convs whose
    #                            result nothing reads (no channel of theirs is live)
    bn_cumulative: bool = True  # BatchNorm momentum=None (its statistics read num_batches_tracked)
    head: bool = True


@st.composite
def nets(draw, features=Features(), max_nodes=6, max_channels=8, max_hw=8, max_batch=3):
    """A random net: a conv first (so every net has one), then convs and other nodes."""
    batch = draw(st.integers(1, max_batch))
    c = draw(st.integers(1, max_channels))
    h, w = draw(st.integers(3, max_hw)), draw(st.integers(3, max_hw))
    dims = [(c, h, w)]
    nodes = []
    count = draw(st.integers(1, max_nodes))
    for i in range(count):
        node = draw(conv_nodes(dims, max_channels) if i == 0 or draw(st.booleans()) else other_nodes(dims, features))
        nodes.append(node)
        dims = shapes(Net((batch, c, h, w), tuple(nodes)))
    if features.head and draw(st.booleans()):
        nodes.append(Head(len(nodes), draw(st.integers(1, 4))))
    net = Net((batch, c, h, w), tuple(nodes))
    if features.all_channels and draw(st.booleans()):
        return net  # the last node only: the others may be computed for nothing
    return Net(net.in_shape, net.nodes, sinks(net))


def traceable_whole(net: Net) -> bool:
    """Whether dynamo traces the net as one graph: a train-mode BatchNorm with momentum=None
    divides by float(num_batches_tracked), a graph break."""
    return not any(isinstance(n, BN) and n.momentum is None for n in net.nodes)


def sinks(net: Net) -> tuple:
    """The nodes no other node reads (the input aside): returning them all, every node is used."""
    read = set()
    for node in net.nodes:
        read.update((node.a, node.b) if isinstance(node, Add) else node.srcs if isinstance(node, Cat) else (node.src,))
    return tuple(i for i in range(1, len(net.nodes) + 1) if i not in read)


# -- masks -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mask:
    layer: int  # index into FuzzNet.layers
    kind: str  # out | in | out_in | all_but_one | all_out | elementwise | nonbinary
    how: str  # prune (custom_from_mask) | zero (written into the weight) | parametrize
    seed: int
    bias: bool = False  # also prune the bias of removed output channels


MASK_KINDS = ("out", "in", "out_in", "all_but_one", "elementwise", "nonbinary")


def mask_tensor(weight: torch.Tensor, kind: str, seed: int) -> torch.Tensor:
    """A mask of weight's shape; dim 0 are output channels, dim 1 input channels (per group)."""
    g = torch.Generator().manual_seed(seed)
    cout, cin = weight.shape[:2]
    mask = torch.ones_like(weight)

    def some(n):  # a random non-empty proper subset (empty where there is none)
        k = int(torch.randint(1, n, (), generator=g)) if n > 1 else 0
        return torch.randperm(n, generator=g)[:k]

    if kind in ("out", "out_in"):
        mask[some(cout)] = 0
    if kind in ("in", "out_in"):
        mask[:, some(cin)] = 0
    if kind == "all_but_one":
        keep = int(torch.randint(0, cout, (), generator=g))
        mask[:keep] = 0
        mask[keep + 1:] = 0
    if kind == "all_out":  # (every input channel too: the next conv then reads constants only)
        mask.zero_()
    if kind == "elementwise":
        mask = (torch.rand(weight.shape, generator=g) > 0.5).to(weight.dtype)
        mask.view(-1)[int(torch.randint(0, mask.numel(), (), generator=g))] = 1  # one channel lives
    if kind == "nonbinary":  # some channels zero, the others scaled by values other than 1
        mask[some(cout)] = 0
        mask *= torch.tensor([0.5, 2.0, -1.0])[torch.randint(0, 3, (cout,), generator=g)].view(-1, *[1] * (weight.dim() - 1))
    return mask


class MaskParam(nn.Module):
    """A parametrization multiplying the weight by a registered mask buffer."""

    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        return w * self.mask


def apply_mask(model: FuzzNet, m: Mask) -> None:
    layer = model.layers[m.layer]
    mask = mask_tensor(layer.weight.detach(), m.kind, m.seed)
    if m.how == "prune":
        prune.custom_from_mask(layer, "weight", mask)
        if m.bias and getattr(layer, "bias", None) is not None:
            prune.custom_from_mask(layer, "bias", (mask.flatten(1) != 0).any(1).to(mask.dtype))
    elif m.how == "parametrize":
        parametrize.register_parametrization(layer, "weight", MaskParam(mask))
    else:
        with torch.no_grad():
            layer.weight.mul_(mask)


@st.composite
def masks(draw, net: Net, features=Features(), force=()):
    """A mask for some convs (and the head); with `force`, one conv gets one of those kinds."""
    kinds = MASK_KINDS + (("all_out",) if features.all_channels else ())
    out = []
    for i, node in enumerate(net.nodes):
        if isinstance(node, Conv) and draw(st.integers(0, 3)) > 0:
            kind = draw(st.sampled_from(kinds))
            out.append(Mask(i, kind, draw(st.sampled_from(["prune", "prune", "zero", "parametrize"])),
                            draw(st.integers(0, 2**16)), draw(st.booleans())))
        elif isinstance(node, Head) and draw(st.booleans()):
            out.append(Mask(i, "in", draw(st.sampled_from(["prune", "zero"])), draw(st.integers(0, 2**16))))
    if force:
        layer = draw(st.sampled_from([i for i, node in enumerate(net.nodes) if isinstance(node, Conv)]))
        out = [m for m in out if m.layer != layer] + [
            Mask(layer, draw(st.sampled_from(force)), draw(st.sampled_from(["prune", "zero", "parametrize"])),
                 draw(st.integers(0, 2**16)), draw(st.booleans()))]
    return tuple(out)


def effective_weight(conv: nn.Module) -> torch.Tensor:
    if hasattr(conv, "weight_mask"):
        return conv.weight_orig * conv.weight_mask
    return conv.weight


def dead_conv(model: nn.Module) -> bool:
    """Whether some conv's weight is zero all over (every output channel, and every input
    channel, removed)."""
    return any(not effective_weight(m).detach().any() for m in model.modules() if isinstance(m, nn.Conv2d))


# -- edits after compiling ----------------------------------------------------------------------

@dataclass(frozen=True)
class Edit:
    """What changes between two calls. Applied to the compiled model's module and to its eager
    twin alike, from the same seed."""
    kind: str  # sgd | load_state_dict | mask_edit | weight_edit | data_write[_refresh] | train | eval
    #            (and the call's: batch | size | grad, test_fuzz.py)
    seed: int = 0


def stored_weight(m: nn.Module) -> Optional[torch.Tensor]:
    """The tensor holding a layer's weight: prune's `weight_orig`, a parametrization's
    `original`, or `weight` itself."""
    if hasattr(m, "weight_orig"):
        return m.weight_orig
    if parametrize.is_parametrized(m, "weight"):
        return m.parametrizations.weight.original
    return m.weight


def grown(net: Net, shape: tuple, seed: int) -> tuple:
    """A larger spatial size for the next call (every conv and pool still fits), where the
    net has no flatten + linear head (its width is fixed)."""
    if any(isinstance(n, Head) for n in net.nodes):
        return shape
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    return n, c, h + int(torch.randint(0, 3, (), generator=g)), w + int(torch.randint(1, 3, (), generator=g))


def _float_params(model):
    return [p for p in model.parameters() if p.is_floating_point()]


def _masks_of(model):
    """The mask tensors a user edits: prune's `*_mask` buffers and parametrization masks."""
    return [b for n, b in model.named_buffers() if n.endswith("_mask") or n.endswith(".mask")]


def apply_edit(model: nn.Module, edit: Edit) -> None:
    g = torch.Generator().manual_seed(edit.seed)
    if edit.kind == "sgd":  # an optimizer step with given gradients (sparsity may change)
        params = _float_params(model)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        torch.optim.SGD(params, lr=0.1, momentum=0.0, weight_decay=0.01).step()
        for p in params:
            p.grad = None
    elif edit.kind == "load_state_dict":  # new values for everything, masks included
        state = model.state_dict()
        new = {}
        for name, t in state.items():
            if name.endswith("num_batches_tracked"):
                new[name] = t + int(torch.randint(0, 3, (), generator=g))
            elif name.endswith("running_var"):
                new[name] = (torch.rand(t.shape, generator=g) + 0.3).to(t.dtype)
            elif name.endswith("mask"):
                new[name] = (torch.rand(t.shape, generator=g) > 0.3).to(t.dtype) * t.ne(0).to(t.dtype) if \
                    bool(torch.randint(0, 2, (), generator=g)) else (torch.rand(t.shape, generator=g) > 0.3).to(t.dtype)
            else:
                new[name] = torch.randn(t.shape, generator=g).to(t.dtype)
        model.load_state_dict(new)
    elif edit.kind == "mask_edit":  # in-place on a mask: one output channel off, or all back on
        found = _masks_of(model)
        if found:
            mask = found[int(torch.randint(0, len(found), (), generator=g))]
            with torch.no_grad():
                if bool(torch.randint(0, 2, (), generator=g)):
                    mask[int(torch.randint(0, mask.shape[0], (), generator=g))] = 0
                else:
                    mask.fill_(1)
    elif edit.kind == "weight_edit":  # in-place on a weight: zero one output channel or revive one
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        w = stored_weight(convs[int(torch.randint(0, len(convs), (), generator=g))])
        row = int(torch.randint(0, w.shape[0], (), generator=g))
        with torch.no_grad():
            if bool(torch.randint(0, 2, (), generator=g)):
                w[row] = 0
            else:
                w[row] = torch.randn(w[row].shape, generator=g).to(w.dtype)
    elif edit.kind in ("data_write", "data_write_refresh"):  # `.data` has its own version counter
        mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
        m = mods[int(torch.randint(0, len(mods), (), generator=g))]
        targets = [t for t in (stored_weight(m), getattr(m, "running_var", None), getattr(m, "weight_mask", None))
                   if t is not None]
        t = targets[int(torch.randint(0, len(targets), (), generator=g))]
        choice = int(torch.randint(0, 3, (), generator=g))
        if choice == 0:
            t.data.mul_(2)
        elif choice == 1:
            t.data.copy_(torch.rand(t.shape, generator=g).to(t.dtype) + 0.25)
        else:
            t.data[int(torch.randint(0, t.shape[0], (), generator=g))] = 1
        if edit.kind == "data_write_refresh":
            import fxsparse

            fxsparse.refresh(model)
    elif edit.kind == "train":
        model.train()
    elif edit.kind == "eval":
        model.eval()
    else:
        raise ValueError(f"unknown edit {edit.kind!r}")
