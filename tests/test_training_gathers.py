"""The compacted training graph's slices of parameters and what its GPU code launches.

`index_select`'s backward is `new_zeros + index_add` (a fill and a scatter per dim, kernels
Inductor cannot fuse); `gather.kept_slice` builds the full-size gradient by gathering the
compact one by inverse positions. These tests check that no scatter is left in the backward
of a masked conv + BatchNorm + linear graph, and that every gradient and buffer is eager's;
that a conv weight's slice (a scatter) is exact and fused with the prune mask's multiply; and
that running statistics and counters are written by one kernel each.
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune
from hypothesis import given, settings
from hypothesis import strategies as st

import models as M
from models import fresh_dynamo  # noqa: F401

from fxsparse.lowering.gather import KeptIndex, kept_rows, kept_slice, kept_weight

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

SCATTERS = ("index_add", "scatter", "index_put")


def masked_net() -> tuple:
    """conv-BN-ReLU x3 (3x3 padded, 3x3 padded, 1x1), pool, linear: every conv's output
    channels masked, so beta reaches the next conv as a bias map (padding), a bias (1x1) and
    the linear head; no activation is gathered or relaid out (nothing but parameters)."""
    torch.manual_seed(0)
    model = nn.Sequential(M.ConvBNReLU(3, 8), M.ConvBNReLU(8, 8), M.ConvBNReLU(8, 8, k=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    M.randomize_bn(model)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            prune.ln_structured(m, "weight", amount=0.5, n=2, dim=0)
    return model.train().double(), (4, 3, 6, 6)


def joint_graphs(model, x) -> dict:
    """{"fw", "bw"}: AOTAutograd's graphs of fxsparse's rewritten training graph (what Inductor
    compiles), the model run once forward and backward."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    from fxsparse.backend import rewrite
    from fxsparse.options import Options

    graphs = {}

    def keep(kind):
        def compiler(gm, inputs):
            graphs[kind] = gm
            return make_boxed_func(gm.forward)
        return compiler

    def backend(gm, inputs):
        new = rewrite(gm, inputs, Options.parse({}), 0).gm
        graphs["rewritten"] = new
        return aot_module_simplified(new, inputs, fw_compiler=keep("fw"), bw_compiler=keep("bw"))

    torch.compile(model, backend=backend, fullgraph=True)(x).square().sum().backward()
    return graphs


def targets(gm) -> list:
    return [getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes if n.op == "call_function"]


def test_backward_has_no_scatter_and_matches_eager():
    model, shape = masked_net()
    ref, _ = masked_net()
    x = torch.randn(shape, dtype=torch.float64)
    graphs = joint_graphs(model, x)
    ref(x).square().sum().backward()
    assert sum(t == "kept_slice" for t in targets(graphs["rewritten"])) >= 8, "parameters not gathered"
    scatters = [t for t in targets(graphs["bw"]) if any(s in t for s in SCATTERS)]
    assert not scatters, scatters
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"grad {n}: {m}")
    for (n, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-14, msg=lambda m, n=n: f"{n}: {m}")
    for m in model.modules():  # pruned rows: exactly zero, as eager's grad * mask
        if hasattr(m, "weight_mask"):
            assert torch.all(m.weight_orig.grad[m.weight_mask == 0] == 0)
            assert m.weight_orig.grad[m.weight_mask == 1].abs().sum() > 0


def test_inductor_backward_code_has_no_scatter(tmp_path):
    """Through Inductor (in float64: Inductor's fp32 reductions differ from eager's in order,
    ~2e-5 on these gradients either way): its backward code has no index_add or scatter
    kernel, and the gradients and running statistics are eager's."""
    from fxsparse.report.launches import captured_inductor_code

    model, shape = masked_net()
    ref, _ = masked_net()
    compiled = torch.compile(model, backend="fxsparse", fullgraph=True,
                             options={"inductor": True, "dump_dir": str(tmp_path)})
    x = torch.randn(shape, dtype=torch.float64)
    out = compiled(x)
    codes = []
    with captured_inductor_code(codes):
        out.square().sum().backward()
    ref(x).square().sum().backward()
    assert codes, "no backward compiled"
    assert not [s for s in SCATTERS for c in codes if s in c], [s for s in SCATTERS for c in codes if s in c]
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"grad {n}: {m}")
    for (n, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-14, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("rows,cols", [((5, 1, 3), None), (None, (0, 4)), ((4, 0), (2, 1, 3))])
def test_kept_slice_is_index_select(rows, cols):
    """Values and gradients bit for bit those of index_select (any order of kept indices), and an
    inf in the compact gradient stays on its own entry (pruned entries exactly zero)."""
    t = torch.randn(6, 5, 3, dtype=torch.float64, requires_grad=True)
    r = None if rows is None else KeptIndex.of(torch.tensor(rows), 6)
    c = None if cols is None else KeptIndex.of(torch.tensor(cols), 5)
    args = [None] * 3 if r is None else [r.ids, r.positions, r.kept]
    args += [None] * 3 if c is None else [c.ids, c.positions, c.kept]
    got = kept_slice(t, *args)
    want = t if r is None else t.index_select(0, r.ids)
    want = want if c is None else want.index_select(1, c.ids)
    assert torch.equal(got, want)
    grad = torch.randn_like(got)
    grad.view(-1)[0] = float("inf")
    g_got, = torch.autograd.grad(got, t, grad)
    g_want, = torch.autograd.grad(want, t, grad)
    assert torch.equal(g_got, g_want)
    torch.autograd.gradcheck(lambda t: kept_slice(t, *args), (t.detach().requires_grad_(),))


def test_kept_rows_is_index_select_of_each():
    """Several vectors sliced at once: values and gradients bit for bit those of index_select,
    an unused slice gives no gradient, and an inf in a compact gradient stays on its entry."""
    sizes, picks = (6, 4, 5), ([5, 1, 3], [0, 2, 1, 3], [4])
    ts = [torch.randn(n, dtype=torch.float64, requires_grad=True) for n in sizes]
    ks = [KeptIndex.of(torch.tensor(p), n) for p, n in zip(picks, sizes)]
    got = kept_rows(*[x for t, k in zip(ts, ks) for x in (t, k.ids, k.positions, k.kept)])
    want = [t.index_select(0, k.ids) for t, k in zip(ts, ks)]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    grads = [torch.randn_like(g) for g in got[:2]]  # the third slice is not used
    grads[0][1] = float("inf")
    g_got = torch.autograd.grad(got[:2], ts, grads, allow_unused=True)
    g_want = torch.autograd.grad(want[:2], ts, grads, allow_unused=True)
    assert torch.equal(g_got[0], g_want[0]) and torch.equal(g_got[1], g_want[1])
    assert g_got[2] is None and g_want[2] is None


def test_kept_index_rejects_repeated_indices():
    with pytest.raises(ValueError, match="unique"):
        KeptIndex.of(torch.tensor([1, 1, 2]), 4)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 3), st.integers(1, 3)),
       channels_last=st.booleans(), weight_channels_last=st.booleans())
def test_kept_weight_is_index_select(data, shape, channels_last, weight_channels_last):
    """The scattered slice of a conv weight (itself in either layout): values those of
    index_select on rows and columns (any order of kept indices, either dim kept whole), laid
    out as asked, every element written (its storage starts as NaN), and the gradient
    index_select's."""
    o, i = shape[:2]
    pick = lambda n: data.draw(st.none() | st.permutations(range(n)).flatmap(  # noqa: E731
        lambda p: st.integers(1, n).map(lambda k: p[:k])))
    rows, cols = pick(o), pick(i)
    if rows is None and cols is None:
        rows = list(range(o))
    layout = torch.channels_last if weight_channels_last else torch.contiguous_format
    t = torch.randn(shape, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    r = None if rows is None else KeptIndex.of(torch.tensor(rows), o)
    c = None if cols is None else KeptIndex.of(torch.tensor(cols), i)
    n_rows, n_cols = len(rows) if rows else o, len(cols) if cols else i
    args = ([None, None] if r is None else [r.positions, r.kept]) + ([None, None] if c is None else [c.positions, c.kept])
    with poisoned_empty():
        got = kept_weight(t, *args, n_rows, n_cols, channels_last)
    want = t if r is None else t.index_select(0, r.ids)
    want = want if c is None else want.index_select(1, c.ids)
    assert torch.equal(got, want)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=layout)
    grad = torch.randn_like(got)
    g_got, = torch.autograd.grad(got, t, grad)
    g_want, = torch.autograd.grad(want, t, grad)
    assert torch.equal(g_got, g_want)


@contextmanager
def poisoned_empty():
    """Tensor.new_empty gives NaN-filled storage, so an element the scatter misses shows."""
    original = torch.Tensor.new_empty

    def poisoned(self, *args, **kwargs):
        return original(self, *args, **kwargs).fill_(float("nan"))

    torch.Tensor.new_empty = poisoned
    try:
        yield
    finally:
        torch.Tensor.new_empty = original


def gpu_launches(model, shape, tmp_path, backward: bool = False) -> list:
    """The launch lines of the forward (or backward) Inductor generates for a GPU (counted on
    the CPU)."""
    from fxsparse.report.launches import _call_lines, captured_inductor_code, triton_codegen_without_gpu

    model.float().to(memory_format=torch.channels_last)  # as models train on the GPU
    codes = []
    with triton_codegen_without_gpu(), captured_inductor_code(codes):
        compiled = torch.compile(model, backend="fxsparse", fullgraph=True, options={"dump_dir": str(tmp_path)})
        compiled(torch.randn(shape).to(memory_format=torch.channels_last)).sum().backward()
    return [line.strip() for line in _call_lines(codes[1 if backward else 0])]


def test_statistics_and_counters_written_by_one_kernel_each(tmp_path):
    """Every BatchNorm's running statistics are written by one foreach kernel at the end of the
    forward, and every num_batches_tracked by another, not by a copy kernel each."""
    model, shape = masked_net()
    launches = [line for line in gpu_launches(model, shape, tmp_path) if ".run(" in line]
    assert len([line for line in launches if line.startswith("triton_for_fused")]) == 2, launches
    assert not [line for line in launches if "copy_" in line.split(".run(")[0]], launches


def test_vector_gradients_expanded_by_one_kernel(tmp_path):
    """The gamma and beta gradients of every BatchNorm (and the linear bias) are expanded to
    full width by one foreach kernel in the backward (gather.kept_rows)."""
    model, shape = masked_net()
    launches = [line for line in gpu_launches(model, shape, tmp_path, backward=True) if ".run(" in line]
    expansions = [line for line in launches if line.startswith("triton_for_fused")]
    assert len(expansions) == 1, launches
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        assert bn.weight.grad is not None and bn.bias.grad is not None


def test_weight_slice_fuses_with_the_mask_multiply(tmp_path):
    """In the code Inductor generates for a GPU, each compacted conv's weight is written by the
    kernel that multiplies by the prune mask: slicing a weight launches no kernel of its own."""
    model, shape = masked_net()
    lines = gpu_launches(model, shape, tmp_path)
    weights = [m.group(1) for m in (re.search(r"convolution\(\w+, (?:reinterpret_tensor\()?(\w+)", line)
                                    for line in lines) if m]
    writers = {w: [line for line in lines if ".run(" in line and re.search(rf"\b{w}\b", line)][0] for w in weights}
    sliced = [line for line in writers.values() if "index_put" in line]
    assert len(sliced) == 3, writers  # the three masked convs (the fourth: a constant-channel map)
    assert all(re.match(r"triton_\w+_mul\w*\.run", line) for line in sliced), sliced
