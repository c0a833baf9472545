"""The conv implementations behind `torch.ops.fxsparse.conv2d` (choices.py) and the one selector that
picks among them (select.py). Imports nothing from fxsparse.ops."""
from .conv2d import conv2d_triton
from .problem import ConvArgs
from .select import selector

__all__ = ["ConvArgs", "conv2d_triton", "selector"]
