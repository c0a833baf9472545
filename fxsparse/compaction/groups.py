"""Channel coupling groups: which channels of which layers must be pruned together.

What Torch-Pruning's dependency graph computes, written on the dynamo graph that fxsparse's
backend sees. The model is traced with `torch.compile` and a capturing backend (eval mode,
no_grad, the mode restored after); every call node is classified by
`fxsparse.graph.capture.view` and its channel rule (compaction/rules.py, `Rule.couple`) joins
(tensor, channel) positions in a union-find:

    conv2d (groups=1,   output channel c of the conv <-> member (conv, "conv_out", c)
    or grouped)
                        input channel c of its input <-> member (conv, "conv_in", c)
                        (input and output channels are NOT coupled)
    depthwise conv      input c <-> output c <-> (conv, "conv_out", c)
    batch_norm          input c <-> output c <-> (bn, "bn", c)
    layer_norm          input c <-> output c <-> (ln, "ln", c)
    pointwise, pool,    input c <-> output c
    permute, mul by a parameter
    add, mul (gate)     a c <-> b c <-> output c (a residual couples both producers)
    cat / split         operand k channel c <-> output offset_k + c (and back)
    shuffle             input perm[j] <-> output j
    flatten             channel c <-> features c*H*W .. (c+1)*H*W - 1
    linear              input feature c <-> (linear, "linear_in", c),
                        output feature c <-> (linear, "linear_out", c)
    anything else       (unknown op, the graph output, grouped non-depthwise convs, convs whose
                        weight is not a module parameter) couples nothing, but every channel
                        reaching it is marked not prunable.

Member keys are shared by every call of a module, so a module used twice couples its channels.
A coupled component is a set of (module, kind, index) members; components with the same member
layout (the same (module, kind) list) form one `ChannelGroup` whose i-th channel is the i-th
component: e.g. a residual stream of 64 channels is one group of size 64 whose members are all
the convs writing the stream (conv_out), its BatchNorms and every conv reading it (conv_in).
Only components holding at least one conv_out or linear_out member become groups.

    groups = channel_groups(model, x)
    imp = group_importance(groups[0], p=1)   # per group channel: sum over members of |w|^p
"""
from __future__ import annotations

import contextlib
import itertools
import types
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxsparse.compaction.rules import channel_count, rule_for
from fxsparse.graph.capture import placeholder_source, view_all
from fxsparse.sparsity.read import placeholder_deps

MEMBER_KINDS = ("conv_out", "conv_in", "bn", "linear_in", "linear_out", "ln")
PRODUCER_KINDS = ("conv_out", "linear_out")


@dataclass
class GroupMember:
    module: str  # module path in the model ("" for the root)
    kind: str  # one of MEMBER_KINDS
    indices: list  # the member's channel for each channel of the group (aligned across members)


@dataclass
class ChannelGroup:
    members: list
    prunable: bool
    reason: Optional[str] = None  # why not prunable
    modules: dict = field(default_factory=dict, repr=False)  # module path -> nn.Module

    @property
    def size(self) -> int:
        return len(self.members[0].indices) if self.members else 0

    def of_kind(self, kind: str) -> list:
        return [m for m in self.members if m.kind == kind]

    @property
    def producers(self) -> list:
        """Module paths of the convs whose output channels the group is (conv_out members)."""
        return sorted({m.module for m in self.members if m.kind in PRODUCER_KINDS})

    def __repr__(self) -> str:
        parts = ", ".join(f"{m.module or '<root>'}:{m.kind}" for m in self.members)
        state = "prunable" if self.prunable else f"not prunable ({self.reason})"
        return f"ChannelGroup(size={self.size}, {state}, [{parts}])"


# -- tracing ------------------------------------------------------------------------------

_fresh = itertools.count()


@contextlib.contextmanager
def _recompile_limits(limit: int = 1 << 20):
    import torch._dynamo.config as dcfg

    names = [n for n in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                         "accumulated_cache_size_limit") if hasattr(dcfg, n)]
    old = {n: getattr(dcfg, n) for n in names}
    try:
        for n in names:
            setattr(dcfg, n, max(limit, old[n]))
        yield
    finally:
        for n, v in old.items():
            setattr(dcfg, n, v)


def _run_model(model, *args):
    return model(*args)


def trace_graphs(model: nn.Module, *example_inputs) -> list:
    """The dynamo graphs of `model(*example_inputs)` with their example inputs, as the backend sees
    them: [(GraphModule, [inputs])]. Runs in eval mode under no_grad (so BatchNorm statistics are
    not updated); every module's training flag is restored."""
    graphs = []

    def capture_backend(gm, inputs):
        graphs.append((gm, list(inputs)))
        return gm.forward

    # A fresh code object per call: dynamo's cache (and its recompile limit) is per code object.
    code = _run_model.__code__.replace(co_name=f"_fxsparse_groups_trace_{next(_fresh)}")
    fn = types.FunctionType(code, _run_model.__globals__, code.co_name)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), _recompile_limits():
            torch.compile(fn, backend=capture_backend, dynamic=False)(model, *example_inputs)
    finally:
        for m, t in modes.items():
            m.training = t
        with contextlib.suppress(Exception):
            from torch._C._dynamo.eval_frame import reset_code

            reset_code(code)
    return graphs


# -- union-find -------------------------------------------------------------------------------

class _UnionFind:
    def __init__(self):
        self.parent: list = []

    def add(self, n: int) -> int:
        base = len(self.parent)
        self.parent.extend(range(base, base + n))
        return base

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                ra, rb = rb, ra
            self.parent[ra] = rb

    def union_ranges(self, a: int, b: int, n: int) -> None:
        for i in range(n):
            self.union(a + i, b + i)


class _Builder:
    def __init__(self, model: nn.Module):
        self.model = model
        self.uf = _UnionFind()
        self.tensor_base: dict = {}  # (graph index, node) -> base position
        self.member_base: dict = {}  # (path, kind) -> (base position, channels)
        self.member_of: dict = {}  # position -> (path, kind, index)
        self.blocked: dict = {}  # position -> reason
        self.names: dict = {}
        for name, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                       model.named_buffers(remove_duplicate=False)):
            self.names.setdefault(id(t), name)
        self.first_conv: Optional[str] = None

    # positions ---------------------------------------------------------------------------
    def pos(self, g: int, node) -> Optional[int]:
        if not isinstance(node, fx.Node):
            return None
        key = (g, node)
        if key not in self.tensor_base:
            c = channel_count(node)
            if c is None:
                return None
            self.tensor_base[key] = (self.uf.add(c), c)
        return self.tensor_base[key][0]

    def count(self, g: int, node) -> int:
        return self.tensor_base[(g, node)][1]

    def member(self, path: str, kind: str, channels: int) -> int:
        key = (path, kind)
        if key not in self.member_base:
            base = self.uf.add(channels)
            self.member_base[key] = (base, channels)
            for c in range(channels):
                self.member_of[base + c] = (path, kind, c)
        base, have = self.member_base[key]
        if have != channels:
            raise RuntimeError(f"fxsparse.groups: {path} seen with {have} and {channels} channels")
        return base

    def block(self, g: int, node, reason: str) -> None:
        base = self.pos(g, node)
        if base is None:
            return
        for c in range(self.count(g, node)):
            self.blocked.setdefault(base + c, reason)

    def couple(self, g: int, a, b) -> bool:
        """Channel c of a <-> channel c of b (same count); False when either carries no channels."""
        pa, pb = self.pos(g, a), self.pos(g, b)
        if pa is None or pb is None or self.count(g, a) != self.count(g, b):
            return False
        self.uf.union_ranges(pa, pb, self.count(g, a))
        return True

    # module ownership --------------------------------------------------------------------
    def owner(self, node, values: dict, attrs: tuple, module_type) -> Optional[str]:
        """The module path owning the parameter/buffer placeholders behind `node` (attribute names
        in `attrs`), if exactly one module of `module_type` owns them."""
        if not isinstance(node, fx.Node):
            return None
        owners = set()
        for n in placeholder_deps(node):
            name = self.names.get(id(values.get(n))) or placeholder_source(n)
            if name:
                path, _, attr = name.rpartition(".")
                if attr in attrs:
                    owners.add(path)
        if len(owners) != 1:
            return None
        path = owners.pop()
        try:
            mod = self.model.get_submodule(path) if path else self.model
        except AttributeError:
            return None
        return path if isinstance(mod, module_type) else None

    # the graph walk ------------------------------------------------------------------------
    def add_graph(self, g: int, gm: fx.GraphModule, inputs: list) -> None:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        values = dict(zip(placeholders, inputs))
        views = view_all(gm.graph)
        self.params = set()  # nodes computed from parameters and buffers only: no activation channels
        for n in gm.graph.nodes:
            if n.op == "output":
                for a in n.all_input_nodes:
                    self.block(g, a, "reaches the graph output")
                continue
            if n.op == "get_attr" or n.op == "placeholder" and id(values.get(n)) in self.names:
                self.params.add(n)
            if n.op not in ("call_function", "call_method"):
                continue
            if n.all_input_nodes and all(a in self.params for a in n.all_input_nodes):
                self.params.add(n)  # (e.g. a frozen BatchNorm's scale, a mask times a weight)
                continue
            v = views[n]
            rule_for(v).couple(self, g, n, v, values)

    def block_all(self, g: int, n: fx.Node, reason: str) -> None:
        for a in n.all_input_nodes:
            self.block(g, a, reason)
        self.block(g, n, reason)

    def add_conv(self, g: int, n: fx.Node, v, values: dict) -> None:
        conv = v.conv
        x = conv.input
        path = self.owner(conv.weight, values, ("weight", "weight_orig"), nn.Conv2d)
        px, pn = self.pos(g, x), self.pos(g, n)
        if path is None or px is None or pn is None:
            return self.block_all(g, n, f"conv {n.name}: weight is not a nn.Conv2d parameter")
        if self.first_conv is None:
            self.first_conv = path
        cin, cout = self.count(g, x), self.count(g, n)
        if conv.groups == cin == cout and cin > 1:  # depthwise: channel c in -> channel c out
            self.uf.union_ranges(pn, self.member(path, "conv_out", cout), cout)
            self.uf.union_ranges(px, pn, cout)
        else:  # a grouped conv's input channel c is column c % (cin / groups) of its group's rows
            self.uf.union_ranges(pn, self.member(path, "conv_out", cout), cout)
            self.uf.union_ranges(px, self.member(path, "conv_in", cin), cin)

    # groups ------------------------------------------------------------------------------
    def groups(self) -> list:
        comps = defaultdict(list)
        for p, m in self.member_of.items():
            comps[self.uf.find(p)].append(m)
        reasons = {}
        for p, why in self.blocked.items():
            reasons.setdefault(self.uf.find(p), why)
        by_layout = defaultdict(list)
        for root, members in comps.items():
            if not any(k in PRODUCER_KINDS for _, k, _ in members):
                continue
            members.sort()
            layout = tuple((path, kind) for path, kind, _ in members)
            by_layout[layout].append((members, reasons.get(root)))
        result = []
        for layout, comps_l in by_layout.items():
            comps_l.sort(key=lambda mc: next(i for _, k, i in mc[0] if k in PRODUCER_KINDS))
            members = [GroupMember(path, kind, [mc[0][j][2] for mc in comps_l])
                       for j, (path, kind) in enumerate(layout)]
            why = next((r for _, r in comps_l if r is not None), None)
            mods = {}
            for m in members:
                mods[m.module] = self.model.get_submodule(m.module) if m.module else self.model
            result.append(ChannelGroup(members, why is None, why, mods))
        result.sort(key=lambda grp: (grp.producers, grp.members[0].indices[:1]))
        return result


def channel_groups(model: nn.Module, *example_inputs) -> list:
    """The channel coupling groups of `model` run on `example_inputs` (see the module docstring).

    Returns a list of `ChannelGroup`; `group.prunable` is False (with `group.reason`) when any of
    its channels reaches the graph output or an op fxsparse does not understand.
    """
    return _analyse(model, *example_inputs)[0]


def first_conv(model: nn.Module, *example_inputs) -> Optional[str]:
    """Module path of the first conv the model runs (the stem)."""
    return _analyse(model, *example_inputs)[1]


def _analyse(model: nn.Module, *example_inputs) -> tuple:
    b = _Builder(model)
    for g, (gm, inputs) in enumerate(trace_graphs(model, *example_inputs)):
        b.add_graph(g, gm, inputs)
    return b.groups(), b.first_conv


def _effective_weight(module: nn.Module, name: str = "weight") -> Optional[torch.Tensor]:
    if hasattr(module, name + "_orig") and hasattr(module, name + "_mask"):
        return getattr(module, name + "_orig") * getattr(module, name + "_mask")
    return getattr(module, name, None)


def grouped_columns(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's weight [Cout, Cin / groups, kh, kw] as [Cout, Cin, kh, kw], zero where a
    row's group does not read the input channel: column c is input channel c (conv_in indices)."""
    if groups == 1:
        return weight
    cout, ig = weight.shape[:2]
    og = cout // groups
    out = weight.new_zeros((cout, ig * groups) + tuple(weight.shape[2:]))
    for i in range(groups):
        out[i * og:(i + 1) * og, i * ig:(i + 1) * ig] = weight[i * og:(i + 1) * og]
    return out


def zero_input_channels(mask: torch.Tensor, groups: int, channels) -> None:
    """Zeroes input channels `channels` (conv_in indices) in a conv weight mask: column c for
    groups=1, column c % (Cin / groups) of c's group's rows for a grouped conv."""
    if groups == 1:
        mask[:, channels] = 0
        return
    ig, og = mask.shape[1], mask.shape[0] // groups
    for c in torch.as_tensor(channels).flatten().tolist():
        mask[c // ig * og:(c // ig + 1) * og, c % ig] = 0


@torch.no_grad()
def group_importance(group: ChannelGroup, p: float = 1) -> torch.Tensor:
    """Importance of each channel of the group: the sum over its members of |w|^p of the weights
    that channel owns (conv_out: its filter; conv_in: its input column of every filter; bn: gamma;
    linear_in: its weight column). p=1 ranks as Torch-Pruning's GroupMagnitudeImportance(p=1).
    Masked weights count as the zeros they are. fp32 on the CPU, shape [group.size]."""
    total = torch.zeros(group.size, dtype=torch.float32)
    for m in group.members:
        mod = group.modules[m.module]
        idx = torch.tensor(m.indices, dtype=torch.long)
        if m.kind in ("bn", "ln"):
            w = getattr(mod, "weight", None)
            if w is None:
                continue
            w = w.detach().float().cpu()[idx].abs().pow(p)
        else:
            w = _effective_weight(mod).detach().float().cpu()
            if m.kind in PRODUCER_KINDS:
                w = w[idx].abs().pow(p).flatten(1).sum(1)
            elif m.kind == "conv_in":
                w = grouped_columns(w, getattr(mod, "groups", 1))[:, idx].abs().pow(p).transpose(0, 1).flatten(1).sum(1)
            elif m.kind == "linear_in":
                w = w[:, idx].abs().pow(p).sum(0)
            else:
                raise ValueError(f"unknown member kind {m.kind}")
        total += w
    return total


__all__ = ["ChannelGroup", "GroupMember", "channel_groups", "first_conv", "group_importance", "grouped_columns",
           "trace_graphs", "zero_input_channels"]
