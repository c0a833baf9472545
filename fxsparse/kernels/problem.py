"""What a conv launch is given: the op's arguments (`ConvArgs`, in the schema's order: the one place
they are listed), one call's tensors as the launches take them (`ConvCall`), and the shape that
decides which launch is fastest (`ConvProblem`, the tuner's key)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from fxsparse.kernels.activations import ACTIVATION_CODES

Tensor = torch.Tensor


class ConvArgs(NamedTuple):
    """`torch.ops.fxsparse.conv2d`'s arguments, in its schema's order."""
    x: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    stride: list
    padding: list
    dilation: list
    in_index: Optional[Tensor]
    out_index: Optional[Tensor]
    out_channels: int
    fill: Optional[Tensor]
    bias_map: Optional[Tensor]
    residual: Optional[Tensor]
    activation: str
    residual_after_activation: bool

    @classmethod
    def of(cls, x: Tensor, weight: Tensor, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
           in_index=None, out_index=None, out_channels: Optional[int] = None, fill=None, bias_map=None,
           residual=None, activation: str = "none", residual_after_activation: bool = False) -> "ConvArgs":
        """The arguments with the op's defaults (tests, benchmarks): every output channel computed."""
        return cls(x, weight, bias, list(stride), list(padding), list(dilation), in_index, out_index,
                   weight.shape[0] if out_channels is None else out_channels, fill, bias_map, residual,
                   activation, bool(residual_after_activation))


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@dataclass(slots=True)
class ConvCall:
    """One call's tensors as a launch takes them: `x` already holds only the channels the weight reads
    (in_index applied), `out` is the output the launch writes in full."""
    x: Tensor
    weight: Tensor
    bias: Optional[Tensor]
    bias_map: Optional[Tensor]
    residual: Optional[Tensor]
    out_index: Optional[Tensor]
    fill: Optional[Tensor]
    out: Tensor
    stride: tuple
    padding: tuple
    dilation: tuple
    activation: str
    residual_after_activation: bool

    @property
    def activation_code(self) -> int:
        return ACTIVATION_CODES[self.activation]

    @property
    def pointwise(self) -> bool:
        """1x1, stride 1, no padding: a plain GEMM over pixel rows."""
        kh, kw = self.weight.shape[2:]
        return kh == 1 and kw == 1 and self.stride == (1, 1) and self.padding == (0, 0)

    def key(self, split_k: Optional[int] = None) -> tuple:
        """What `problem` is made of, as a plain tuple: the selector's per-call lookup."""
        x, w = self.x, self.weight
        return (x.shape, w.shape, self.stride, self.padding, self.dilation, x.dtype, x.stride(1), w.stride(1),
                x.device, split_k)

    def problem(self, sms: int, split_k: Optional[int] = None) -> "ConvProblem":
        n, _, h, w = self.x.shape
        nch, cin, kh, kw = self.weight.shape
        return ConvProblem(n, h, w, cin, nch, (kh, kw), self.stride, self.padding, self.dilation,
                           str(self.x.dtype).replace("torch.", ""), self.x.stride(1), self.weight.stride(1),
                           sms, split_k)


@dataclass(frozen=True)
class ConvProblem:
    """What decides which launch of a conv is fastest: the tuner's key (in memory and on disk)."""
    batch: int
    height: int
    width: int
    in_channels: int  # channels the weight reads
    out_channels: int  # kept output channels (rows of the compacted weight)
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    dtype: str
    x_channel_stride: int  # 1: channels_last rows
    w_channel_stride: int
    sms: int  # the device's SM count (tiles per wave)
    split_k: Optional[int] = None  # a forced split-K factor (settings.split_k)

    @property
    def out_hw(self) -> tuple:
        return tuple(output_size(s, k, st, p, d) for s, k, st, p, d in
                     zip((self.height, self.width), self.kernel, self.stride, self.padding, self.dilation))

    @property
    def m(self) -> int:
        ho, wo = self.out_hw
        return self.batch * ho * wo

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def pointwise(self) -> bool:
        return self.kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.out_channels * self.in_channels * self.taps

    def describe(self) -> str:
        return (f"N={self.batch} {self.in_channels}->{self.out_channels} {self.kernel[0]}x{self.kernel[1]}"
                f"/{self.stride[0]} @{self.height}x{self.width} {self.dtype}")
