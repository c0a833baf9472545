"""Helpers with the seed notebook's meaning: error between two modules, a timing, distillation.

    compare_modules(ref, other, x)  -> {"mae", "max", "rel_l2"} of other(x) against ref(x)
    benchmark_module(module, x)     -> ms per call (CUDA-graph replay median on the GPU,
                                       plain-call median on the CPU)
    finetune(student, teacher, steps, ...) -> the loss curve of a distillation from teacher
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxsparse.kernels.timing import cuda_graph_time_ms, plain_time_ms

from .conv import copy_module

Tensor = torch.Tensor


@torch.no_grad()
def compare_modules(ref: Callable, other: Callable, x: Tensor) -> dict:
    """Error of `other(x)` against `ref(x)`, computed in fp64: mean and max absolute difference and
    ||other - ref|| / ||ref||. Both are called under no_grad in their current mode."""
    r = ref(x).double()
    o = other(x).double()
    if r.shape != o.shape:
        raise ValueError(f"output shapes differ: {tuple(r.shape)} vs {tuple(o.shape)}")
    diff = (o - r).abs()
    return {
        "mae": diff.mean().item(),
        "max": diff.max().item(),
        "rel_l2": diff.norm().item() / max(r.norm().item(), 1e-300),
    }


def wall_time_ms(fn: Callable[[], object], repeat: int = 5, warmup: int = 1, min_time_s: float = 0.0) -> float:
    """Median wall-clock ms of `repeat` calls of `fn` (at least `min_time_s` of calls in all)."""
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < repeat or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def benchmark_module(module: Callable, x: Tensor, iters: int = 50, warmup: int = 5,
                     calls_per_graph: int = 20, cuda_graph: bool = True) -> float:
    """Milliseconds per inference call of `module(x)` (eval mode, no_grad; the mode is restored).

    CUDA input: `calls_per_graph` calls captured in one CUDA graph, the median of
    `triton.testing.do_bench` on its replay divided by the calls (kernel time, launch gaps
    hidden); `cuda_graph=False` times the plain call with do_bench
    (host overhead included). CPU input: the median wall-clock time of `iters` plain calls.
    """
    was_training = getattr(module, "training", None)
    if isinstance(module, nn.Module):
        module.eval()
    try:
        with torch.no_grad():
            fn = lambda: module(x)  # noqa: E731
            if x.is_cuda:
                if cuda_graph:
                    return cuda_graph_time_ms(fn, calls_per_graph, warmup)
                for _ in range(warmup):
                    fn()
                return plain_time_ms(fn)
            return wall_time_ms(fn, repeat=iters, warmup=warmup)
    finally:
        if isinstance(module, nn.Module) and was_training:
            module.train()


def masked_weights_zero(module: nn.Module) -> bool:
    """True when every prune-masked weight in `module` is zero wherever its mask is zero (the
    weight the forward uses, `<name> = <name>_orig * <name>_mask`)."""
    for m in module.modules():
        for name, mask in list(m.named_buffers(recurse=False)):
            if not name.endswith("_mask") or not hasattr(m, name[:-5] + "_orig"):
                continue
            w = getattr(m, name[:-5])
            if bool((w.detach()[mask == 0] != 0).any()):
                return False
    return True


def _default_batch_shape(module: nn.Module) -> tuple:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return (16, m.in_channels, 56, 56)
    raise ValueError("finetune: give batch_shape or input_fn (no conv found to guess the input from)")


def finetune(student: nn.Module, teacher: nn.Module, steps: int, lr: float = 1e-3,
             batch_shape: Optional[Sequence[int]] = None, grad_clip: Optional[float] = 1.0,
             input_fn: Optional[Callable[[int], Tensor]] = None, progress: bool = True,
             loss_fn: Callable[[Tensor, Tensor], Tensor] = F.mse_loss,
             backend: Optional[str] = None, options: Optional[dict] = None) -> list:
    """Distils the dense `teacher` into the (masked) `student`: Adam on the student's parameters,
    MSE between outputs on random inputs (`input_fn(step)`, else randn of `batch_shape`, default
    (16, Cin of the first conv, 56, 56)), gradient norm clipped to `grad_clip` (None: off).

    Training runs in fp32 (a fp16/bf16 student and teacher are upcast for it; the student is cast
    back after). Prune masks stay applied (the forward uses weight_orig * mask, so pruned weights
    get no gradient); this is asserted after every step. A line is printed every steps // 5 steps
    when `progress`. Returns the loss of every step; the student is left in eval mode.

    `backend` (e.g. "fxsparse", "inductor"): the student's forward and backward run through
    `torch.compile(student, backend=backend, options=options)`, as a user would write it; the
    optimizer still holds the student's own parameters. None: eager.
    """
    if steps <= 0:
        return []
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the student has no trainable parameters")
    device, orig_dtype = params[0].device, params[0].dtype
    low_precision = orig_dtype in (torch.float16, torch.bfloat16)
    if low_precision:
        student.float()
    dtype = torch.float32 if low_precision else orig_dtype
    teacher_copy = copy_module(teacher).to(device=device, dtype=dtype).eval()
    shape = tuple(batch_shape) if batch_shape is not None else (None if input_fn else _default_batch_shape(student))
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    every = max(1, steps // 5)
    losses = []
    student.train()
    forward = student if backend is None else torch.compile(student, backend=backend, options=options)
    try:
        for step in range(steps):
            x = input_fn(step) if input_fn is not None else torch.randn(*shape, device=device, dtype=dtype)
            x = x.to(device=device, dtype=dtype)
            with torch.no_grad():
                target = teacher_copy(x)
            loss = loss_fn(forward(x), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
            opt.step()
            losses.append(loss.item())
            if progress and (step % every == 0 or step == steps - 1):
                print(f"[finetune {step + 1}/{steps}] loss={losses[-1]:.4e}", flush=True)
            # weight_orig moved: re-derive the masked weights and check the mask still holds
            with torch.no_grad():
                for m in student.modules():
                    for hook in m._forward_pre_hooks.values():
                        if isinstance(hook, torch.nn.utils.prune.BasePruningMethod):
                            torch.nn.utils.prune.BasePruningMethod.__call__(hook, m, None)
            assert masked_weights_zero(student), "finetune: a masked weight became non-zero"
    finally:
        if low_precision:
            student.to(orig_dtype)
        student.eval()
    return losses
