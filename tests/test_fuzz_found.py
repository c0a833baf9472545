"""Failures the property tests (tests/test_fuzz.py) found, each minimised to an explicit model."""
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from models import compile_model, fresh_dynamo  # noqa: F401

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class UnreadConv(nn.Module):
    """A conv computed for nothing (its result unused) beside the value returned."""

    def __init__(self, groups):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        self.conv(x)
        return self.bn(x)


@pytest.mark.parametrize("groups", [1, 4])
def test_conv_whose_result_nothing_reads(groups, tmp_path):
    """No channel of the conv is live: the rewrite once emitted a conv of 0 output channels
    (groups=0 when depthwise) and the compile crashed."""
    model = UnreadConv(groups).eval()
    compiled = compile_model(model, tmp_path)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


class FlattenHead(nn.Module):
    """conv -> flatten of the whole map -> linear."""

    def __init__(self, cin, cout, hw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)
        self.fc = nn.Linear(cout * hw * hw, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


@pytest.mark.parametrize("cin", [1, 3])
def test_flatten_head_under_dynamic_shapes(cin, tmp_path):
    """With dynamic=True a flatten's feature count is symbolic (C * H * W): the linear after it
    was planned with a layout of None channels and the compile crashed whenever the conv was
    compacted (a 1-channel input, whose channel dim dynamo keeps static)."""
    torch.manual_seed(0)
    model = FlattenHead(cin, 2, 3).eval()
    compiled = compile_model(model, tmp_path, dynamic=True)
    with torch.no_grad():
        for batch in (2, 3):
            x = torch.randn(batch, cin, 3, 3)
            torch.testing.assert_close(compiled(x), model(x))


class PrunedBeforeHead(nn.Module):
    """conv -> conv with every output channel masked -> flatten -> linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, 2)
        self.c2 = nn.Conv2d(6, 7, 1, bias=False)
        self.fc = nn.Linear(7 * 3 * 1, 1)

    def forward(self, x):
        return self.fc(torch.flatten(self.c2(self.c1(x)), 1))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=Exception, reason="training graph, dynamic=True, through Inductor: the "
                   "rewritten graph's relayout of the one channel kept (is_channels_last on a symbolic "
                   "[N, 1, H, 1] tensor) guards inside the backend, and Inductor's lowering fails with "
                   "ValueRangeError: Invalid ranges [5:2] (plain Inductor compiles this model)")
def test_training_graph_under_dynamic_shapes_through_inductor(tmp_path):
    torch.manual_seed(0)
    model = PrunedBeforeHead()
    prune.custom_from_mask(model.c2, "weight", torch.zeros_like(model.c2.weight))
    compiled = compile_model(model, tmp_path, dynamic=True, inductor=True)
    x = torch.randn(3, 1, 7, 4)
    torch.testing.assert_close(compiled(x), model(x))


class TrainBNBeforeMaskedHead(nn.Module):
    """depthwise conv -> BatchNorm -> flatten -> linear whose input columns are partly masked."""

    def __init__(self, groups):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, stride=2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(3, affine=False)
        self.fc = nn.Linear(3 * 2 * 2, 1)

    def forward(self, x):
        return self.fc(torch.flatten(self.bn(self.conv(x)), 1))


@pytest.mark.parametrize("groups", [1, 3])
def test_train_mode_batchnorm_statistics_of_channels_the_head_ignores(groups, tmp_path):
    def build():
        torch.manual_seed(0)
        m = TrainBNBeforeMaskedHead(groups).train()
        mask = torch.ones_like(m.fc.weight)
        mask[:, :4] = 0  # the first channel's 2x2 pixels: read by nobody
        prune.custom_from_mask(m.fc, "weight", mask)
        return m

    model, twin = build(), build()
    compiled = compile_model(model, tmp_path)
    x = torch.randn(2, 3, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), twin(x))
    torch.testing.assert_close(model.bn.running_mean, twin.bn.running_mean)
    torch.testing.assert_close(model.bn.running_var, twin.bn.running_var)
