"""Training with the fused op: lowering "triton" and "auto" mean in training what they mean in
inference. Each compacted dense conv of the training graph runs as `torch.ops.fxsparse.conv2d`
(a plain conv + bias; its backward is aten's conv backward on the same compacted tensors)
or as an aten conv, and the model trains as eager does: losses, gradients of `weight_orig`
and BatchNorm's gamma and beta, parameters, running statistics and `num_batches_tracked`.

On the CPU the op's Triton kernel runs in Triton's interpreter (tests/conftest.py), inside
`triton_on_cpu()`, on NaN-poisoned outputs; tiny shapes only.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

import models as M
from fxsparse.lowering import choose
from fxsparse.ops import triton_interpreter_on, triton_on_cpu
from models import after_graph, compile_model, fresh_dynamo  # noqa: F401
from test_training import batches_match, compacted_rows, train_both

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

FUSED_OP = "torch.ops.fxsparse.conv2d.default("


def needs_interpreter():
    if not triton_interpreter_on():
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported (tests/conftest.py sets it without a GPU)")


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN, plus a shortcut (a 1x1 conv with BN where the block strides), add, ReLU."""

    def __init__(self, c=6, width=8, stride=1, dilation=1, bias=False):
        super().__init__()
        self.conv1 = nn.Conv2d(c, width, 3, stride, dilation, dilation, bias=bias)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, c, 3, 1, 1, bias=bias)
        self.bn2 = nn.BatchNorm2d(c)
        self.shortcut = nn.Identity() if stride == 1 else nn.Sequential(
            nn.Conv2d(c, c, 1, stride, bias=bias), nn.BatchNorm2d(c))

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + self.shortcut(x))


BLOCKS = {
    "plain": dict(),
    "strided_dilated_bias": dict(stride=2, dilation=2, bias=True),
}
# A conv bias before a train-mode BatchNorm has zero gradient in exact arithmetic; eager's is
# rounding noise scaled by 1/sqrt(eps) on a pruned channel (~5e-5 in fp32): float64 there.
DTYPES = {"plain": torch.float32, "strided_dilated_bias": torch.float64}


def make_block(kind: str, seed: int = 0):
    """The block in train mode, half of conv1's output channels and a third of conv2's input
    channels masked (so conv2 reads a compacted input and pruned channels' constants)."""
    torch.manual_seed(seed)
    model = M.randomize_bn(Block(**BLOCKS[kind]), seed)
    prune.ln_structured(model.conv1, "weight", amount=0.5, n=2, dim=0)
    prune.ln_structured(model.conv2, "weight", amount=0.34, n=2, dim=1)
    if not isinstance(model.shortcut, nn.Identity):
        prune.ln_structured(model.shortcut[0], "weight", amount=0.5, n=2, dim=0)
    return model.train().to(DTYPES[kind]), (2, 6, 6, 6)


def fused_calls(dump_dir) -> int:
    return after_graph(dump_dir).count(FUSED_OP)


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_triton_lowering_trains_as_eager(kind, tmp_path, poisoned_kernel_outputs):
    """lowering="triton": every compacted dense conv is the fused op, its kernel runs (outputs
    poisoned first), and three SGD steps equal eager's in fp32."""
    needs_interpreter()
    model, shape = make_block(kind)
    ref, _ = make_block(kind)
    compiled = compile_model(model, tmp_path, lowering="triton")
    with triton_on_cpu():
        train_both(model, ref, compiled, shape, steps=3, dtype=DTYPES[kind])
    rows = compacted_rows(tmp_path)
    assert rows and all(r["lowering"] == "triton" for r in rows), rows
    assert fused_calls(tmp_path) == len(rows)
    assert len(poisoned_kernel_outputs) >= 3 * len(rows), "the kernel did not run"
    assert all(int(m.num_batches_tracked) == 3 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_triton_lowering_with_dynamic_shapes(tmp_path, poisoned_kernel_outputs):
    """dynamic=True: one training graph for every batch size, its convs the fused op (the op's
    shapes symbolic), outputs and gradients eager's."""
    needs_interpreter()
    model, shape = M.build("resnet")
    ref, _ = M.build("resnet")
    M.MASKS["ln0"](model), M.MASKS["ln0"](ref)
    model.train(), ref.train()
    compiled = compile_model(model, tmp_path, dynamic=True, lowering="triton")
    with triton_on_cpu():
        batches_match(compiled, model, ref, shape, (2, 3))
    rows = compacted_rows(tmp_path)
    assert rows and all(r["lowering"] == "triton" for r in rows) and fused_calls(tmp_path) == len(rows)
    assert poisoned_kernel_outputs, "the kernel did not run"


def test_aten_lowering_has_no_fused_op(tmp_path):
    model, shape = make_block("strided_dilated_bias")
    ref, _ = make_block("strided_dilated_bias")
    compiled = compile_model(model, tmp_path, lowering="aten")
    train_both(model, ref, compiled, shape, steps=2, dtype=torch.float64)
    rows = compacted_rows(tmp_path)
    assert rows and all(r["lowering"] == "aten" for r in rows), rows
    assert fused_calls(tmp_path) == 0


def test_cpu_without_the_interpreter_keeps_aten(tmp_path, monkeypatch):
    """On the CPU the op runs a training conv only where the Triton interpreter is on."""
    import fxsparse.lowering.training as T

    monkeypatch.setattr(T, "triton_interpreter_on", lambda: False)
    model, shape = make_block("plain")
    compiled = compile_model(model, tmp_path, lowering="triton")
    compiled(torch.randn(shape)).sum().backward()
    assert {r["lowering"] for r in compacted_rows(tmp_path)} == {"aten"}
    assert fused_calls(tmp_path) == 0


def test_triton_lowering_under_cpu_autocast(tmp_path, poisoned_kernel_outputs):
    """bf16 autocast on the CPU: the op gets the casts autocast gives an aten conv (written into
    the graph) and trains as eager does within bf16 rounding."""
    needs_interpreter()
    model, shape = make_block("plain")
    ref, _ = make_block("plain")
    compiled = compile_model(model, tmp_path, lowering="triton")
    with triton_on_cpu():
        train_both(model, ref, compiled, shape, steps=2, autocast=torch.bfloat16, rtol=5e-2, atol=5e-2,
                   loss_atol=5e-2)
    rows = compacted_rows(tmp_path)
    assert rows and all(r["lowering"] == "triton" for r in rows)
    after = after_graph(tmp_path)
    assert fused_calls(tmp_path) == len(rows) and "torch.bfloat16" in after, after
    assert poisoned_kernel_outputs, "the kernel did not run"


def test_auto_times_forward_and_backward_per_conv(tmp_path, monkeypatch):
    """lowering="auto" (a fake timer on the CPU): each conv's op and aten conv are each run
    forward and backward, timed under the training key (apart from inference chains' decisions),
    and the faster is emitted; the report says why."""
    needs_interpreter()
    from fxsparse.kernels import select as S

    keys, real = [], S.selector.pick
    monkeypatch.setattr(S.selector, "pick", lambda key, runs, **kw: (keys.append(key), real(key, runs, **kw))[1])
    ran = []

    def timer(name, shape, fn):
        out = fn()
        ran.append(name)
        assert out.shape[:2] == (shape.batch, shape.out_channels)
        return 10.0 if name == "triton" else (5.0 if shape.kernel == (1, 1) else 20.0)

    model, shape = make_block("strided_dilated_bias")
    ref, _ = make_block("strided_dilated_bias")
    with choose.override(timer):
        compiled = compile_model(model, tmp_path, lowering="auto")
        train_both(model, ref, compiled, shape, steps=2, dtype=torch.float64)
    rows = {r["name"]: r for r in compacted_rows(tmp_path)}
    assert rows["shortcut.0"]["lowering"] == "aten", rows
    assert rows["shortcut.0"]["choice"] == "measured: triton 10.0 us vs aten 5.0 us"
    assert rows["conv1"]["lowering"] == "triton" and rows["conv2"]["lowering"] == "triton", rows
    assert rows["conv1"]["choice"] == "measured: triton 10.0 us vs aten 20.0 us"
    assert fused_calls(tmp_path) == 2
    assert keys and all(k[0] == "train-conv" and isinstance(k[1], choose.TrainConvShape) for k in keys), keys
    assert sorted(ran) == sorted(["aten", "triton"] * len(rows))


@pytest.mark.gpu
@pytest.mark.parametrize("lowering", ["triton", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_amp_train_steps_with_the_fused_op_on_cuda(lowering, dtype, tmp_path):
    """CUDA, autocast, channels_last, through Inductor, a ResNet-like model: lowering "triton"
    puts the fused op in the training graph for every compacted dense conv, "auto" the faster
    of it and cuDNN per conv; both train as eager does within AMP rounding, buffers included."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, shape = M.build("resnet")
    ref, _ = M.build("resnet")
    M.MASKS["ln0"](model), M.MASKS["ln0"](ref)
    model, ref = (m.train().cuda().to(memory_format=torch.channels_last) for m in (model, ref))
    compiled = compile_model(model, tmp_path, inductor=True, lowering=lowering)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn((8,) + shape[1:], generator=g).cuda().to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=dtype):
            loss, loss_ref = (compiled(x) - 0.5).float().square().mean(), (ref(x) - 0.5).float().square().mean()
        torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=2e-3)
        opt.zero_grad(), opt_ref.zero_grad()
        loss.backward(), loss_ref.backward()
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            if q.grad is not None:
                scale = max(1.0, float(q.grad.abs().max()))
                torch.testing.assert_close(p.grad, q.grad, rtol=5e-2, atol=5e-2 * scale, msg=lambda m, n=n: f"grad {n}: {m}")
        opt.step(), opt_ref.step()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-3, msg=lambda m, n=n: f"{n}: {m}")
    for (n, b), (_, c) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b.float(), c.float(), rtol=2e-2, atol=2e-3, msg=lambda m, n=n: f"{n}: {m}")
    rows = compacted_rows(tmp_path)
    dense = [r for r in rows if r["groups"] == 1]
    assert dense
    if lowering == "triton":
        assert all(r["lowering"] == "triton" for r in dense), rows
        assert fused_calls(tmp_path) == len(dense)
    else:
        assert all(r["choice"] and r["choice"].startswith(("measured", "from the tuning cache")) for r in dense), rows


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stride,dilation,bias", [(1, 1, False), (2, 2, True)])
def test_fused_op_gradients_are_cudnn_conv_gradients(dtype, stride, dilation, bias):
    """On CUDA the op as training calls it (plain conv + bias, channels_last weight) gives the
    forward of the aten conv within fp16/bf16 rounding and the same input, weight and bias
    gradients (its backward is aten's conv backward)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", dtype=dtype)
    x = torch.randn(4, 24, 14, 14, generator=g, **kw).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(40, 24, 3, 3, generator=g, **kw) / 15).contiguous(memory_format=torch.channels_last)
    b = torch.randn(40, generator=g, **kw) if bias else None
    leaves = [t.requires_grad_(True) for t in (x, w, b) if t is not None]
    args = (list((stride, stride)), [dilation, dilation], [dilation, dilation])
    y = torch.ops.fxsparse.conv2d.default(x, w, b, *args, None, None, 40, None, None, None, "none", False)
    ref = torch.conv2d(x, w, b, *args, 1)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y, ref, **tol)
    gy = torch.randn(y.shape, generator=g, **kw).contiguous(memory_format=torch.channels_last)
    got = torch.autograd.grad(y, leaves, gy)
    want = torch.autograd.grad(ref, leaves, gy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3)
