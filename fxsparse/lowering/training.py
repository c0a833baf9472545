"""Stage 4 in training: the compacted training graph, exact in values, gradients and buffers.

In training nothing may be folded into constants (every value changes each step), but the
channels a mask removes are still structurally known: a masked conv's pruned output channel
is its bias (zero without one) at every pixel, whatever the weights become. This lowering
stores every channel-carrying tensor as its kept channels plus, for the others, a graph
value: a vector `const` of the value each channel holds everywhere, computed in the graph
from the parameters (so autograd sees it). Carried across:

* train-mode BatchNorm: a constant channel has batch mean = the constant and batch variance
  0, so its output is exactly `beta`. The kept channels run a compacted batch_norm; the
  pruned channels' running statistics get the update aten would make (mean towards the
  constant, variance towards 0). The buffers are written at the end of the graph, all by one
  foreach multiply-add (and num_batches_tracked by one foreach add): one launch, not one each.
  `gamma` of a pruned channel is not read, so its gradient is zero, as in eager.
* eval-mode BatchNorm, activations, pooling, flatten: the constant goes through the op.
* residual adds (the union of the operands' channels), concat (offsets).
* the next conv: constant input channels become a bias (no padding) or a bias map (zero
  padding), computed in the graph from the constants and those weight columns, so `beta`
  and the weights get the gradients eager gives them. A linear head folds them likewise. A
  bias that a train-mode BatchNorm subtracts again (the conv feeds only it) is left out of
  the conv's output and moves only that BatchNorm's running mean: its gradient is zero (in
  eager, rounding noise around zero).
* anything else reads its inputs at full width (constants materialised).

Weights are sliced inside the graph from `mask * weight_orig`, so gradients reach
`weight_orig` (zero on pruned rows) and optimizers keep the original parameters. Every such
slice (conv weights, rows and columns at once, BatchNorm's parameters, the constants) is
`gather.kept_slice`, or for a conv weight where Inductor writes Triton kernels
`gather.kept_weight` (a scatter in the kernel that applies the mask); the backward of both
gathers the compact gradient back by inverse positions instead of scattering it: one pointwise
kernel with `grad * mask` under Inductor, where index_select's backward costs a fill and a
scatter per dim. The trained vectors (BatchNorm's gamma and beta, biases) are then sliced
together by one `gather.kept_rows`, whose backward expands all their gradients in one foreach
kernel (finish_graph). Masks are the only source of sparsity here; the runtime guard watches
them and rebuilds when one changes.

Each compacted dense conv runs as the option `lowering` says, as in inference: an aten conv
("aten"), the fused op `torch.ops.fxsparse.conv2d` as a plain conv (+ bias) where it runs
("triton": fp16/bf16 on CUDA, autocast's casts written out; the Triton interpreter on the
CPU), or the faster of the two, forward and backward timed on the compacted shapes
("auto", choose.TrainConvProblem). The op's backward is aten's conv backward on the same
compacted tensors, so gradients are those of the aten conv. Nothing is fused into the op
here: a conv before a train-mode BatchNorm has no epilogue to fold.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxsparse.compaction.plan import CONST_DTYPE, KeptChannels, at_least_one
from fxsparse.compaction.propagate import Propagation
from fxsparse.compaction.rules import channel_count
from fxsparse.graph.capture import OpView
from fxsparse.kernels.layout import constant_input_map, relayout, select_channels
from fxsparse.lowering import choose
from fxsparse.lowering.gather import KeptIndex, kept_rows, kept_slice, kept_weight
from fxsparse.lowering.rewrite import Lowering
from fxsparse.ops.conv2d import triton_interpreter_on
from fxsparse.sparsity.read import ConvSparsity, param_only


@dataclass
class Stored(KeptChannels):
    """A tensor of `channels` channels stored as its `kept` channels (ascending); every other
    channel c holds `const[c]` everywhere (`const`: a node of the new graph, a vector of all
    `channels`; None: zeros)."""
    channels: int
    kept: torch.Tensor
    const: Optional[fx.Node]

    @staticmethod
    def full(channels: int) -> "Stored":
        return Stored(channels, torch.arange(channels), None)


_INPLACE_FUNCTIONS = {torch.relu_: torch.relu, F.relu_: F.relu, operator.iadd: operator.add,
                      operator.imul: operator.mul, operator.isub: operator.sub, operator.itruediv: operator.truediv}


class TrainingLowering(Lowering):
    def __init__(self, cap, sparsity: dict, lowering: str, cudagraphs: bool = False):
        # the inference propagation is not run: only its helpers (cap, views) are used
        super().__init__(Propagation(cap, sparsity, enabled=False), sparsity, lowering, inference=False,
                         cudagraphs=cudagraphs)
        self.stored: dict = {}  # captured node -> Stored (channel-carrying tensors only)
        self.kept_indices: dict = {}  # (ids, total, device) -> KeptIndex: one set of constants each
        self.deferred_stats: dict = {}  # keep (1 - momentum) -> [(running buffer, update)]: written at the end
        self.deferred_counters: dict = {}  # step -> [counter]: advanced at the end
        self.shifts: dict = {}  # conv node -> per-channel constant its BatchNorm cancels (batch_norm_cancels)
        self.param_outputs: dict = {}  # output position -> captured node: handed out detached (emit_output)

    # -- layouts --------------------------------------------------------------------------
    def layout(self, old) -> Optional[Stored]:
        if not isinstance(old, fx.Node):
            return None
        if old in self.stored:
            return self.stored[old]
        c = channel_count(old)
        return None if c is None else Stored.full(c)

    def device_of(self, old) -> torch.device:
        val = old.meta.get("example_value")
        return val.device if isinstance(val, torch.Tensor) else torch.device("cpu")

    def index(self, ids: torch.Tensor, old, hint: str) -> fx.Node:
        return self.const(ids.to(self.device_of(old)), hint)

    def call(self, fn, *args, **kwargs) -> fx.Node:
        return self.graph.call_function(fn, args, kwargs)

    def const_vector(self, s: Stored, ids: torch.Tensor, old) -> fx.Node:
        """The constants of channels `ids` (a node of len(ids))."""
        if s.const is None:
            return self.const(torch.zeros(len(ids), device=self.device_of(old)), "zeros")
        return self.kept_slice(s.const, old, rows=(ids, s.channels))

    def kept_index(self, ids: torch.Tensor, total: int, like) -> KeptIndex:
        device = self.device_of(like)
        key = (tuple(ids.tolist()), total, str(device))
        if key not in self.kept_indices:
            self.kept_indices[key] = KeptIndex.of(ids.to(device), total)
        return self.kept_indices[key]

    def kept_slice(self, t: fx.Node, like, rows: Optional[tuple] = None, cols: Optional[tuple] = None) -> fx.Node:
        """`t`'s kept rows (dim 0) and/or columns (dim 1), each given as (ids, total); a dim
        kept whole in order is left as it is. The backward gathers too (gather.py), so Inductor
        fuses a parameter's gradient into one pointwise kernel."""
        args = self.slice_args(rows, like, "rows") + self.slice_args(cols, like, "cols")
        return t if all(a is None for a in args) else self.call(kept_slice, t, *args)

    def slice_args(self, picked: Optional[tuple], like, hint: str, parts=("ids", "positions", "kept")) -> list:
        """The KeptIndex constants `parts` of one dim given as (ids, total), or Nones where the
        dim is kept whole in order (None too)."""
        if picked is None or torch.equal(picked[0], torch.arange(picked[1], device=picked[0].device)):
            return [None] * len(parts)
        k = self.kept_index(*picked, like)
        return [self.index(getattr(k, part), like, f"{hint}_{part}") for part in parts]

    def kept_weight(self, weight: fx.Node, conv, rows: tuple, cols: tuple, dtype) -> fx.Node:
        """A conv weight's kept rows and columns (each (ids, total)) in the conv's dtype. Where
        Inductor writes Triton kernels (each a launch) the cast and the slice are a scatter
        (gather.py) that goes into the kernel making the weight (the prune mask's multiply),
        laid out channels-last where the input is and on CUDA, where Inductor lays conv weights
        out channels-last (a contiguous one would be copied). Elsewhere (Inductor's C++ kernels
        fuse a gather as well) a gather: it reads only the kept elements."""
        device = conv.input.meta["example_value"].device
        if not triton_kernels(device):
            return self.cast(self.kept_slice(weight, conv.input, rows=rows, cols=cols), conv.weight, dtype)
        weight = self.cast(weight, conv.weight, dtype)
        inverse = ("positions", "kept")
        args = self.slice_args(rows, conv.input, "rows", inverse) + self.slice_args(cols, conv.input, "cols", inverse)
        if all(a is None for a in args):
            return weight
        layout = channels_last(conv.input.meta["example_value"]) or device.type == "cuda"
        return self.call(kept_weight, weight, *args, len(rows[0]), len(cols[0]), layout)

    def read_as(self, old, kept: torch.Tensor) -> fx.Node:
        """The emitted value of `old` stored as channels `kept` (constants materialised)."""
        new = self.env[old]
        s = self.layout(old)
        if s is None or torch.equal(s.kept, kept):
            return new
        wanted = torch.zeros(s.channels, dtype=torch.bool)
        wanted[kept] = True
        if not bool(wanted[s.kept].all()):
            # stored channels `kept` drops: widened first, then selected (never a gather into
            # relayout: see kernels/layout.py)
            union = (wanted | s.kept_mask()).nonzero().flatten()
            wide = self.read_as(old, union)
            return self.call(select_channels, wide, self.index(Stored(s.channels, union, None).positions_of(kept),
                                                              old, "in_index"))
        fill = self.const_vector(s, kept, old)
        return self.call(relayout, new, None, self.index(Stored(s.channels, kept, None).positions_of(s.kept), old,
                                                         "dst_pos"), fill)

    def scalar(self, value):
        """A non-tensor argument (with dynamic=True dynamo may pass one as a graph input)."""
        return fx.node.map_arg(value, self.read_full)

    def read_full(self, old):
        if not isinstance(old, fx.Node):
            return old
        s = self.layout(old)
        return self.env[old] if s is None or s.is_full else self.read_as(old, torch.arange(s.channels))

    # -- the walk -------------------------------------------------------------------------
    def emit_node(self, n: fx.Node) -> None:
        if self.defer_counter_step(n):
            return
        v = self.cap.views.get(n)
        kind = v.kind if v is not None else "unknown"
        handler = {"conv2d": self.emit_train_conv, "batch_norm": self.emit_train_bn,
                   "pointwise": self.emit_pointwise, "add": self.emit_add, "cat": self.emit_cat,
                   "pool": self.emit_pool, "flatten": self.emit_flatten,
                   "linear": self.emit_train_linear}.get(kind)
        if handler is None or not handler(n, v):
            self.env[n] = self.copy_full(n)
        self.env[n].meta["example_value"] = n.meta.get("example_value")

    def copy_full(self, n: fx.Node) -> fx.Node:
        """`n` as it is, its channel inputs at full width."""
        args = fx.node.map_arg(n.args, self.read_full)
        kwargs = fx.node.map_arg(n.kwargs, self.read_full)
        new = self.graph.create_node(n.op, n.target, args, kwargs, n.name)
        new.meta = dict(n.meta)
        return new

    def copy_with_input(self, n: fx.Node, old_input: fx.Node, new_input: fx.Node) -> fx.Node:
        args = fx.node.map_arg(n.args, lambda a: new_input if a is old_input else self.read_full(a))
        kwargs = fx.node.map_arg(n.kwargs, lambda a: new_input if a is old_input else self.read_full(a))
        new = self.graph.create_node(n.op, n.target, args, kwargs, n.name)
        new.meta = dict(n.meta)
        return new

    def emit_output(self, n: fx.Node) -> None:
        """The graph's outputs; those computed from parameters alone that require grad (prune's
        recomputed `weight`, written back to the module) detached: the wrapper gives them their
        gradient (runtime/param_outputs.py), and the backward takes no gradient for them."""
        self.write_deferred_stats()
        outs = n.args[0]
        if not isinstance(outs, (tuple, list)):
            self.graph.output(fx.node.map_arg(outs, self.read_full))
            return
        values = []
        for i, a in enumerate(outs):
            value = fx.node.map_arg(a, self.read_full)
            if self.differentiable_param_output(a):
                self.param_outputs[i] = a
                value = self.graph.call_method("detach", (value,))
            values.append(value)
        self.graph.output(type(outs)(values))

    def differentiable_param_output(self, a) -> bool:
        if not isinstance(a, fx.Node) or a.op in ("placeholder", "get_attr") or not param_only(a, self.cap):
            return False
        value = a.meta.get("example_value")
        return isinstance(value, torch.Tensor) and value.requires_grad

    # -- convs ----------------------------------------------------------------------------
    def emit_train_conv(self, n: fx.Node, v: OpView) -> bool:
        sp: ConvSparsity = self.sparsity[n]
        conv = v.conv
        if sp.reason is not None or not isinstance(conv.weight, fx.Node):
            return False
        if conv.groups == 1:
            return self.emit_dense_conv(n, v, sp)
        if conv.groups == sp.in_channels == sp.out_channels:
            return self.emit_depthwise_conv(n, v, sp)
        return False

    def emit_dense_conv(self, n, v, sp) -> bool:
        conv = v.conv
        lin = self.layout(conv.input)
        kept_out = at_least_one(~sp.zero_rows).nonzero().flatten()  # never a zero-size conv
        used = ~sp.zero_cols
        stored = lin.kept_mask()
        const_cols = (used & ~stored).nonzero().flatten() if lin.const is not None else torch.zeros(0, dtype=torch.long)
        if len(kept_out) == sp.out_channels and lin.is_full and not bool(sp.zero_cols.any()):
            return False
        read = used & stored
        x = self.env[conv.input]
        if 8 * int((stored & ~used).sum()) > len(lin.kept):  # gather what the filters use
            in_ids = read.nonzero().flatten() if bool(read.any()) else lin.kept[:1]  # (a zero column)
            x = self.call(select_channels, x, self.index(lin.positions_of(in_ids), conv.input, "in_index"))
        else:  # read the whole stored input, zero weight columns for the few unused
            in_ids = lin.kept
        weight = self.env[conv.weight]
        w = self.kept_weight(weight, conv, (kept_out, sp.out_channels), (in_ids, sp.in_channels), example_dtype(n))
        bias = None if conv.bias is None else self.rows(self.env[conv.bias], kept_out, sp.out_channels, conv.input)
        lowering, why = self.conv_lowering(n, conv, len(in_ids), len(kept_out))
        if lowering == "triton":
            y = self.emit_fused_conv(n, conv, x, w, bias, len(kept_out))
        else:
            y = self.call(torch.conv2d, x, w, bias, conv.stride, conv.padding, conv.dilation, 1)
        if len(const_cols):
            term = self.constant_input_term(conv, lin, const_cols, weight, kept_out, sp, x, y)
            if conv.padding == (0, 0) and self.batch_norm_cancels(n):
                # a per-channel constant the train-mode BatchNorm after the conv subtracts again:
                # only that BatchNorm's running mean sees it (emit_train_bn)
                self.shifts[n] = self.call(torch.Tensor.detach, term)
            else:
                y = self.call(torch.add, y, term)
        out_const = None if conv.bias is None else self.env[conv.bias]
        self.stored[n] = Stored(sp.out_channels, kept_out, out_const)
        self.env[n] = y
        ideal_in = int(read.sum())
        self.records[n] = self._record(sp, len(in_ids), len(kept_out), ideal_in, len(kept_out), lowering, None)
        self.records[n].choice = why
        return True

    def batch_norm_cancels(self, n: fx.Node) -> bool:
        """Whether `n` feeds only a train-mode BatchNorm, whose output no per-channel constant
        added to `n` changes (it subtracts the batch mean)."""
        users = list(n.users)
        v = self.cap.views.get(users[0]) if len(users) == 1 else None
        return v is not None and v.kind == "batch_norm" and v.args["input"] is n and v.args["training"] is True

    def conv_lowering(self, n, conv, in_channels: int, out_channels: int) -> tuple:
        """("triton" | "aten", why where it was measured) for a compacted dense conv reading
        `in_channels` and computing `out_channels`."""
        dtype, device = example_dtype(n), self.device_of(conv.input)
        if self.lowering == "aten" or not triton_trains(device, dtype):
            return "aten", None
        if self.lowering == "triton":
            return "triton", None
        try:
            x, w = conv.input.meta["example_value"], conv.weight.meta["example_value"]
            c = choose.concrete
            shape = choose.TrainConvShape(
                c(x.shape[0]), in_channels, c(x.shape[2]), c(x.shape[3]), out_channels, tuple(w.shape[2:]),
                tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.bias is not None,
                str(dtype).replace("torch.", ""), device.type, channels_last(x), bool(x.requires_grad),
                bool(w.requires_grad), self.cudagraphs)
        except Exception as e:  # noqa: BLE001 - e.g. a size with no concrete value
            return "aten", f"not measured ({type(e).__name__}: {e}): aten"
        problem = choose.TrainConvProblem(shape, device)
        if not self.chooser.forced and not problem.launch_known():
            # tuning every training conv's launch would cost minutes of compile for a plain conv
            # that rarely beats cuDNN; lowering="triton" tunes them (and fills the cache "auto" reads)
            return "aten", "aten: the fused op has no tuned launch for this shape"
        decision = self.chooser.choose(problem)
        return decision.lowering, decision.reason

    def emit_fused_conv(self, n, conv, x, w, bias, out_channels: int) -> fx.Node:
        """The conv as the fused op, a plain conv (+ bias) in the conv's dtype: the casts autocast
        makes for an aten conv are written out (the op has no autocast rule; `w` is cast
        already), the weight channels_last as the op reads it best."""
        dtype = example_dtype(n)
        x = self.cast(x, conv.input, dtype)
        w = self.call(torch.Tensor.contiguous, w, memory_format=torch.channels_last)
        bias = None if bias is None else self.cast(bias, conv.bias, dtype)
        return self.call(torch.ops.fxsparse.conv2d.default, x, w, bias, list(conv.stride), list(conv.padding),
                         list(conv.dilation), None, None, out_channels, None, None, None, "none", False)

    def cast(self, new: fx.Node, old: fx.Node, dtype: torch.dtype) -> fx.Node:
        return new if example_dtype(old) == dtype else self.call(torch.Tensor.to, new, dtype)

    def rows(self, t: fx.Node, ids: torch.Tensor, total: int, like) -> fx.Node:
        return self.kept_slice(t, like, rows=(ids, total))

    def columns(self, w: fx.Node, ids: torch.Tensor, total: int, like) -> fx.Node:
        return self.kept_slice(w, like, cols=(ids, total))

    def constant_input_term(self, conv, lin: Stored, const_cols, weight, kept_out, sp, x, y) -> fx.Node:
        """What the constant input channels add to the conv's output, as a graph value of the
        constants and the weight columns: a per-channel bias without padding, else the bias map
        of x's size (`constant_input_map`, exact where the filters meet padding; computed from
        each call's size, so it holds under dynamic shapes too)."""
        w_c = self.kept_slice(weight, conv.input, rows=(kept_out, sp.out_channels), cols=(const_cols, sp.in_channels))
        values = self.const_vector(lin, const_cols, conv.input)
        if conv.padding == (0, 0):
            term = self.call(torch.matmul, self.call(torch.sum, w_c, (2, 3)), values)
            term = self.call(torch.reshape, term, (1, -1, 1, 1))
        else:
            weighted = self.call(torch.mul, w_c, self.call(torch.reshape, values, (1, -1, 1, 1)))
            summed = self.call(torch.sum, weighted, 1, True)
            term = self.call(constant_input_map, x, summed, conv.stride, conv.padding, conv.dilation)
        return self.call(torch.Tensor.type_as, term, y)

    def emit_depthwise_conv(self, n, v, sp) -> bool:
        """Channel c reads input channel c only: computed where its filter is kept, from the
        input stored (materialised where the input holds a constant there)."""
        conv = v.conv
        lin = self.layout(conv.input)
        kept_out = at_least_one(~sp.zero_rows).nonzero().flatten()
        if len(kept_out) == sp.out_channels and lin.is_full:
            return False
        x = self.read_as(conv.input, kept_out) if not bool(lin.kept_mask()[kept_out].all()) else self.env[conv.input]
        if bool(lin.kept_mask()[kept_out].all()) and not torch.equal(lin.kept, kept_out):
            x = self.call(select_channels, x, self.index(lin.positions_of(kept_out), conv.input, "in_index"))
        w = self.rows(self.env[conv.weight], kept_out, sp.out_channels, conv.input)
        bias = None if conv.bias is None else self.rows(self.env[conv.bias], kept_out, sp.out_channels, conv.input)
        self.env[n] = self.call(torch.conv2d, x, w, bias, conv.stride, conv.padding, conv.dilation, len(kept_out))
        self.stored[n] = Stored(sp.out_channels, kept_out, None if conv.bias is None else self.env[conv.bias])
        self.records[n] = self._record(sp, 1, len(kept_out), 1, len(kept_out), "aten", None)
        return True

    # -- BatchNorm ------------------------------------------------------------------------
    def emit_train_bn(self, n: fx.Node, v: OpView) -> bool:
        a = v.args
        shift = self.shifts.pop(a["input"], None)
        lin = self.layout(a["input"])
        if lin is None or lin.is_full or not isinstance(a["training"], bool) or any(
                a[k] is not None and not isinstance(a[k], fx.Node) for k in ("running_mean", "running_var", "weight", "bias")):
            if shift is not None:  # the BatchNorm runs as it is: its input gets the constant back
                self.env[a["input"]] = self.call(torch.add, self.env[a["input"]], shift)
            return False
        kept, like = lin.kept, a["input"]
        pick = lambda k: None if a[k] is None else self.rows(self.env[a[k]], kept, lin.channels, like)  # noqa: E731
        stats = a["running_mean"] is not None and a["running_var"] is not None
        if a["training"] and stats:
            # the compacted batch_norm updates zeros, giving `momentum * batch statistic`;
            # update_running_stats blends that into the full buffers
            mean_k, var_k = (self.graph.call_method("new_zeros", (self.env[a[k]], (len(kept),)))
                             for k in ("running_mean", "running_var"))
        else:
            mean_k, var_k = pick("running_mean"), pick("running_var")
        y = self.call(F.batch_norm, self.env[a["input"]], mean_k, var_k, pick("weight"), pick("bias"),
                      a["training"], self.scalar(a["momentum"]), self.scalar(a["eps"]))
        if a["training"]:
            if stats:
                self.update_running_stats(a, lin, mean_k, var_k, shift)
            out_const = None if a["bias"] is None else self.env[a["bias"]]  # exactly beta
        else:
            out_const = self.eval_bn_constants(a, lin)
        self.env[n] = y
        self.stored[n] = Stored(lin.channels, kept, out_const)
        return True

    def update_running_stats(self, a: dict, lin: Stored, mean_k: fx.Node, var_k: fx.Node,
                             shift: Optional[fx.Node] = None) -> None:
        """Writes the running statistics of every channel as aten updates them:
        `(1 - momentum) * buffer + momentum * batch statistic`, where a pruned channel's batch
        mean is its constant and its unbiased batch variance 0. `mean_k`, `var_k`: the kept
        channels' `momentum * batch statistic` (batch_norm's update of zeros); `shift`: a
        per-channel constant left out of the BatchNorm's input, which moves its batch mean
        (not its variance or output). A buffer nothing else in the graph reads is written at
        the end of the graph, with the others, by one foreach multiply and add (one kernel for
        all BatchNorms, where each would be a launch); any other is written here."""
        like = a["input"]
        k = self.kept_index(lin.kept, lin.channels, like)
        kept, positions = self.index(k.kept, like, "rows_kept"), self.index(k.positions, like, "rows_pos")
        m = self.scalar(a["momentum"])
        keep = self.call(operator.sub, 1.0, m) if isinstance(m, fx.Node) else 1.0 - m
        if shift is not None:
            moved = self.call(torch.Tensor.type_as, self.call(torch.reshape, shift, (-1,)), mean_k)
            mean_k = self.call(operator.add, mean_k, self.call(operator.mul, moved, m))
        for key, update_k, value in (("running_mean", mean_k, True), ("running_var", var_k, False)):
            buf = self.env[a[key]]
            if value and lin.const is not None:
                pruned = self.call(torch.Tensor.type_as, self.call(operator.mul, self.call(torch.Tensor.detach, lin.const), m), buf)
            else:
                pruned = 0.0
            update = self.call(torch.where, kept, self.call(torch.index_select, update_k, 0, positions), pruned)
            if isinstance(keep, float) and len(a[key].users) == 1:
                self.deferred_stats.setdefault(keep, []).append((buf, update))
            else:
                self.graph.call_method("copy_", (buf, self.call(operator.add, self.call(operator.mul, buf, keep), update)))

    def finish_graph(self) -> None:
        """The kept entries of every trained vector (BatchNorm's gamma and beta, biases) in one
        `kept_rows` call at the top of the graph: its backward expands all their gradients in
        one kernel, where a slice each launches one each."""
        slices = [n for n in self.graph.nodes if n.op == "call_function" and n.target is kept_slice
                  and n.args[0].op == "placeholder" and all(a is None for a in n.args[4:])
                  and n.args[0].meta["example_value"].dim() == 1 and n.args[0].meta["example_value"].requires_grad]
        if len(slices) < 2:
            return
        top = next(n for n in self.graph.nodes if n.op != "placeholder")
        for index in {a: None for n in slices for a in n.args[1:4]}:  # constants: no inputs
            if index is not top:
                top.prepend(index)
        args = tuple(a for n in slices for a in n.args[:4])
        anchor = max(args, key=list(self.graph.nodes).index)
        with self.graph.inserting_after(anchor):
            batch = self.call(kept_rows, *args)
        for i, n in reversed(list(enumerate(slices))):
            with self.graph.inserting_after(batch):
                item = self.call(operator.getitem, batch, i)
            n.replace_all_uses_with(item)
            self.graph.erase_node(n)

    def defer_counter_step(self, n: fx.Node) -> bool:
        """`counter.add_(k)` on a scalar integer input nothing else in the graph reads (BatchNorm's
        num_batches_tracked): done at the end of the graph with the others, one foreach add for
        all where each would be a launch."""
        if not (n.op == "call_method" and n.target == "add_" and not n.users and len(n.args) == 2 and not n.kwargs):
            return False
        counter, step = n.args
        value = counter.meta.get("example_value") if isinstance(counter, fx.Node) else None
        if not (counter.op == "placeholder" and len(counter.users) == 1 and isinstance(step, int)
                and isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point()):
            return False
        self.deferred_counters.setdefault(step, []).append(self.env[counter])
        return True

    def write_deferred_stats(self) -> None:
        """`buffer = buffer * keep + update` for every deferred buffer, one foreach pair per keep;
        `counter += step` for every deferred counter, one foreach add per step."""
        for keep, pairs in self.deferred_stats.items():
            bufs, updates = [b for b, _ in pairs], [u for _, u in pairs]
            self.call(torch.ops.aten._foreach_mul_.Scalar, bufs, keep)
            self.call(torch.ops.aten._foreach_add_.List, bufs, updates)
        for step, counters in self.deferred_counters.items():
            self.call(torch.ops.aten._foreach_add_.Scalar, counters, step)

    def eval_bn_constants(self, a: dict, lin: Stored) -> Optional[fx.Node]:
        """An eval-mode BatchNorm's value on the constant channels, by batch_norm itself on a
        [1, C] row of the constants."""
        like = a["input"]
        values = self.const_vector(lin, torch.arange(lin.channels), like) if lin.const is None else lin.const
        row = self.call(torch.reshape, values, (1, -1))
        args = [None if a[k] is None else self.env[a[k]] for k in ("running_mean", "running_var", "weight", "bias")]
        return self.call(torch.reshape, self.call(F.batch_norm, row, *args, False, self.scalar(a["momentum"]),
                                                  self.scalar(a["eps"])), (-1,))

    # -- channel-wise ops -----------------------------------------------------------------
    def emit_pointwise(self, n: fx.Node, v: OpView) -> bool:
        src = n.args[0] if n.args else None
        lin = self.layout(src)
        if lin is None or lin.is_full or v.fn is None:
            return False
        self.env[n] = self.copy_with_input(n, src, self.env[src])
        self.stored[n] = Stored(lin.channels, lin.kept, self.pointwise_constants(n, v, lin, src))
        return True

    def pointwise_constants(self, n: fx.Node, v: OpView, lin: Stored, src) -> Optional[fx.Node]:
        """The op applied (out of place) to the constant vector; None where it maps zeros to zeros."""
        if lin.const is None:
            zero = torch.zeros(1, 1, 1, 1, dtype=CONST_DTYPE)
            value = float(v.fn(zero).reshape(-1)[0])
            if value == 0.0:
                return None
            return self.const(torch.full((lin.channels,), value, device=self.device_of(src)), "const")
        return out_of_place(self.graph, n, lin.const, src, self.read_full)

    def emit_same_channels(self, n: fx.Node, v: OpView) -> bool:
        src = v.args["input"]
        lin = self.layout(src)
        if lin is None or lin.is_full:
            return False
        self.env[n] = self.copy_with_input(n, src, self.env[src])
        self.stored[n] = Stored(lin.channels, lin.kept, lin.const)
        return True

    def emit_flatten(self, n: fx.Node, v: OpView) -> bool:
        """(N, C, H, W) -> (N, C*H*W): channel c becomes features c*H*W .. (c+1)*H*W - 1."""
        src = v.args["input"]
        lin = self.layout(src)
        if lin is None or lin.is_full:
            return False
        hw = int(src.meta["example_value"].shape[2:].numel())  # (capture: static H, W)
        self.env[n] = self.copy_with_input(n, src, self.env[src])
        kept = (lin.kept[:, None] * hw + torch.arange(hw)).flatten()
        const = None if lin.const is None else self.call(torch.repeat_interleave, lin.const, hw)
        self.stored[n] = Stored(lin.channels * hw, kept, const)
        return True

    def emit_pool(self, n: fx.Node, v: OpView) -> bool:
        # a constant channel pools to itself only where the window never counts padding
        return self.prop._uniform_pool(v) and self.emit_same_channels(n, v)

    def emit_add(self, n: fx.Node, v: OpView) -> bool:
        la, lb = self.layout(v.args["a"]), self.layout(v.args["b"])
        if la is None or lb is None or (la.is_full and lb.is_full):
            return False
        kept = (la.kept_mask() | lb.kept_mask()).nonzero().flatten()
        self.env[n] = self.call(torch.add, self.read_as(v.args["a"], kept), self.read_as(v.args["b"], kept))
        consts = [c for c in (la.const, lb.const) if c is not None]
        const = consts[0] if len(consts) == 1 else (self.call(torch.add, *consts) if consts else None)
        self.stored[n] = Stored(la.channels, kept, const)
        return True

    def emit_cat(self, n: fx.Node, v: OpView) -> bool:
        parts = v.args["tensors"]
        layouts = [self.layout(t) for t in parts]
        if all(s.is_full for s in layouts):
            return False
        kept, consts, start = [], [], 0
        for t, s in zip(parts, layouts):
            kept.append(s.kept + start)
            consts.append(s.const if s.const is not None else self.const_vector(s, torch.arange(s.channels), t))
            start += s.channels
        self.env[n] = self.call(torch.cat, [self.env[t] for t in parts], 1)
        any_const = any(s.const is not None for s in layouts)
        self.stored[n] = Stored(start, torch.cat(kept), self.call(torch.cat, consts) if any_const else None)
        return True

    def emit_train_linear(self, n: fx.Node, v: OpView) -> bool:
        x, weight, bias = v.args["input"], v.args["weight"], v.args.get("bias")
        lin = self.layout(x)
        if lin is None or lin.is_full or not isinstance(weight, fx.Node):
            return False
        w = self.env[weight]
        y = self.call(F.linear, self.env[x], self.columns(w, lin.kept, lin.channels, x),
                      None if bias is None else self.env[bias])
        if lin.const is not None:
            dropped = (~lin.kept_mask()).nonzero().flatten()
            term = self.call(F.linear, self.call(torch.reshape, self.const_vector(lin, dropped, x), (1, -1)),
                             self.columns(w, dropped, lin.channels, x))
            y = self.call(torch.add, y, self.call(torch.Tensor.type_as, term, y))
        self.env[n] = y
        return True


def example_dtype(node) -> Optional[torch.dtype]:
    val = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def triton_kernels(device: torch.device) -> bool:
    """Whether Inductor generates Triton kernels for `device` (its C++ kernels on the CPU)."""
    import torch._inductor.config

    return device.type != "cpu" or torch._inductor.config.cpu_backend == "triton"


def triton_trains(device: torch.device, dtype: Optional[torch.dtype]) -> bool:
    """Where the fused op runs a training conv: fp16/bf16 on CUDA (under autocast, the conv's
    dtype); on the CPU only with the Triton interpreter on (how the tests run the kernel)."""
    if device.type == "cuda":
        return dtype in (torch.float16, torch.bfloat16)
    return device.type == "cpu" and triton_interpreter_on() and dtype in (
        torch.float16, torch.bfloat16, torch.float32, torch.float64)


def out_of_place(graph: fx.Graph, n: fx.Node, vector: fx.Node, src, read) -> fx.Node:
    """`n`'s op applied to `vector` in place of its tensor operand `src`, never in place (the
    vector may be a parameter such as a BatchNorm's beta)."""
    target = _INPLACE_FUNCTIONS.get(n.target, n.target)
    args = list(fx.node.map_arg(n.args, lambda a: vector if a is src else read(a)))
    kwargs = dict(fx.node.map_arg(n.kwargs, lambda a: vector if a is src else read(a)))
    if n.op == "call_method":
        name = n.target[:-1] if n.target.endswith("_") and not n.target.endswith("__") else n.target
        return graph.call_method(name, tuple(args), kwargs)
    if "inplace" in kwargs:
        kwargs["inplace"] = False
    else:
        try:
            params = list(inspect.signature(target).parameters)
        except (TypeError, ValueError):
            params = []
        if "inplace" in params and params.index("inplace") < len(args):
            args[params.index("inplace")] = False
    return graph.call_function(target, tuple(args), kwargs)


def lower_training(cap, sparsity: dict, lowering: str, cudagraphs: bool = False) -> tuple:
    """(compacted training graph, {conv node: ConvRecord}, {output position: captured node} of the
    outputs it hands out detached). `cudagraphs`: what lowering "auto" times (kernel time where
    the graph runs under CUDA graphs)."""
    low = TrainingLowering(cap, sparsity, lowering, cudagraphs)
    gm = low.run()
    for n, sp in sparsity.items():  # convs no handler rewrote
        if n not in low.records:
            low.record_unchanged(n, sp)
    return gm, low.records, low.param_outputs
