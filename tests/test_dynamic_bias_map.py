"""Under dynamic shapes, the constants a pruned channel carries into a zero-padding conv fold into
a bias map the graph computes from each call's spatial size, as the static case folds them into
a constant map: the next conv reads only the kept channels, and the report shows the static MACs."""
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from models import (after_graph, assert_matches, channel_mask, compile_model, fresh_dynamo,  # noqa: F401
                    randomize_bn, report)

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

KEPT_1 = 8  # of conv c1's 16 output channels


class PaddedResidual(nn.Module):
    """c1 (stride 2) -> BN -> ReLU -> c2 -> BN -> ReLU -> c3 -> BN, + the c2 branch, ReLU; every
    conv zero-pads. c1's pruned channels hold act(BN(bias)) everywhere, which c2 reads through
    its padded 3x3 filters: exact only with a per-position map at the borders."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False)
        self.bn3 = nn.BatchNorm2d(16)

    def forward(self, x):
        y = torch.relu(self.bn1(self.c1(x)))
        y = torch.relu(self.bn2(self.c2(y)))
        return torch.relu(self.bn3(self.c3(y)) + y)


def build(groups: int = 1) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(PaddedResidual(groups)).eval()
    pruned = [1, 2, 4, 7, 9, 10, 12, 15]  # half of each group of c2 reads
    prune.custom_from_mask(model.c1, "weight", channel_mask(model.c1.weight, out=pruned))
    prune.custom_from_mask(model.c2, "weight", channel_mask(model.c2.weight, out=[0, 5, 11]))
    return model


def c2_rows(dump_dir) -> list:
    return [r for g in report(dump_dir)["graphs"] for r in g["convs"] if r["name"] == "c2"]


def static_macs(model, shape, tmp_path) -> dict:
    """{conv: macs_after} of a static compile at `shape` (the reference the dynamic report meets)."""
    static_dir = tmp_path / "static"
    c = compile_model(model, static_dir, dynamic=False)
    with torch.no_grad():
        assert_matches(c, model, shape, seeds=(1,))
    torch._dynamo.reset()
    return {r["name"]: r["macs_after"] for g in report(static_dir)["graphs"] for r in g["convs"]}


def assert_folded(dump_dir, static: dict, groups: int) -> None:
    """Every graph's c2 reads c1's kept channels only (a grouped conv's row counts its output
    channels: its MACs say it); the first graph's MACs (at the example input's size) are the
    static compile's; each graph with a symbolic size computes its bias maps in the graph."""
    rows = c2_rows(dump_dir)
    assert rows
    if groups == 1:
        assert all(r["kept_in_channels"] == KEPT_1 for r in rows), rows
    first = report(dump_dir)["graphs"][0]["convs"]
    assert {r["name"]: r["macs_after"] for r in first} == static
    for i, g in enumerate(report(dump_dir)["graphs"]):
        symbolic = any("symbolic" in note for r in g["convs"] for note in r["notes"])
        assert ("constant_input_map(" in after_graph(dump_dir, i)) == symbolic


@pytest.mark.parametrize("lowering,groups", [("aten", 1), ("triton", 1), ("aten", 2)])
def test_dynamic_true_one_graph(lowering, groups, tmp_path):
    model = build(groups)
    static = static_macs(model, (2, 3, 9, 9), tmp_path)
    c = compile_model(model, tmp_path, lowering=lowering, dynamic=True)
    with torch.no_grad(), torch.fx.experimental._config.patch(use_duck_shape=False):
        assert_matches(c, model, (2, 3, 9, 9), seeds=(2,))  # compiled here
        for n, h, w in ((3, 9, 9), (4, 9, 9), (3, 12, 7), (4, 6, 11)):
            assert_matches(c, model, (n, 3, h, w), seeds=(n * h * w,))
        assert len(report(tmp_path)["graphs"]) == 1, "one graph serves every batch and spatial size"
        assert_matches(c, model, (1, 3, 10, 8), seeds=(7,))  # (dynamo specialises size 1: a graph of its own)
    assert_folded(tmp_path, static, groups)
    graphs = report(tmp_path)["graphs"]
    assert all(any("symbolic" in note for note in r["notes"]) for g in graphs for r in g["convs"])


def test_mark_dynamic(tmp_path):
    model = build()
    static = static_macs(model, (3, 3, 9, 9), tmp_path)
    c = compile_model(model, tmp_path)
    x = torch.randn(3, 3, 9, 9)
    for d in (0, 2, 3):
        torch._dynamo.mark_dynamic(x, d)
    with torch.no_grad():
        torch.testing.assert_close(c(x), model(x))
        for n, h, w in ((4, 9, 9), (3, 13, 10), (1, 9, 9)):
            assert_matches(c, model, (n, 3, h, w), seeds=(n + h + w,))
    assert_folded(tmp_path, static, 1)


def test_automatic_dynamic_after_a_spatial_change(tmp_path):
    """No flag: the second spatial size recompiles with symbolic sizes, still without extra channels."""
    model = build()
    static = static_macs(model, (3, 3, 9, 9), tmp_path)
    c = compile_model(model, tmp_path)
    with torch.no_grad():
        for n, h, w in ((3, 9, 9), (3, 11, 8), (4, 7, 12), (1, 10, 10)):
            assert_matches(c, model, (n, 3, h, w), seeds=(h * w,))
    graphs = report(tmp_path)["graphs"]
    assert len(graphs) >= 2
    assert any("symbolic" in note for r in graphs[-1]["convs"] for note in r["notes"])
    assert_folded(tmp_path, static, 1)


@pytest.mark.slow
def test_through_inductor(tmp_path):
    model = build()
    c = compile_model(model, tmp_path, dynamic=True, inductor=True)
    with torch.no_grad(), torch.fx.experimental._config.patch(use_duck_shape=False):
        for n, h, w in ((2, 9, 9), (3, 12, 7), (4, 6, 11)):
            assert_matches(c, model, (n, 3, h, w), seeds=(n * h * w,))
    assert all(r["kept_in_channels"] == KEPT_1 for r in c2_rows(tmp_path))


def test_training_graph(tmp_path):
    """Training, dynamic=True: the map is computed in the graph from the constants and weights of
    each step (so they get eager's gradients) and from each call's size."""
    model, twin = build().train(), build().train()
    c = compile_model(model, tmp_path, dynamic=True)
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        for n, h, w in ((2, 9, 9), (3, 12, 7), (4, 6, 11)):
            x = torch.randn(n, 3, h, w)
            got, want = c(x), twin(x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            got.square().sum().backward(), want.square().sum().backward()
    # (c1's bias feeds a train-mode BatchNorm: its true gradient is 0, eager's is rounding noise
    # of the model's largest gradients, ~1e3 here)
    scale = max(float(q.grad.abs().max()) for q in twin.parameters())
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6 * scale, msg=name)
    for (name, b), (_, q) in zip(model.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(b, q, rtol=1e-4, atol=1e-5, msg=name)
    assert all(r["kept_in_channels"] == KEPT_1 for r in c2_rows(tmp_path))
    assert "constant_input_map(" in after_graph(tmp_path, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("lowering", ["triton", "aten", "auto"])
def test_half_channels_last_on_cuda(lowering, tmp_path):
    """The fused op reads the per-call map (fp32, as cuDNN lays it out); aten adds it in fp16."""
    model = build().cuda().half().to(memory_format=torch.channels_last)
    c = compile_model(model, tmp_path, lowering=lowering, dynamic=True, inductor=True)
    # (no duck shapes: the first call's H == W would otherwise become a guard, and 20x12 a recompile)
    with torch.no_grad(), torch.fx.experimental._config.patch(use_duck_shape=False):
        for n, h, w in ((2, 16, 16), (3, 20, 12), (4, 9, 13)):
            x = torch.randn(n, 3, h, w, device="cuda", dtype=torch.half).to(memory_format=torch.channels_last)
            got, want = c(x).float(), model(x).float()
            assert ((got - want).norm() / want.norm()).item() < 2e-3, (n, h, w)
    assert len(report(tmp_path)["graphs"]) == 1
    assert all(r["kept_in_channels"] == KEPT_1 for r in c2_rows(tmp_path))
