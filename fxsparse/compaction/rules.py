"""Per-op channel rules: how each kind of op maps channels from its inputs to its output.

One `Rule` per op kind (`OpView.kind`, graph/capture.py) serves every stage that reasons
about channels, so adding an op is one entry in `RULES` (and its kind in capture.py):

    axis(v)                     the dim of the op's output that holds channels (NCHW: 1; a
                                permute to channels-last moves it to 3; a linear's is its last)
    live(prop, n, v, out_live)  propagation pass 1: which input channels the live output
                                channels need (`prop._need(input, mask)`)
    layout(prop, n, v, c)       propagation pass 2: the output's `Layout` from the input
                                layouts, or a string saying why the op cannot carry them
    no_result(prop, n, v)       pass 2 for an op without a channel result (default: its
                                inputs are read at full width)
    couple(b, g, n, v, values)  channel groups (groups.py): union-find of coupled channels
    emit(low, n, v)             lowering (lowering/rewrite.py): the op on compacted tensors;
                                None copies the node as it is (inputs in their layouts)

The rule kinds, in Torch-Pruning's terms: elementwise (pointwise, add, mul, batch_norm,
pool, permute: channel c in <-> channel c out), concat (offsets), split (slices), shuffle
(a permutation), flatten (channel c -> features c*HW..), conv / linear (consumer of input
channels, producer of output channels), layer_norm (every input channel reaches every
output), and the stopper: an op without a rule, or whose rule does not `fit` it, reads every
input at full width, its output is full, none of its channels is prunable and the report
names it. Nothing is assumed elementwise that is not known to be.

`channel_axis` / `channel_count` are the one definition of which dim is a node's channels.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from fxsparse.compaction.plan import CONST_DTYPE, Layout, at_least_one
from fxsparse.graph.capture import OpView, view
from fxsparse.kernels.layout import select_channels
from fxsparse.sparsity.read import param_only

_AXIS = "_fxsparse_channel_axis"
SKIP = object()  # emit(): the node needs no emitted value (its users read its input)


# -- which dim holds channels -----------------------------------------------------------------

def _channel_tensor(node) -> Optional[torch.Tensor]:
    val = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() not in (2, 4) or not val.is_floating_point():
        return None
    return val


def channel_axis(node) -> Optional[int]:
    """The dim holding `node`'s channels (a 4-D activation or a 2-D feature matrix); None for
    anything else."""
    if not isinstance(node, fx.Node):
        return None
    if _AXIS not in node.meta:
        _annotate(node.graph)
    return node.meta.get(_AXIS)


def _annotate(graph: fx.Graph) -> None:
    for n in graph.nodes:  # in order: an input's axis is known before its users'
        if _AXIS in n.meta:
            continue
        axis = None
        if _channel_tensor(n) is not None:
            axis = 1
            if n.op in ("call_function", "call_method"):
                v = view(n)
                rule = RULES.get(v.kind)
                if rule is not None:
                    axis = rule.axis(v) if rule.axis(v) is not None else 1
        n.meta[_AXIS] = axis


def channel_count(node) -> Optional[int]:
    """Channels of a 4-D activation or a 2-D feature matrix (on its channel axis); None else."""
    val = _channel_tensor(node)
    if val is None:
        return None
    c = val.shape[channel_axis(node)]
    if isinstance(c, torch.SymInt):
        # dynamic=True makes an input's channel dim symbolic too, though the weights it meets
        # specialise it: the shape env then knows its value
        c = c.node.maybe_as_int()
    return c if isinstance(c, int) else None


def _axis_of(node) -> Optional[int]:
    return channel_axis(node) if isinstance(node, fx.Node) else None


# -- rules --------------------------------------------------------------------------------------

class Rule:
    """A stopper: every input at full width, a full output, nothing coupled."""
    #: runs with propagation off too (a conv still compacts itself)
    when_disabled = False

    def fits(self, v: OpView) -> bool:
        return True

    def axis(self, v: OpView) -> Optional[int]:
        return 1

    def why(self, v: OpView) -> str:
        n = v.node
        target = n.target if n.op == "call_method" else getattr(n.target, "__name__", n.target)
        if v.kind in RULES:
            return f"{v.kind} {n.name} ({target}) in a form fxsparse does not carry channels through"
        return f"unknown op {n.name} ({target})"

    def live(self, prop, n, v, out_live) -> None:
        for a in n.all_input_nodes:
            prop._need(a)

    def layout(self, prop, n, v, c):
        return self.why(v)

    def no_result(self, prop, n, v) -> None:
        prop._materialize_inputs(n)

    def couple(self, b, g, n, v, values) -> None:
        b.block_all(g, n, self.why(v))

    def emit(self, low, n, v):
        return None


STOP = Rule()


class Elementwise(Rule):
    """Channel c of the output is a function of channel c of `v.channel_input` only (its other
    tensor operands, if any, are read whole): activations, scalar arithmetic, pooling."""

    def source(self, v):
        return v.channel_input

    def fits(self, v):
        x = self.source(v)
        return _axis_of(x) is not None and channel_count(x) == channel_count(v.node)

    def axis(self, v):
        return _axis_of(self.source(v))

    def live(self, prop, n, v, out_live):
        if out_live is None:
            return super().live(prop, n, v, out_live)
        prop._need(self.source(v), out_live)
        prop._need_rest(n, self.source(v))

    def couple(self, b, g, n, v, values):
        x = self.source(v)
        if not b.couple(g, x, n):
            return b.block_all(g, n, f"{v.kind} op {n.name} changes the channel count")
        for a in n.all_input_nodes:
            if a is not x:
                b.block(g, a, f"operand of {n.name}")


class Pointwise(Elementwise):
    def layout(self, prop, n, v, c):
        lin = prop.input_layout(v.node.args[0])
        const = v.fn(lin.const.reshape(1, -1, 1, 1)).reshape(-1).to(CONST_DTYPE)
        return Layout(c, lin.kept, const)


class Permute(Elementwise):
    """A permute moves the channel dim (NCHW <-> NHWC); channels stay as they are stored."""

    def fits(self, v):
        return _axis_of(v.args["input"]) is not None

    def axis(self, v):
        return v.args["dims"].index(_axis_of(v.args["input"]))

    def layout(self, prop, n, v, c):
        lin = prop.input_layout(v.args["input"])
        return Layout(c, lin.kept, lin.const.clone())


class Pool(Elementwise):
    def fits(self, v):
        return super().fits(v) and _axis_of(v.args["input"]) == 1

    def axis(self, v):
        return 1

    def layout(self, prop, n, v, c):
        lin = prop.input_layout(v.args["input"])
        if prop._uniform_pool(v):
            return Layout(c, lin.kept, lin.const.clone())
        prop.materialize[(v.args["input"], n)] = prop._physical(lin, v.args["input"])
        return Layout(c, prop.materialize[(v.args["input"], n)].kept, lin.const.clone())


class BatchNorm(Elementwise):
    def fits(self, v):
        return super().fits(v) and _axis_of(v.args["input"]) == 1

    def axis(self, v):
        return 1

    def live(self, prop, n, v, out_live):
        if v.args.get("training") is not False and isinstance(v.args.get("running_mean"), fx.Node):
            out_live = None  # its running-statistics update reads every channel, live or not
        super().live(prop, n, v, out_live)

    def layout(self, prop, n, v, c):
        if not prop._foldable_bn(v):
            return f"batch_norm {n.name} in training or with statistics that are not parameters"
        lin = prop.input_layout(v.args["input"])
        a, b = prop.bn_folds[n] = prop.bn_affine(v)
        return Layout(c, lin.kept, lin.const * a + b)

    def couple(self, b, g, n, v, values):
        x = v.args["input"]
        if not b.couple(g, x, n):
            return b.block_all(g, n, "batch_norm on a tensor without channels")
        path = b.owner(v.args.get("running_mean"), values, ("running_mean",), nn.modules.batchnorm._NormBase) \
            or b.owner(v.args.get("weight"), values, ("weight",), nn.modules.batchnorm._NormBase)
        if path is not None:
            b.uf.union_ranges(b.pos(g, n), b.member(path, "bn", b.count(g, n)), b.count(g, n))

    def emit(self, low, n, v):
        if n in low.prop.bn_folds:
            return low.emit_affine_bn(n, v)
        return None


class Flatten(Rule):
    """(N, C, H, W) -> (N, C*H*W): channel c becomes features c*H*W .. (c+1)*H*W - 1."""

    def fits(self, v):
        return _axis_of(v.args["input"]) == 1

    def per_channel(self, v) -> int:
        shape = v.args["input"].meta["example_value"].shape
        return int(shape[2] * shape[3])

    def live(self, prop, n, v, out_live):
        if out_live is None:
            return super().live(prop, n, v, out_live)
        prop._need(v.args["input"], out_live.reshape(-1, self.per_channel(v)).any(1))

    def layout(self, prop, n, v, c):
        lin = prop.input_layout(v.args["input"])
        hw = self.per_channel(v)
        kept = (lin.kept.reshape(-1, 1) * hw + torch.arange(hw)).reshape(-1)
        return Layout(c, kept, lin.const.repeat_interleave(hw))

    def couple(self, b, g, n, v, values):
        x, hw = v.args["input"], self.per_channel(v)
        px, pn = b.pos(g, x), b.pos(g, n)
        if px is None or pn is None:
            return b.block_all(g, n, f"flatten {n.name} of a tensor without channels")
        for c in range(b.count(g, x)):
            for s in range(hw):
                b.uf.union(px + c, pn + c * hw + s)


class Add(Rule):
    def fits(self, v):
        return _axis_of(v.args["a"]) is not None and _axis_of(v.args["a"]) == _axis_of(v.args["b"])

    def axis(self, v):
        return _axis_of(v.args["a"])

    def live(self, prop, n, v, out_live):
        if out_live is None:
            return super().live(prop, n, v, out_live)
        prop._need(v.args["a"], out_live)
        prop._need(v.args["b"], out_live)

    def layout(self, prop, n, v, c):
        la, lb = prop.input_layout(v.args["a"]), prop.input_layout(v.args["b"])
        kept = la.kept_mask() | lb.kept_mask()
        if n in prop.widen:
            kept = kept | prop.widen[n]
        return Layout(c, prop.storage.round(kept).nonzero().flatten(), la.const + lb.const)

    def couple(self, b, g, n, v, values):
        if not (b.couple(g, v.args["a"], n) and b.couple(g, v.args["b"], n)):
            b.block_all(g, n, f"add {n.name} of tensors without channels")

    def emit(self, low, n, v):
        if n not in low.prop.layout:
            return None
        want = low.prop.layout[n]
        return low.graph.call_function(torch.add, (low.read(v.args["a"], want), low.read(v.args["b"], want)))


class Mul(Rule):
    op = torch.mul

    """a * b. Both channel tensors of one channel count (a squeeze-excite gate: (N,C,H,W) *
    (N,C,1,1)): channel c of each gives channel c; a channel that is the constant 0 in either
    operand is 0. Else one operand is a parameter broadcast along the channel dim only (a layer
    scale): a per-channel affine."""

    def operands(self, v, prop=None):
        """(the channel operand, the parameter operand or None for a gate of two channel tensors).
        With `prop`, an operand computed from parameters only is the parameter, whatever its shape."""
        a, b = v.args["a"], v.args["b"]
        if channel_count(a) is not None and channel_count(b) is not None:
            if prop is not None and prop.enabled and param_only(b, prop.cap) and not param_only(a, prop.cap):
                return a, b
            if prop is not None and prop.enabled and param_only(a, prop.cap) and not param_only(b, prop.cap):
                return b, a
            return a, None
        if channel_count(b) is not None:
            a, b = b, a
        return a, None if channel_count(b) is not None else b

    def fits(self, v):
        a, b = v.args["a"], v.args["b"]
        ca, cb = channel_count(a), channel_count(b)
        if ca is not None and cb is not None:
            return (_axis_of(a) == _axis_of(b) and ca == cb and channel_count(v.node) == ca
                    and a.meta["example_value"].dim() == b.meta["example_value"].dim())
        x, p = (a, b) if ca is not None else (b, a)
        return channel_count(x) is not None and self._scale_dim(x, p) is not None

    @staticmethod
    def _scale_dim(x, p) -> Optional[int]:
        """The dim of `p` that runs along x's channels (p broadcast over every other dim)."""
        xs, ps = x.meta["example_value"].shape, p.meta["example_value"].shape
        axis, offset = channel_axis(x), x.meta["example_value"].dim() - len(ps)
        if offset < 0 or any(d != 1 for i, d in enumerate(ps) if i + offset != axis):
            return None
        if axis - offset < 0:
            return None
        return axis - offset if ps[axis - offset] == xs[axis] else None

    def axis(self, v):
        a, b = v.args["a"], v.args["b"]
        return _axis_of(a) if channel_count(a) is not None else _axis_of(b)

    def live(self, prop, n, v, out_live):
        if out_live is None:
            return super().live(prop, n, v, out_live)
        x, p = self.operands(v, prop)
        prop._need(x, out_live)
        if p is None:
            prop._need(v.args["b"], out_live)
        else:
            prop._need_rest(n, x)

    def layout(self, prop, n, v, c):
        if param_only(n, prop.cap):
            return "parameter arithmetic"  # (a mask times a weight: never a compacted tensor)
        x, p = self.operands(v, prop)
        if p is not None:
            if not prop.inference_value_ok(p) or self._scale_dim(x, p) is None:
                return f"mul {n.name} by a tensor that is not a parameter nor a channel tensor"
            lin = prop.input_layout(x)
            # the lowering applies the parameter's kept channels, in the model's dtype
            like = n.meta["example_value"]
            value = prop.value(p).detach()
            prop.channel_params[n] = value.index_select(self._scale_dim(x, p), lin.kept.to(value.device)).to(like.dtype)
            return Layout(c, lin.kept, self.apply(lin.const, self.scale(prop, x, p)))
        la, lb = prop.input_layout(v.args["a"]), prop.input_layout(v.args["b"])
        return self.combine(prop, la, lb, c)

    def combine(self, prop, la, lb, c):
        """The layout of a * b from the operands' (a product is 0 where either is the constant 0)."""
        zero_a = ~la.kept_mask() & (la.const == 0)
        zero_b = ~lb.kept_mask() & (lb.const == 0)
        kept = at_least_one((la.kept_mask() | lb.kept_mask()) & ~zero_a & ~zero_b)
        const = torch.where(zero_a | zero_b, torch.zeros((), dtype=CONST_DTYPE), la.const * lb.const)
        return Layout(c, prop.storage.round(kept).nonzero().flatten(), const)

    def apply(self, const, scale):
        return const * scale

    def scale(self, prop, x, p) -> torch.Tensor:
        dim = self._scale_dim(x, p)
        return prop.value(p).detach().to("cpu", CONST_DTYPE).movedim(dim, 0).reshape(-1)

    def couple(self, b, g, n, v, values):
        x, p = self.operands(v)
        if p is None and (v.args["a"] in b.params or v.args["b"] in b.params):
            x, p = (v.args["b"], v.args["a"]) if v.args["a"] in b.params else (v.args["a"], v.args["b"])
        if p is None:
            if not (b.couple(g, v.args["a"], n) and b.couple(g, v.args["b"], n)):
                b.block_all(g, n, f"mul {n.name} of tensors without channels")
        elif not b.couple(g, x, n):
            b.block_all(g, n, f"mul {n.name} changes the channel count")

    def emit(self, low, n, v):
        if n not in low.prop.layout:
            return None
        want = low.prop.layout[n]
        x, p = self.operands(v, low.prop)
        if p is None:
            return low.graph.call_function(self.op, (low.read(v.args["a"], want), low.read(v.args["b"], want)))
        return low.graph.call_function(self.op, (low.read(x, want), low.const(low.prop.channel_params[n], "scale")))


class AddBroadcast(Mul):
    """a + b of another shape: a per-channel bias (a parameter, e.g. a frozen BatchNorm's
    shift) or two channel tensors broadcast over space: channel c of each gives channel c."""
    op = torch.add

    def combine(self, prop, la, lb, c):
        kept = la.kept_mask() | lb.kept_mask()
        return Layout(c, prop.storage.round(kept).nonzero().flatten(), la.const + lb.const)

    def apply(self, const, bias):
        return const + bias


class Cat(Rule):
    def fits(self, v):
        return all(_axis_of(t) == 1 for t in v.args["tensors"])

    def live(self, prop, n, v, out_live):
        if out_live is None:
            return super().live(prop, n, v, out_live)
        start = 0
        for t in v.args["tensors"]:
            c = channel_count(t)
            prop._need(t, out_live[start:start + c])
            start += c

    def layout(self, prop, n, v, c):
        kept, const, start = [], [], 0
        for t in v.args["tensors"]:
            lt = prop.input_layout(t)
            kept.append(lt.kept + start)
            const.append(lt.const)
            start += lt.channels
        return Layout(c, torch.cat(kept), torch.cat(const))

    def couple(self, b, g, n, v, values):
        out = b.pos(g, n)
        offset = 0
        for t in v.args["tensors"]:
            pt = b.pos(g, t)
            if out is None or pt is None:
                return b.block_all(g, n, f"cat {n.name} of tensors without channels")
            b.uf.union_ranges(pt, out + offset, b.count(g, t))
            offset += b.count(g, t)


class Split(Rule):
    """split / chunk along the channel dim: a tuple whose getitems (split_item) each take a
    slice of the input's stored channels; the tuple itself is never built."""

    def fits(self, v):
        return v.args["dim"] == _axis_of(v.args["input"]) and all(
            u.op == "call_function" and view(u).kind == "split_item" for u in v.node.users)

    def live(self, prop, n, v, out_live):
        pass  # its items pull liveness

    def no_result(self, prop, n, v):
        pass

    def couple(self, b, g, n, v, values):
        pass

    def emit(self, low, n, v):
        return SKIP if low.prop.enabled else None


class SplitItem(Rule):
    def fits(self, v):
        return RULES["split"].fits(view(v.args["split"]))

    def axis(self, v):
        return v.args["dim"]

    def live(self, prop, n, v, out_live):
        x = v.args["input"]
        if out_live is None or x not in prop.live:
            return super().live(prop, n, v, out_live)
        mask = torch.zeros_like(prop.live[x])
        mask[v.args["start"]:v.args["start"] + v.args["size"]] = out_live
        prop._need(x, mask)

    def layout(self, prop, n, v, c):
        x = v.args["input"]
        lin = prop.input_layout(x)
        start = v.args["start"]
        inside = (lin.kept >= start) & (lin.kept < start + c)
        if not bool(inside.any()):  # no zero-size tensor: the slice's first channel, materialised
            need = lin.kept_mask()
            need[start] = True
            prop.materialize[(x, n)] = Layout(lin.channels, need.nonzero().flatten(), lin.const)
            return Layout(c, torch.tensor([0]), lin.const[start:start + c].clone())
        return Layout(c, lin.kept[inside] - start, lin.const[start:start + c].clone())

    def couple(self, b, g, n, v, values):
        px, pn = b.pos(g, v.args["input"]), b.pos(g, n)
        if px is None or pn is None:
            return b.block_all(g, n, f"split {n.name} of a tensor without channels")
        b.uf.union_ranges(px + v.args["start"], pn, b.count(g, n))

    def emit(self, low, n, v):
        x = v.args["input"]
        lin = low.prop.materialize.get((x, n)) or low.prop.layout[x]
        mine = low.prop.layout[n]
        pos = lin.positions_of(mine.kept + v.args["start"])
        first = int(pos[0]) if len(pos) else 0
        return low.graph.call_method("narrow", (low.read(x, lin), v.args["dim"], first, len(pos)))


class Shuffle(Rule):
    """Channel shuffle: output channel j is input channel perm[j]."""

    def fits(self, v):
        return _axis_of(v.args["input"]) == 1

    @staticmethod
    def perm(v, c) -> torch.Tensor:
        g = v.args["groups"]
        j = torch.arange(c)
        return (j % g) * (c // g) + j // g

    def live(self, prop, n, v, out_live):
        if out_live is None:
            return super().live(prop, n, v, out_live)
        mask = torch.zeros_like(out_live)
        mask[self.perm(v, len(out_live))] = out_live
        prop._need(v.args["input"], mask)

    def layout(self, prop, n, v, c):
        lin = prop.input_layout(v.args["input"])
        perm = self.perm(v, c)
        return Layout(c, lin.kept_mask()[perm].nonzero().flatten(), lin.const[perm])

    def couple(self, b, g, n, v, values):
        px, pn = b.pos(g, v.args["input"]), b.pos(g, n)
        if px is None or pn is None:
            return b.block_all(g, n, f"shuffle {n.name} of a tensor without channels")
        for j, i in enumerate(self.perm(v, b.count(g, n)).tolist()):
            b.uf.union(px + i, pn + j)

    def emit(self, low, n, v):
        x = v.args["input"]
        lin, mine = low.prop.layout[x], low.prop.layout[n]
        pos = lin.positions_of(self.perm(v, mine.channels)[mine.kept])
        like = n.meta["example_value"]
        return low.graph.call_function(select_channels, (low.read(x, lin), low.const(pos.to(like.device), "shuffle")))


class ShufflePart(Rule):
    """The view and transpose inside a channel shuffle: where the shuffle carries channels it
    reads their input itself; else they are ordinary ops (stoppers)."""

    @staticmethod
    def carried(n) -> bool:
        for _ in range(3):  # view -> transpose -> contiguous -> the shuffle's view
            (n,) = n.users
            v = view(n)
            if v.kind == "shuffle":
                return RULES["shuffle"].fits(v)
        return False

    def live(self, prop, n, v, out_live):
        if not self.carried(n):
            super().live(prop, n, v, out_live)

    def no_result(self, prop, n, v):
        if not self.carried(n):
            super().no_result(prop, n, v)

    def couple(self, b, g, n, v, values):
        if not self.carried(n):
            super().couple(b, g, n, v, values)

    def emit(self, low, n, v):
        return SKIP if low.prop.enabled and self.carried(n) else None


class Conv(Rule):
    when_disabled = True

    def live(self, prop, n, v, out_live):
        if out_live is not None and prop.rewritable(n) and _axis_of(v.conv.input) == 1:
            if v.conv.groups == 1:
                prop._need(v.conv.input, ~prop.sparsity[n].zero_cols)
                return prop._need_rest(n, v.conv.input)
            if prop.is_depthwise(n):
                prop._need(v.conv.input, out_live & ~prop.sparsity[n].zero_rows)
                return prop._need_rest(n, v.conv.input)
            if prop.sparsity[n].weight is not None:  # grouped: a group's inputs feed its rows only
                prop._need(v.conv.input, self.grouped_inputs(prop.sparsity[n], v.conv.groups, out_live))
                return prop._need_rest(n, v.conv.input)
        super().live(prop, n, v, out_live)

    @staticmethod
    def grouped_inputs(sp, groups: int, out_live) -> torch.Tensor:
        """Input channels of a grouped conv that its live, non-zero rows read."""
        nz = sp.weight.ne(0).flatten(2).any(2).cpu() & (out_live & ~sp.zero_rows).reshape(-1, 1)
        og = sp.out_channels // groups
        return nz.reshape(groups, og, -1).any(1).reshape(-1)

    def layout(self, prop, n, v, c):
        if not prop.rewritable(n):
            return f"conv {n.name}: {prop.sparsity[n].reason}" if n in prop.sparsity else self.why(v)
        if prop.sparsity[n].weight is None or v.conv.groups > 1 and not prop.enabled and not prop.is_depthwise(n):
            return f"conv {n.name}: weight not evaluated (training)" if prop.sparsity[n].weight is None \
                else "propagation off"
        if v.conv.groups > 1 and channel_count(v.conv.input) is None:
            return f"grouped conv {n.name} (groups={v.conv.groups}) on an input of unknown channels"
        return prop._plan_conv(n, v)

    def couple(self, b, g, n, v, values):
        b.add_conv(g, n, v, values)

    def emit(self, low, n, v):
        return low.emit_conv(n, v)


class OtherConv(Rule):
    when_disabled = True  # (emit: the report's row, with its reason)

    def why(self, v):
        return f"{v.args.get('reason', 'conv')} {v.node.name}"

    def emit(self, low, n, v):
        return low.emit_conv(n, v)


class Linear(Rule):
    """F.linear on the channel dim (a head on (N, C), or a 1x1 conv in channels-last layout):
    consumer of its input's channels, producer of its output's."""

    def fits(self, v):
        x = v.args["input"]
        return _axis_of(x) is not None and _axis_of(x) == x.meta["example_value"].dim() - 1

    def axis(self, v):
        return v.node.meta["example_value"].dim() - 1

    def live(self, prop, n, v, out_live):
        if not prop._foldable_linear(v):
            return super().live(prop, n, v, out_live)
        w = prop.value(v.args["weight"])
        rows = w if out_live is None else w[out_live.to(w.device)]
        prop._need(v.args["input"], (rows != 0).any(0).cpu())
        prop._need_rest(n, v.args["input"])

    def layout(self, prop, n, v, c):
        if not prop._foldable_linear(v):
            return f"linear {n.name} whose weight is not a parameter (or training)"
        return prop._plan_linear(n, v, c)

    def couple(self, b, g, n, v, values):
        x = v.args["input"]
        path = b.owner(v.args["weight"], values, ("weight", "weight_orig"), nn.Linear)
        px = b.pos(g, x)
        if path is None or px is None:
            return b.block_all(g, n, f"linear {n.name} not on the channels of a module")
        b.uf.union_ranges(px, b.member(path, "linear_in", b.count(g, x)), b.count(g, x))
        pn = b.pos(g, n)
        if pn is not None:
            b.uf.union_ranges(pn, b.member(path, "linear_out", b.count(g, n)), b.count(g, n))

    def emit(self, low, n, v):
        return low.emit_linear(n, v) if n in low.prop.linear_plans else None


class LayerNorm(Rule):
    """F.layer_norm over the channel dim (the last). Every input channel enters the mean and
    variance, so every one is needed, but a constant one can be: its sum and square sum are
    folded into the statistics of the stored ones (`layer_norm_kept`). Output channel c is
    (x_c - mean) * rstd * w_c + b_c: the constant b_c where w_c is 0, else it must be computed
    from a stored input channel."""

    def fits(self, v):
        x = v.args["input"]
        shape = v.args["normalized_shape"]
        return (self.axis(v) == x.meta["example_value"].dim() - 1 and _axis_of(x) == self.axis(v)
                and isinstance(shape, (list, tuple)) and len(shape) == 1 and shape[0] == channel_count(x))

    def axis(self, v):
        return _axis_of(v.args["input"])

    def live(self, prop, n, v, out_live):
        prop._need(v.args["input"])
        prop._need_rest(n, v.args["input"])

    def couple(self, b, g, n, v, values):
        if not b.couple(g, v.args["input"], n):
            return b.block_all(g, n, f"layer_norm {n.name} changes the channel count")
        path = b.owner(v.args.get("weight"), values, ("weight",), nn.LayerNorm)
        if path is not None:
            b.uf.union_ranges(b.pos(g, n), b.member(path, "ln", b.count(g, n)), b.count(g, n))

    def affine(self, prop, v, c) -> tuple:
        w, b = v.args["weight"], v.args["bias"]
        w = torch.ones(c, dtype=CONST_DTYPE) if w is None else prop.value(w).detach().to("cpu", CONST_DTYPE)
        b = torch.zeros(c, dtype=CONST_DTYPE) if b is None else prop.value(b).detach().to("cpu", CONST_DTYPE)
        return w, b

    def layout(self, prop, n, v, c):
        if not all(a is None or (isinstance(a, fx.Node) and prop.inference_value_ok(a))
                   for a in (v.args["weight"], v.args["bias"])) or not isinstance(v.args["eps"], float):
            return f"layer_norm {n.name} whose weight or bias is not a parameter (or training)"
        x = v.args["input"]
        lin = prop.input_layout(x)
        w, b = self.affine(prop, v, c)
        live = prop.live.get(n, torch.ones(c, dtype=torch.bool))
        need = lin.kept_mask() | (live & (w != 0))
        if not torch.equal(need, lin.kept_mask()):
            lin = Layout(c, prop.storage.round(need).nonzero().flatten(), lin.const)
            prop.materialize[(x, n)] = lin
        like = n.meta["example_value"]
        prop.channel_params[n] = tuple(t[lin.kept].to(like.device, like.dtype) for t in (w, b))
        return Layout(c, lin.kept, b.clone())

    def emit(self, low, n, v):
        if n not in low.prop.layout:
            return None
        x = v.args["input"]
        lin = low.prop.materialize.get((x, n)) or low.prop.layout[x]
        c = lin.channels
        weight, bias = low.prop.channel_params[n]
        dropped = ~lin.kept_mask()
        s1, s2 = float(lin.const[dropped].sum()), float((lin.const[dropped] ** 2).sum())
        w_k, b_k = low.const(weight, "ln_weight"), low.const(bias, "ln_bias")
        return low.graph.call_function(layer_norm_kept, (low.read(x, lin), c, s1, s2, w_k, b_k, float(v.args["eps"])))


def layer_norm_kept(x: torch.Tensor, channels: int, const_sum: float, const_square_sum: float,
                    weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """layer_norm over `channels` channels of which `x` (last dim) stores some; the others are
    constants with sum `const_sum` and sum of squares `const_square_sum`."""
    k = x.shape[-1]
    if k == channels:
        return torch.nn.functional.layer_norm(x, (k,), weight, bias, eps)
    xf = x.float()
    mean = (xf.sum(-1, keepdim=True) + const_sum) / channels
    # sum over the constants of (c - mean)^2, expanded
    rest = const_square_sum - 2 * mean * const_sum + (channels - k) * mean * mean
    var = (((xf - mean) ** 2).sum(-1, keepdim=True) + rest) / channels
    return ((xf - mean) * torch.rsqrt(var + eps) * weight + bias).to(x.dtype)


RULES = {
    "conv2d": Conv(),
    "conv_other": OtherConv(),
    "batch_norm": BatchNorm(),
    "pointwise": Pointwise(),
    "pool": Pool(),
    "flatten": Flatten(),
    "add": Add(),
    "mul": Mul(),
    "add_broadcast": AddBroadcast(),
    "cat": Cat(),
    "split": Split(),
    "split_item": SplitItem(),
    "shuffle": Shuffle(),
    "shuffle_part": ShufflePart(),
    "permute": Permute(),
    "linear": Linear(),
    "layer_norm": LayerNorm(),
}


def rule_for(v: Optional[OpView]) -> Rule:
    """The rule of `v`'s op, or the stopper where there is none or it does not fit."""
    if v is None:
        return STOP
    rule = RULES.get(v.kind)
    if rule is None or not rule.fits(v):
        return STOP
    return rule


__all__ = ["RULES", "Rule", "SKIP", "STOP", "channel_axis", "channel_count", "layer_norm_kept", "rule_for"]
