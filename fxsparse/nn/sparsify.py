"""`fxsparse.sparsify`: L1-norm channel masks on every conv of a model, optionally group-consistent.

    fxsparse.sparsify(model, 0.5)                                  # per conv, output channels
    fxsparse.sparsify(model, 0.5, kind="block", block_size=4)      # per conv, filter groups
    fxsparse.sparsify(model, 0.5, kind="input")                    # per conv, input channels
    fxsparse.sparsify(model, 0.5, example_inputs=(x,))             # coupled groups (Torch-Pruning)

Masks are `torch.nn.utils.prune` masks (custom_from_mask on "weight"; an existing mask is
multiplied in), so the model stays an ordinary masked model: `torch.compile(model,
backend="fxsparse")` compacts it, a plain eager run computes the zeros.

Per conv (no example_inputs, or kind "block"/"input"): every nn.Conv2d except the stem (the
first nn.Conv2d in `model.modules()` order) and the `skip` names, by the L1 rule of
`fxsparse.nn.conv` (keep = round half up of keep_ratio * C, clamped to [1, C]). Grouped convs
(groups != 1) get no mask for kind "input", and for "channel"/"block" only per conv.

Coupled (kind "channel" with example_inputs): `fxsparse.compaction.groups.channel_groups`
finds the channels that must go together; in each prunable group the channels of lowest
`group_importance` (sum of |w| over every member) are pruned: the producing convs' output rows
AND the consuming convs' input columns are masked (what a physical pruning removes), and so are
the rows and columns of linear layers on the channel dim (a ConvNeXt MLP; the classifier's
outputs reach the graph output and are never pruned). BatchNorm is left as is (the backend folds
it: a masked channel is a constant). A LayerNorm over channels gets its weight masked: it mixes
every channel into its statistics, so a removed channel with its weight left would leave it
with values that depend on the input (ConvNeXt's stem), live wherever the stream goes; masked,
it leaves as its bias, a constant. Groups that reach the
graph output or an op fxsparse does not understand are not pruned, nor groups written by the stem
(the first conv executed) or by a module named in `skip`; a module named in `skip` gets no mask.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

from .conv import apply_mask, block_mask, channel_mask, input_channel_mask, keep_count, top_indices

KINDS = ("channel", "block", "input")


def _conv_modules(model: nn.Module) -> list:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _unmasked(m: nn.Module) -> torch.Tensor:
    return m.weight_orig if hasattr(m, "weight_orig") else m.weight


def sparsify(model: nn.Module, keep_ratio: float, kind: str = "channel", block_size: int = 4,
             skip: Iterable[str] = (), example_inputs: Optional[Sequence] = None,
             skip_stem: bool = True) -> nn.Module:
    """Applies L1-norm prune masks to the convs of `model` in place (see the module docstring);
    returns `model`. `example_inputs` (a tuple of model inputs, or one tensor) turns on the
    group-consistent channel pruning for kind "channel"."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    keep_count(keep_ratio, 1)  # validates the ratio
    skip = set(skip)
    if example_inputs is not None and kind == "channel":
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        _sparsify_groups(model, keep_ratio, skip, tuple(example_inputs), skip_stem)
        return model
    convs = _conv_modules(model)
    if skip_stem and convs:
        skip.add(convs[0][0])
    for name, m in convs:
        if name in skip:
            continue
        w = _unmasked(m)
        if kind == "channel":
            mask = channel_mask(w, keep_ratio)
        elif kind == "block":
            mask = block_mask(w, keep_ratio, block_size)
        else:
            if m.groups != 1:
                continue
            mask = input_channel_mask(w, keep_ratio)
        apply_mask(m, mask, accumulate=True)
    return model


def _sparsify_groups(model: nn.Module, keep_ratio: float, skip: set, example_inputs: tuple,
                     skip_stem: bool) -> None:
    from fxsparse.compaction.groups import _analyse, group_importance, zero_input_channels

    groups, stem = _analyse(model, *example_inputs)
    if skip_stem and stem is not None:
        skip = skip | {stem}
    masks: dict = {}  # module path -> mask being built

    def mask_of(path: str) -> torch.Tensor:
        if path not in masks:
            w = _unmasked(model.get_submodule(path))
            masks[path] = torch.ones_like(w)
        return masks[path]

    for group in groups:
        if not group.prunable or any(p in skip for p in group.producers):
            continue
        keep = keep_count(keep_ratio, group.size)
        if keep == group.size:
            continue
        kept = set(top_indices(group_importance(group, p=1), keep).tolist())
        pruned = [i for i in range(group.size) if i not in kept]
        for m in group.members:
            if m.module in skip or m.kind not in ("conv_out", "conv_in", "linear_out", "linear_in", "ln"):
                continue
            if m.kind == "ln" and getattr(model.get_submodule(m.module), "weight", None) is None:
                continue
            channels = torch.tensor([m.indices[i] for i in pruned], dtype=torch.long)
            mask = mask_of(m.module)
            channels = channels.to(mask.device)
            if m.kind in ("conv_out", "linear_out", "ln"):
                mask[channels] = 0
            else:
                zero_input_channels(mask, getattr(model.get_submodule(m.module), "groups", 1), channels)
    for path, mask in masks.items():
        apply_mask(model.get_submodule(path), mask, accumulate=True)


__all__ = ["sparsify", "KINDS"]
