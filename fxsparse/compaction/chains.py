"""Which nodes run inside one conv kernel: conv -> BatchNorm -> activation -> residual add.

A chain grows from a planned conv through single-user successors, in the
orders ResNet-like blocks use:

    conv [-> batch_norm] [-> act]                 epilogue: bias, BN, act
    conv [-> batch_norm] -> add [-> act]          residual added before act
    conv [-> batch_norm] -> act -> add            residual added after act

The last node is the chain's anchor: the lowering emits the fused conv when it
reaches the anchor, where every input (the residual too) already exists.
A chain is part of the compaction plan (Propagation.chains): it fixes which
BatchNorm folds into which conv and the layout the chain writes its result in
(`result`); the lowering emits each chain fused or as an aten conv whose
epilogue Inductor fuses.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

import torch
import torch.fx as fx

from fxsparse.compaction.plan import CONST_DTYPE, BiasMap, ConvPlan, Layout

if TYPE_CHECKING:
    from fxsparse.compaction.propagate import Propagation


@dataclass(frozen=True, eq=False)
class Chain:
    conv: fx.Node
    # the layout the chain writes its result in (see result_layout); None until planned
    result: Optional[Layout] = None
    # the conv's constants with its BatchNorm folded in (CONST_DTYPE, on the CPU): w' = w * a,
    # b' = b * a + s, bias map' = bias map * a
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    bias_map: Optional[BiasMap] = None
    bn: Optional[fx.Node] = None
    act: Optional[fx.Node] = None
    add: Optional[fx.Node] = None
    residual: Optional[fx.Node] = None  # the add's other operand
    residual_after_activation: bool = False

    @property
    def nodes(self) -> list:
        return [n for n in (self.conv, self.bn, self.act, self.add) if n is not None]

    @property
    def anchor(self) -> fx.Node:
        return max(self.nodes, key=_position)

    @property
    def pre_activation(self) -> fx.Node:
        """The node whose value the conv epilogue computes before activation and residual."""
        return self.bn or self.conv


def _position(node: fx.Node) -> int:
    # fx node lists are ordered; a node's index in its graph is its position (plan_chains
    # numbers them all: searching the node list on every call made chains quadratic)
    pos = node.meta.get("_fxsparse_pos")
    if pos is None:
        pos = node.meta["_fxsparse_pos"] = list(node.graph.nodes).index(node)
    return pos


def _only_user(node: fx.Node, output_nodes: set) -> Optional[fx.Node]:
    if len(node.users) != 1 or node in output_nodes:
        return None
    return next(iter(node.users))


def plan_chains(prop: "Propagation") -> dict:
    """{node: Chain} for every node that is part of a chain."""
    graph = prop.cap.gm.graph
    for i, n in enumerate(graph.nodes):
        n.meta["_fxsparse_pos"] = i
    output = next(n for n in graph.nodes if n.op == "output")
    output_nodes = set(output.all_input_nodes)
    chains = {}
    if not prop.enabled:  # per-conv compaction: each conv alone, the BN and what follows read full-width tensors
        return {conv: planned(prop, Chain(conv), plan) for conv, plan in prop.conv_plans.items()}
    for conv, plan in prop.conv_plans.items():
        chain = Chain(conv)
        nxt = _only_user(conv, output_nodes)
        if nxt is not None and nxt in prop.bn_folds:
            chain, nxt = replace(chain, bn=nxt), _only_user(nxt, output_nodes)
        if not plan.depthwise and plan.groups == 1:
            chain = _extend_epilogue(prop, chain, nxt, output_nodes)
            if chain.add is not None and chain.add in chains:
                # both operands of a residual add are conv chains (a downsample branch): one
                # chain takes the add, the other ends before it, else neither node is emitted
                chain = replace(chain, add=None, residual=None, act=None, residual_after_activation=False)
                if nxt is not None and _activation(prop, nxt):
                    chain = replace(chain, act=nxt)
        chain = planned(prop, chain, plan)
        for n in chain.nodes:
            chains[n] = chain
    return chains


def planned(prop: "Propagation", chain: Chain, plan: ConvPlan) -> Chain:
    """`chain` with its result layout and its BatchNorm-folded constants."""
    weight, bias, bias_map = plan.weight.to("cpu", CONST_DTYPE), plan.bias, plan.bias_map
    if chain.bn is not None:
        a, s = prop.bn_folds[chain.bn]
        a_k, s_k = a[plan.out_layout.kept], s[plan.out_layout.kept]
        weight = weight * a_k.reshape(-1, 1, 1, 1)
        bias = (torch.zeros_like(a_k) if bias is None else bias) * a_k + s_k
        bias_map = None if bias_map is None else bias_map.scaled(a_k)
    return replace(chain, result=result_layout(prop, chain), weight=weight, bias=bias, bias_map=bias_map)


def result_layout(prop: "Propagation", chain: Chain) -> Layout:
    """The layout a chain writes its result in: its residual add's; for a chain without one
    whose only reader is an add storing more channels (a downsample branch), that add's,
    which it then reads without a relayout; else the chain's own."""
    if chain.add is not None:
        return prop.layout[chain.add]
    own = prop.layout[chain.anchor]
    plan = prop.conv_plans[chain.conv]
    if plan.depthwise or plan.groups > 1 or len(chain.anchor.users) != 1:
        return own  # (a depthwise conv's filters are its channels: no rows to add)
    (user,) = chain.anchor.users
    v = prop.view(user)
    if v is None or v.kind != "add" or user not in prop.layout or not prop.enabled:
        return own
    want = prop.layout[user]
    return want if want.channels == own.channels and not want.same_storage(own) else own


def _activation(prop: "Propagation", node) -> Optional[str]:
    v = prop.view(node) if node is not None else None
    return v.activation if v is not None and v.kind == "pointwise" else None


def _extend_epilogue(prop: "Propagation", chain: Chain, nxt, output_nodes: set) -> Chain:
    if _activation(prop, nxt):
        chain, nxt = replace(chain, act=nxt), _only_user(nxt, output_nodes)
    v = prop.view(nxt) if nxt is not None else None
    if v is None or v.kind != "add" or nxt not in prop.layout:
        return chain
    prev = chain.act or chain.pre_activation
    other = v.args["b"] if v.args["a"] is prev else v.args["a"]
    if other is prev:  # x + x: not a residual
        return chain
    chain = replace(chain, add=nxt, residual=other, residual_after_activation=chain.act is not None)
    if chain.act is None:
        after = _only_user(nxt, output_nodes)
        if _activation(prop, after):
            chain = replace(chain, act=after)
    return chain
