"""Epilogue pieces shared by the conv kernels (conv2d.py, pointwise_tma.py): the activations,
specialised at compile time on their code in `fxsparse.ops.activations.ACTIVATION_CODES`."""
from __future__ import annotations

import triton
import triton.language as tl

from fxsparse.ops.activations import ACTIVATION_CODES

# `activation`'s `if ACTIVATION == k` chain is written against these codes.
_KERNEL_ACTIVATIONS = ("none", "relu", "relu6", "silu", "gelu", "gelu_tanh", "hardswish",
                       "hardsigmoid", "sigmoid", "tanh")
assert {n: i for i, n in enumerate(_KERNEL_ACTIVATIONS)} == ACTIVATION_CODES, (
    "fxsparse.kernels.epilogue: activation table out of sync with fxsparse.ops.activations")


@triton.jit
def tanh(z):
    # tl has no portable tanh across 3.6-3.9 and the interpreter; exact in fp32 up to ~1e-7 abs.
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def activation(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:
        z = tl.maximum(z, 0.0)
    elif ACTIVATION == 2:
        z = tl.minimum(tl.maximum(z, 0.0), 6.0)
    elif ACTIVATION == 3:
        z = z * tl.sigmoid(z)
    elif ACTIVATION == 4:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACTIVATION == 5:
        z = 0.5 * z * (1.0 + tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACTIVATION == 6:
        z = z * (tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0)
    elif ACTIVATION == 7:
        z = tl.minimum(tl.maximum(z + 3.0, 0.0), 6.0) / 6.0
    elif ACTIVATION == 8:
        z = tl.sigmoid(z)
    elif ACTIVATION == 9:
        z = tanh(z)
    return z


@triton.jit
def residual_and_activation(z, r, HAS_RESIDUAL: tl.constexpr, RESIDUAL_AFTER: tl.constexpr,
                            ACTIVATION: tl.constexpr):
    """act(z + r), or act(z) + r (RESIDUAL_AFTER: the ResNet block whose add follows its ReLU)."""
    if HAS_RESIDUAL:
        if not RESIDUAL_AFTER:
            z += r
    z = activation(z, ACTIVATION)
    if HAS_RESIDUAL:
        if RESIDUAL_AFTER:
            z += r
    return z
