"""Stage 3, compaction and propagation: which channels each tensor physically stores.

A removed channel is gone from every tensor it flows through (BatchNorm,
activations, residual adds, concat, pooling, the next conv's input and a
linear head), as a physical pruning would remove it, but inside the compiled
graph of the unmodified model. Two passes over the graph, each asking every op's
channel rule (rules.py, one entry per op kind) how its channels map:

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
   bias map (zero padding: exact at the borders; `BiasMap`, a constant where the
   spatial size is static, computed in the graph on every call where it is
   symbolic), into the linear head's bias.
   A channel that is live but not constant is kept; a channel that nobody
   needs is dropped whatever its value.

Where a constant cannot be folded (a depthwise conv, a pooling that is not
uniform at the borders, an unknown op), the consumer gets the channels it needs
materialised (`Relayout`).

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

from types import MappingProxyType
from typing import Optional

import torch
import torch.fx as fx

from fxsparse.compaction.chains import plan_chains
from fxsparse.compaction.check import check_layout, check_plan
from fxsparse.compaction.plan import CONST_DTYPE, BiasMap, ConvPlan, Layout, LinearPlan, Storage, at_least_one
from fxsparse.compaction.rules import channel_count, rule_for
from fxsparse.graph.capture import Capture, OpView
from fxsparse.sparsity.read import ConvSparsity, evaluate, param_only

class Propagation:
    """Runs both passes. Results: `live[node]`, `layout[node]`, `conv_plans[conv node]`,
    `linear_plans[linear node]`, `materialize[(node, user)]`: the layout `user` needs `node`
    in where it cannot take constant channels, `bn_folds[batch_norm node]`: its inference
    affine (scale, shift), `channel_params[node]`: the kept channels of the parameter a per-channel
    mul/add applies (of the weight and bias, for a layer_norm), in the model's dtype, and `chains[node]`: the conv chain a node belongs to (chains.py). After
    `run` the plan is frozen (read-only mappings of frozen records) and checked (check_plan):
    the lowering reads it and decides nothing the plan holds."""

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
        self.stopped: dict = {}  # node -> why it read compacted inputs at full width
        self.ruled: set = set()
        self.bn_folds: dict = {}
        self.channel_params: dict = {}
        self.widen: dict = {}
        self.chains: dict = {}

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
        return evaluate(node, self.cap)

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
        v = self.view(n)
        if n.op in ("output", "placeholder") or v is None or not self.enabled:
            for a in n.all_input_nodes:
                self._need(a)
            return
        rule_for(v).live(self, n, v, self.live.get(n))

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
        self.stopped, self.bn_folds, self.channel_params = {}, {}, {}
        self.ruled = set()  # nodes whose layout their channel rule made (lowering emits them by it)
        for n in self.cap.gm.graph.nodes:
            c = channel_count(n)
            if c is not None:
                self.layout[n] = self._layout_of(n, c)
            elif n.op in ("call_function", "call_method"):
                # no channel result (a size, a tuple, ...): by default it sees its inputs at
                # full width
                v = self.view(n)
                rule_for(v).no_result(self, n, v)

    def input_layout(self, node) -> Layout:
        return self.layout.get(node) or Layout.full(channel_count(node))

    def _layout_of(self, n: fx.Node, c: int) -> Layout:
        v = self.view(n)
        rule = rule_for(v)
        if v is None or not (self.enabled or rule.when_disabled):
            return self._plan_unknown(n, c)
        # disabled, a conv still compacts itself (inference: its weight was evaluated); every
        # other op then reads its output restored to full width
        out = rule.layout(self, n, v, c)
        if isinstance(out, str):
            return self._plan_unknown(n, c, out if self.enabled else None)
        check_layout(n, out)  # here, before any consumer's rule reads it
        self.ruled.add(n)
        return out

    def _physical(self, lin: Layout, node) -> Layout:
        """The layout storing every live channel of `node` (constants materialised)."""
        keep = lin.kept_mask() | self.live.get(node, torch.ones(lin.channels, dtype=torch.bool))
        return Layout(lin.channels, self.storage.round(keep).nonzero().flatten(), lin.const.clone())

    def _plan_unknown(self, n: fx.Node, c: int, why: Optional[str] = None) -> Layout:
        self._materialize_inputs(n, why)
        return Layout.full(c)

    def _materialize_inputs(self, n: fx.Node, why: Optional[str] = None) -> None:
        for a in n.all_input_nodes:
            if a in self.layout and not self.layout[a].is_full:
                self.materialize[(a, n)] = Layout.full(self.layout[a].channels)
                if self.enabled:
                    self.stopped[n] = why or rule_for(self.view(n)).why(self.view(n)) if self.view(n) else n.name

    def stop_notes(self) -> list:
        """One line per op that read compacted channels at full width, and why."""
        return [f"channels restored to full width before {why}" for why in dict.fromkeys(self.stopped.values())]

    def _plan_linear(self, n: fx.Node, v: OpView, c: int) -> Layout:
        """A linear on the channel dim as a 1x1 conv: output channels whose weight row is zero
        (or that nobody needs) are its bias; input channels it does not store are folded into
        the bias."""
        w = self.value(v.args["weight"]).detach()
        b = v.args.get("bias")
        b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else self.value(b).detach()
        bias = b.to("cpu", CONST_DTYPE)
        live = self.live.get(n, torch.ones(c, dtype=torch.bool))
        zero_rows = ~(w != 0).any(1).cpu()
        kept_out = self.storage.round(at_least_one(live & ~zero_rows)).nonzero().flatten()
        lin = self.input_layout(v.args["input"])
        # every stored input is read (an unused one through a zero column): liveness already
        # keeps the producer from storing channels no consumer uses
        w_rows = w[kept_out.to(w.device)]  # (rows gathered once, then converted: the head is large)
        dropped = ~lin.kept_mask()
        folded = w_rows[:, dropped.to(w.device)].to("cpu", CONST_DTYPE) @ lin.const[dropped]
        w_k = w_rows[:, lin.kept.to(w.device)].contiguous()
        b_k = (bias[kept_out] + folded).to(b.device, b.dtype)
        ideal_in = int(((w_rows != 0).any(0).cpu() & lin.kept_mask()).sum())
        self.linear_plans[n] = LinearPlan(lin, Layout(c, kept_out, bias.clone()), lin.kept, w_k, b_k, ideal_in)
        return self.linear_plans[n].out_layout

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
        if a["pool"] in ("adaptive", "max", "interpolate", "mean"):  # (interpolation weights sum to 1)
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
        if conv.groups > 1:
            return self._plan_grouped(n, v, sp, lin, weight, bias, live_out)
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
            folded, bias_map = self._fold_constant_inputs(w_out, const_in, lin.const[const_in], x, conv)
            kept_bias = folded + (0 if kept_bias is None else kept_bias)
        in_ids = self.storage.conv_reads(used, lin.kept_mask()).nonzero().flatten()
        w_in = w_out[:, in_ids]
        if not len(in_ids):  # every input folded into the bias: one stored channel, read with zero weights
            in_ids = lin.kept[:1]
            w_in = torch.zeros_like(w_out[:, in_ids])
        out_layout = Layout(sp.out_channels, kept_out, out_const)
        self.conv_plans[n] = ConvPlan(sp, lin, out_layout, in_ids, w_in, kept_bias, bias_map)
        return out_layout

    def _fold_constant_inputs(self, w_out, const_in, values, x, conv) -> tuple:
        """Contribution of constant input channels: (bias [Cout_k], BiasMap or None)."""
        w = w_out[:, const_in].to("cpu", CONST_DTYPE)
        summed = (w * values.to(CONST_DTYPE).reshape(1, -1, 1, 1)).sum(1, keepdim=True)
        return self._fold_summed(summed, x, conv)

    @staticmethod
    def _fold_summed(summed: torch.Tensor, x, conv) -> tuple:
        """(bias, BiasMap or None) of constant inputs whose weighted columns sum to `summed`
        [rows, 1, kh, kw]: a bias where every tap reads the input (no padding) or where the map
        is uniform at the example's static size, else the map."""
        zeros = torch.zeros(summed.shape[0], dtype=CONST_DTYPE)
        if conv.padding == (0, 0) or not bool(summed.any()):
            return summed.sum((1, 2, 3)), None
        bias_map = BiasMap(summed, tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))
        size = tuple(x.meta["example_value"].shape[2:4])
        if not all(isinstance(s, int) for s in size):
            return zeros, bias_map  # symbolic: computed on every call
        bmap = bias_map.at(size)
        uniform = bmap.amax((1, 2))
        if torch.equal(bmap.amin((1, 2)), uniform):
            return uniform, None
        return zeros, bias_map

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

    def _plan_grouped(self, n, v, sp, lin, weight, bias, live_out) -> Layout:
        """A grouped conv compacted group by group into a grouped conv of the same group count:
        each group keeps as many output rows and input columns as its fullest group (a group
        with fewer computes some of its own channels anyway, and reads a repeated input through
        zero columns). Input channels it does not store are constants folded into the bias (or
        a bias map where the conv pads)."""
        conv, g = v.conv, v.conv.groups
        og, ig = sp.out_channels // g, sp.in_channels // g
        x = conv.input
        nz = weight.ne(0).flatten(2).any(2).cpu()  # [Cout, Cin / groups]
        want = (live_out & ~sp.zero_rows).reshape(g, og)
        rows = self._pad_per_group(want)  # [g, k] output channel ids
        used = torch.stack([nz[rows[i]].any(0) for i in range(g)])  # [g, ig] local columns
        stored = lin.kept_mask().reshape(g, ig)
        const = lin.const.reshape(g, ig)
        const_in = used & ~stored & (const != 0)
        bias_k = (torch.zeros(sp.out_channels, dtype=CONST_DTYPE) if bias is None else bias.clone())[rows.flatten()]
        bias_map = None
        if bool(const_in.any()):
            folded, bias_map = self._fold_grouped(weight, rows, const_in, const, x, conv)
            bias_k = bias_k + folded
        read = used & stored
        if not bool(read.any()):  # nothing to read: one stored (or materialised) channel, zero columns
            read = stored.clone() if bool(stored.any()) else read
            if not bool(read.any()):
                lin = Layout(lin.channels, torch.tensor([0]), lin.const)
                self.materialize[(x, n)] = lin
                read = lin.kept_mask().reshape(g, ig)
        cols = self._pad_per_group(read, fill_from=lin.kept)  # [g, j] input channel ids
        j = cols.shape[1]
        w = torch.zeros((rows.numel(), j) + tuple(weight.shape[2:]), dtype=weight.dtype, device=weight.device)
        for i in range(g):  # the first read[i].sum() columns are the group's own; the rest pad
            real = int(read[i].sum())
            w[i * rows.shape[1]:(i + 1) * rows.shape[1], :real] = weight[rows[i]][:, cols[i][:real] - i * ig]
        kept_out = rows.flatten()
        order = kept_out.argsort()
        if not torch.equal(order, torch.arange(len(order))):
            raise AssertionError("grouped conv rows out of order")  # groups are ascending ranges
        out_layout = Layout(sp.out_channels, kept_out,
                            torch.zeros(sp.out_channels, dtype=CONST_DTYPE) if bias is None else bias.clone())
        self.conv_plans[n] = ConvPlan(sp, lin, out_layout, cols.flatten(), w, bias_k, bias_map, groups=g)
        return out_layout

    @staticmethod
    def _pad_per_group(want: torch.Tensor, fill_from: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[groups, k] channel ids: each group's wanted channels (ascending), padded to the most
        any group wants with its own other channels (rows: computed anyway) or, for inputs
        (`fill_from`: the stored channels), with a repeat of one stored channel."""
        g, per = want.shape
        k = max(int(want.sum(1).max()), 1)
        out = []
        for i in range(g):
            ids = want[i].nonzero().flatten()
            if fill_from is None:
                extra = (~want[i]).nonzero().flatten()[: k - len(ids)]
                ids = torch.cat([ids, extra]).sort().values
            else:
                pad = ids[:1] if len(ids) else fill_from[:1] - i * per
                ids = torch.cat([ids, pad.repeat(k - len(ids))])
            out.append(ids + i * per)
        return torch.stack(out)

    def _fold_grouped(self, weight, rows, const_in, const, x, conv) -> tuple:
        """Contribution of a grouped conv's constant inputs to its kept rows: (bias, BiasMap or None)."""
        g = conv.groups
        values = torch.where(const_in, const, torch.zeros((), dtype=CONST_DTYPE))  # [g, ig]
        w = weight.to("cpu", CONST_DTYPE)
        per_row = values.repeat_interleave(w.shape[0] // g, 0)  # each output row's group's constants
        summed = (w * per_row.reshape(*per_row.shape, 1, 1)).sum(1, keepdim=True)
        return self._fold_summed(summed[rows.flatten()], x, conv)

    def run(self) -> "Propagation":
        self.run_liveness()
        self.run_layouts()
        self.chains = plan_chains(self)
        self.freeze()
        check_plan(self)
        return self

    def freeze(self) -> None:
        """Makes the plan read-only: what lowering reads is final."""
        for name in ("live", "layout", "conv_plans", "linear_plans", "materialize", "stopped", "bn_folds",
                     "channel_params", "widen", "chains"):
            setattr(self, name, MappingProxyType(getattr(self, name)))
        self.ruled = frozenset(self.ruled)


def propagate(cap: Capture, sparsity: dict, enabled: bool = True, storage: Storage = Storage()) -> Propagation:
    return Propagation(cap, sparsity, enabled, storage).run()
