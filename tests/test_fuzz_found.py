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
def test_training_graph_under_dynamic_shapes_through_inductor(tmp_path):
    """The input is 4 pixels wide: 1 after the stride-2 3x3 conv, which dynamo's own trace of the
    flatten guards on. The relayout of the one channel kept broadcast its per-channel fill
    against that width, Inductor took the fill's literal 1 for it, and the flatten's
    N*7*H*1 == N*7*H*W then failed to lower (ValueRangeError: Invalid ranges [5:2]). Compiled
    twice: the second compile reads Inductor's FX graph cache, whose backward entry once named
    the input `x` in its guards (the sizes dynamo passes were dropped as unread inputs)."""
    def build():
        torch.manual_seed(0)
        m = PrunedBeforeHead()
        prune.custom_from_mask(m.c2, "weight", torch.zeros_like(m.c2.weight))
        return m

    model, twin, plain = build(), build(), build()
    for _ in range(2):
        torch._dynamo.reset()
        compiled = compile_model(model, tmp_path, dynamic=True, inductor=True)
        inductor = torch.compile(plain, dynamic=True)  # plain Inductor compiles the same model
        for batch in (3, 2):
            x = torch.randn(batch, 1, 7, 4)
            for m in (model, twin, plain):
                m.zero_grad()
            got, want, ref = compiled(x), twin(x), inductor(x)
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(ref, want)
            got.sum().backward()
            want.sum().backward()
            for name, p in twin.named_parameters():
                torch.testing.assert_close(dict(model.named_parameters())[name].grad, p.grad, msg=name)


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


class FlattenHeadAfterMaskedConv(nn.Module):
    """a conv with a masked output channel, flattened (3x3 pixels per channel) into a linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.fc = nn.Linear(2 * 3 * 3, 1)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


@pytest.mark.parametrize("train", [False, True])
def test_training_graph_flatten_keeps_every_pixel_of_a_kept_channel(train, tmp_path):
    def build():
        torch.manual_seed(0)
        m = FlattenHeadAfterMaskedConv().train(train)
        mask = torch.ones_like(m.conv.weight)
        mask[0] = 0
        prune.custom_from_mask(m.conv, "weight", mask)
        return m

    model, twin = build(), build()
    compiled = compile_model(model, tmp_path)
    x = torch.randn(1, 1, 3, 3)
    out, expected = compiled(x), twin(x)  # grad enabled: the training lowering
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(model.fc.weight.grad, twin.fc.weight.grad)
    torch.testing.assert_close(model.conv.weight_orig.grad, twin.conv.weight_orig.grad)
