"""The activations the conv epilogue can apply, in one table.

The reference (aten) functions below define the semantics; the Triton epilogue
(`fxsparse/kernels/conv2d.py`) implements the same names, selected by the code
in `ACTIVATION_CODES` so that the kernel specialises on it at compile time.
"""
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


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"fxsparse.conv2d: unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}"
        )


def apply_activation(name: str, z: torch.Tensor) -> torch.Tensor:
    check_activation(name)
    return ACTIVATIONS[name](z)
