"""`fxsparse.compact(model, *example_inputs)`: the compaction as a standalone, smaller model.

    small = fxsparse.compact(model, x)      # an fx.GraphModule: only kept channels, BN folded
    small(x)                                # == model.eval()(x), for any batch size
    small.report                            # the rows fxsparse.explain prints

The backend's stages (capture -> sparsity -> propagation -> lowering) run once on the dynamo
graph of `model(*example_inputs)` in eval mode, batch dimension symbolic. The compacted graph
they emit then becomes a module of its own: every tensor it reads is a copy of only what it
uses (kept channels, folded BatchNorm, bias maps), registered as a parameter or buffer; the
model's own tensors are no longer referenced; channel moves are emitted as plain
`index_select` / `where` ops, so with lowering "aten" (the default off CUDA) the module holds
torch ops only: torch.export, torch.onnx.export(dynamo=True), AOTInductor and torch.save take
it as any other module, and what they write loads without the model's code. Lowering "triton"/"auto" (CUDA, fp16/bf16) keeps `torch.ops.fxsparse.conv2d`
where it is faster: an opaque custom op (with its fake kernel), which export carries and
AOTInductor calls through its proxy executor, so the loading process must `import fxsparse`.

Shipping it (the .pt2 of torch.export loads with neither fxsparse nor the model's code):
    ep = torch.export.export(small, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, "small.pt2");  torch.export.load("small.pt2").module()(x)
    torch.onnx.export(small, (x,), dynamo=True).save("small.onnx")         # onnxruntime
    torch._inductor.aoti_compile_and_package(ep)  ->  aoti_load_package    # C++ / Python
    torch.save(small, "small.pt");  torch.load("small.pt", weights_only=False)   # needs fxsparse
    small.state_dict()   # loads into fxsparse.compact(model, x) of the same model

What the stages leave dense (dynamic weights, ops fxsparse does not understand) stays dense
and exact, and the report says why. The result is checked against the eager model on the
example inputs (and on one batch size more) before it is returned: a mismatch is an error,
as are a graph break (named) and a forward that writes model state.
"""
from __future__ import annotations

import contextlib
import itertools
import re
import types
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from fxsparse.backend import freezing_hint, graph_output_count, rewrite
from fxsparse.graph.capture import placeholder_source
from fxsparse.kernels.layout import relayout, select_channels
from fxsparse.options import Options
from fxsparse.report import Report

__all__ = ["compact", "CompactError"]


class CompactError(RuntimeError):
    """The model cannot be turned into one exact compact module (the message says why)."""


@dataclass(frozen=True)
class CompactOptions:
    # "aten": plain compacted convs (any device); "triton": torch.ops.fxsparse.conv2d;
    # "auto": per conv chain the faster of the two, timed (fp16/bf16 on CUDA; aten elsewhere).
    # None: "auto" for fp16/bf16 inputs on CUDA, "aten" otherwise
    lowering: Optional[str] = None
    # carry removed channels across layers (off: each conv compacts only itself)
    propagate: bool = True
    # stored channel counts in multiples of this (None: exact, 1)
    align_channels: Optional[int] = None
    # the batch dimension (dim 0 of every tensor input) stays symbolic
    dynamic_batch: bool = True
    # compare with the eager model on the example inputs before returning (tolerances: CHECK_TOLERANCE)
    check: bool = True

    @staticmethod
    def parse(options: dict) -> "CompactOptions":
        allowed = {"lowering", "propagate", "align_channels", "dynamic_batch", "check"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise ValueError(f"fxsparse.compact: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
        for flag in ("dynamic_batch", "check"):
            if flag in options and not isinstance(options[flag], bool):
                raise ValueError(f"fxsparse.compact: option {flag} must be True or False, got {options[flag]!r}")
        opts = CompactOptions(**options)
        opts.backend_options(torch.float32, False)  # validates the options the stages share
        return opts

    def backend_options(self, dtype: torch.dtype, on_cuda: bool) -> Options:
        lowering = self.lowering
        if lowering is None:
            lowering = "auto" if on_cuda and dtype in (torch.float16, torch.bfloat16) else "aten"
        return Options.parse({"lowering": lowering, "propagate": self.propagate,
                              "align_channels": self.align_channels, "inductor": False})


# max |compact - eager| allowed at construction, relative to max(1, max |eager|)
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 3e-2, torch.bfloat16: 1e-1}


def compact(model: nn.Module, *example_inputs, **options) -> fx.GraphModule:
    """A standalone module computing what `model.eval()` computes, holding only kept channels.

    `example_inputs`: the tensors `model` is called with (dim 0 the batch unless
    dynamic_batch=False); the result runs on their device and dtype. Options: see
    CompactOptions. Raises CompactError where the forward does not trace as one graph
    (the message names the graph break) or writes model state."""
    opts = CompactOptions.parse(options)
    inputs = _checked_inputs(model, example_inputs)
    trace_inputs = _batch_of_two(inputs) if opts.dynamic_batch else inputs
    first = next(t for t in inputs if isinstance(t, torch.Tensor))
    backend_opts = opts.backend_options(first.dtype, first.is_cuda)
    with _eval_mode(model):
        expected = _eager_without_state_writes(model, trace_inputs)
        small = _trace_and_build(model, trace_inputs, backend_opts, opts.dynamic_batch, expected)
        if opts.check:
            check_exact(small, model, trace_inputs, expected)
            if opts.dynamic_batch:
                other = _batch_of(inputs, 3)
                check_exact(small, model, other, _eager(model, other))
    return small


# -- inputs and modes ----------------------------------------------------------------------

def _checked_inputs(model, example_inputs) -> tuple:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxsparse.compact: model must be a torch.nn.Module, got {type(model).__name__}")
    if not example_inputs:
        raise ValueError("fxsparse.compact: pass the model's example inputs (at least one tensor): "
                         "fxsparse.compact(model, x)")
    others = [type(t).__name__ for t in example_inputs if not isinstance(t, torch.Tensor)]
    if others:  # dynamo would bake their values in, and the module would ignore new ones
        raise ValueError(f"fxsparse.compact: example inputs must be tensors, got {others}; bind other "
                         "arguments in a wrapper module (its forward taking tensors only)")
    return tuple(example_inputs)


def _batch_of(inputs: Sequence, batch: int) -> tuple:
    """The inputs with `batch` rows (their rows repeated in turn): new tensors, same memory format."""
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor):
            if t.dim() == 0:
                raise ValueError("fxsparse.compact: a 0-d tensor input has no batch dimension; "
                                 "pass dynamic_batch=False")
            fmt = torch.channels_last if t.dim() == 4 and _is_channels_last(t) else torch.contiguous_format
            rows = t[torch.arange(batch, device=t.device) % t.shape[0]]
            t = rows.contiguous(memory_format=fmt)
        out.append(t)
    return tuple(out)


def _batch_of_two(inputs: Sequence) -> tuple:
    """A batch of at least 2 to trace with: dynamo specialises a size-1 dimension to 1."""
    if all(not isinstance(t, torch.Tensor) or (t.dim() > 0 and t.shape[0] >= 2) for t in inputs):
        return tuple(inputs)
    return _batch_of(inputs, 2)


def _is_channels_last(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, t in modes.items():
            m.training = t


def _eager(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def _model_state(model: nn.Module) -> dict:
    """Every tensor the modules hold (parameters, buffers, plain tensor attributes such as
    prune's recomputed `weight`), by (module, name)."""
    state = {}
    for path, m in model.named_modules():
        tensors = {**m._parameters, **m._buffers,
                   **{k: v for k, v in vars(m).items() if isinstance(v, torch.Tensor)}}
        for name, t in tensors.items():
            if t is not None:
                state[(path, name)] = t
    return state


def _eager_without_state_writes(model: nn.Module, inputs: Sequence):
    """The eval-mode output; a forward that changes the model's state (a counter, a cache) is an
    error (a standalone module cannot reproduce it), and the state is put back as it was. (A pruned
    module's `weight` attribute takes the device and dtype of `.cuda().half()` on its first forward:
    not a write.)"""
    before = {k: t.detach().clone() for k, t in _model_state(model).items()}
    expected = _eager(model, inputs)
    after = _model_state(model)
    changed = [k for k, t in before.items() if k not in after or after[k].shape != t.shape
               or not torch.equal(after[k].detach(), t.to(after[k].device, after[k].dtype))] + [k for k in after if k not in before]
    if changed:
        with torch.no_grad():
            for k in changed:
                if k in after and k in before and after[k].shape == before[k].shape:
                    after[k].copy_(before[k])
        names = ", ".join(".".join(filter(None, k)) for k in changed[:5])
        raise CompactError(f"fxsparse.compact: the forward writes model state ({names}), which a standalone "
                           "module cannot reproduce")
    return expected


# -- tracing -------------------------------------------------------------------------------

def _run_model(model, *args):
    return model(*args)


_fresh = itertools.count()


def _trace_and_build(model, inputs: tuple, opts: Options, dynamic_batch: bool, expected) -> fx.GraphModule:
    """Runs the stages inside a dynamo backend (dynamo's source metadata, which tells
    parameters from inputs, exists only there) and builds the module from their graph."""
    built = []

    def backend(gm, graph_inputs):
        with torch.no_grad():
            rw = rewrite(gm, graph_inputs, opts, 0)
        # (advice on compiling: the compact module is not compiled by fxsparse)
        hints = freezing_hint(graph_inputs, True)
        rw.report.notes = [n for n in rw.report.notes if n not in hints]
        built.append(ModuleBuilder(gm, rw, graph_inputs, traced, expected).build())
        return gm.forward

    traced = []
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t = t.detach()  # a new tensor object: mark_dynamic leaves the caller's alone
            if dynamic_batch:
                torch._dynamo.mark_dynamic(t, 0)
        traced.append(t)
    # a fresh code object per call: dynamo's cache (and its recompile limit) is per code object
    code = _run_model.__code__.replace(co_name=f"_fxsparse_compact_{next(_fresh)}")
    fn = types.FunctionType(code, _run_model.__globals__, code.co_name)
    try:
        with torch.no_grad():
            torch.compile(fn, backend=backend, fullgraph=True, dynamic=None if dynamic_batch else False)(
                model, *traced)
    except torch.fx.experimental.symbolic_shapes.ConstraintViolationError as e:
        raise CompactError("fxsparse.compact: the forward does not hold for every batch size (it specialises "
                           f"on dim 0 of an input); pass dynamic_batch=False:\n{e}") from e
    except torch._dynamo.exc.Unsupported as e:
        raise CompactError("fxsparse.compact: the model's forward does not trace as one graph "
                           f"(graph break), so it cannot be compacted as a whole:\n{e}") from e
    except torch._dynamo.exc.BackendCompilerFailed as e:
        raise (e.inner_exception if isinstance(e.inner_exception, (CompactError, ValueError)) else e) from e
    finally:
        # dynamo marks code first run inside a backend (the built module's forward ran there, in
        # the exactness check) as never to compile: a user's torch.compile of the module would
        # silently run it eagerly
        _forget_dynamo_state([code] + [type(m).forward.__code__ for m in built])
    if len(built) != 1:
        raise CompactError(f"fxsparse.compact: expected one graph of the forward, dynamo produced {len(built)}")
    return built[0]


def _forget_dynamo_state(codes: Sequence) -> None:
    with contextlib.suppress(Exception):
        from torch._C._dynamo.eval_frame import reset_code

        for code in codes:
            reset_code(code)


# -- the standalone module -----------------------------------------------------------------

class ModuleBuilder:
    """Turns the lowered graph (whose inputs are dynamo's: parameters, sizes and the model's
    arguments) into a GraphModule of the model's arguments only, owning its tensors."""

    def __init__(self, dynamo_gm: fx.GraphModule, rw, graph_inputs: Sequence, call_inputs: tuple, expected):
        self.dynamo_gm = dynamo_gm
        self.rw = rw
        self.lowered: fx.GraphModule = rw.gm
        self.graph_inputs = list(graph_inputs)
        self.call_inputs = call_inputs
        self.expected = expected
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.names: dict = {}  # id(tensor) -> attribute name
        self.named: list = []  # the tensors behind `names`, alive so that no id is reused
        self.env: dict = {}
        self.values: dict = {}  # lowered node -> value on the example inputs (ranks of relayouts)

    # -- constants --------------------------------------------------------------------
    def const(self, tensor: torch.Tensor, hint: str) -> fx.Node:
        """A get_attr of a copy of `tensor` owned by the module (one attribute per tensor)."""
        name = self.names.get(id(tensor))
        if name is None:
            base = re.sub(r"\W", "_", hint).strip("_") or "constant"
            name = base
            for i in itertools.count(1):
                if not hasattr(self.root, name):
                    break
                name = f"{base}_{i}"
            # a copy: no reference to the model's storage, and a view saves only its own elements
            copy = tensor.detach().clone()
            if copy.is_floating_point():
                self.root.register_parameter(name, nn.Parameter(copy, requires_grad=False))
            else:
                self.root.register_buffer(name, copy)
            self.names[id(tensor)] = name
            self.named.append(tensor)
        return self.graph.get_attr(name)

    # -- inputs -----------------------------------------------------------------------
    def input_position(self, value) -> Optional[int]:
        return next((i for i, t in enumerate(self.call_inputs) if t is value), None)

    def size_source(self, symint, placeholders: list) -> tuple:
        """(input placeholder, dim) whose size `symint` is."""
        expr = symint.node.expr
        for p in placeholders:
            fake = p.meta.get("example_value")
            if isinstance(fake, torch.Tensor):
                for d, s in enumerate(fake.shape):
                    if isinstance(s, torch.SymInt) and s.node.expr == expr:
                        return p, d
        raise CompactError(f"fxsparse.compact: the graph reads a size ({symint}) that is no input's dimension")

    def emit_inputs(self) -> None:
        lowered_ph = self.lowered.graph.find_nodes(op="placeholder")
        dynamo_ph = self.dynamo_gm.graph.find_nodes(op="placeholder")
        names = ["x"] if len(self.call_inputs) == 1 else [f"x{i}" for i in range(len(self.call_inputs))]
        call_ph = self.call_placeholders = [self.graph.placeholder(n) for n in names]
        user = {}  # lowered placeholder -> call placeholder
        sizes = []
        for new, old, value in zip(lowered_ph, dynamo_ph, self.graph_inputs):
            source = placeholder_source(old)
            pos = None if source is not None else self.input_position(value)
            if pos is not None:
                user[new] = call_ph[pos]
                self.env[new] = call_ph[pos]
            elif isinstance(value, torch.SymInt):
                sizes.append((new, value))
            elif isinstance(value, torch.Tensor) and (source is not None or _is_global(old)):
                if new.users:  # the model's state (or a global tensor), frozen as it is now
                    self.env[new] = self.const(value, source or new.name)
            elif new.users:
                raise CompactError(f"fxsparse.compact: graph input {new.name} ({type(value).__name__}) is "
                                   "neither a model argument, a tensor of the model nor a size")
        for new, value in sizes:
            if new.users:
                src, dim = self.size_source(value, list(user))
                self.env[new] = self.graph.call_function(torch.ops.aten.sym_size.int, (user[src], dim))

    # -- the walk ---------------------------------------------------------------------
    def concrete_inputs(self) -> list:
        """The lowered graph's inputs with every size a number (for the example run)."""
        out = []
        for p, v in zip(self.lowered.graph.find_nodes(op="placeholder"), self.graph_inputs):
            if isinstance(v, torch.SymInt):
                src, dim = self.size_source(v, self.lowered.graph.find_nodes(op="placeholder"))
                v = self.graph_inputs[self.lowered.graph.find_nodes(op="placeholder").index(src)].shape[dim]
            out.append(v)
        return out

    def record_values(self) -> None:
        values = self.values

        class Recorder(fx.Interpreter):
            def run_node(self, n):
                result = super().run_node(n)
                values[n] = result
                return result

        with torch.no_grad():
            Recorder(self.lowered).run(*self.concrete_inputs())

    def build(self) -> fx.GraphModule:
        self.record_values()
        self.emit_inputs()
        for n in self.lowered.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                self.emit_output(n)
            elif n.op == "get_attr":
                value = getattr(self.lowered, n.target)
                if not isinstance(value, torch.Tensor):
                    raise CompactError(f"fxsparse.compact: the graph reads attribute {n.target} "
                                       f"({type(value).__name__}), not a tensor")
                self.env[n] = self.const(value, n.target.replace("_fxsparse_", ""))
            elif n.target is relayout:
                self.env[n] = self.emit_relayout(n)
            elif n.target is select_channels:
                x, index = (self.env[a] for a in n.args)
                self.env[n] = self.graph.call_function(torch.index_select, (x, 1, index))
            else:
                self.env[n] = self.graph.node_copy(n, lambda a: self.env[a])
        fold_constants(self.graph, self.root, self.const)
        gm = fx.GraphModule(self.root, self.graph, class_name="CompactModule")
        self.rw.report.notes.extend(restored_notes(self.lowered.graph))
        gm.report = Report([self.rw.report])
        return gm

    def emit_relayout(self, n: fx.Node) -> fx.Node:
        """relayout as gather + where: output channel c is x's channel src[i] where c == dst[i],
        else fill[c]. Every operand but x is a constant, so no size of x enters the graph."""
        x_node, src_node, dst_node, fill_node = n.args
        src, dst, fill = (self.values[a] for a in (src_node, dst_node, fill_node))
        rank = self.values[x_node].dim()
        channels = fill.shape[0]
        gather = torch.zeros(channels, dtype=torch.long, device=src.device)
        keep = torch.zeros(channels, dtype=torch.bool, device=src.device)
        gather[dst] = src
        keep[dst] = True
        shape = (1, channels) + (1,) * (rank - 2)
        x_dtype = self.values[x_node].dtype
        picked = self.graph.call_function(torch.index_select, (self.env[x_node], 1, self.const(gather, "gather")))
        return self.graph.call_function(torch.where, (
            self.const(keep.reshape(shape), "keep"), picked, self.const(fill.to(x_dtype).reshape(shape), "fill")))

    def emit_output(self, n: fx.Node) -> None:
        """The model's return value. Dynamo's graph also returns what the forward writes back to
        the model (prune's recomputed `weight`), and the lowering hands parameter-only outputs
        over as constants; each value the model returns is matched to the graph output that
        computes it (equal on the example inputs; check_exact confirms on others)."""
        outs = n.args[0]
        computed = iter(list(outs) if isinstance(outs, (tuple, list)) else [outs])
        candidates = []  # (emitted node or constant tensor, its value on the example inputs)
        for i in range(graph_output_count(self.dynamo_gm)):
            if i in self.rw.constant_outputs:
                t = self.rw.constant_outputs[i]
                candidates.append((t, t))
            else:
                a = next(computed)
                candidates.append((a, self.values.get(a) if isinstance(a, fx.Node) else a))
        leaves, spec = pytree.tree_flatten(self.expected)
        used: set = set()
        self.graph.output(pytree.tree_unflatten([self.output_for(leaf, candidates, used) for leaf in leaves], spec))

    def output_for(self, leaf, candidates: list, used: set):
        if not isinstance(leaf, torch.Tensor):
            return leaf
        for t, p in zip(self.call_inputs, self.call_placeholders):
            if _same_tensor(leaf, t):  # an input returned as it is: not a graph output
                return p
        fits = [(float((v.float() - leaf.float()).abs().max()) if v.numel() else 0.0, i)
                for i, (_, v) in enumerate(candidates) if i not in used and isinstance(v, torch.Tensor)
                and v.shape == leaf.shape and v.dtype == leaf.dtype]
        if not fits:
            raise CompactError(f"fxsparse.compact: the model returns a {tuple(leaf.shape)} {leaf.dtype} tensor "
                               "that the traced graph does not compute")
        _, i = min(fits)
        used.add(i)
        value = candidates[i][0]
        if isinstance(value, fx.Node):
            return self.env[value]
        return self.const(value, "output")


# ops that read a compacted layout as it is stored (the lowering's own, and channel-aware ones)
_READS_LAYOUTS = {torch.add, torch.conv2d, torch.nn.functional.linear, relayout, select_channels}


def restored_notes(graph: fx.Graph) -> list:
    """A report note naming the ops before which removed channels are put back (full width,
    holding their constants): ops the propagation does not carry channels through, and the
    model's outputs."""
    readers = set()
    for n in graph.nodes:
        if n.target is relayout:
            for u in n.users:
                if u.op == "output":
                    readers.add("the model's output")
                elif u.target not in _READS_LAYOUTS and "fxsparse" not in str(u.target):
                    readers.add(str(getattr(u.target, "__name__", u.target)))
    if not readers:
        return []
    return ["removed channels are put back (full width, holding their constant values) before "
            + ", ".join(sorted(readers)) + ": channels are not carried through them, so the layers "
            "around them keep those channels"]


def _same_tensor(a: torch.Tensor, b) -> bool:
    return (isinstance(b, torch.Tensor) and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.shape == b.shape and a.stride() == b.stride())


def _is_global(placeholder: fx.Node) -> bool:
    source = getattr(placeholder.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    return isinstance(name, str) and name.startswith("G[")


def fold_constants(graph: fx.Graph, root: nn.Module, const) -> None:
    """Evaluates every op that reads constants only (e.g. prune's mask * weight_orig of a conv
    left dense) into one constant, then drops the attributes and nodes nothing reads."""
    values = {}
    for node in list(graph.nodes):
        if node.op == "get_attr":
            values[node] = getattr(root, node.target)
            continue
        if node.op not in ("call_function", "call_method") or _mutates(node):
            continue
        deps = node.all_input_nodes
        if not deps or not all(d in values for d in deps):
            continue
        args = fx.node.map_arg(node.args, lambda a: values[a])
        kwargs = fx.node.map_arg(node.kwargs, lambda a: values[a])
        with torch.no_grad():
            value = node.target(*args, **kwargs) if node.op == "call_function" else getattr(
                args[0], node.target)(*args[1:], **kwargs)
        if not isinstance(value, torch.Tensor):
            continue
        with graph.inserting_before(node):
            folded = const(value, f"folded_{node.name}")
        values[folded] = value
        node.replace_all_uses_with(folded)
        graph.erase_node(node)
    for node in reversed(list(graph.nodes)):
        if not node.users and (node.op == "get_attr" or (node.op == "call_function" and node in values)):
            graph.erase_node(node)
    used = {n.target for n in graph.find_nodes(op="get_attr")}
    for name in [n for n, _ in itertools.chain(root.named_parameters(), root.named_buffers()) if n not in used]:
        delattr(root, name)


def _mutates(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", str(node.target))
    return name.endswith("_") or name in _INPLACE_OPERATORS or bool(node.kwargs.get("inplace"))


_INPLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "ipow", "iand", "ior", "ixor"}


# -- the check -------------------------------------------------------------------------------

def check_exact(small: nn.Module, model: nn.Module, inputs: Sequence, expected) -> None:
    """Raises CompactError unless `small(*inputs)` matches `expected` (the eager eval output)."""
    with torch.no_grad():
        got = small(*inputs)
    got_leaves, want_leaves = pytree.tree_leaves(got), pytree.tree_leaves(expected)
    for g, w in zip(got_leaves, want_leaves):
        if not isinstance(w, torch.Tensor):
            continue
        if g.shape != w.shape or g.dtype != w.dtype:
            raise CompactError(f"fxsparse.compact: the compact module returns {tuple(g.shape)} {g.dtype}, "
                               f"the model {tuple(w.shape)} {w.dtype}")
        if not w.is_floating_point():
            if not torch.equal(g, w):
                raise CompactError("fxsparse.compact: the compact module's integer output differs from the model's")
            continue
        scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
        err = float((g.float() - w.float()).abs().max()) if w.numel() else 0.0
        if not err <= CHECK_TOLERANCE.get(w.dtype, 1e-4) * scale:
            raise CompactError(f"fxsparse.compact: the compact module differs from the eval-mode model by {err:.3g} "
                               f"(output scale {scale:.3g}) on batch {inputs[0].shape[0]}; not returned")
