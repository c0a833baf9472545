"""Lowering "auto": per conv chain, our fused Triton op or a cuDNN conv + Inductor epilogue, by measurement.

As Inductor's max-autotune chooses between an extern cuDNN conv and its Triton
template, each fused chain (conv [+BN] [+act] [+residual add], compaction/chains.py) is
timed at compile time on its real shapes:

    triton   `torch.ops.fxsparse.conv2d`: conv, BN, activation, residual and the
             channel scatter in one kernel
    aten     `torch.conv2d` on the compacted channels_last weight (cuDNN), plus one
             elementwise pass standing in for the kernel Inductor fuses the
             epilogue into (reads the conv output and the residual, writes the
             output once; nothing when the chain ends at a folded BatchNorm)

on random inputs of the chain's shape, dtype and layout and its real compacted
weight and bias constants. The one selector (kernels/select.py: `selector.pick`)
times them and keeps the faster: by kernel time (CUDA-graph replay) where the
compiled graph will run under CUDA graphs, by the plain call's time (host launch
cost included) where it will not. Decisions are kept per shape signature
(`ChainShape`) for the process and in the tuning cache on disk, so identical
layers are timed once. A failure while timing falls back to "triton" and says why.

In training (lowering/training.py) the question is the same per compacted dense conv,
forward and backward together (`TrainConvProblem`): the op, whose backward is aten's
conv backward, against the aten conv, on the conv's compacted shapes and its autocast
dtype; its decisions are kept under their own key, apart from the chains'. A failure
while timing keeps aten there.

The timer is pluggable: `override(timer)` installs one (with a fresh cache) and
also enables the choice where it is otherwise off (CPU, fp32), which is how the
CPU tests drive a mixed graph. Without an override the choice runs only on CUDA
outside the Triton interpreter: for fp16/bf16 inference, and in training for each conv
that runs in fp16/bf16 (autocast or a half model).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from fxsparse.kernels import choices, timing
from fxsparse.kernels.layout import select_channels
from fxsparse.kernels.problem import ConvArgs, ConvCall, output_size
from fxsparse.kernels.select import selector
from fxsparse.ops.conv2d import triton_interpreter_on

# (candidate name "triton" | "aten", the chain's shape, a callable running it once) -> microseconds
Timer = Callable[[str, "ChainShape", Callable[[], object]], float]


@dataclass(frozen=True)
class ChainShape:
    """What decides a chain's speed: the cache key."""
    batch: int
    in_channels: int  # channels of x as stored (before any in_index gather)
    height: int
    width: int
    out_channels: int  # kept output channels (rows of the compacted weight)
    out_stored: int  # channels of the output as stored (> out_channels where out_index scatters)
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    dtype: str
    device: str
    activation: str
    residual: bool
    residual_after_activation: bool
    in_index: Optional[int]  # channels gathered from x, None: x read as it is
    out_index: bool
    bias_map: bool
    # the compiled graph runs under CUDA graphs: kernel time decides (host launch cost is
    # replayed away); otherwise the plain call's time, host overhead included
    graphed: bool = False

    def describe(self) -> str:
        return describe_conv(self)


def describe_conv(s) -> str:
    """A conv shape (ChainShape, TrainConvShape) in a line of the report."""
    k = "x".join(map(str, s.kernel))
    return f"N={s.batch} {s.in_channels}->{s.out_channels} {k} s{s.stride[0]} {s.height}x{s.width} {s.dtype}"


def writes_with_zero_rows(kernel, fused: bool, residual: bool, residual_after_activation: bool) -> bool:
    """Whether a chain whose result layout stores more channels than its conv computes writes
    that layout from zero filter rows (rewrite.dense_out) rather than scattering into it: 1x1
    convs only, and for aten not where a residual add follows the activation."""
    return tuple(kernel) == (1, 1) and (fused or not (residual and residual_after_activation))


def zero_row_weights(weight, bias, bias_map, index, fill, rows: int) -> tuple:
    """(weight, bias, bias map) with `rows` output rows: the given ones at `index`, zero rows
    elsewhere whose bias is `fill` (the channel's constant), in the given dtypes and devices.
    The bias map is a map [k, Ho, Wo] or a BiasMap's summed weight [k, 1, kh, kw]: zero rows either way."""
    index = index.long()
    w = weight.new_zeros((rows, *weight.shape[1:]))
    w[index.to(w.device)] = weight
    b = fill.to(w.device, weight.dtype if bias is None else bias.dtype).clone()
    if bias is not None:
        b[index.to(b.device)] = bias
    m = None
    if bias_map is not None:
        m = bias_map.new_zeros((rows, *bias_map.shape[1:])).index_copy(0, index.to(bias_map.device), bias_map)
    return w, b, m


@dataclass
class ChainProblem:
    """One chain as the lowering will emit it: constants real, activations to be made up."""
    KEY = "chain"  # the selector's key, beside the shape
    FALLBACK = "triton"  # kept where timing fails
    ATEN = "aten+epilogue"  # what the aten candidate runs, as the reason names it

    shape: ChainShape
    weight: torch.Tensor  # [out_channels, used_in, kh, kw], channels_last, model dtype
    bias: Optional[torch.Tensor]
    bias_map: Optional[torch.Tensor]  # fp32, as the fused op takes it
    in_index: Optional[torch.Tensor]
    out_index: Optional[torch.Tensor]
    fill: Optional[torch.Tensor]
    out_hw: tuple
    fused_args: Optional[ConvArgs] = field(default=None, repr=False)  # the op's arguments, once candidates() ran

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def has_epilogue(self) -> bool:
        s = self.shape
        return s.residual or s.activation != "none" or s.out_index or s.bias_map

    def candidates(self) -> dict:
        """{"triton": fn, "aten": fn}, each running the chain once on random inputs."""
        s, dev, dtype = self.shape, self.weight.device, self.weight.dtype
        x = torch.randn(s.batch, s.in_channels, s.height, s.width, device=dev, dtype=dtype).to(
            memory_format=torch.channels_last)
        ho, wo = self.out_hw
        residual = None
        if s.residual:
            residual = torch.randn(s.batch, s.out_stored, ho, wo, device=dev, dtype=dtype).to(
                memory_format=torch.channels_last)
        w, b, m = self.weight, self.bias, self.bias_map
        stride, padding, dilation = list(s.stride), list(s.padding), list(s.dilation)

        # Each candidate is what the lowering emits for it (rewrite.emit_chain, dense_out):
        # where the chain's result layout stores more channels than the conv computes, a 1x1
        # conv writes that layout itself from zero filter rows (aten: unless a residual add
        # comes after the activation); otherwise the fused op scatters into it and aten's
        # compact output is scattered there by a relayout. Aten then runs one elementwise
        # pass, as Inductor fuses bias map, residual and activation into one.
        wide = None
        if self.out_index is not None and writes_with_zero_rows(s.kernel, True, s.residual, s.residual_after_activation):
            wide = zero_row_weights(w, b, m, self.out_index, self.fill, s.out_stored)
            wide = (wide[0].contiguous(memory_format=torch.channels_last), *wide[1:])
        dense_aten = wide is not None and writes_with_zero_rows(s.kernel, False, s.residual,
                                                               s.residual_after_activation)
        w_t, b_t, m_t = wide if wide is not None else (w, b, m)
        out_index_t, fill_t = (None, None) if wide is not None else (self.out_index, self.fill)
        w_a, b_a, m_a = wide if dense_aten else (w, b, m)
        scatter = self.out_index is not None and not dense_aten
        # what each path emits: the fused op, or cuDNN whose epilogue Inductor fuses into one pass
        fused = ConvArgs(x, w_t, b_t, stride, padding, dilation, self.in_index, out_index_t, s.out_stored, fill_t,
                         m_t, residual, s.activation, s.residual_after_activation)
        aten = ConvArgs(x, w_a, b_a, stride, padding, dilation, self.in_index, self.out_index if scatter else None,
                        s.out_stored if scatter else w_a.shape[0], self.fill if scatter else None,
                        None if m_a is None else m_a.to(dtype), residual, s.activation, s.residual_after_activation)

        self.fused_args = fused

        def triton():
            return torch.ops.fxsparse.conv2d.default(*fused)

        def aten_path():
            return choices.ATEN.compute(aten_call(aten), epilogue="fused")

        return {"triton": triton, "aten": aten_path}


@dataclass(frozen=True)
class TrainConvShape:
    """What decides a training conv's forward + backward speed: the cache key (kept apart
    from the chains' by its own key in the selector and on disk)."""
    batch: int
    in_channels: int  # channels the conv reads (after any gather)
    height: int
    width: int
    out_channels: int  # kept output channels
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    bias: bool
    dtype: str  # the conv's compute dtype (autocast's)
    device: str
    channels_last: bool  # the input's memory format
    input_grad: bool  # the backward computes the input's gradient (not for the first conv)
    weight_grad: bool
    graphed: bool = False

    def describe(self) -> str:
        return "train " + describe_conv(self)


@dataclass
class TrainConvProblem:
    """One compacted dense conv of a training graph: forward and backward of the fused op (a plain
    conv, backward by aten's conv backward) against the aten conv, on random tensors of its shapes."""
    KEY = "train-conv"
    FALLBACK = "aten"  # the training lowering's long-standing conv
    ATEN = "aten"

    shape: TrainConvShape
    device: torch.device

    def launch_known(self) -> bool:
        """Whether the fused op's launch for this conv is known without tuning (the disk cache, the
        shipped table, or tuning off): a training compile does not tune launches for "auto"."""
        from fxsparse.kernels.conv2d import conv_call
        from fxsparse.options import kernel_settings

        if self.device.type != "cuda":  # (the interpreter: no tuned launches, only the safe one)
            return kernel_settings().tune == "off"
        s = self.shape
        make = dict(device=self.device, dtype=getattr(torch, s.dtype))
        x = torch.empty(s.batch, s.in_channels, s.height, s.width, **make)
        w = torch.empty(s.out_channels, s.in_channels, *s.kernel, **make)
        args = ConvArgs(x.contiguous(memory_format=torch.channels_last) if s.channels_last else x,
                        w.contiguous(memory_format=torch.channels_last),
                        torch.empty(s.out_channels, **make) if s.bias else None, list(s.stride), list(s.padding),
                        list(s.dilation), None, None, s.out_channels, None, None, None, "none", False)
        return selector.known(conv_call(args))

    def candidates(self) -> dict:
        """{"triton": fn, "aten": fn}, each one forward and backward as the compiled training graph
        runs them: the fused op or aten's conv, then aten's conv backward (the op's backward) for
        the gradients the graph needs. Returns the forward's output."""
        s = self.shape
        make = dict(device=self.device, dtype=getattr(torch, s.dtype))
        x = torch.randn(s.batch, s.in_channels, s.height, s.width, **make)
        if s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fan_in = s.in_channels * s.kernel[0] * s.kernel[1]
        w = torch.randn(s.out_channels, s.in_channels, *s.kernel, **make) / fan_in ** 0.5
        w_cl = w.contiguous(memory_format=torch.channels_last)  # as the lowering hands it to the op
        b = torch.randn(s.out_channels, **make) if s.bias else None
        ho, wo = (output_size(size, k, st, p, d) for size, k, st, p, d in
                  zip((s.height, s.width), s.kernel, s.stride, s.padding, s.dilation))
        grad = torch.randn(s.batch, s.out_channels, ho, wo, **make).contiguous(memory_format=torch.channels_last)
        stride, padding, dilation = list(s.stride), list(s.padding), list(s.dilation)
        mask = [s.input_grad, s.weight_grad, s.bias and s.weight_grad]  # (a bias trains as its weight)

        def backward(weight):
            if any(mask):
                torch.ops.aten.convolution_backward(grad, x, weight, [s.out_channels] if s.bias else None, stride,
                                                    padding, dilation, False, [0, 0], 1, mask)

        def triton():
            y = torch.ops.fxsparse.conv2d.default(x, w_cl, b, stride, padding, dilation, None, None,
                                                  s.out_channels, None, None, None, "none", False)
            backward(w_cl)
            return y

        def aten():
            y = torch.conv2d(x, w, b, s.stride, s.padding, s.dilation, 1)
            backward(w)
            return y

        return {"triton": triton, "aten": aten}


def aten_call(args: ConvArgs) -> ConvCall:
    """The tensors of `args` as the aten choice reads them (its output is computed, not written: `out`
    only carries the output's shape)."""
    x = args.x if args.in_index is None else select_channels(args.x, args.in_index)
    n, _, h, w = x.shape
    kh, kw = args.weight.shape[2:]
    hw = [output_size(size, k, s, p, d) for size, k, s, p, d in
          zip((h, w), (kh, kw), args.stride, args.padding, args.dilation)]
    out = torch.empty((n, args.out_channels, *hw), device="meta")
    return ConvCall(x, args.weight, args.bias, args.bias_map, args.residual, args.out_index, args.fill, out,
                    tuple(args.stride), tuple(args.padding), tuple(args.dilation), args.activation,
                    args.residual_after_activation)


@dataclass
class Decision:
    lowering: str  # "triton" | "aten"
    reason: str
    triton_us: Optional[float] = None
    aten_us: Optional[float] = None
    measured: bool = False  # timed now or read from the tuning cache (kept for the process)


def cuda_timer(name: str, shape: ChainShape, fn: Callable[[], object]) -> float:
    """Microseconds of `fn` as the selector times it: CUDA-graph replay where the compiled graph will
    run under CUDA graphs (kernel time), else the plain call (host launch cost included, which our
    op's Python launcher makes larger than cuDNN's). The first calls compile and choose the op's
    launch (outside the timed region)."""
    return timing.gpu_time_ms(fn, graphed=shape.graphed) * 1e3


class Chooser:
    """The lowering's question to the selector: per chain (per training conv), the fused op or aten."""

    def __init__(self, timer: Timer, forced: bool = False):
        self.timer = timer
        self.forced = forced  # choose even where it is off by default (CPU tests)
        self.cache: dict = {}  # ChainShape -> Decision
        self.timed: list = []  # the shape (ChainShape, TrainConvShape) of every problem actually timed, in order

    def enabled(self, on_gpu: bool, half: bool, inference: bool) -> bool:
        """Whether "auto" measures at all; in training `half` is known per conv only (autocast),
        and convs that do not run in fp16/bf16 keep aten there."""
        return self.forced or (on_gpu and (half or not inference) and not triton_interpreter_on())

    def choose(self, problem) -> Decision:
        """`problem`: a ChainProblem or a TrainConvProblem."""
        hit = self.cache.get(problem.shape)
        if hit is not None:
            return hit
        decision = self._measure(problem)
        if decision.measured:  # failures are not cached: the next compile tries again
            self.cache[problem.shape] = decision
        return decision

    def _measure(self, problem) -> Decision:
        # (KEY, FALLBACK and ATEN of the problem's class: its key, what a failure keeps, the report's word)
        fallback = problem.FALLBACK
        if problem.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return Decision(fallback, f"not measured (a CUDA graph capture is in progress): {fallback}")
        try:
            cands = problem.candidates()
            self.timed.append(problem.shape)
            timer = None if self.timer is cuda_timer else (lambda name, fn: self.timer(name, problem.shape, fn))
            # (an overriding timer is the tests': its answers are not kept on disk)
            name, times = selector.pick((problem.KEY, problem.shape), cands, graphed=problem.shape.graphed,
                                        timer=timer, persist=timer is None)
        except Exception as e:  # noqa: BLE001 - any failure keeps the fallback
            return Decision(fallback, f"timing failed ({type(e).__name__}: {e}): {fallback}")
        if not times:
            if name == "triton" and isinstance(problem, ChainProblem):
                _compile_ahead(problem, cands["triton"])
            return Decision(name, f"from the tuning cache: {name}", measured=True)
        t, a = times.get("triton"), times.get("aten")
        if timer is None:
            t, a = (None if v is None else v * 1e3 for v in (t, a))
        if t is None:
            return Decision(fallback, f"timing failed (the fused op did not run): {fallback}")
        reason = f"measured: triton {t:.1f} us vs {problem.ATEN} {a:.1f} us" if a is not None else \
            f"measured: triton {t:.1f} us (aten failed)"
        return Decision(name, reason, t, a, measured=True)


def _compile_ahead(problem: ChainProblem, run: Callable[[], object]) -> None:
    """With settings.compile_workers > 1, the fused op's launch for this chain, known without timing,
    compiles on a background thread while the rest of the graph is lowered and compiled."""
    from fxsparse.kernels.conv2d import conv_call
    from fxsparse.options import kernel_settings

    workers = kernel_settings().compile_workers
    if workers > 1 and problem.weight.is_cuda and selector.known(conv_call(problem.fused_args)):
        selector.prefetch(run, workers, problem.weight.device)


_current = Chooser(cuda_timer)


def current() -> Chooser:
    return _current


@contextlib.contextmanager
def override(timer: Timer, forced: bool = True):
    """Installs `timer` with a fresh cache (and, forced, the choice on CPU / fp32 too); yields the Chooser."""
    global _current
    previous, _current = _current, Chooser(timer, forced)
    try:
        yield _current
    finally:
        _current = previous


def concrete(v) -> int:
    """An int for a size that may be symbolic (its hint); raises where there is none."""
    if isinstance(v, int):
        return v
    if isinstance(v, torch.SymInt):
        got = v.node.maybe_as_int()
        if got is None:
            got = getattr(v.node, "hint", None)
        if isinstance(got, int):
            return got
    raise ValueError(f"size {v!r} has no concrete value")
