"""The activations the conv epilogue can apply (the table lives in `fxsparse.kernels.activations`,
beside the Triton epilogue that implements the same names)."""
from __future__ import annotations

import torch

from fxsparse.kernels.activations import ACTIVATION_CODES, ACTIVATIONS

__all__ = ["ACTIVATIONS", "ACTIVATION_CODES", "apply_activation", "check_activation"]


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"fxsparse.conv2d: unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}"
        )


def apply_activation(name: str, z: torch.Tensor) -> torch.Tensor:
    check_activation(name)
    return ACTIVATIONS[name](z)
