"""Graph outputs computed from parameters alone, outside the compiled training graph's autograd.

A pruned module's forward pre-hook writes `module.weight = weight_orig * mask` back to the module
on every call, so dynamo's graph returns each masked weight as an output that requires grad.
Compiled, every such output is a differentiable output of the forward: the backward takes a
gradient for each (autograd makes a full-size tensor of zeros for it when, as almost always,
nothing uses the weight attribute) and, under CUDA graphs, copies each into the graph's memory
on every step. The training lowering hands these outputs out detached instead
(`lowering/training.py: emit_output`), and `with_param_output_grads` gives them back their
gradient: one autograd node for all of them, whose backward runs only when a loss uses one
(a weight penalty on `module.weight`, say) and then recomputes them from the parameters under
autograd (`replay`), so the gradient that reaches `weight_orig` is eager's.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx

from fxsparse.runtime.guards import _fake


class ParamOutputs:
    """Which outputs of the compiled graph are computed from parameters alone (`slots`), and
    `replay`, a graph module computing them all from the graph inputs at `positions`."""

    def __init__(self, slots: Sequence[int], replay: fx.GraphModule, positions: Sequence[int]):
        self.slots, self.replay, self.positions = tuple(slots), replay, tuple(positions)

    @classmethod
    def of(cls, outputs: dict, graph: fx.Graph, root: torch.nn.Module) -> "ParamOutputs":
        """`outputs`: {output position: node of `graph` computed from placeholders and attributes
        only}. The replay holds a copy of the nodes they need, nothing else."""
        slots = sorted(outputs)
        needed: set = set()
        stack = [outputs[s] for s in slots]
        while stack:
            n = stack.pop()
            if n not in needed:
                needed.add(n)
                stack.extend(n.all_input_nodes)
        placeholders = graph.find_nodes(op="placeholder")
        replay, env = fx.Graph(), {}
        for n in graph.nodes:  # graph order: a node's inputs come first
            if n not in needed:
                continue
            if n.op == "placeholder":
                env[n] = replay.placeholder(n.name)
            else:
                env[n] = replay.node_copy(n, env.__getitem__)
        replay.output(tuple(env[outputs[s]] for s in slots))
        return cls(slots, fx.GraphModule(root, replay), [i for i, p in enumerate(placeholders) if p in needed])


class _Reattach(torch.autograd.Function):
    """Outputs: the detached tensors as they are, now with a gradient path to the parameters."""

    @staticmethod
    def forward(ctx, replay, count: int, *tensors):
        ctx.replay, ctx.count = replay, count
        ctx.save_for_backward(*tensors[count:])
        ctx.set_materialize_grads(False)  # unused outputs: no tensors of zeros
        return tensors[:count]  # (autograd views an input returned as it is, in C++)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        wanted = [i for i, g in enumerate(grads) if g is not None]
        leaves = [t for t in inputs if t.requires_grad]
        found = iter(())
        if wanted and leaves:
            with torch.enable_grad():
                outs = ctx.replay(*inputs)
            found = iter(torch.autograd.grad([outs[i] for i in wanted], leaves, [grads[i] for i in wanted],
                                             allow_unused=True))
        input_grads = [next(found, None) if t.requires_grad else None for t in inputs]
        return (None, None, *([None] * ctx.count), *input_grads)


def with_param_output_grads(fn, outputs: ParamOutputs):
    """`fn` (the compiled graph, called with every graph input) with the outputs in
    `outputs.slots` given their gradient path (module doc)."""
    def run(*args):
        result = fn(*args)
        if not torch.is_grad_enabled() or _fake(args):  # (DDPOptimizer's shape propagation)
            return result
        result = list(result)
        params = [args[i] for i in outputs.positions]
        attached = _Reattach.apply(outputs.replay, len(outputs.slots), *(result[s] for s in outputs.slots), *params)
        for s, t in zip(outputs.slots, attached):
            result[s] = t
        return result

    return run
