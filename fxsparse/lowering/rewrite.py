"""Stage 4, lowering: emit the compacted graph.

Walks the captured graph once, in order, and emits a new one in which every
channel-carrying tensor is stored in its `Layout` (only kept channels), convs
run on compacted constant weights with their BatchNorm folded in, and fused
chains (compaction/chains.py) become one `torch.ops.fxsparse.conv2d` call (lowering
"triton") or a compacted aten conv (lowering "aten") whose epilogue (activation,
residual add) is emitted as plain ops for Inductor to fuse; lowering "auto" picks
one of the two per chain by timing both (choose.py). Where a chain's residual
add stores more channels than its conv computes, the fused op scatters into the
add's layout and an aten conv writes it directly from zero filter rows
(`dense_out`). Everything fxsparse does not rewrite is copied as it is, its
channel inputs first restored to full width (`relayout`, kernels/layout.py, in
the input's memory format), and the result goes to Inductor.

The lowering reads the compaction plan (`Propagation`: layouts, conv and linear
plans, folded BatchNorm, chains) and decides only how to emit it; the plan is
frozen before it gets here.

In training, values change every step, so nothing is folded: a conv whose mask
removes channels gathers its kept weights from `mask * weight_orig` inside the
graph (gradients reach the kept weights as in eager) and scatters its output
back to full width, pruned channels holding their bias.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.fx as fx

from fxsparse.compaction.chains import Chain
from fxsparse.compaction.plan import BiasMap, ConvPlan, Layout, LinearPlan, at_least_one
from fxsparse.compaction.propagate import Propagation
from fxsparse.compaction.rules import SKIP, channel_axis, rule_for
from fxsparse.graph.capture import OpView, module_path, written_args
from fxsparse.kernels.layout import constant_input_map, relayout, select_channels
from fxsparse.lowering import choose
from fxsparse.sparsity.read import ConvSparsity, evaluate, other_conv_geometry, param_only
from fxsparse.stages import StageError, check_graph


@dataclass
class ConvRecord:
    """What happened to one conv (a row of the report)."""
    name: str
    in_channels: int
    out_channels: int
    kept_in_channels: int
    kept_out_channels: int
    kernel_size: tuple
    stride: tuple
    groups: int
    lowering: str  # triton | aten | unchanged
    reason: Optional[str]
    sparsity: str
    source: str
    macs_before: int
    macs_after: int
    macs_ideal: int
    fused: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    # why this lowering, where lowering "auto" measured it ("measured: triton 12.1 us vs
    # aten+epilogue 15.3 us"); None where the option decided
    choice: Optional[str] = None


class Lowering:
    def __init__(self, prop: Propagation, sparsity: dict, lowering: str, inference: bool,
                 cudagraphs: bool = False):
        self.prop = prop
        self.cap = prop.cap
        self.sparsity = sparsity
        self.lowering = lowering  # "triton" | "aten" | "auto" (measured per chain, choose.py)
        self.inference = inference
        self.graph = fx.Graph()
        self.env: dict = {}
        # node -> Layout its emitted value is stored in, where that is not the propagation's
        # (an aten conv writing its residual add's layout directly: dense_out)
        self.stored_as: dict = {}
        self.zero_rows: dict = {}  # conv node -> zero filter rows its dense_out conv computes
        self.consts: dict = {}
        self.records: dict = {}
        self.constant_outputs: dict = {}  # output position -> tensor the wrapper returns
        # an aten chain's epilogue is emitted node by node (Inductor fuses it); it is a chain
        # all the same, so that its conv can write the residual add's layout (dense_out)
        # (without propagation the plan has a chain per conv, the conv alone, emitted by its rule)
        self.chains = prop.chains if inference and prop.enabled else {}
        self.chooser = choose.current() if lowering == "auto" else None
        self.cudagraphs = cudagraphs  # what the chooser times: kernel time under CUDA graphs

    # -- constants ----------------------------------------------------------------------
    def const(self, tensor: torch.Tensor, hint: str) -> fx.Node:
        # one attribute per tensor: AOTAutograd would otherwise see a duplicated input, whose
        # guard needs a source dynamo can evaluate (ours are constants, keep_dynamo_metadata)
        name = next((n for n, t in self.consts.items() if t is tensor), None)
        if name is None:
            name = f"_fxsparse_{hint}_{len(self.consts)}".replace(".", "_")
            self.consts[name] = tensor
        node = self.graph.get_attr(name)
        node.meta["example_value"] = tensor
        return node

    # -- channel layouts ----------------------------------------------------------------
    def read(self, old, want: Optional[Layout] = None):
        """The emitted value of `old`, stored as `want` (default: as it is stored now)."""
        if not isinstance(old, fx.Node):
            return old
        new = self.env[old]
        have = self.stored_as.get(old) or self.prop.layout.get(old)
        if want is None or have is None or have.same_storage(want):
            return new
        src_ids = (have.kept_mask() & want.kept_mask()).nonzero().flatten()
        # a channel `have` does not store holds have's constant (want's constants describe
        # the consumer's result, e.g. a residual sum, not this operand)
        like = self._example(old)
        axis = channel_axis(old)
        if axis != 1 and like.dim() != 2:  # channels-last activation (after a permute)
            new = self.graph.call_method("movedim", (new, axis, 1))
        out = self.graph.call_function(relayout, (
            new,
            self.const(have.positions_of(src_ids).to(like.device), "src_pos"),
            self.const(want.positions_of(src_ids).to(like.device), "dst_pos"),
            self.const(have.const[want.kept].to(like.dtype).to(like.device), "fill"),
        ))
        return out if axis == 1 or like.dim() == 2 else self.graph.call_method("movedim", (out, 1, axis))

    def read_for(self, old, user) -> fx.Node:
        """`old` as `user` needs it: materialised where the propagation said so."""
        if not isinstance(old, fx.Node):
            return old
        want = self.prop.materialize.get((old, user))
        return self.read(old, want)

    def _example(self, node) -> torch.Tensor:
        return node.meta["example_value"]

    # -- the walk -----------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        for n in self.cap.gm.graph.nodes:
            self.emit(n)
        self.drop_unused_weight_math(self.graph)  # before the module generates its code, once
        self.finish_graph()
        root = torch.nn.Module()
        for name, t in pack_vectors(self.graph, self.consts).items():
            root.register_buffer(name, t)
        for n in self.graph.nodes:  # attributes the captured graph itself reads
            if n.op == "get_attr" and not hasattr(root, n.target):
                setattr(root, n.target, getattr(self.cap.gm, n.target))
        gm = python_module(root, self.graph)
        keep_dynamo_metadata(self.cap.gm, gm)
        check_lowered(self.cap.gm, gm, self.constant_outputs)
        return gm

    def finish_graph(self) -> None:
        """Rewrites of the emitted graph as a whole, once every node is emitted (none here)."""

    @staticmethod
    def drop_unused_weight_math(graph: fx.Graph) -> None:
        """Removes copied parameter-only nodes (`mask * weight_orig`) that nothing reads any more.
        (Not a general DCE: an unused in-place op writes a tensor others read, or a buffer.)"""
        for node in reversed(list(graph.nodes)):
            if node.meta.get("_fxsparse_param_only") and not node.users and not written_args(node):
                graph.erase_node(node)

    def emit(self, n: fx.Node) -> None:
        if n.op == "placeholder":
            self.env[n] = self.graph.placeholder(n.name, default_value=n.args[0] if n.args else fx.node.inspect.Parameter.empty)
            self.env[n].meta = dict(n.meta)
            if hasattr(n, "_dynamo_source"):  # see keep_dynamo_metadata
                self.env[n]._dynamo_source = n._dynamo_source
            return
        if n.op == "output":
            self.emit_output(n)
            return
        chain = self.chains.get(n)
        if chain is not None:
            if n is chain.anchor:
                self.env[n] = self.emit_chain(chain)
            return  # inner chain nodes have no other users
        self.emit_node(n)

    def emit_node(self, n: fx.Node) -> None:
        """`n` by its own handler (its op's channel rule, compaction/rules.py), outside any chain."""
        v = self.cap.views.get(n)
        rule = rule_for(v)
        by_rule = rule.when_disabled or self.prop.enabled and (n in self.prop.ruled or n not in self.prop.layout)
        out = rule.emit(self, n, v) if v is not None and by_rule else None
        if out is SKIP:
            return
        self.env[n] = self.copy(n) if out is None else out
        self.env[n].meta["example_value"] = n.meta.get("example_value")

    def copy(self, n: fx.Node) -> fx.Node:
        args = fx.node.map_arg(n.args, lambda a: self.read_for(a, n))
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self.read_for(a, n))
        new = self.graph.create_node(n.op, n.target, args, kwargs, n.name)
        new.meta = dict(n.meta)
        if n.op in ("call_function", "call_method") and param_only(n, self.cap):
            new.meta["_fxsparse_param_only"] = True
        return new

    def emit_output(self, n: fx.Node) -> None:
        outs = n.args[0]
        if not isinstance(outs, (tuple, list)):
            self.graph.output(self.output_value(outs))
            return
        kept = []
        for i, a in enumerate(outs):
            if self.inference and isinstance(a, fx.Node) and a.op != "placeholder" and param_only(a, self.cap):
                # e.g. prune's `weight = weight_orig * mask`, written back to the module: the same
                # tensor every call while its inputs are unchanged (the runtime guard checks them),
                # handed out by the wrapper rather than through the compiled graph
                self.constant_outputs[i] = evaluate(a, self.cap).detach()
            else:
                kept.append(self.output_value(a))
        self.graph.output(tuple(kept))

    def output_value(self, a):
        if not isinstance(a, fx.Node):
            return a
        layout = self.prop.layout.get(a)
        if layout is not None and not layout.is_full:
            return self.read(a, Layout.full(layout.channels))
        return self.env[a]

    # -- convs ------------------------------------------------------------------------
    def emit_conv(self, n: fx.Node, v: OpView) -> fx.Node:
        sp: ConvSparsity = self.sparsity[n]
        plan = self.prop.conv_plans.get(n)
        if plan is not None:
            return self.emit_chain(self.prop.chains[n])
        if not self.inference and sp.reason is None and sp.source == "mask" and v.conv.groups == 1 and (
                bool(sp.zero_rows.any()) or bool(sp.zero_cols.any())):
            return self.emit_training_conv(n, v, sp)
        self.record_unchanged(n, sp)
        return self.copy(n)

    def emit_chain(self, chain: Chain) -> fx.Node:
        n = chain.conv
        plan: ConvPlan = self.prop.conv_plans[n]
        conv = self.cap.views[n].conv
        x_layout = plan.in_layout
        x = self.read(conv.input, x_layout)
        like = self._example(conv.input)
        dtype, device = plan.weight.dtype, plan.weight.device
        weight, bias, bias_map = chain.weight, chain.bias, chain.bias_map  # BatchNorm folded in
        positions = x_layout.positions_of(plan.in_channels_used)
        identity_in = len(positions) == len(x_layout.kept) and torch.equal(positions, torch.arange(len(positions)))
        w_t = weight.to(device, dtype).contiguous(memory_format=torch.channels_last)
        b_t = None if bias is None else bias.to(device, dtype)
        # the bias map's summed weight (CONST_DTYPE, on the CPU), rows as the conv computes them
        m_w = None if bias_map is None else bias_map.weight
        lowering = self.lowering if not (plan.depthwise or plan.groups > 1) else "aten"
        choice = None
        if lowering == "auto":
            decision = self.choose_lowering(chain, x_layout, None if identity_in else positions, w_t, b_t, bias_map,
                                            like)
            lowering, choice = decision.lowering, decision.reason
        fused = lowering == "triton"
        wide = self.dense_out(chain, w_t, b_t, m_w, fused)
        if wide is not None:
            w_t, b_t, m_w = wide
        w_node = self.const(w_t.contiguous(memory_format=torch.channels_last), "weight")
        b_node = None if b_t is None else self.const(b_t, "bias")
        m_node = None if m_w is None else self.emit_bias_map(replace(bias_map, weight=m_w), x, like, dtype, fused)
        if fused:
            out = self.emit_fused_op(chain, plan, x, None if identity_in else positions, w_node, b_node, m_node, like,
                                     scatter=wide is None)
        else:
            out = self.emit_aten_conv(plan, conv, x, None if identity_in else positions, w_node, b_node, m_node)
            out = self.emit_aten_epilogue(chain, out)
        self.record_rewritten(chain, plan, lowering, choice)
        return out

    def emit_bias_map(self, bias_map: BiasMap, x: fx.Node, like: torch.Tensor, dtype, fused: bool) -> fx.Node:
        """The bias map as a graph value: a constant where the input's spatial size is static, else
        computed from the size on every call. The fused op adds it to its fp32 accumulator (fp32
        at least; a float64 model's own precision); aten adds it to the conv's output in the
        model's dtype (an fp32 map would promote the rest of the graph)."""
        exact = torch.promote_types(dtype, torch.float32)
        size = tuple(like.shape[2:4])
        if all(isinstance(s, int) for s in size):
            return self.const(bias_map.at(size).to(like.device, exact if fused else dtype), "bias_map")
        weight = self.const(bias_map.weight.to(like.device, exact), "bias_map_weight")
        m = self.graph.call_function(constant_input_map, (
            x, weight, bias_map.stride, bias_map.padding, bias_map.dilation))
        return m if fused or dtype == exact else self.graph.call_method("to", (m, dtype))

    def dense_out(self, chain: Chain, weight, bias, bias_map, fused: bool) -> Optional[tuple]:
        """For a 1x1 chain whose result layout (chains.result_layout) stores more channels than the
        conv computes: the (weight, bias, bias map) of a conv that writes that layout
        directly, the added channels from zero filter rows whose bias is their constant (their
        activation and residual then follow as for any row). Zero rows in a 1x1 conv cost
        little (its K is short; it is bound by the output it writes), while the alternatives
        cost a pass or worse: the fused op's scatter stores are 2-byte scalar stores (offline
        PTX for sm90: 64 `st.global.b16` per thread where the dense tile issues 8
        `st.global.v4`; measured 0.5-1 ms on ResNet-50's conv3 chains), an aten conv's
        compact output needs a relayout into the add's layout. None where it does not apply:
        more than one tap (zero rows cost kh*kw times more); for aten, a lowering that was
        not measured (on the CPU Inductor fuses the scatter into the add's own pass) or an add
        after the activation (emitted node by node, the sum is not what the rows compute)."""
        if not choose.writes_with_zero_rows(tuple(weight.shape[2:]), fused, chain.add is not None,
                                            chain.residual_after_activation):
            return None
        if not fused and self.lowering != "auto":
            return None
        out_layout, out_index, fill = self.epilogue_layout(chain, weight.device)
        if out_index is None:
            return None
        if not fused:  # emitted node by node: the nodes before the add are read wide
            self.mark_widened(chain, out_layout, (chain.pre_activation, chain.act))
        self.zero_rows[chain.conv] = len(out_layout.kept) - len(out_index)
        return choose.zero_row_weights(weight, bias, bias_map, out_index, fill, len(out_layout.kept))

    def mark_widened(self, chain: Chain, out_layout: Layout, nodes) -> None:
        """Records that the chain's `nodes` are emitted in `out_layout` (each with its own
        constants in the channels it does not compute) where the propagation stored them
        narrower; `read` then serves them without a relayout."""
        for node in nodes:
            if node is None or node is chain.add:
                continue
            own = self.prop.layout[node]
            if not own.same_storage(out_layout):
                self.stored_as[node] = Layout(own.channels, out_layout.kept, own.const)

    def epilogue_layout(self, chain: Chain, device) -> tuple:
        """(layout of the chain's result, out_index, fill): where the fused op scatters kept
        column j (None: in order) and the pre-activation constant of the channels it adds."""
        pre = self.prop.layout[chain.pre_activation]
        out_layout = chain.result
        if out_layout.same_storage(pre):
            return out_layout, None, None
        out_index = out_layout.positions_of(pre.kept).to(device)
        missing = out_layout.kept_mask() & ~pre.kept_mask()
        fill_full = torch.where(missing, pre.const, torch.zeros_like(pre.const))
        return out_layout, out_index, fill_full[out_layout.kept].to(device, torch.float32)

    def choose_lowering(self, chain, x_layout, positions, weight, bias, bias_map, like) -> "choose.Decision":
        """Lowering "auto": the chain's fused op against its aten conv + epilogue, timed (choose.py)."""
        try:
            conv = self.cap.views[chain.conv].conv
            out_layout, out_index, fill = self.epilogue_layout(chain, weight.device)
            out_val = self._example(chain.conv)
            c = choose.concrete
            shape = choose.ChainShape(
                c(like.shape[0]), len(x_layout.kept), c(like.shape[2]), c(like.shape[3]), weight.shape[0],
                len(out_layout.kept), tuple(weight.shape[2:]), tuple(conv.stride), tuple(conv.padding),
                tuple(conv.dilation), str(weight.dtype).replace("torch.", ""), weight.device.type,
                self.cap.views[chain.act].activation if chain.act is not None else "none",
                chain.add is not None, chain.residual_after_activation,
                None if positions is None else len(positions), out_index is not None, bias_map is not None,
                self.cudagraphs)
            hw = (c(like.shape[2]), c(like.shape[3]))  # (timed at the example's size)
            m_t = None if bias_map is None else bias_map.at(hw).to(weight.device, torch.float32)
            problem = choose.ChainProblem(
                shape, weight, bias, m_t,
                None if positions is None else positions.to(weight.device), out_index, fill,
                (c(out_val.shape[2]), c(out_val.shape[3])))
        except Exception as e:  # noqa: BLE001 - e.g. a size with no concrete value
            return choose.Decision("triton", f"not measured ({type(e).__name__}: {e}): triton")
        return self.chooser.choose(problem)

    def emit_fused_op(self, chain, plan, x, positions, w_node, b_node, m_node, like, scatter: bool) -> fx.Node:
        """`scatter`: the weight holds the computed rows only, and the op writes them into the
        chain's result layout at out_index, filling the others; else the weight already has
        one row per stored channel (dense_out)."""
        conv = self.cap.views[chain.conv].conv
        out_layout, out_index, fill = self.epilogue_layout(chain, like.device)
        if not scatter:
            out_index = fill = None
        residual = None
        if out_index is not None:
            out_index = self.const(out_index, "out_index")
            fill = self.const(fill, "fill")
        if chain.add is not None:
            residual = self.read(chain.residual, out_layout)
        else:  # a downsample branch written in its add's layout (chains.result_layout)
            self.mark_widened(chain, out_layout, (chain.anchor,))
        act = self.cap.views[chain.act].activation if chain.act is not None else "none"
        in_index = None if positions is None else self.const(positions.to(like.device), "in_index")
        return self.graph.call_function(torch.ops.fxsparse.conv2d.default, (
            x, w_node, b_node, list(conv.stride), list(conv.padding), list(conv.dilation),
            in_index, out_index, len(out_layout.kept), fill, m_node, residual,
            act, chain.residual_after_activation))

    def emit_aten_conv(self, plan, conv, x, positions, w_node, b_node, m_node) -> fx.Node:
        if positions is not None:
            x = self.graph.call_function(select_channels, (x, self.const(positions.to(self._device(x)), "in_index")))
        groups = len(plan.out_layout.kept) if plan.depthwise else plan.groups
        out = self.graph.call_function(torch.conv2d, (
            x, w_node, b_node, conv.stride, conv.padding, conv.dilation, groups))
        if m_node is not None:
            out = self.graph.call_function(torch.add, (out, m_node))
        return out

    def emit_aten_epilogue(self, chain: Chain, pre_activation: fx.Node) -> fx.Node:
        """The chain's nodes after its (BN-folded) conv, emitted by their own handlers as plain
        ops that Inductor fuses into one elementwise kernel: the one path for a chain lowered
        to aten, whichever lowering chose it. Returns the chain's result."""
        pre_activation.meta["example_value"] = chain.pre_activation.meta.get("example_value")
        self.env[chain.pre_activation] = pre_activation
        for n in sorted((n for n in (chain.act, chain.add) if n is not None), key=lambda n: n.meta["_fxsparse_pos"]):
            self.emit_node(n)
        return self.env[chain.anchor]

    def _device(self, x: fx.Node):
        val = x.meta.get("example_value")
        return val.device if isinstance(val, torch.Tensor) else "cpu"

    def emit_linear(self, n: fx.Node, v: OpView) -> fx.Node:
        """A linear on the channel dim, compacted as a 1x1 conv: rows of its kept outputs, columns
        of its stored inputs, the other inputs' constants folded into the bias."""
        plan = self.prop.linear_plans[n]
        x = self.read(v.args["input"], plan.in_layout)
        if self._example(v.args["input"]).dim() == 4:
            self.record_linear(n, plan)
        return self.graph.call_function(torch.nn.functional.linear, (
            x, self.const(plan.weight, "linear_weight"), self.const(plan.bias, "linear_bias")))

    def record_linear(self, n: fx.Node, plan: LinearPlan) -> None:
        """A report row for a linear on the channel dim of a channels-last activation: a 1x1 conv
        (a ConvNeXt block's MLP), with its MACs beside the convs'."""
        shape = self._example(self.cap.views[n].args["input"]).shape
        pixels = int(torch.tensor([int(d) for d in shape[1:-1]]).prod()) if all(
            isinstance(d, int) for d in shape[1:-1]) else 0
        cout, cin = plan.out_layout.channels, plan.in_layout.channels
        kin, kout = len(plan.in_layout.kept), len(plan.out_layout.kept)
        self.records[n] = ConvRecord(
            module_path(n), cin, cout, kin, kout, (1, 1), (1, 1), 1, "aten", None, "linear on channels",
            "values", pixels * cin * cout, pixels * kin * kout, pixels * plan.ideal_in * kout)

    def emit_affine_bn(self, n: fx.Node, v: OpView) -> fx.Node:
        """A BatchNorm that follows no conv (e.g. after a concat), run on its kept channels."""
        layout = self.prop.layout[n]
        a, s = self.prop.bn_folds[n]
        like = self._example(n)
        shape = (1, -1, 1, 1)
        a_n = self.const(a[layout.kept].reshape(shape).to(like.device, like.dtype), "bn_scale")
        s_n = self.const(s[layout.kept].reshape(shape).to(like.device, like.dtype), "bn_shift")
        x = self.read(v.args["input"])
        return self.graph.call_function(torch.add, (self.graph.call_function(torch.mul, (x, a_n)), s_n))

    def emit_training_conv(self, n: fx.Node, v: OpView, sp: ConvSparsity) -> fx.Node:
        conv = v.conv
        kept_out = at_least_one(~sp.zero_rows).nonzero().flatten()
        kept_in = at_least_one(~sp.zero_cols).nonzero().flatten()
        dev = self._device(conv.input)
        w = self.env[conv.weight]
        x = self.env[conv.input]
        if len(kept_in) < len(sp.zero_cols):
            ki = self.const(kept_in.to(dev), "in_index")
            w = self.graph.call_function(torch.index_select, (w, 1, ki))
            x = self.graph.call_function(select_channels, (x, ki))
        ko = self.const(kept_out.to(dev), "out_index")
        w = self.graph.call_function(torch.index_select, (w, 0, ko))
        bias = self.env[conv.bias] if conv.bias is not None else None
        b = self.graph.call_function(torch.index_select, (bias, 0, ko)) if bias is not None else None
        y = self.graph.call_function(torch.conv2d, (x, w, b, conv.stride, conv.padding, conv.dilation, 1))
        # full width again: pruned channels hold their bias (a trainable value) or zero
        fill = bias if bias is not None else self.const(torch.zeros(sp.out_channels, device=dev), "zeros")
        out = self.graph.call_function(relayout, (
            y, self.const(torch.arange(len(kept_out), device=dev), "src_pos"), ko, fill))
        self.records[n] = self._record(sp, len(kept_in), len(kept_out), len(kept_in), len(kept_out), "aten", None)
        return out

    # -- records ----------------------------------------------------------------------
    def _macs(self, sp: ConvSparsity, cin_per_group: int, cout: int) -> int:
        """Multiply-accumulates per sample, at the example input's size where the graph's is symbolic."""
        h, w = (size_hint(s) for s in self._example(sp.view.node).shape[2:4])
        if h is None or w is None:
            return 0
        kh, kw = sp.kernel_size
        return h * w * cout * cin_per_group * kh * kw

    def _record(self, sp, kin, kout, ideal_in, ideal_out, lowering, reason, fused=(),
                computed_out: Optional[int] = None) -> ConvRecord:
        """kin / ideal_in: input channels each output channel reads (per group). computed_out:
        the output rows the conv computes, where more than the kept ones (zero rows)."""
        conv = sp.view.conv
        groups = conv.groups if conv else 1
        return ConvRecord(
            sp.name, sp.in_channels, sp.out_channels,
            sp.in_channels if lowering == "unchanged" else (kout if groups > 1 else kin), kout,
            tuple(sp.kernel_size), tuple(conv.stride) if conv else other_conv_geometry(sp.view.node)[3], groups,
            lowering, reason,
            sp.kind, sp.source, self._macs(sp, sp.in_channels // max(groups, 1), sp.out_channels) if conv else 0,
            self._macs(sp, kin, computed_out or kout) if conv else 0, self._macs(sp, ideal_in, ideal_out) if conv else 0,
            list(fused), list(sp.notes) + self._symbolic_note(sp))

    def _symbolic_note(self, sp) -> list:
        sizes = self._example(sp.view.node).shape[2:4]
        if all(isinstance(s, int) for s in sizes):
            return []
        return [f"spatial size symbolic ({' x '.join(map(str, sizes))}): MACs counted at the example input's "
                f"{' x '.join(str(size_hint(s)) for s in sizes)}"]

    def record_unchanged(self, n, sp: ConvSparsity) -> None:
        reason = sp.reason
        if reason is None:
            conv = sp.view.conv
            if conv.groups != 1:
                reason = f"grouped conv (groups={conv.groups}): left to aten"
            elif not self.inference:
                reason = "training: no mask removes a whole channel (values alone cannot be trusted while training)"
            else:
                reason = "no structured sparsity"
        per_group = sp.in_channels // max(sp.view.conv.groups if sp.view.conv else 1, 1)
        self.records[n] = self._record(sp, per_group, sp.out_channels, per_group, sp.out_channels,
                                       "unchanged", reason)

    def record_rewritten(self, chain: Chain, plan: ConvPlan, lowering: str, choice: Optional[str] = None) -> None:
        sp = plan.sparsity
        kout = len(plan.out_layout.kept)
        if plan.depthwise:  # one input channel per output channel
            kin = ideal_in = 1
        elif plan.groups > 1:  # input channels per group, padded to the fullest group
            kin = ideal_in = plan.weight.shape[1]
        else:
            kin = len(plan.in_channels_used)
            ideal_layout = self.prop.layout.get(self.cap.views[chain.conv].conv.input)
            ideal_in = kin if ideal_layout is None else int((~sp.zero_cols & ideal_layout.kept_mask()).sum())
        fused = [k for k, node in (("batch_norm", chain.bn), ("activation", chain.act), ("residual", chain.add)) if node is not None]
        zero = self.zero_rows.get(chain.conv, 0)  # dense_out computes its zero rows too
        record = self.records[chain.conv] = self._record(sp, kin, kout, ideal_in, kout, lowering, None, fused,
                                                         computed_out=kout + zero)
        record.choice = choice
        if zero:
            record.notes.append(f"the conv also computes {zero} zero filter rows: it writes the residual "
                                f"add's {kout + zero}-channel layout directly (no scatter)")


def size_hint(size) -> Optional[int]:
    """An int size, or the example's value of a symbolic one (None where it has none)."""
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return int(hint) if hint is not None else None


def keep_dynamo_metadata(dynamo_gm: fx.GraphModule, gm: fx.GraphModule) -> None:
    """Lets AOTAutograd see `gm` as the dynamo graph it replaces.

    AOTAutograd reads which inputs are static (parameters and buffers, whose addresses never
    change) from dynamo's metadata: `dynamo_compile_id` in the module's meta, each
    placeholder's `_dynamo_source` and its `tensor_dict` meta, and a source per lifted
    attribute. A graph without it has no static inputs, and under CUDA graphs Inductor then
    copies every parameter and buffer into the graph's memory on every call (for a pruned
    ResNet-50: ~320 tensors, the full-size `weight_orig`s among them).
    DDPOptimizer's split graphs carry the metadata over the same way. Our folded constants
    are attributes of `gm` that never change: each gets a constant source. Where dynamo's
    metadata is not all there, nothing is attached (the graph runs as any non-dynamo graph)."""
    if "dynamo_compile_id" not in dynamo_gm.meta:
        return
    placeholders = gm.graph.find_nodes(op="placeholder")
    if not all(hasattr(p, "_dynamo_source") for p in placeholders):
        return
    from torch._dynamo.source import ConstantSource

    known = dict(getattr(dynamo_gm, "_param_name_to_source", None) or {})
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)] + [
        n for n, _ in gm.named_buffers(remove_duplicate=False)]
    gm._param_name_to_source = {n: known.get(n) or ConstantSource(f"fxsparse_constant_{n}") for n in names}
    gm.meta.update(dynamo_gm.meta)


def lower(prop: Propagation, sparsity: dict, lowering: str, inference: bool, cudagraphs: bool = False) -> tuple:
    """(compacted graph, {conv node: ConvRecord}, {output position: constant tensor})."""
    low = Lowering(prop, sparsity, lowering, inference, cudagraphs)
    gm = low.run()
    return gm, low.records, low.constant_outputs


def output_count(gm: fx.GraphModule) -> int:
    outs = gm.graph.find_nodes(op="output")[0].args[0]
    return len(outs) if isinstance(outs, (tuple, list)) else 1


def pack_vectors(graph: fx.Graph, consts: dict) -> dict:
    """`consts` ({attribute: tensor}, read by get_attr nodes of `graph`) with the 1-D ones packed
    into one buffer per device and dtype, each read rewritten as a view of its buffer.

    A compiled graph takes each buffer as an input, the training backward saves each one it
    reads, and under CUDA graphs every input and saved tensor costs host time on every call:
    a pruned ResNet-50's kept indices and masks are ~110 of them. Views start 16-byte aligned.
    What the fused op reads stays whole: it checks an index once per tensor, not per view."""
    op_reads = {a.target for n in graph.find_nodes(op="call_function", target=torch.ops.fxsparse.conv2d.default)
                for a in n.all_input_nodes if a.op == "get_attr"}
    groups: dict = {}  # (device, dtype) -> names
    out = {}  # what stays as it is, then the buffers
    for name, t in consts.items():
        if t.dim() == 1 and name not in op_reads:
            groups.setdefault((t.device, t.dtype), []).append(name)
        else:
            out[name] = t
    place: dict = {}  # name -> (buffer node, offset)
    first = next(n for n in graph.nodes if n.op != "placeholder")
    for i, names in enumerate(groups.values()):
        packed, offsets = _packed([consts[n] for n in names])
        out[f"_fxsparse_vectors_{i}"] = packed
        with graph.inserting_before(first):
            buffer = graph.get_attr(f"_fxsparse_vectors_{i}")
        buffer.meta["example_value"] = packed
        place.update({name: (buffer, off) for name, off in zip(names, offsets)})
    for node in list(graph.find_nodes(op="get_attr")):
        if node.target in place:
            buffer, off = place[node.target]
            with graph.inserting_before(node):
                view = graph.call_function(torch.narrow, (buffer, 0, off, consts[node.target].numel()))
            view.meta = dict(node.meta)
            node.replace_all_uses_with(view)
            graph.erase_node(node)
    return out


def _packed(vectors: list) -> tuple:
    """(one buffer holding `vectors` (same device and dtype), each one's offset: 16-byte aligned)."""
    step = max(1, 16 // vectors[0].element_size())
    offsets, end = [], 0
    for v in vectors:
        offsets.append(end)
        end += -(-v.numel() // step) * step
    packed = vectors[0].new_zeros(end)
    for v, off in zip(vectors, offsets):
        packed[off:off + v.numel()] = v
    return packed, offsets


def python_module(root: torch.nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """The compacted graph as a module, its Python code generated (once: a ResNet-50 graph's code
    takes tens of milliseconds)."""
    try:
        return fx.GraphModule(root, graph, class_name="FxsparseGraph")
    except Exception as e:  # noqa: BLE001 - codegen of a malformed graph fails in many ways
        raise StageError("lowering", f"graph does not compile to Python: {e}") from e


def check_lowered(before: fx.GraphModule, after: fx.GraphModule, constant_outputs: dict) -> None:
    """The compacted graph lints and returns what the captured one returned (its outputs plus
    those the wrapper hands out as constants); python_module made its code."""
    check_graph("lowering", after)
    want = output_count(before)
    got = output_count(after) + len(constant_outputs)
    if got != want:
        raise StageError("lowering", f"graph returns {got} outputs, the captured graph {want}",
                         before.graph.find_nodes(op="output")[0])
