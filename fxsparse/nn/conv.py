"""`TritonConv2d`: a drop-in `nn.Conv2d` that runs only its kept channels.

The sparsity lives where the rest of PyTorch expects it: a `torch.nn.utils.prune` mask on
"weight" (`weight_orig` parameter, `weight_mask` buffer, applied by prune's forward pre-hook).
So the very same module

* in eager, runs `torch.ops.fxsparse.conv2d` on the compacted weight: only the kept output
  channels are computed (`out_index`; a pruned output channel holds its bias, passed as `fill`,
  exactly what the masked conv gives), only the used input channels are read (`in_index`);
  on CUDA that is fxsparse's Triton kernel, on the CPU aten;
* under `torch.compile`, is an ordinary masked conv (`F.conv2d(x, weight_orig * mask)`): the
  backend sees the mask. `backend="fxsparse"` compacts it (and carries the channels across
  layers); Inductor computes the zeros;
* gives the same outputs and gradients as a plain `nn.Conv2d` pruned with the same mask.

Compaction: the kept rows/columns are read from the mask (an output channel is kept when any
element of its filter mask is non-zero, an input channel when any filter uses it), so any mask
works: element-wise zeros inside kept rows stay in the compacted weight. The index vectors are
cached on the mask's identity and `_version`. The compacted weight is re-gathered every forward
that records autograd (training: gradients flow through the gather into `weight_orig`); when no
gradient is recorded (eval under no_grad/inference_mode, or frozen weights) it is cached, keyed
on the `_version`, storage and dtype of `weight_orig`, the mask and the bias, so eager inference
does no per-call gather and is never stale after an optimizer step or `copy_`. (A write through
`.data` bypasses version counting: call `invalidate_cache()` after one.)

Keep-count rule (all `set_*` methods): `keep = floor(keep_ratio * C + 0.5)` (round half up),
clamped to [1, C]; C is the number of output channels, input channels or filter groups. Ties
in L1 norm keep the lower index. A `set_*` call replaces the module's mask (computed from the
unmasked `weight_orig`) unless `accumulate=True`, which multiplies it into the current mask.

Execution (eager): the kept channels are read and written by the op itself (`in_index`,
`out_index` + `fill`: "fused"), or gathered into a compact input first ("gather") / written as a
compact output then copied into the full one ("scatter"), or the full masked weight is run
("dense"). `TritonConv2d.execution = "auto"` (default) times the variants once per problem shape
on CUDA under no_grad and keeps the fastest; naming one forces it. `last_execution` says what
ran. Kept channel counts are padded to a multiple of `align_channels` (8) with zero-weight channels
(exact), so channels_last rows stay 16-byte aligned for the kernel.

Unsupported by the op (the module then runs `F.conv2d` on the masked weight, the reason is in
`fallback_reason`): groups != 1, padding_mode != "zeros", string padding ("same"/"valid"),
unbatched (3-D) input.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch.nn.utils import prune

import fxsparse.ops  # noqa: F401  (registers torch.ops.fxsparse.conv2d)

Tensor = torch.Tensor


def keep_count(keep_ratio: float, total: int) -> int:
    """How many of `total` channels (or groups) a keep ratio keeps: round half up, in [1, total]."""
    if not 0.0 <= float(keep_ratio) <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    if total <= 0:
        raise ValueError(f"nothing to keep from (total={total})")
    return min(total, max(1, int(math.floor(float(keep_ratio) * total + 0.5))))


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores (ties: lower index first), ascending."""
    order = torch.sort(scores.detach().float().cpu(), descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def channel_mask(weight: Tensor, keep_ratio: float) -> Tensor:
    """Mask keeping the output channels (filters) of largest L1 norm."""
    cout = weight.shape[0]
    keep = top_indices(weight.detach().abs().reshape(cout, -1).sum(1), keep_count(keep_ratio, cout))
    mask = torch.zeros_like(weight)
    mask[keep.to(weight.device)] = 1
    return mask


def block_mask(weight: Tensor, keep_ratio: float, block_size: int = 4) -> Tensor:
    """Mask keeping groups of `block_size` consecutive filters of largest group L1 norm (sum over
    the group's filters). When block_size does not divide Cout the last group is partial (scored
    by its own, smaller, sum)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    cout = weight.shape[0]
    per_filter = weight.detach().abs().reshape(cout, -1).sum(1).float()
    ngroups = -(-cout // block_size)
    group_of = torch.arange(cout, device=per_filter.device) // block_size
    scores = torch.zeros(ngroups, device=per_filter.device).index_add_(0, group_of, per_filter)
    keep_groups = top_indices(scores, keep_count(keep_ratio, ngroups)).to(weight.device)
    rows = torch.isin(group_of.to(weight.device), keep_groups)
    mask = torch.zeros_like(weight)
    mask[rows] = 1
    return mask


def input_channel_mask(weight: Tensor, keep_ratio: float) -> Tensor:
    """Mask keeping the input channels whose weight slice (over all filters) has largest L1 norm."""
    cin = weight.shape[1]
    scores = weight.detach().abs().transpose(0, 1).reshape(cin, -1).sum(1)
    keep = top_indices(scores, keep_count(keep_ratio, cin))
    mask = torch.zeros_like(weight)
    mask[:, keep.to(weight.device)] = 1
    return mask


class _CachedMaskHook(prune.CustomFromMask):
    """prune's mask hook, minus the work when it would recompute the same tensor: with no
    autograd recorded and neither `weight_orig` nor the mask changed (`_version`, storage, dtype)
    since the last computation, `module.weight` already holds `weight_orig * mask`. In eval this
    keeps a per-call elementwise multiply (one extra kernel launch) off TritonConv2d's forward."""

    def __call__(self, module, inputs):
        name = self._tensor_name
        if torch.compiler.is_compiling():
            return super().__call__(module, inputs)
        key = (_version_key(getattr(module, name + "_orig")), _version_key(getattr(module, name + "_mask")))
        record = torch.is_grad_enabled() and getattr(module, name + "_orig").requires_grad
        if not record and getattr(module, "_mask_hook_key", None) == key and hasattr(module, name):
            return None
        super().__call__(module, inputs)
        module._mask_hook_key = None if record else key
        return None


def _prune_hook(module: nn.Module, name: str = "weight"):
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod) and getattr(hook, "_tensor_name", None) == name:
            return hook
    return None


def apply_mask(module: nn.Module, mask: Tensor, accumulate: bool = False, name: str = "weight") -> None:
    """Sets `mask` as the prune mask of `module.<name>` (custom_from_mask). An existing mask is
    replaced (the original values in `<name>_orig` are kept), or multiplied in (`accumulate`)."""
    mask = mask.to(device=getattr(module, name).device)
    if _prune_hook(module, name) is None:
        prune.custom_from_mask(module, name, mask)
        with torch.no_grad():  # a leaf until the next forward (so the module deep-copies)
            prune.BasePruningMethod.__call__(_prune_hook(module, name), module, None)
    else:
        buf = getattr(module, name + "_mask")
        with torch.no_grad():
            new = (buf * mask) if accumulate else mask.to(buf.dtype)
            buf.copy_(new)
        hook = _prune_hook(module, name)
        module._mask_hook_key = None
        prune.BasePruningMethod.__call__(hook, module, None)  # recompute module.<name> now
    if isinstance(module, TritonConv2d):
        module.invalidate_cache()


def copy_module(module: nn.Module) -> nn.Module:
    """copy.deepcopy that also works on pruned modules after a forward with autograd (their
    derived `weight = weight_orig * mask` is then a non-leaf tensor, which deepcopy refuses): the
    derived tensors are left out of the copy and recomputed there, without autograd history."""
    import copy

    derived = []
    for m in module.modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name in m.__dict__:
                derived.append((m, hook._tensor_name, m.__dict__.pop(hook._tensor_name)))
    try:
        new = copy.deepcopy(module)
    finally:
        for m, name, value in derived:
            m.__dict__[name] = value
    with torch.no_grad():
        for m in new.modules():
            for hook in m._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod):
                    prune.BasePruningMethod.__call__(hook, m, None)
    return new


def _unmasked_weight(module: nn.Module) -> Tensor:
    return module.weight_orig if hasattr(module, "weight_orig") else module.weight


def _version_key(t: Optional[Tensor]):
    if t is None:
        return None
    return (id(t), t._version, t.data_ptr(), t.dtype, t.device)


def _align(kept: Tensor, align: int) -> Tensor:
    """`kept` with the first few unkept channels added so the count is a multiple of `align` (or
    all). Exact: an added output channel has a zero filter (it computes its bias, the value a
    pruned channel holds), an added input channel a zero column."""
    k, total = int(kept.sum()), kept.numel()
    target = min(total, -(-k // align) * align) if align > 1 else k
    if target > k:
        kept = kept.clone()
        kept[(~kept).nonzero().flatten()[: target - k]] = True
    return kept


_EXECUTIONS = ("fused", "gather", "scatter", "gather+scatter", "dense")


def _time_plans(key, run, plans: list) -> str:
    """The fastest of `plans` for `run(plan)` on CUDA, as the one selector times alternatives
    (kernels/select.py: CUDA-graph replay, the plain call where `run` cannot be captured); each plan
    is warmed up first (the op chooses its launch there). A plan that fails is not chosen."""
    if len(plans) == 1:
        return plans[0]
    from fxsparse.kernels.select import selector

    return selector.pick(("nn.TritonConv2d", key), {p: (lambda p=p: run(p)) for p in plans})[0]


class TritonConv2d(nn.Conv2d):
    """`nn.Conv2d` whose forward runs `torch.ops.fxsparse.conv2d` on the kept channels.

    See the module docstring for the contract. Build one with the nn.Conv2d constructor or
    `TritonConv2d.from_conv(conv)`; prune with `set_channel_sparsity`, `set_block_sparsity`,
    `set_input_channel_sparsity` (or any `torch.nn.utils.prune` mask on "weight").
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.invalidate_cache()

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "TritonConv2d":
        """A TritonConv2d with `conv`'s configuration, a copy of its values and its prune mask
        (if it has one); on conv's device and dtype."""
        w = _unmasked_weight(conv)
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                  bias=conv.bias is not None, padding_mode=conv.padding_mode,
                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(w)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        if hasattr(conv, "weight_mask"):
            apply_mask(new, conv.weight_mask.detach().clone())
        new.train(conv.training)
        return new

    # -- sparsity ---------------------------------------------------------------------------
    def set_channel_sparsity(self, keep_ratio: float, accumulate: bool = False) -> "TritonConv2d":
        """Keeps the `keep_count(keep_ratio, Cout)` output channels of largest filter L1 norm."""
        apply_mask(self, channel_mask(_unmasked_weight(self), keep_ratio), accumulate)
        return self

    def set_block_sparsity(self, keep_ratio: float, block_size: int = 4,
                           accumulate: bool = False) -> "TritonConv2d":
        """Keeps `keep_count(keep_ratio, ceil(Cout / block_size))` groups of `block_size`
        consecutive output channels, by group L1 norm (the last group may be partial)."""
        apply_mask(self, block_mask(_unmasked_weight(self), keep_ratio, block_size), accumulate)
        return self

    def set_input_channel_sparsity(self, keep_ratio: float, accumulate: bool = False) -> "TritonConv2d":
        """Keeps the `keep_count(keep_ratio, Cin)` input channels of largest L1 norm (over all
        filters)."""
        if self.groups != 1:
            raise ValueError("input-channel sparsity needs groups == 1")
        apply_mask(self, input_channel_mask(_unmasked_weight(self), keep_ratio), accumulate)
        return self

    def clear_sparsity(self) -> "TritonConv2d":
        """Removes the mask, keeping the unmasked values (the module becomes dense again)."""
        if _prune_hook(self, "weight") is not None:
            with torch.no_grad():
                self.weight_mask.fill_(1)
            prune.remove(self, "weight")
        self.invalidate_cache()
        return self

    @property
    def kept_out_channels(self) -> int:
        return int(self._indices()[2])

    @property
    def kept_in_channels(self) -> int:
        return int(self._indices()[3])

    # -- execution ----------------------------------------------------------------------------
    @property
    def fallback_reason(self) -> Optional[str]:
        """Why the forward runs F.conv2d instead of the fxsparse op (None: it runs the op)."""
        if self.groups != 1:
            return f"groups={self.groups}: the fxsparse op handles groups=1 only"
        if self.padding_mode != "zeros":
            return f"padding_mode={self.padding_mode!r}: the fxsparse op pads with zeros only"
        if isinstance(self.padding, str):
            return f"padding={self.padding!r}: the fxsparse op takes explicit integer padding"
        return None

    def invalidate_cache(self) -> None:
        self._index_cache = None
        self._weight_cache = None

    def _mask(self) -> Optional[Tensor]:
        hook = _prune_hook(self, "weight")
        if hook is None:
            return None
        if type(hook) is prune.CustomFromMask:
            hook.__class__ = _CachedMaskHook  # same state, cheaper when nothing changed
        return self.weight_mask

    def _indices(self):
        """(out_index or None, in_index or None, kept out count, kept in count), from the mask."""
        mask = self._mask()
        key = _version_key(mask)
        cache = self._index_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        cout, cin = self.out_channels, self.in_channels // self.groups
        if mask is None:
            result = (None, None, cout, cin)
        else:
            nz = mask.detach() != 0
            rows = nz.reshape(cout, -1).any(1)
            cols = nz.transpose(0, 1).reshape(cin, -1).any(1)
            kept_rows, kept_cols = int(rows.sum()), int(cols.sum())
            rows, cols = _align(rows, self.align_channels), _align(cols, self.align_channels)
            out_idx = None if bool(rows.all()) else rows.nonzero().flatten()
            in_idx = None if bool(cols.all()) else cols.nonzero().flatten()
            result = (out_idx, in_idx, kept_rows, kept_cols)
        self._index_cache = (key, result)
        return result

    def _compacted(self, weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype, record_grad: bool):
        """(compacted weight, compacted bias, fill, out_index, in_index)."""
        out_idx, in_idx, _, _ = self._indices()
        key = None
        if not record_grad:
            key = (_version_key(_unmasked_weight(self)), _version_key(self._mask()), _version_key(bias), dtype)
            if self._weight_cache is not None and self._weight_cache[0] == key:
                return self._weight_cache[1]
        w, b, fill = weight, bias, None
        if out_idx is not None:
            w = w.index_select(0, out_idx)
            if bias is not None:
                fill, b = bias, bias.index_select(0, out_idx)
        if in_idx is not None:
            w = w.index_select(1, in_idx)
        if w.dtype != dtype:
            w = w.to(dtype)
        if w.is_cuda and not record_grad:
            w = w.contiguous(memory_format=torch.channels_last)  # the kernel's preferred weight layout
        result = (w, b, fill, out_idx, in_idx)
        if not record_grad:
            result = tuple(t.detach() if isinstance(t, Tensor) else t for t in result)
            self._weight_cache = (key, result)
        return result

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or self.fallback_reason is not None or x.dim() != 4:
            # Under torch.compile the backend sees the masked conv itself (fxsparse compacts it).
            return self._conv_forward(x, self.weight, self.bias)
        weight, bias = self.weight, self.bias
        dtype = x.dtype
        if weight.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            raise RuntimeError(f"TritonConv2d: input dtype {x.dtype} differs from weight dtype {weight.dtype}")
        record_grad = torch.is_grad_enabled() and (
            weight.requires_grad or (bias is not None and bias.requires_grad))
        w, b, fill, out_idx, in_idx = self._compacted(weight, bias, dtype, record_grad)
        plan = self._plan(x, w, b, fill, out_idx, in_idx, record_grad)
        self._last_plan = plan
        out = self._run(x, w, b, fill, out_idx, in_idx, plan)
        if not x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous()  # like nn.Conv2d: NCHW in, NCHW out
        return out

    # How the kept channels are read and written (see the module docstring):
    #   "fused"    the op's in_index / out_index + fill: the kernel gathers input channels and
    #              scatters output channels itself (one pass)
    #   "gather"   the kept input channels are copied out first (index_select), then the op
    #   "scatter"  the op writes a compact output, copied into the full one with the constants
    #   "dense"    the op on the full masked weight (computes the zeros; never much slower than dense)
    # "auto" (default) times the candidates once per problem shape on CUDA (no_grad) and keeps
    # the fastest, shared by all modules; on the CPU and when recording autograd: "fused".
    execution = "auto"
    # kept channel counts are rounded up to a multiple of this with zero-weight channels (exact):
    # channels_last rows of 8 fp16 values (16 bytes) keep the kernel's loads and stores aligned
    align_channels = 8

    def _plan(self, x: Tensor, w: Tensor, b, fill, out_idx, in_idx, record_grad: bool) -> str:
        if out_idx is None and in_idx is None:
            return "fused"
        mode = self.execution
        if mode == "auto" and (record_grad or not x.is_cuda):
            return "fused"
        if mode != "auto":
            if mode not in _EXECUTIONS:
                raise ValueError(f"TritonConv2d.execution must be auto or one of {_EXECUTIONS}, got {mode!r}")
            return mode
        key = (tuple(x.shape), x.stride(), x.dtype, x.device, tuple(w.shape), tuple(self.stride),
               tuple(self.padding), tuple(self.dilation), in_idx is not None, out_idx is not None,
               self.out_channels, self.in_channels)
        from fxsparse.kernels.select import selector

        plan = selector.picks.get(("nn.TritonConv2d", key))  # (a plan chosen before, by _time_plans)
        if plan is None:
            if torch.cuda.is_current_stream_capturing():
                return "fused"  # cannot time inside a CUDA graph capture
            candidates = ["fused", "dense"]
            if in_idx is not None:
                candidates.append("gather")
            if out_idx is not None:
                candidates.append("scatter")
            if in_idx is not None and out_idx is not None:
                candidates.append("gather+scatter")
            plan = _time_plans(key, lambda p: self._run(x, w, b, fill, out_idx, in_idx, p), candidates)
        return plan

    def _dense_weight(self, dtype: torch.dtype) -> Tensor:
        key = (_version_key(_unmasked_weight(self)), _version_key(self._mask()), dtype)
        cache = getattr(self, "_dense_cache", None)
        if cache is not None and cache[0] == key:
            return cache[1]
        w = self.weight.detach().to(dtype)
        if w.is_cuda:
            w = w.contiguous(memory_format=torch.channels_last)
        self._dense_cache = (key, w)
        return w

    def _op(self, x, w, b, in_idx, out_idx, out_channels, fill) -> Tensor:
        return torch.ops.fxsparse.conv2d(
            x, w, b, list(self.stride), list(self.padding), list(self.dilation), in_idx, out_idx,
            out_channels, fill, None, None, "none", False)

    def _run(self, x: Tensor, w: Tensor, b, fill, out_idx, in_idx, plan: str) -> Tensor:
        if plan == "dense":
            bias = None if self.bias is None else self.bias.detach()
            return self._op(x, self._dense_weight(x.dtype), bias, None, None, self.out_channels, None)
        if "gather" in plan and in_idx is not None:
            if x.is_contiguous(memory_format=torch.channels_last):
                xs = torch.empty((x.shape[0], len(in_idx)) + tuple(x.shape[2:]), device=x.device, dtype=x.dtype,
                                 memory_format=torch.channels_last)
                torch.index_select(x, 1, in_idx, out=xs)
            else:
                xs = x.index_select(1, in_idx)
            x, in_idx = xs, None
        if "scatter" not in plan or out_idx is None:
            return self._op(x, w, b, in_idx, out_idx, self.out_channels, fill)
        y = self._op(x, w, b, in_idx, None, w.shape[0], None)
        n, _, ho, wo = y.shape
        full = torch.empty((n, self.out_channels, ho, wo), device=y.device, dtype=y.dtype,
                           memory_format=torch.channels_last)
        full[:, out_idx] = y
        pruned = self._pruned_index(out_idx)
        const = (fill.index_select(0, pruned) if fill is not None else
                 torch.zeros(len(pruned), device=y.device)).to(y.dtype)
        full[:, pruned] = const.view(1, -1, 1, 1).expand(n, len(pruned), ho, wo)
        return full

    @property
    def last_execution(self) -> str:
        """How the last eager forward ran: "fused", "gather", "scatter", "gather+scatter" or "dense"."""
        return getattr(self, "_last_plan", "fused")

    def _pruned_index(self, out_idx: Tensor) -> Tensor:
        cache = getattr(self, "_pruned_cache", None)
        if cache is not None and cache[0] is out_idx:
            return cache[1]
        keep = torch.zeros(self.out_channels, dtype=torch.bool, device=out_idx.device)
        keep[out_idx] = True
        pruned = (~keep).nonzero().flatten()
        self._pruned_cache = (out_idx, pruned)
        return pruned

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self._mask() is not None:
            _, _, ko, ki = self._indices()
            s += f", kept_out={ko}/{self.out_channels}, kept_in={ki}/{self.in_channels // self.groups}"
        if self.fallback_reason:
            s += f", fallback={self.fallback_reason!r}"
        return s
