"""`torch.ops.fxsparse.conv2d` on CPU (the aten reference path): values, opcheck,
gradients and argument checking. The oracle (tests/conv_oracle.py) is written
independently of `conv2d_reference`."""
import pytest
import torch

import fxsparse.ops  # noqa: F401  (registers torch.ops.fxsparse)
from fxsparse.ops import ConvArgs

from conv_oracle import ORACLE_ACT, oracle

OP = torch.ops.fxsparse.conv2d


def call(x, w, **kw):
    return OP(*ConvArgs.of(x, w, **kw))


def args_tuple(x, w, **kw):
    return tuple(ConvArgs.of(x, w, **kw))


def R(*shape, dtype=torch.float64, g=None):
    return torch.randn(*shape, dtype=dtype, generator=g)


def problem(kind, dtype=torch.float64, seed=0):
    """A small problem of each kind: (x, w, kwargs). Tensors are fresh and leaf."""
    g = torch.Generator().manual_seed(seed)
    n, h, wd = 2, 6, 5
    if kind == "plain":
        return R(n, 5, h, wd, dtype=dtype, g=g), R(7, 5, 3, 3, dtype=dtype, g=g), dict(padding=(1, 1))
    if kind == "epilogue":
        x, w = R(n, 5, h, wd, dtype=dtype, g=g), R(7, 5, 3, 3, dtype=dtype, g=g)
        return x, w, dict(padding=(1, 1), stride=(2, 1), bias=R(7, dtype=dtype, g=g),
                          bias_map=R(7, 3, 5, dtype=dtype, g=g),
                          residual=R(n, 7, 3, 5, dtype=dtype, g=g), activation="silu")
    if kind == "compact":
        x, w = R(n, 9, h, wd, dtype=dtype, g=g), R(4, 5, 3, 3, dtype=dtype, g=g)
        return x, w, dict(padding=(1, 1), dilation=(1, 1), in_index=torch.tensor([8, 0, 3, 5, 1]),
                          out_index=torch.tensor([6, 2, 0, 3]), out_channels=7, fill=R(7, dtype=dtype, g=g),
                          bias=R(4, dtype=dtype, g=g), residual=R(n, 7, h, wd, dtype=dtype, g=g),
                          activation="gelu", residual_after_activation=True)
    if kind == "gathered":  # a plain conv (the form training lowers to the op): in_index, bias, stride, dilation
        x, w = R(n, 9, h, wd, dtype=dtype, g=g), R(4, 5, 3, 2, dtype=dtype, g=g)
        return x, w, dict(stride=(2, 1), padding=(2, 1), dilation=(2, 1), in_index=torch.tensor([8, 0, 3, 5, 1]),
                          bias=R(4, dtype=dtype, g=g))
    if kind == "out_index_no_fill":
        x, w = R(n, 5, h, wd, dtype=dtype, g=g), R(3, 5, 1, 1, dtype=dtype, g=g)
        return x, w, dict(out_index=torch.tensor([4, 1, 2], dtype=torch.int32), out_channels=5,
                          activation="tanh")
    raise KeyError(kind)


KINDS = ["plain", "gathered", "epilogue", "compact", "out_index_no_fill"]


# ------------------------------------------------------------------ values

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_reference_matches_oracle(kind, dtype):
    x, w, kw = problem(kind, dtype=torch.float64)
    kw = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    x, w = x.to(dtype), w.to(dtype)
    y = call(x, w, **kw)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(y.double(), oracle(x, w, **kw), rtol=tol, atol=tol)


@pytest.mark.parametrize("activation", list(ORACLE_ACT))
def test_reference_activations(activation):
    x, w, kw = problem("plain")
    kw.update(activation=activation, bias=R(7) * 3, residual=R(2, 7, 6, 5))
    torch.testing.assert_close(call(x, w, **kw), oracle(x, w, **kw).contiguous(memory_format=torch.channels_last))


def test_reference_every_channel_pruned():
    x = R(1, 3, 4, 4)
    w = R(0, 3, 3, 3)
    kw = dict(padding=(1, 1), out_index=torch.zeros(0, dtype=torch.int64), out_channels=4, fill=R(4),
              activation="relu")
    torch.testing.assert_close(call(x, w, **kw), oracle(x, w, **kw).contiguous(memory_format=torch.channels_last))


# ------------------------------------------------------------------ opcheck

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(kind, requires_grad):
    x, w, kw = problem(kind, dtype=torch.float32)
    if requires_grad:
        for t in [x, w] + [v for k, v in kw.items() if torch.is_tensor(v) and v.is_floating_point()]:
            t.requires_grad_(True)
    torch.library.opcheck(OP.default, args_tuple(x, w, **kw))


# ------------------------------------------------------------------ gradients

def _grad_leaves(x, w, kw):
    leaves = {"x": x, "weight": w}
    for name in ("bias", "fill", "bias_map", "residual"):
        if kw.get(name) is not None:
            leaves[name] = kw[name]
    for t in leaves.values():
        t.requires_grad_(True)
    return leaves


@pytest.mark.parametrize("kind", ["plain", "gathered", "epilogue", "compact"])
def test_gradients_match_eager_oracle(kind):
    x, w, kw = problem(kind)
    leaves = _grad_leaves(x, w, kw)
    gy = R(*call(x, w, **kw).shape)
    y = call(x, w, **kw)
    got = torch.autograd.grad(y, list(leaves.values()), gy)
    want = torch.autograd.grad(oracle(x, w, **kw), list(leaves.values()), gy)
    for name, a, b in zip(leaves, got, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("kind", ["plain", "gathered", "epilogue", "compact"])
def test_gradcheck(kind):
    x, w, kw = problem(kind)
    leaves = _grad_leaves(x, w, kw)
    names = list(leaves)

    def f(*ts):
        k = dict(kw)
        k.update({n: t for n, t in zip(names, ts) if n not in ("x", "weight")})
        return call(ts[0], ts[1], **k)

    assert torch.autograd.gradcheck(f, tuple(leaves.values()))


@pytest.mark.parametrize("wanted", [("x",), ("weight",), ("bias",), ("x", "bias"), ("x", "weight", "bias")])
def test_plain_conv_backward_is_aten_conv_backward(wanted, monkeypatch):
    """A plain conv's backward is one aten.convolution_backward on the tensors the forward read,
    asking only for the gradients autograd needs, with no recompute of the forward; its
    gradients are the oracle's."""
    import sys

    masks = []
    real = torch.ops.aten.convolution_backward

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is real.default:
                masks.append(list(args[-1]))
            return func(*args, **(kwargs or {}))

    x, w, kw = problem("gathered")
    leaves = {"x": x, "weight": w, "bias": kw["bias"]}
    for name in wanted:
        leaves[name].requires_grad_(True)
    y = call(x, w, **kw)  # (on the CPU the forward is the reference itself)
    gy = R(*y.shape)
    monkeypatch.setattr(sys.modules["fxsparse.ops.conv2d"], "conv2d_reference",
                        lambda *a: pytest.fail("the forward was recomputed"))
    with Spy():
        got = torch.autograd.grad(y, [leaves[n] for n in wanted], gy)
    assert masks == [[n in wanted for n in ("x", "weight", "bias")]]
    want = torch.autograd.grad(oracle(x, w, **kw), [leaves[n] for n in wanted], gy)
    for name, a, b in zip(wanted, got, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"grad of {name}: {m}")


def test_gradients_fp32_vs_oracle():
    x, w, kw = problem("compact", dtype=torch.float32)
    leaves = _grad_leaves(x, w, kw)
    y = call(x, w, **kw)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, list(leaves.values()), gy)
    want = torch.autograd.grad(oracle(x, w, **kw), list(leaves.values()), gy.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ argument checking

def _bad(**changes):
    x, w, kw = problem("plain", dtype=torch.float32)
    kw.update(changes.pop("kw", {}))
    x = changes.pop("x", x)
    w = changes.pop("w", w)
    return x, w, kw


BAD = {
    "int x": (dict(x=torch.ones(2, 5, 6, 5, dtype=torch.int32)), "must be float16, bfloat16 or float32"),
    "weight dtype": (dict(w=torch.ones(7, 5, 3, 3, dtype=torch.float64)), "weight dtype"),
    "weight on meta": (dict(w=torch.ones(7, 5, 3, 3, device="meta")), "weight is on meta"),
    "x rank": (dict(x=torch.ones(5, 6, 5)), "x must be 4-D"),
    "weight rank": (dict(w=torch.ones(7, 5, 3)), "weight must be 4-D"),
    "channel mismatch": (dict(x=torch.ones(2, 4, 6, 5)), "x has 4 channels but weight expects 5"),
    "in_index out of range": (dict(x=torch.ones(2, 6, 6, 5), kw=dict(in_index=torch.tensor([0, 1, 2, 3, 6]))),
                              r"in_index has values in \[0, 6\], outside \[0, 6\)"),
    "in_index negative": (dict(x=torch.ones(2, 6, 6, 5), kw=dict(in_index=torch.tensor([0, 1, -1, 3, 4]))),
                          "in_index has values in"),
    "in_index length": (dict(x=torch.ones(2, 6, 6, 5), kw=dict(in_index=torch.tensor([0, 1, 2]))),
                        "in_index must be a vector of length 5"),
    "in_index float": (dict(kw=dict(in_index=torch.zeros(5))), "in_index must be int32 or int64"),
    "out_index length": (dict(kw=dict(out_index=torch.tensor([0, 1]), out_channels=9)),
                         "out_index must be a vector of length 7"),
    "out_index range": (dict(kw=dict(out_index=torch.arange(7) + 3, out_channels=9)),
                        "out_index has values in"),
    "out_index repeats": (dict(kw=dict(out_index=torch.tensor([0, 1, 2, 3, 4, 5, 5]), out_channels=9)),
                          "repeated"),
    "out_channels small": (dict(kw=dict(out_index=torch.arange(7), out_channels=6)), "smaller than weight"),
    "out_channels no index": (dict(kw=dict(out_channels=9)), "differs from weight's 7 rows"),
    "fill without index": (dict(kw=dict(fill=torch.zeros(7))), "fill needs out_index"),
    "fill length": (dict(kw=dict(out_index=torch.arange(7), out_channels=9, fill=torch.zeros(7))),
                    "fill must be a vector of length 9"),
    "bias length": (dict(kw=dict(bias=torch.zeros(6))), "bias must be a vector of length 7"),
    "bias int": (dict(kw=dict(bias=torch.ones(7, dtype=torch.int64))), "bias must be floating point"),
    "bias_map shape": (dict(kw=dict(bias_map=torch.zeros(7, 5, 5))), "bias_map must have shape"),
    "residual shape": (dict(kw=dict(residual=torch.zeros(2, 7, 6, 4))), "residual must have the output's shape"),
    "unknown activation": (dict(kw=dict(activation="swish")), "unknown activation 'swish'"),
    "stride zero": (dict(kw=dict(stride=(0, 1))), "stride and dilation must be >= 1"),
    "stride length": (dict(kw=dict(stride=(1, 1, 1))), "stride must have 2 values"),
    "empty output": (dict(kw=dict(padding=(0, 0)), x=torch.ones(2, 5, 2, 2)), "output would be empty"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_arguments(name):
    changes, message = BAD[name]
    x, w, kw = _bad(**changes)
    with pytest.raises(ValueError, match=message):
        call(x, w, **kw)


def test_index_checked_again_after_in_place_change():
    x, w, kw = problem("plain", dtype=torch.float32)
    x = torch.randn(2, 6, 6, 5)
    idx = torch.tensor([0, 1, 2, 3, 4])
    call(x, w, in_index=idx, **kw)
    call(x, w, in_index=idx, **kw)  # cached check: no error, no recheck
    idx[0] = 6
    with pytest.raises(ValueError, match="in_index has values in"):
        call(x, w, in_index=idx, **kw)
