"""The compaction plan's invariants, checked where the plan is made (Propagation.run).

A layout stores distinct channels of its tensor in ascending order, with one constant per
channel; a conv or linear plan reads its input as the plan stores it, and its compacted
constants have one row per kept channel; a folded BatchNorm or per-channel parameter has
one value per channel it applies to; a chain's result layout has its anchor's channels.
A violation raises StageError("compaction", ...) naming the node.
"""
from __future__ import annotations

from typing import Optional

import torch

from fxsparse.compaction.rules import channel_count
from fxsparse.stages import StageError


def _fail(node, message: str):
    raise StageError("compaction", message, node)


def check_layout(node, layout, what: str = "layout", verified: Optional[dict] = None) -> None:
    """`layout` is well formed and describes `node`'s channels. `verified` ({id: layout}): layouts
    already found well formed in this check (many nodes share one), whose own tensors are not
    read again."""
    count = channel_count(node)
    if verified is not None and verified.get(id(layout)) is layout:
        if count is not None and count != layout.channels:
            _fail(node, f"{what} of node {node.name} describes {layout.channels} channels, the tensor has {count}")
        return
    name = f"{what} of node {node.name}"
    kept, c = layout.kept, layout.channels
    if kept.dim() != 1 or kept.dtype != torch.int64:
        _fail(node, f"{name} stores channels as {kept.dtype} {tuple(kept.shape)}, not a 1-D int64 index")
    if len(kept) > c:
        _fail(node, f"{name} stores {len(kept)} channels of {c}")
    if len(kept) and (int(kept.min()) < 0 or int(kept.max()) >= c):
        _fail(node, f"{name} stores channel {int(kept.max()) if int(kept.max()) >= c else int(kept.min())} of {c}")
    if len(kept) > 1 and not bool((kept[1:] > kept[:-1]).all()):
        _fail(node, f"{name} stores channels not in ascending order or repeated")
    if tuple(layout.const.shape) != (c,):
        _fail(node, f"{name} has constants of shape {tuple(layout.const.shape)} for {c} channels")
    if count is not None and count != c:
        _fail(node, f"{name} describes {c} channels, the tensor has {count}")
    if verified is not None:
        verified[id(layout)] = layout


def check_plan(prop) -> None:
    verified: dict = {}
    for node, layout in prop.layout.items():
        check_layout(node, layout, verified=verified)
    for (node, user), layout in prop.materialize.items():
        check_layout(node, layout, f"layout {user.name} reads", verified)
        if node in prop.layout and prop.layout[node].channels != layout.channels:
            _fail(user, f"layout {user.name} reads of node {node.name} has {layout.channels} channels, "
                        f"the node {prop.layout[node].channels}")
    for node, plan in prop.conv_plans.items():
        check_conv_plan(prop, node, plan)
    for node, plan in prop.linear_plans.items():
        check_linear_plan(prop, node, plan)
    for node, (scale, shift) in prop.bn_folds.items():
        c = prop.layout[node].channels
        if tuple(scale.shape) != (c,) or tuple(shift.shape) != (c,):
            _fail(node, f"folded batch_norm {node.name} has scale {tuple(scale.shape)} and shift "
                        f"{tuple(shift.shape)} for {c} channels")
    for node, values in prop.channel_params.items():
        for value in values if isinstance(values, tuple) else (values,):
            if value.numel() != len(prop.layout[node].kept):
                _fail(node, f"parameter of node {node.name} has {value.numel()} values for "
                            f"{len(prop.layout[node].kept)} stored channels")
    for node, chain in prop.chains.items():
        if chain.bn is not None and chain.bn not in prop.bn_folds:
            _fail(node, f"chain of node {node.name} folds batch_norm {chain.bn.name}, which the plan does not fold")
        if chain.weight is None or chain.weight.shape != prop.conv_plans[chain.conv].weight.shape:
            _fail(node, f"chain of node {node.name} has folded weight "
                        f"{None if chain.weight is None else tuple(chain.weight.shape)}, its conv plan "
                        f"{tuple(prop.conv_plans[chain.conv].weight.shape)}")
        check_layout(chain.anchor, chain.result, "chain result", verified)
        if chain.result.channels != prop.layout[chain.anchor].channels:
            _fail(node, f"chain of node {node.name} writes {chain.result.channels} channels, its result has "
                        f"{prop.layout[chain.anchor].channels}")


def _reads(prop, node, x):
    """The layout `node` reads its input `x` in, as the plan stores it."""
    return prop.materialize.get((x, node)) or prop.input_layout(x)


def _subset(plan_ids: torch.Tensor, layout) -> bool:
    return bool(layout.kept_mask()[plan_ids].all()) if len(plan_ids) else True


def check_conv_plan(prop, node, plan) -> None:
    sp, x = plan.sparsity, prop.view(node).conv.input
    check_layout(node, plan.out_layout, "output layout")
    if plan.out_layout.channels != sp.out_channels or plan.in_layout.channels != sp.in_channels:
        _fail(node, f"conv plan of node {node.name} maps {plan.in_layout.channels} -> {plan.out_layout.channels} "
                    f"channels, the conv {sp.in_channels} -> {sp.out_channels}")
    if not plan.in_layout.same_storage(_reads(prop, node, x)):
        _fail(node, f"conv plan of node {node.name} reads {x.name} in a layout the plan does not store it in")
    if not plan.out_layout.same_storage(prop.layout[node]):
        _fail(node, f"conv plan of node {node.name} writes a layout other than the node's")
    used = plan.in_channels_used
    if len(used) and (int(used.min()) < 0 or int(used.max()) >= plan.in_layout.channels
                      or not _subset(used, plan.in_layout)):
        _fail(node, f"conv plan of node {node.name} reads input channels its input layout does not store")
    rows = len(plan.out_layout.kept)
    cols = 1 if plan.depthwise else (len(used) // plan.groups if plan.groups > 1 else len(used))
    if tuple(plan.weight.shape[:2]) != (rows, cols):
        _fail(node, f"conv plan of node {node.name} has weight {tuple(plan.weight.shape)} for {rows} kept "
                    f"outputs and {cols} inputs read")
    if plan.bias is not None and tuple(plan.bias.shape) != (rows,):
        _fail(node, f"conv plan of node {node.name} has bias {tuple(plan.bias.shape)} for {rows} kept outputs")
    if plan.bias_map is not None and tuple(plan.bias_map.weight.shape[:2]) != (rows, 1):
        _fail(node, f"conv plan of node {node.name} has a bias map of weight {tuple(plan.bias_map.weight.shape)} "
                    f"for {rows} kept outputs")


def check_linear_plan(prop, node, plan) -> None:
    check_layout(node, plan.out_layout, "output layout")
    x = prop.view(node).args["input"]
    if not plan.in_layout.same_storage(_reads(prop, node, x)):
        _fail(node, f"linear plan of node {node.name} reads {x.name} in a layout the plan does not store it in")
    rows, cols = len(plan.out_layout.kept), len(plan.in_channels_used)
    if tuple(plan.weight.shape) != (rows, cols) or tuple(plan.bias.shape) != (rows,):
        _fail(node, f"linear plan of node {node.name} has weight {tuple(plan.weight.shape)} and bias "
                    f"{tuple(plan.bias.shape)} for {rows} kept outputs and {cols} inputs read")
