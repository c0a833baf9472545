"""The activations the conv epilogue applies, in one table: the aten function that defines each
one, and the code the Triton epilogue (tile.activation) specialises on at compile time."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "none": lambda z: z,
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}

ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
