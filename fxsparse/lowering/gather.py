"""Kept slices of a trainable tensor whose backward is a gather, not a scatter.

`t.index_select(0, rows)` has `new_zeros + index_add` as its backward: a fill and an atomic
scatter per level, kernels Inductor cannot fuse into the pointwise math around them (the
prune mask's `grad * mask`). Every kept index appears once, so the full-size gradient is
also a gather: channel i reads the compact gradient at its position in the kept list, or
is zero where it was not kept. That is one pointwise expression Inductor fuses with its
neighbours, and exact: each entry is a copy of one value or zero, as index_add makes it.

A conv weight is sliced forward by a scatter instead (`kept_weight`): every element of the
full weight is stored at its place in the compact one, or in a scratch slot of its own past it. The
scatter runs over the full weight's elements, as the prune mask's multiply that makes the
weight does, so Inductor computes both in one kernel where a gather would be a second one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class KeptIndex:
    """The kept indices `ids` (unique) of a dim of size `total`, with their inverse: for each
    index, its position in `ids` (0 where not kept) and whether it is kept."""
    ids: torch.Tensor
    positions: torch.Tensor
    kept: torch.Tensor

    @staticmethod
    def of(ids: torch.Tensor, total: int) -> "KeptIndex":
        ids = ids.to(torch.long)
        kept = torch.zeros(total, dtype=torch.bool, device=ids.device)
        kept[ids] = True
        if int(kept.sum()) != len(ids):
            raise ValueError(f"kept indices must be unique, got {ids.tolist()}")
        positions = torch.zeros(total, dtype=torch.long, device=ids.device)
        positions[ids] = torch.arange(len(ids), device=ids.device)
        return KeptIndex(ids, positions, kept)


def _pick(t: torch.Tensor, dim: int, index: Optional[torch.Tensor]) -> torch.Tensor:
    return t if index is None else t.index_select(dim, index)


def _along(mask: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    """`mask` shaped to broadcast along `dim` of a rank-`rank` tensor."""
    shape = [1] * rank
    shape[dim] = -1
    return mask.reshape(shape)


def _full_gradient(ctx, grad):
    """The full-size gradient of a kept slice: the compact gradient gathered back by inverse
    positions, zero where nothing was kept (ctx saved row_pos, row_kept, col_pos, col_kept)."""
    row_pos, row_kept, col_pos, col_kept = ctx.saved_tensors
    full = _pick(_pick(grad, 0, row_pos), 1, col_pos)
    kept = None
    for mask, dim in ((row_kept, 0), (col_kept, 1)):
        if mask is not None:
            m = _along(mask, dim, ctx.rank)
            kept = m if kept is None else kept & m
    # a fill, not a multiply by 0/1: an inf or nan in the compact gradient stays where it is
    return full.masked_fill(~kept, 0)


class _KeptSlice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, row_ids, row_pos, row_kept, col_ids, col_pos, col_kept):
        ctx.save_for_backward(row_pos, row_kept, col_pos, col_kept)
        ctx.rank = t.dim()
        return _pick(_pick(t, 0, row_ids), 1, col_ids)

    @staticmethod
    def backward(ctx, grad):
        return _full_gradient(ctx, grad), None, None, None, None, None, None


def _scatter_index(t: torch.Tensor, row_pos, row_kept, col_pos, col_kept, rows: int, cols: int,
                   channels_last: bool) -> torch.Tensor:
    """Where each element of the conv weight `t` [O, I, kh, kw], taken in its memory order, goes
    in the flat compact weight of `rows` x `cols` (laid out channels-last or contiguous), or,
    dropped, its own slot after it, in the same order: a GPU serialises stores to one address,
    so dropped elements sharing a few slots made the scatter the step's slowest pointwise kernel."""
    o_n, i_n, kh, kw = t.shape
    device = next(v.device for v in (row_pos, col_pos) if v is not None)
    o = torch.arange(o_n, device=device).view(-1, 1, 1, 1)
    i = torch.arange(i_n, device=device).view(1, -1, 1, 1)
    h = torch.arange(kh, device=device).view(1, 1, -1, 1)
    w = torch.arange(kw, device=device).view(1, 1, 1, -1)
    r = o if row_pos is None else row_pos.view(-1, 1, 1, 1)
    c = i if col_pos is None else col_pos.view(1, -1, 1, 1)
    target = ((r * kh + h) * kw + w) * cols + c if channels_last else ((r * cols + c) * kh + h) * kw + w
    kept = torch.ones(t.shape, dtype=torch.bool, device=device)
    if row_kept is not None:
        kept = kept & row_kept.view(-1, 1, 1, 1)
    if col_kept is not None:
        kept = kept & col_kept.view(1, -1, 1, 1)
    order = _memory_order(t)
    scratch = rows * cols * kh * kw + torch.arange(t.numel(), device=device)
    return torch.where(kept.permute(order).reshape(-1), target.permute(order).reshape(-1), scratch)


def _memory_order(t: torch.Tensor) -> list:
    """t's dims from outermost to innermost in memory."""
    return sorted(range(t.dim()), key=lambda d: -t.stride(d))


class _KeptWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, row_pos, row_kept, col_pos, col_kept, rows: int, cols: int, channels_last: bool):
        ctx.save_for_backward(row_pos, row_kept, col_pos, col_kept)
        ctx.rank = t.dim()
        index = _scatter_index(t, row_pos, row_kept, col_pos, col_kept, rows, cols, channels_last)
        kh, kw = t.shape[2:]
        flat = t.new_empty(rows * cols * kh * kw + t.numel())
        # elements in t's memory order: the scatter then reads t where the kernel making t wrote
        # it, and Inductor fuses the two (in another order it would not, and t.flatten() copies)
        flat.index_put_((index,), t.permute(_memory_order(t)).reshape(-1))
        kept = flat[: rows * cols * kh * kw]
        if channels_last:
            return kept.view(rows, kh, kw, cols).permute(0, 3, 1, 2)
        return kept.view(rows, cols, kh, kw)

    @staticmethod
    def backward(ctx, grad):
        return _full_gradient(ctx, grad), None, None, None, None, None, None, None


def kept_weight(t: torch.Tensor, row_pos=None, row_kept=None, col_pos=None, col_kept=None, rows: int = 0,
                cols: int = 0, channels_last: bool = False) -> torch.Tensor:
    """A conv weight `t` [O, I, kh, kw] restricted to its kept rows and columns (`rows` and
    `cols` of them; `pos` and `kept`: KeptIndex's inverse, None for a dim kept whole), laid out
    channels-last or contiguous. Values and gradients are those of `kept_slice`."""
    return _KeptWeight.apply(t, row_pos, row_kept, col_pos, col_kept, rows, cols, channels_last)


class _KeptRows(torch.autograd.Function):
    """Several vectors' kept entries at once; the backward expands every gradient in one
    foreach op, which Inductor makes one kernel where each expansion would be a launch."""

    @staticmethod
    def forward(ctx, *flat):
        groups = [flat[i:i + 4] for i in range(0, len(flat), 4)]  # (t, ids, pos, kept)
        ctx.set_materialize_grads(False)  # a slice nothing used gives its vector no gradient
        ctx.save_for_backward(*[x for g in groups for x in g[2:]])
        return tuple(t.index_select(0, ids) for t, ids, _, _ in groups)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        index = [i for i, g in enumerate(grads) if g is not None]
        fulls = [grads[i].index_select(0, saved[2 * i]).masked_fill(~saved[2 * i + 1], 0) for i in index]
        # an exact identity, there to put the expansions in one foreach kernel
        fulls = torch._foreach_mul(fulls, 1.0) if fulls else []
        out = [None] * (4 * len(grads))
        for i, full in zip(index, fulls):
            out[4 * i] = full
        return tuple(out)


def kept_rows(*flat: torch.Tensor) -> tuple:
    """For each (vector, ids, pos, kept) in `flat`: the vector's kept entries (KeptIndex:
    `ids`, and its inverse `pos`, `kept`). Values and gradients are those of index_select."""
    return _KeptRows.apply(*flat)


def kept_slice(t: torch.Tensor, row_ids=None, row_pos=None, row_kept=None,
               col_ids=None, col_pos=None, col_kept=None) -> torch.Tensor:
    """`t` restricted to the kept rows (dim 0) and/or columns (dim 1): `ids` the kept
    indices, `pos` and `kept` their inverse (KeptIndex); None for a dim kept whole.
    Values and gradients are those of `index_select` on each dim."""
    if row_ids is None and col_ids is None:
        return t
    return _KeptSlice.apply(t, row_ids, row_pos, row_kept, col_ids, col_pos, col_kept)
