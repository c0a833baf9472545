"""The compaction plan's records: what stage 3 hands the lowering, frozen.

`Layout` (the channels a tensor stores, the constants of the others), `Storage` (how many
channels a layout stores on a device), `BiasMap`, `ConvPlan` and `LinearPlan`. propagate.py
makes them, rules.py and chains.py build parts of them, check.py checks them, lowering reads them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from fxsparse.kernels.layout import constant_input_map
from fxsparse.sparsity.read import ConvSparsity

CONST_DTYPE = torch.float64  # constants are folded in fp64, then cast to the model's dtype


class KeptChannels:
    """What a tensor of `channels` channels stored as its `kept` channels (ascending original
    ids) answers; shared by the inference plan's `Layout` and the training lowering's layouts."""
    channels: int
    kept: torch.Tensor

    @property
    def is_full(self) -> bool:
        return len(self.kept) == self.channels

    def kept_mask(self) -> torch.Tensor:
        m = torch.zeros(self.channels, dtype=torch.bool)
        m[self.kept] = True
        return m

    def positions_of(self, channels: torch.Tensor) -> torch.Tensor:
        """Where each of `channels` (all kept here) sits in the stored tensor."""
        pos = torch.full((self.channels,), -1, dtype=torch.long)
        pos[self.kept] = torch.arange(len(self.kept))
        out = pos[channels]
        assert bool((out >= 0).all()), "channel not stored"
        return out


@dataclass(frozen=True)
class Layout(KeptChannels):
    """A tensor of `channels` channels stored as its `kept` channels (in that order);
    every other channel c holds `const[c]` everywhere."""
    channels: int
    kept: torch.Tensor  # int64, ascending original channel ids
    const: torch.Tensor  # CONST_DTYPE [channels]; meaningful where not kept

    @staticmethod
    def full(channels: int) -> "Layout":
        return Layout(channels, torch.arange(channels), torch.zeros(channels, dtype=CONST_DTYPE))

    def same_storage(self, other: "Layout") -> bool:
        return self.channels == other.channels and torch.equal(self.kept, other.kept)


@dataclass(frozen=True)
class Storage:
    """How many channels a layout stores: `multiple` rounds the count up (adding the lowest
    unkept channels, so layouts that agree stay equal), and a layout keeping more than
    `dense_above` of its channels stores them all. `Storage()` is exact compaction."""
    multiple: int = 1
    dense_above: float = 1.0

    @staticmethod
    def align_channels(multiple: int) -> "Storage":
        return Storage(multiple, 7 / 8) if multiple > 1 else Storage()

    def round(self, kept: torch.Tensor) -> torch.Tensor:
        """The stored channels (a bool mask) for a layout that needs `kept`."""
        c, k = len(kept), int(kept.sum())
        if k == c or k == 0 or self.multiple == 1 and self.dense_above >= 1:
            return kept
        if k > self.dense_above * c:
            return torch.ones_like(kept)
        return self._rounded_up(kept, ~kept, c)

    def _rounded_up(self, chosen: torch.Tensor, spare: torch.Tensor, limit: int) -> torch.Tensor:
        """`chosen` (a bool mask) with the first `spare` channels added, so that it holds a
        multiple of `multiple` channels (or `limit`, where that is fewer)."""
        k = int(chosen.sum())
        extra = min(limit, -(-k // self.multiple) * self.multiple) - k
        if extra <= 0:
            return chosen
        out = chosen.clone()
        out[spare.nonzero().flatten()[:extra]] = True
        return out

    def reads_whole(self, unused: int, stored: int) -> bool:
        """Whether a conv reads all `stored` channels of its input (zero weight columns for the
        `unused` ones) rather than gathering the ones it uses: a gather is a full copy of the
        input, a few zero columns cost a few MACs per pixel."""
        return self.multiple > 1 and 0 < unused and (unused < self.multiple or 8 * unused <= stored)

    def conv_reads(self, used: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """The stored channels (a bool mask) a conv reads, of those `used` by its filters: all of
        them (reads_whole), or the used ones gathered, rounded up to `multiple` with unused stored
        channels read through zero weight columns, so that a gathered pixel's row stays whole
        vectors as a stored one does."""
        unused = stored & ~used
        total = int(stored.sum())
        if self.reads_whole(int(unused.sum()), total):
            return stored
        return self._rounded_up(used & stored, unused, total)


@dataclass(frozen=True)
class BiasMap:
    """What a conv's constant input channels add to its kept outputs where the conv pads: per
    output channel and position, exact at the borders (where some taps read the zero padding).
    `weight` [rows, 1, kh, kw] holds each row's weight columns of those channels times their
    constants, summed; the map is its conv over an all-ones image of the input's size
    (`constant_input_map`). The lowering makes it a constant where the spatial size is static,
    else a conv in the graph on every call (batch 1, one channel: cheaper than reading the
    constant channels at every batch item)."""
    weight: torch.Tensor  # CONST_DTYPE [rows, 1, kh, kw], on the CPU
    stride: tuple
    padding: tuple
    dilation: tuple

    def at(self, size: tuple) -> torch.Tensor:
        """The map [rows, Ho, Wo] for an input of spatial `size` (ints)."""
        return constant_input_map(self.weight.new_empty((0, 0, *size)), self.weight, self.stride, self.padding,
                                  self.dilation)

    def scaled(self, a: torch.Tensor) -> "BiasMap":
        """The map of rows scaled by `a` (a folded BatchNorm)."""
        return replace(self, weight=self.weight * a.reshape(-1, 1, 1, 1))


@dataclass(frozen=True)
class ConvPlan:
    """How one conv runs: its compacted weight, which input channels it reads and what constants it folds."""
    sparsity: ConvSparsity
    in_layout: Layout  # layout of the tensor the conv reads (after any relayout)
    out_layout: Layout  # the conv's own output (pre-BatchNorm)
    in_channels_used: torch.Tensor  # original input channel ids read, in order
    weight: torch.Tensor  # [kept_out, used_in, kh, kw], model dtype
    bias: Optional[torch.Tensor]  # [kept_out], with folded constants
    bias_map: Optional[BiasMap]  # where constant inputs meet padding
    depthwise: bool = False
    groups: int = 1  # a grouped conv: in_channels_used is per group (repeats pad short groups)


@dataclass(frozen=True)
class LinearPlan:
    """How a linear on the channel dim runs: it reads `in_channels_used` of its input stored as
    `in_layout` (the other channels' constants fold into its bias) and writes `out_layout`."""
    in_layout: Layout
    out_layout: Layout
    in_channels_used: torch.Tensor
    weight: torch.Tensor  # [kept_out, used_in], model dtype
    bias: torch.Tensor  # [kept_out], with the dropped inputs' constants folded in
    ideal_in: int  # stored inputs some kept row reads with a non-zero weight (the report's ideal)


def at_least_one(keep: torch.Tensor) -> torch.Tensor:
    """`keep` (a channel mask), or channel 0 alone where it keeps none: a conv whose mask removes
    every output channel still computes one (a zero filter row gives its exact constant, the
    bias), so that no zero-size conv or tensor is ever emitted."""
    if bool(keep.any()) or not len(keep):
        return keep
    keep = keep.clone()
    keep[0] = True
    return keep
