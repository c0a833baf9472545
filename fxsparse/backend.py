"""The `fxsparse` torch.compile backend: the stages, wired in order.

    capture -> sparsity -> propagation -> lowering -> Inductor
    (graph/)   (sparsity/)  (compaction/)  (lowering/)

`torch.compile(model, backend="fxsparse", options={...})` finds this function
through the `torch_dynamo_backends` entry point; `Options` lists what it takes.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.weak import WeakIdKeyDictionary

from fxsparse.compaction.plan import Storage
from fxsparse.compaction.propagate import propagate
from fxsparse.graph.capture import (_SOURCE_KEY, Capture, capture, placeholder_source, real_example_inputs,
                                    running_stat_counter, written_placeholders)
from fxsparse.lowering import choose
from fxsparse.lowering.rewrite import lower
from fxsparse.lowering.training import lower_training
from fxsparse.options import Options
from fxsparse.report import GraphReport, current_report, log_graph, write_dumps
from fxsparse.report.launches import captured_inductor_code, fxsparse_extra_launches, launch_sites
from fxsparse.runtime import GuardedGraph, ValueGuard
from fxsparse.runtime.param_outputs import ParamOutputs, with_param_output_grads
from fxsparse.sparsity.read import evaluate, param_only, placeholder_deps, read_all

_graph_counter = itertools.count()


@dataclass
class Rewrite:
    gm: fx.GraphModule
    report: GraphReport
    depends_on: list  # positions of the inputs whose values the rewrite read
    constant_outputs: dict  # output position -> tensor returned as it is (see with_constant_outputs)
    counters: list = field(default_factory=list)  # tensors watched in place of BatchNorm statistics
    frozen: list = field(default_factory=list)  # tensors the graph holds as attributes (see frozen_tensors)
    by_value: list = field(default_factory=list)  # positions of read inputs guarded by value (made anew per call)
    param_outputs: Optional[ParamOutputs] = None  # training: outputs handed out detached (runtime/param_outputs.py)


def is_inference(example_inputs: Sequence) -> bool:
    if not torch.is_grad_enabled():
        return True
    return not any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


def _on_cuda(example_inputs: Sequence, floating_only: bool = False) -> bool:
    """Every (floating-point) tensor input is on CUDA, and there is one."""
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)
               and (t.is_floating_point() or not floating_only)]
    return bool(tensors) and all(t.is_cuda for t in tensors)


def conv_lowering(opts: Options, example_inputs: Sequence, inference: bool) -> str:
    if opts.lowering != "auto":
        return opts.lowering
    on_gpu = _on_cuda(example_inputs, floating_only=True)
    half = any(isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16) for t in example_inputs)
    if choose.current().enabled(on_gpu, half, inference):
        return "auto"  # per chain: fused Triton op or cuDNN + Inductor epilogue, measured (choose.py)
    return "triton" if inference and on_gpu and half else "aten"


def channel_storage(opts: Options, example_inputs: Sequence) -> Storage:
    """Exact compaction on the CPU; on CUDA, stored channel counts in multiples of 8 (16-byte
    rows of fp16) and near-full layouts stored full (plan.Storage says why)."""
    multiple = opts.align_channels
    if multiple is None:
        multiple = 8 if _on_cuda(example_inputs, floating_only=True) else 1
    return Storage.align_channels(multiple)


def rewrite(gm: fx.GraphModule, example_inputs: Sequence, opts: Options, index: int,
            cudagraphs: bool = False) -> Rewrite:
    """Stages 1-4 on one graph: the compacted graph and its report (nothing compiled yet).
    `cudagraphs`: whether the compiled graph will run under CUDA graphs (what lowering "auto"
    times: kernel time there, the plain call otherwise)."""
    inference = is_inference(example_inputs)
    lowering = conv_lowering(opts, example_inputs, inference)
    cap = capture(gm, example_inputs)
    sparsity = read_all(cap, inference)
    propagating = opts.propagate and not _mutates_shared_tensor(cap)
    enabled = propagating
    if inference or not propagating:
        prop = propagate(cap, sparsity, enabled=enabled, storage=channel_storage(opts, example_inputs))
        new_gm, records, constant_outputs = lower(prop, sparsity, lowering, inference, cudagraphs)
        param_outputs = None
    else:  # training: kept channels carried across the graph, constants as graph values
        new_gm, records, detached = lower_training(cap, sparsity, lowering, cudagraphs)
        constant_outputs, prop = {}, None
        param_outputs = ParamOutputs.of(detached, gm.graph, gm) if detached else None
    report = GraphReport(index, "inference" if inference else "training", lowering, enabled,
                         [records[n] for n in gm.graph.nodes if n in records])
    if opts.propagate and not propagating:
        report.notes.append("an in-place op writes a tensor that other ops also read: channels not "
                            "carried across layers (per-conv compaction only)")
    if prop is not None:
        report.notes.extend(prop.stop_notes())
    if inference:
        report.notes.extend(freezing_hint(example_inputs, _on_cuda(example_inputs)))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    read = [i for i, p in enumerate(placeholders) if p in cap.read]
    # a float attribute (a BatchNorm's eps) that dynamo passes as a fresh 0-d tensor every call
    # under dynamic shapes, a mask an earlier piece of a split graph passes on: guarded by value
    by_value = [i for i in read if wrapped_scalar(placeholders[i]) or from_earlier_piece(placeholders[i])]
    depends_on = [i for i in read if i not in by_value]
    # (attributes: under freezing every statistic is one, and the guard watches them all)
    counters = batchnorm_counters([placeholders[i] for i in depends_on] + gm.graph.find_nodes(op="get_attr"), report)
    return Rewrite(new_gm, report, depends_on, constant_outputs, counters, frozen_tensors(gm), by_value,
                   param_outputs)


def wrapped_scalar(p: fx.Node) -> bool:
    """Whether placeholder `p` is a Python float dynamo wraps in a new tensor per call (known
    from its metadata at compile time only, so the answer is kept on the node)."""
    if "_fxsparse_scalar" not in p.meta:
        p.meta["_fxsparse_scalar"] = bool(getattr(p.meta.get("grapharg"), "pass_arg_as_tensor", False))
    return p.meta["_fxsparse_scalar"]


# Parameters arriving as graph inputs from which the report suggests freezing.
FREEZING_HINT_MIN_PARAMETERS = 32


def freezing_hint(example_inputs: Sequence, on_cuda: bool) -> list:
    """A report note for a CUDA inference graph traced without Inductor's freezing, whose
    parameters dynamo then marshals as inputs on every call: host time that small batches feel
    (MobileNet-v2 at B=1 on an H100: 377 us of host time a call against 288 us with freezing,
    docs/benchmarks.md). fxsparse's guard follows frozen weights (frozen_tensors), so
    freezing costs no staleness here. Not on the CPU, where frozen convs measured slower per
    call at small sizes (docs/benchmarks.md, CPU)."""
    params = sum(isinstance(t, torch.nn.Parameter) for t in example_inputs)
    if not on_cuda or params < FREEZING_HINT_MIN_PARAMETERS:
        return []
    return [f"{params} parameters are graph inputs: each call passes them through dynamo's wrapper. "
            "Setting torch._inductor.config.freezing = True before compiling (inference, grad off) hands "
            "them over as constants, for less host time per call; fxsparse still recompacts if one changes"]


def frozen_tensors(gm: fx.GraphModule) -> list:
    """Tensors the dynamo graph reads as attributes rather than inputs. Under
    `torch._inductor.config.freezing` (with grad off) dynamo hands parameters and buffers over
    this way: no per-call marshalling of ~300 inputs, but then no input carries them either.
    The rewrite folds their values and Inductor freezes them all, so the guard watches every
    one of them: an in-place change recompacts and recompiles instead of going stale (Inductor
    alone, frozen, keeps returning the old weights)."""
    out, seen = [], set()
    for node in gm.graph.find_nodes(op="get_attr"):
        t = getattr(gm, node.target, None)  # (dynamo's attribute names are flat, as evaluate() reads them)
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def batchnorm_counters(read: Sequence[fx.Node], report: GraphReport) -> list:
    """The `num_batches_tracked` buffers standing in, for the guard, for the BatchNorm running
    statistics the rewrite folded (a train-mode forward bumps them, not the statistics);
    a report note names the statistics that have none."""
    counters, blind = {}, []
    for p in read:
        is_stat, counter = running_stat_counter(p)
        if counter is not None:
            counters[id(counter)] = counter  # mean and var share their module's counter
        elif is_stat:
            blind.append(placeholder_source(p) or p.name)
    if blind:
        report.notes.append(
            "BatchNorm statistics folded without a num_batches_tracked to watch: a train-mode forward "
            "run outside the compiled model would not be seen (" + ", ".join(blind) + ")")
    return list(counters.values())


def _mutates_shared_tensor(cap) -> bool:
    return any(v.inplace and v.node.args and isinstance(v.node.args[0], fx.Node)
               and len(v.node.args[0].users) > 1 for v in cap.views.values())


def _inductor(gm: fx.GraphModule, example_inputs: Sequence, opts: Options, cudagraphs: bool):
    """Inductor's compiled graph, and its launches per call (None where no code was seen)."""
    from torch._inductor.compile_fx import compile_fx

    patches = {**opts.inductor_patches(), "triton.cudagraphs": cudagraphs}
    with captured_inductor_code([]) as codes:
        fn = compile_fx(gm, list(example_inputs), config_patches=patches)
    if not codes:
        return fn, None
    return fn, sum(launch_sites(codes[-1]).values()) + fxsparse_extra_launches(gm)


def _use_cudagraphs(opts: Options, example_inputs: Sequence, inference: bool) -> bool:
    """Whether the graph runs under CUDA graphs: as option `cudagraphs` (or `mode`) asks; by
    default on for CUDA inference with static shapes, off for training (as Inductor's default)."""
    if not _on_cuda(example_inputs):
        return False
    explicit = opts.cudagraphs if opts.cudagraphs is not None else opts.mode_wants_cudagraphs()
    if explicit is not None:
        return explicit
    static = all(isinstance(t, torch.Tensor) for t in example_inputs)  # a size input marks dynamic shapes
    return inference and static


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence, opts: Options):
    index = next(_graph_counter)
    inference = is_inference(example_inputs)
    cudagraphs = _use_cudagraphs(opts, example_inputs, inference)
    report = current_report(opts.dump_dir)

    def build(inputs: Sequence, compile_inputs: Optional[Sequence] = None):
        """`compile_inputs`: what Inductor compiles with, where `inputs` are not (fake inputs)."""
        rw = rewrite(gm, inputs, opts, index, cudagraphs)
        if opts.dump_dir:
            write_dumps(opts.dump_dir, index, gm, rw.gm, inputs)
        if opts.inductor:
            used = drop_unused_inputs(rw.gm)
            compile_inputs = inputs if compile_inputs is None else compile_inputs
            fn, rw.report.launches = _inductor(rw.gm, [compile_inputs[i] for i in used], opts, cudagraphs)
            fn = with_inputs_at(fn, used, len(inputs))
        else:
            fn = rw.gm.forward
        _record(report, rw.report, opts)
        fn = with_constant_outputs(fn, rw.constant_outputs, graph_output_count(gm))
        if rw.param_outputs is not None:
            fn = with_param_output_grads(fn, rw.param_outputs)
        return fn, ValueGuard(rw.depends_on, inputs, list(rw.constant_outputs.values()) + rw.counters + rw.frozen,
                              check=opts.guard_check(), by_value=rw.by_value)

    real = values_from_earlier_pieces(gm, real_example_inputs(gm, example_inputs))
    if all(a is b for a, b in zip(real, example_inputs)):
        return GuardedGraph(build, example_inputs)
    # a piece of a graph DDPOptimizer split: values read from the real tensors, compiled on the fake ones
    remember_parameter_outputs(gm, real)
    return GuardedGraph(build, real, built=build(real, example_inputs))


# -- values crossing the cuts of a graph DDPOptimizer split --------------------------------
# DDPOptimizer cuts the graph where a bucket of parameters fills, counting backwards, so a cut
# often falls between a pruned conv's `mask.to(dtype)` (a buffer: in no bucket) and its
# `mask * weight_orig`: the next piece receives the mask as an activation, without a source.
# A piece's outputs computed from non-trainable parameters and buffers alone are evaluated on
# the real tensors when the piece is compiled, and kept under the fake value dynamo gave the
# node: split_module gives the next piece's placeholder that same object in its metadata.

_piece_outputs = WeakIdKeyDictionary()  # dynamo's fake value of a node -> (real value, source name)
_FROM_PIECE_KEY = "_fxsparse_from_piece"


def remember_parameter_outputs(gm: fx.GraphModule, inputs: Sequence) -> None:
    placeholders = gm.graph.find_nodes(op="placeholder")
    cap = Capture(gm, dict(zip(placeholders, inputs)), {}, written=written_placeholders(gm.graph))
    (output,) = gm.graph.find_nodes(op="output")
    for n in output.all_input_nodes:
        fake = n.meta.get("example_value")
        if n.op == "placeholder" or not isinstance(fake, torch.Tensor) or fake in _piece_outputs:
            continue
        deps = placeholder_deps(n)
        values = [cap.values.get(p) for p in deps]
        if (deps and param_only(n, cap) and all(isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor)
                                                  and not v.requires_grad for v in values)):
            _piece_outputs[fake] = (evaluate(n, cap), placeholder_source(deps[0]))


def values_from_earlier_pieces(gm: fx.GraphModule, inputs: list) -> list:
    """`inputs` with each value an earlier piece remembered (remember_parameter_outputs) in
    place of its fake; such a placeholder counts as a buffer from then on (its source: the
    first buffer it was computed from), guarded by value since it arrives anew every call."""
    out = list(inputs)
    for i, p in enumerate(gm.graph.find_nodes(op="placeholder")[:len(out)]):
        found = _piece_outputs.get(p.meta.get("example_value")) if isinstance(out[i], FakeTensor) else None
        if found is not None and found[0].shape == out[i].shape and placeholder_source(p) is None:
            out[i], p.meta[_SOURCE_KEY] = found
            p.meta[_FROM_PIECE_KEY] = True
    return out


def from_earlier_piece(p: fx.Node) -> bool:
    return p.meta.get(_FROM_PIECE_KEY, False)


def drop_unused_inputs(gm: fx.GraphModule) -> list:
    """Removes the placeholders nothing reads any more and returns the positions of the rest.

    Dynamo hands every parameter and buffer over as an input (~300 for a ResNet-50); the
    rewrite folds most of them into constants, and an input the compiled graph still took
    would cost on every call (Inductor's wrappers and CUDA-graph tree walk the argument list).
    """
    placeholders = gm.graph.find_nodes(op="placeholder")
    used = [i for i, p in enumerate(placeholders) if p.users or _symbolic_size(p)]
    if len(used) < len(placeholders):
        for i, p in enumerate(placeholders):
            if i not in used:
                gm.graph.erase_node(p)
        gm.recompile()
    return used


def _symbolic_size(p: fx.Node) -> bool:
    """A size dynamo passes as an input under dynamic shapes. Kept though unread: AOTAutograd then
    saves it for the backward rather than a size expression of an activation, whose cached
    guards named a tensor the backward does not take (a warm FX graph cache failed every later
    compile of the graph with KeyError)."""
    return isinstance(p.meta.get("example_value"), torch.SymInt)


def with_inputs_at(fn, positions: list, count: int):
    """`fn` of the inputs at `positions`, called with all `count` of them."""
    if positions == list(range(count)):
        return fn

    def run(*args):
        return fn(*[args[i] for i in positions])

    return run


def graph_output_count(gm: fx.GraphModule) -> int:
    """How many values the graph returns (1 for a single, unpacked result)."""
    (output,) = gm.graph.find_nodes(op="output")
    result = output.args[0]
    return len(result) if isinstance(result, (tuple, list)) else 1


def with_constant_outputs(fn, constants: dict, total: int):
    """Puts the graph's constant outputs back among what `fn` returns.

    A pruned module's `weight` (mask * weight_orig) is a graph output that dynamo writes back
    to the module on every call; its value only changes when its inputs do (then the guard
    rebuilds), so the wrapper returns one tensor instead of the compiled graph producing it:
    no kernel per pruned conv, and no per-output bookkeeping under CUDA graphs.
    """
    if not constants:
        return fn
    template = [constants.get(i) for i in range(total)]  # `total` outputs, constants in place
    free = [i for i in range(total) if i not in constants]

    def run(*args):
        result = template.copy()
        for slot, value in zip(free, fn(*args)):
            result[slot] = value
        return result

    return run


def _record(report, graph_report: GraphReport, opts: Options) -> None:
    report.graphs = [g for g in report.graphs if g.index != graph_report.index] + [graph_report]
    report.graphs.sort(key=lambda g: g.index)
    log_graph(graph_report)
    if opts.dump_dir:
        report.write(opts.dump_dir)


def fxsparse_backend(gm: fx.GraphModule, example_inputs: Sequence, options: Optional[dict] = None,
                     mode: Optional[str] = None):
    """torch.compile backend entry point (`backend="fxsparse"`; torch.compile passes `mode` and
    `options` only when they are set)."""
    opts = Options.parse(options, mode=mode)
    return compile_graph(gm, example_inputs, opts)


__all__ = ["fxsparse_backend", "compile_graph", "rewrite", "placeholder_source"]
