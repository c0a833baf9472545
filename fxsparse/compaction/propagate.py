"""Stage 3, compaction and propagation: which channels each tensor physically stores.

A removed channel is gone from every tensor it flows through (BatchNorm,
activations, residual adds, concat, pooling, the next conv's input and a
linear head), as a physical pruning would remove it, but inside the compiled
graph of the unmodified model. Two passes over the graph:

1. Liveness, backward: a channel is live where some consumer needs it. A conv
   needs the input channels its filters use; a linear head the features its
   weight uses; the graph output and any op fxsparse does not understand need
   every channel. Residual adds and elementwise ops pass liveness through;
   concat maps it by offsets.
2. Layouts, forward: every channel-carrying tensor gets a `Layout`: the
   channels it stores (`kept`, in order) and, for every other channel, the
   constant it holds everywhere. A conv's pruned output channel is not zero: it
   is its bias, then BatchNorm and the activation turn it into another
   constant, `act(gamma * (b - mean) / sqrt(var + eps) + beta)`. Constants
   travel through the graph (evaluated by each op's own function) and are
   folded where they are consumed: into the next conv's bias (no padding) or a
   bias map (zero padding: exact at the borders), into the linear head's bias.
   A channel that is live but not constant is kept; a channel that nobody
   needs is dropped whatever its value.

Where a constant cannot be folded (a conv of symbolic spatial size with
padding, a pooling that is not uniform at the borders, an unknown op), the
consumer gets the channels it needs materialised (`Relayout`).

A residual stream stores one layout from block to block. An add keeps the union
of its operands' channels, so where masks disagree (each conv pruned on its
own) the union grows from block to block, and every block would copy its
identity into the next, wider layout: a full pass over the activation per
block (measured on ResNet-50 with per-conv masks: most of its time). Pass 2
therefore runs to a fixpoint in which an add that feeds a later add (directly
or through activations) stores that add's channels too (`widen`). With
Torch-Pruning-style masks the coupled channels agree and nothing widens.

What a layout stores also suits the GPU's memory (`Storage`): on CUDA every stored
channel count is a multiple of 8, so each pixel's row of fp16 channels is whole
16-byte vectors (an odd count, e.g. 495 of 512 where masks disagree, turned
cuDNN to a padding copy and slow unaligned kernels and our kernel to 2-byte
loads: measured on ResNet-50 with per-conv masks), and a layout that would keep
more than 7/8 of its channels stores them all. The channels this adds are real
channels of the model (computed from zero filter rows, i.e. their constant), so
the result is exact; a conv then reads them with zero weight columns rather
than gathering the channels it uses out of its input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx

from fxsparse.graph.capture import Capture, OpView
from fxsparse.sparsity.read import ConvSparsity, evaluate, param_only

CONST_DTYPE = torch.float64  # constants are folded in fp64, then cast to the model's dtype


@dataclass
class Layout:
    """A tensor of `channels` channels stored as its `kept` channels (in that order);
    every other channel c holds `const[c]` everywhere."""
    channels: int
    kept: torch.Tensor  # int64, ascending original channel ids
    const: torch.Tensor  # CONST_DTYPE [channels]; meaningful where not kept

    @staticmethod
    def full(channels: int) -> "Layout":
        return Layout(channels, torch.arange(channels), torch.zeros(channels, dtype=CONST_DTYPE))

    @property
    def is_full(self) -> bool:
        return len(self.kept) == self.channels

    def kept_mask(self) -> torch.Tensor:
        m = torch.zeros(self.channels, dtype=torch.bool)
        m[self.kept] = True
        return m

    def same_storage(self, other: "Layout") -> bool:
        return self.channels == other.channels and torch.equal(self.kept, other.kept)

    def positions_of(self, channels: torch.Tensor) -> torch.Tensor:
        """Where each of `channels` (all kept here) sits in the stored tensor."""
        pos = torch.full((self.channels,), -1, dtype=torch.long)
        pos[self.kept] = torch.arange(len(self.kept))
        out = pos[channels]
        assert bool((out >= 0).all()), "channel not stored"
        return out


@dataclass(frozen=True)
class Storage:
    """How many channels a layout stores: `multiple` rounds the count up (adding the lowest
    unkept channels, so layouts that agree stay equal), and a layout keeping more than
    `dense_above` of its channels stores them all. `Storage()` is exact compaction."""
    multiple: int = 1
    dense_above: float = 1.0

    @staticmethod
    def aligned(multiple: int) -> "Storage":
        return Storage(multiple, 7 / 8) if multiple > 1 else Storage()

    def round(self, kept: torch.Tensor) -> torch.Tensor:
        """The stored channels (a bool mask) for a layout that needs `kept`."""
        c, k = len(kept), int(kept.sum())
        if k == c or k == 0 or self.multiple == 1 and self.dense_above >= 1:
            return kept
        if k > self.dense_above * c:
            return torch.ones_like(kept)
        extra = min(c, -(-k // self.multiple) * self.multiple) - k
        out = kept.clone()
        out[(~kept).nonzero().flatten()[:extra]] = True
        return out

    def reads_whole(self, unused: int, stored: int) -> bool:
        """Whether a conv reads all `stored` channels of its input (zero weight columns for the
        `unused` ones) rather than gathering the ones it uses: a gather is a full copy of the
        input, a few zero columns cost a few MACs per pixel."""
        return self.multiple > 1 and 0 < unused and (unused < self.multiple or 8 * unused <= stored)


def channel_count(node) -> Optional[int]:
    """Channels of a 4-D activation (dim 1) or a 2-D feature matrix; None for anything else."""
    val = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() not in (2, 4) or not val.is_floating_point():
        return None
    c = val.shape[1]
    if isinstance(c, torch.SymInt):
        # dynamic=True makes an input's channel dim symbolic too, though the weights it meets
        # specialise it: the shape env then knows its value
        c = c.node.maybe_as_int()
    return c if isinstance(c, int) else None


@dataclass
class ConvPlan:
    """How one conv runs: its compacted weight, which input channels it reads and what constants it folds."""
    sparsity: ConvSparsity
    in_layout: Layout  # layout of the tensor the conv reads (after any relayout)
    out_layout: Layout  # the conv's own output (pre-BatchNorm)
    in_channels_used: torch.Tensor  # original input channel ids read, in order
    weight: torch.Tensor  # [kept_out, used_in, kh, kw], model dtype
    bias: Optional[torch.Tensor]  # [kept_out], with folded constants
    bias_map: Optional[torch.Tensor]  # [kept_out, Ho, Wo] where constant inputs meet padding
    depthwise: bool = False


class Propagation:
    """Runs both passes. Results: `live[node]`, `layout[node]`, `conv_plans[conv node]`,
    `linear_plans[linear node]` and `materialize[(node, user)]`: the layout `user` needs `node`
    in where it cannot take constant channels."""

    def __init__(self, cap: Capture, sparsity: dict, enabled: bool = True, storage: Storage = Storage()):
        self.cap = cap
        self.sparsity = sparsity
        self.enabled = enabled  # off: every tensor full (per-conv compaction only)
        self.storage = storage
        self.live: dict = {}
        self.layout: dict = {}
        self.conv_plans: dict = {}
        self.linear_plans: dict = {}
        self.materialize: dict = {}  # (node, user) -> Layout the user needs (full where unknown)
        self._memo: dict = {}

    # -- helpers ------------------------------------------------------------------------
    def view(self, node) -> Optional[OpView]:
        return self.cap.views.get(node)

    def rewritable(self, node) -> bool:
        sp = self.sparsity.get(node)
        return sp is not None and sp.reason is None

    def is_depthwise(self, node) -> bool:
        v = self.view(node)
        sp = self.sparsity.get(node)
        return (v is not None and v.kind == "conv2d" and v.conv.groups > 1 and sp is not None
                and sp.in_channels == v.conv.groups and sp.out_channels == v.conv.groups)

    def value(self, node):
        return evaluate(node, self.cap, self._memo)

    # -- pass 1: liveness ---------------------------------------------------------------
    def run_liveness(self) -> None:
        nodes = list(self.cap.gm.graph.nodes)
        for n in nodes:
            c = channel_count(n)
            if c is not None:
                self.live[n] = torch.zeros(c, dtype=torch.bool)
        for n in reversed(nodes):
            self._pull_liveness(n)

    def _need(self, node, mask=None) -> None:
        if node not in self.live:
            return
        self.live[node] |= True if mask is None else mask

    def _pull_liveness(self, n: fx.Node) -> None:
        if n.op == "output" or n.op == "placeholder":
            for a in n.all_input_nodes:
                self._need(a)
            return
        v = self.view(n)
        out_live = self.live.get(n)
        kind = v.kind if v is not None else "unknown"
        if not self.enabled or out_live is None and kind not in ("linear",):
            for a in n.all_input_nodes:
                self._need(a)
            return
        if kind == "conv2d" and self.rewritable(n) and v.conv.groups == 1:
            self._need(v.conv.input, ~self.sparsity[n].zero_cols)
            self._need_rest(n, v.conv.input)
        elif kind == "conv2d" and self.rewritable(n) and self.is_depthwise(n):
            self._need(v.conv.input, out_live & ~self.sparsity[n].zero_rows)
            self._need_rest(n, v.conv.input)
        elif kind in ("batch_norm", "pointwise", "pool", "flatten") and v.channel_input is not None:
            self._need(v.channel_input, out_live)
            self._need_rest(n, v.channel_input)
        elif kind == "add":
            self._need(v.args["a"], out_live)
            self._need(v.args["b"], out_live)
        elif kind == "cat":
            start = 0
            for t in v.args["tensors"]:
                c = channel_count(t)
                self._need(t, out_live[start:start + c])
                start += c
        elif kind == "linear" and self._foldable_linear(v):
            w = self.value(v.args["weight"])
            self._need(v.args["input"], (w != 0).any(0).cpu())
            self._need_rest(n, v.args["input"])
        else:
            for a in n.all_input_nodes:
                self._need(a)

    def _need_rest(self, n, channel_input) -> None:
        for a in n.all_input_nodes:
            if a is not channel_input:
                self._need(a)

    def _foldable_linear(self, v: OpView) -> bool:
        # (an input whose feature count is symbolic, a flatten of a dynamic-size map, has no layout)
        return (isinstance(v.args.get("weight"), fx.Node) and channel_count(v.args.get("input")) is not None
                and self.inference_value_ok(v.args["weight"])
                and (v.args.get("bias") is None or self.inference_value_ok(v.args["bias"])))

    def inference_value_ok(self, node) -> bool:
        """A value fxsparse may fold: inference, and computed from parameters and buffers only."""
        return self.enabled and param_only(node, self.cap)

    # -- pass 2: layouts ----------------------------------------------------------------
    def run_layouts(self) -> None:
        self.widen: dict = {}  # add node -> channels it must store for a later add
        adds = [n for n in self.cap.gm.graph.nodes if (v := self.view(n)) is not None and v.kind == "add"]
        # Widths only grow, and one round carries a stream's width back through all its adds
        # (reverse order), so a second round normally confirms it. Should a graph keep growing
        # them past the cap, the layouts without widening are just as exact (more relayouts).
        for _ in range(len(adds) + 2):
            self._run_layouts_once()
            if not self.enabled or not self._widen_residual_streams(adds):
                return
        self.widen = {}
        self._run_layouts_once()

    def _widen_residual_streams(self, adds: list) -> bool:
        """Marks each add whose result reaches a later add's operand (through activations only)
        to store that add's channels; True where that changed anything."""
        changed = False
        for n in reversed(adds):
            want = self.layout[n].kept_mask()
            if n in self.widen:
                want = want | self.widen[n]
            v = self.view(n)
            for operand in (v.args["a"], v.args["b"]):
                src = self._stream_source(operand)
                if src is None:
                    continue
                if not bool((want & ~self.layout[src].kept_mask()).any()):
                    continue  # it already stores them
                before = self.widen.get(src)
                grown = want if before is None else before | want
                if before is None or not torch.equal(grown, before):
                    self.widen[src] = grown
                    changed = True
        return changed

    def _stream_source(self, node) -> Optional[fx.Node]:
        """The add `node` is (or is an activation chain of), else None."""
        while isinstance(node, fx.Node) and node in self.layout:
            v = self.view(node)
            if v is None:
                return None
            if v.kind == "add":
                return node
            if v.kind != "pointwise":
                return None
            node = v.node.args[0]
        return None

    def _run_layouts_once(self) -> None:
        self.layout, self.conv_plans, self.linear_plans, self.materialize = {}, {}, {}, {}
        for n in self.cap.gm.graph.nodes:
            c = channel_count(n)
            if c is not None:
                self.layout[n] = self._layout_of(n, c)
            elif n.op in ("call_function", "call_method"):
                # no channel result (a size, a tuple, ...): it sees its inputs at full width
                self._materialize_inputs(n)

    def input_layout(self, node) -> Layout:
        return self.layout.get(node) or Layout.full(channel_count(node))

    def _layout_of(self, n: fx.Node, c: int) -> Layout:
        v = self.view(n)
        if v is None:
            return self._plan_unknown(n, c)
        kind = v.kind
        # disabled, a conv still compacts itself (inference: its weight was evaluated); every
        # other op then reads its output restored to full width
        if kind == "conv2d" and self.rewritable(n) and (v.conv.groups == 1 or self.is_depthwise(n)) and (
                self.enabled or self.sparsity[n].weight is not None):
            return self._plan_conv(n, v)
        if not self.enabled:
            return self._plan_unknown(n, c)
        if kind == "batch_norm" and self._foldable_bn(v):
            lin = self.input_layout(v.args["input"])
            a, b = self.bn_affine(v)
            return Layout(c, lin.kept, lin.const * a + b)
        if kind == "pointwise":
            lin = self.input_layout(v.node.args[0])
            const = v.fn(lin.const.reshape(1, -1, 1, 1)).reshape(-1).to(CONST_DTYPE)
            return Layout(c, lin.kept, const)
        if kind == "add":
            la, lb = self.input_layout(v.args["a"]), self.input_layout(v.args["b"])
            kept = la.kept_mask() | lb.kept_mask()
            if n in self.widen:
                kept = kept | self.widen[n]
            return Layout(c, self.storage.round(kept).nonzero().flatten(), la.const + lb.const)
        if kind == "cat":
            kept, const, start = [], [], 0
            for t in v.args["tensors"]:
                lt = self.input_layout(t)
                kept.append(lt.kept + start)
                const.append(lt.const)
                start += lt.channels
            return Layout(c, torch.cat(kept), torch.cat(const))
        if kind == "pool":
            lin = self.input_layout(v.args["input"])
            if self._uniform_pool(v):
                return Layout(c, lin.kept, lin.const.clone())
            self.materialize[(v.args["input"], n)] = self._physical(lin, v.args["input"])
            return Layout(c, self.materialize[(v.args["input"], n)].kept, lin.const.clone())
        if kind == "flatten":
            lin = self.input_layout(v.args["input"])
            return Layout(c, lin.kept, lin.const.clone())
        if kind == "linear" and self._foldable_linear(v):
            self.linear_plans[n] = self.input_layout(v.args["input"])
            return Layout.full(c)
        return self._plan_unknown(n, c)

    def _physical(self, lin: Layout, node) -> Layout:
        """The layout storing every live channel of `node` (constants materialised)."""
        keep = lin.kept_mask() | self.live.get(node, torch.ones(lin.channels, dtype=torch.bool))
        return Layout(lin.channels, self.storage.round(keep).nonzero().flatten(), lin.const.clone())

    def _plan_unknown(self, n: fx.Node, c: int) -> Layout:
        self._materialize_inputs(n)
        return Layout.full(c)

    def _materialize_inputs(self, n: fx.Node) -> None:
        for a in n.all_input_nodes:
            if a in self.layout and not self.layout[a].is_full:
                self.materialize[(a, n)] = Layout.full(self.layout[a].channels)

    def _foldable_bn(self, v: OpView) -> bool:
        a = v.args
        return (a.get("training") is False and all(
            isinstance(a[k], fx.Node) and self.inference_value_ok(a[k]) for k in ("running_mean", "running_var"))
            and all(a[k] is None or (isinstance(a[k], fx.Node) and self.inference_value_ok(a[k]))
                    for k in ("weight", "bias")))

    def bn_affine(self, v: OpView) -> tuple:
        """BatchNorm in inference as y = a * x + b, in CONST_DTYPE on the CPU."""
        a = v.args
        mean = self.value(a["running_mean"]).detach().to("cpu", CONST_DTYPE)
        var = self.value(a["running_var"]).detach().to("cpu", CONST_DTYPE)
        gamma = torch.ones_like(mean) if a["weight"] is None else self.value(a["weight"]).detach().to("cpu", CONST_DTYPE)
        beta = torch.zeros_like(mean) if a["bias"] is None else self.value(a["bias"]).detach().to("cpu", CONST_DTYPE)
        # with dynamic=True dynamo passes eps as a graph input (a wrapped 0-d tensor)
        eps = float(self.value(a["eps"]))
        scale = gamma / torch.sqrt(var + eps)
        return scale, beta - mean * scale

    @staticmethod
    def _uniform_pool(v: OpView) -> bool:
        a = v.args
        if a["pool"] in ("adaptive", "max"):
            return True
        return a["pool"] == "avg" and (a["padding"] in (0, (0, 0), [0, 0]) or not a["count_include_pad"])

    # -- convs -------------------------------------------------------------------------
    def _plan_conv(self, n: fx.Node, v: OpView) -> Layout:
        sp: ConvSparsity = self.sparsity[n]
        conv = v.conv
        x = conv.input
        lin = self.input_layout(x)
        weight = sp.weight.detach()
        bias = None if sp.bias is None else sp.bias.detach().to("cpu", CONST_DTYPE)
        live_out = self.live.get(n, torch.ones(sp.out_channels, dtype=torch.bool))
        if self.is_depthwise(n):
            return self._plan_depthwise(n, v, sp, lin, weight, bias, live_out)
        kept_out = self.storage.round(at_least_one(live_out & ~sp.zero_rows)).nonzero().flatten()
        out_const = torch.zeros(sp.out_channels, dtype=CONST_DTYPE) if bias is None else bias.clone()
        used = ~sp.zero_cols
        const_in = (used & ~lin.kept_mask()).nonzero().flatten()
        values = lin.const[const_in]
        const_in = const_in[values != 0]
        w_out = weight[kept_out]
        kept_bias = None if bias is None else bias[kept_out]
        bias_map = None
        if len(const_in):
            folded = self._fold_constant_inputs(w_out, const_in, lin.const[const_in], x, conv)
            if folded is None:  # cannot fold: read those channels materialised instead
                lin = Layout(lin.channels, torch.unique(torch.cat([lin.kept, const_in])), lin.const)
                self.materialize[(x, n)] = lin
            else:
                base = torch.zeros(len(kept_out), dtype=CONST_DTYPE) if kept_bias is None else kept_bias
                kept_bias, bias_map = base + folded[0], folded[1]
        stored = lin.kept_mask()
        in_mask = used & stored
        if self.storage.reads_whole(int((stored & ~used).sum()), len(lin.kept)):
            in_mask = stored
        in_ids = in_mask.nonzero().flatten()
        w_in = w_out[:, in_ids]
        if not len(in_ids):  # every input folded into the bias: one stored channel, read with zero weights
            in_ids = lin.kept[:1]
            w_in = torch.zeros_like(w_out[:, in_ids])
        out_layout = Layout(sp.out_channels, kept_out, out_const)
        self.conv_plans[n] = ConvPlan(sp, lin, out_layout, in_ids, w_in, kept_bias, bias_map)
        return out_layout

    def _fold_constant_inputs(self, w_out, const_in, values, x, conv):
        """Contribution of constant input channels: (bias [Cout_k], bias map or None), or None."""
        w = w_out[:, const_in].to("cpu", CONST_DTYPE)
        v = values.to(CONST_DTYPE)
        if conv.padding == (0, 0):
            return (w.sum((2, 3)) @ v, None)
        shape = x.meta["example_value"].shape
        h, wd = shape[2], shape[3]
        if not isinstance(h, int) or not isinstance(wd, int):
            return None
        image = v.reshape(1, -1, 1, 1).expand(1, len(v), h, wd)
        bmap = torch.nn.functional.conv2d(image, w, None, conv.stride, conv.padding, conv.dilation)[0]
        uniform = bmap.amax((1, 2))
        if torch.equal(bmap.amin((1, 2)), uniform):
            return (uniform, None)
        return (torch.zeros(bmap.shape[0], dtype=CONST_DTYPE), bmap)

    def _plan_depthwise(self, n, v, sp, lin, weight, bias, live_out) -> Layout:
        # in and out channels are tied: channel c is computed iff it is live, its filter is
        # non-zero and its input is stored (a constant input would need a bias map: materialise)
        kept_out = self.storage.round(at_least_one(live_out & ~sp.zero_rows)).nonzero().flatten()
        out_const = torch.zeros(sp.out_channels, dtype=CONST_DTYPE) if bias is None else bias.clone()
        in_kept = lin.kept_mask()
        if not bool(in_kept[kept_out].all()):
            lin = Layout(lin.channels, torch.unique(torch.cat([lin.kept, kept_out])), lin.const)
            self.materialize[(v.conv.input, n)] = lin
        self.conv_plans[n] = ConvPlan(
            sp, lin, Layout(sp.out_channels, kept_out, out_const), kept_out, weight[kept_out],
            None if bias is None else bias[kept_out], None, depthwise=True)
        return Layout(sp.out_channels, kept_out, out_const)

    def run(self) -> "Propagation":
        self.run_liveness()
        self.run_layouts()
        return self


def at_least_one(keep: torch.Tensor) -> torch.Tensor:
    """`keep` (a channel mask), or channel 0 alone where it keeps none: a conv whose mask removes
    every output channel still computes one (a zero filter row gives its exact constant, the
    bias), so that no zero-size conv or tensor is ever emitted."""
    if bool(keep.any()) or not len(keep):
        return keep
    keep = keep.clone()
    keep[0] = True
    return keep


def propagate(cap: Capture, sparsity: dict, enabled: bool = True, storage: Storage = Storage()) -> Propagation:
    return Propagation(cap, sparsity, enabled, storage).run()
