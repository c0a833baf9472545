"""A small model zoo and mask helpers for the backend tests (no torchvision).

Every model is tiny (channels <= 32, spatial <= 12) so the whole suite runs on
two CPU cores. `randomize_bn` gives BatchNorm non-trivial statistics, so a
pruned channel carries a non-zero constant through BN (the trap a backend that
treats pruned channels as zero falls into).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune

from fxsparse.demo import BasicBlock  # noqa: F401  (torchvision's BasicBlock, shared with the demo)


# -- models ---------------------------------------------------------------------------------

class ConvBNReLU(nn.Sequential):
    def __init__(self, cin, cout, k=3, stride=1, groups=1, bias=False, act=nn.ReLU):
        super().__init__(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias),
                         nn.BatchNorm2d(cout), act(inplace=True))


def chain(c=(3, 8, 16, 16)) -> nn.Sequential:
    """conv-BN-ReLU x3, then a 1x1 conv with bias (the output layer)."""
    layers = [ConvBNReLU(a, b) for a, b in zip(c[:-1], c[1:])]
    return nn.Sequential(*layers, nn.Conv2d(c[-1], 4, 1, bias=True))


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (1x1 -> 3x3 -> 1x1, expansion 4)."""

    def __init__(self, cin, width, stride=1, downsample=True):
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if downsample:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """stem + 3 basic blocks (one with downsample) + adaptive pool + linear head."""

    def __init__(self, width=8, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNet-v2 block: 1x1 expand, 3x3 depthwise, 1x1 project (ReLU6), residual."""

    def __init__(self, c=8, expand=3):
        super().__init__()
        h = c * expand
        self.conv = nn.Sequential(
            ConvBNReLU(c, h, 1, act=nn.ReLU6),
            ConvBNReLU(h, h, 3, groups=h, act=nn.ReLU6),
            nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.conv(x)


class DenseLike(nn.Module):
    """DenseNet-like: two convs whose outputs are concatenated with the input."""

    def __init__(self, c=6, growth=6):
        super().__init__()
        self.a = ConvBNReLU(c, growth)
        self.b = ConvBNReLU(c + growth, growth)
        self.bn = nn.BatchNorm2d(c + 2 * growth)
        self.head = nn.Conv2d(c + 2 * growth, 4, 1)

    def forward(self, x):
        x = torch.cat([x, self.a(x)], 1)
        x = torch.cat([x, self.b(x)], 1)
        return self.head(F.relu(self.bn(x)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = ConvBNReLU(4, 16)
        self.g = nn.Conv2d(16, 16, 3, 1, 1, groups=4, bias=True)
        self.c2 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        return self.c2(F.relu(self.g(self.c1(x))))


class ConvBias(nn.Module):
    """Convs with bias and no BN: a pruned channel outputs its bias."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, 1, 1, bias=True)
        self.c2 = nn.Conv2d(8, 8, 3, 1, 1, bias=True)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


class PoolHead(nn.Module):
    """conv-BN-ReLU -> global pool -> linear: pruned constants reach the head's bias."""

    def __init__(self):
        super().__init__()
        self.f = ConvBNReLU(3, 12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.f(x), 1), 1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g) + 0.5)
    return model


def build(name: str, seed: int = 0):
    """(model in eval mode with random BN, input shape) for a zoo entry."""
    torch.manual_seed(seed)
    model, shape = ZOO[name]()
    return randomize_bn(model, seed).eval(), shape


ZOO = {
    "chain": lambda: (chain(), (2, 3, 8, 8)),
    "basic": lambda: (BasicBlock(8, 16, stride=2), (2, 8, 8, 8)),
    "bottleneck": lambda: (Bottleneck(16, 4), (2, 16, 6, 6)),
    "resnet": lambda: (TinyResNet(), (2, 3, 8, 8)),
    "mobilenet": lambda: (InvertedResidual(), (2, 8, 6, 6)),
    "dense": lambda: (DenseLike(), (2, 6, 6, 6)),
    "grouped": lambda: (Grouped(), (2, 4, 6, 6)),
    "bias": lambda: (ConvBias(), (2, 3, 6, 6)),
    "poolhead": lambda: (PoolHead(), (2, 3, 6, 6)),
}


# -- masks ----------------------------------------------------------------------------------

def convs(model: nn.Module, groups_ok: bool = False) -> list:
    """(name, conv) of every dense Conv2d (grouped ones too with groups_ok)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and (groups_ok or m.groups == 1)]


def ln_structured(model, amount=0.5, dim=0):
    for _, m in convs(model):
        if m.weight.shape[dim] > 1:
            prune.ln_structured(m, "weight", amount=amount, n=2, dim=dim)
    return model


def random_structured(model, amount=0.4, dim=0, seed=0):
    torch.manual_seed(seed)
    for _, m in convs(model):
        prune.random_structured(m, "weight", amount=amount, dim=dim)
    return model


def channel_mask(weight: torch.Tensor, out=None, inp=None) -> torch.Tensor:
    """A 0/1 mask of weight's shape zeroing output channels `out` and input channels `inp`."""
    mask = torch.ones_like(weight)
    if out is not None:
        mask[list(out)] = 0
    if inp is not None:
        mask[:, list(inp)] = 0
    return mask


def custom_out(model, every=3):
    """custom_from_mask removing every `every`-th output channel (offset by the layer index)."""
    for i, (_, m) in enumerate(convs(model)):
        out = range(i % every, m.out_channels, every)
        prune.custom_from_mask(m, "weight", channel_mask(m.weight, out=out))
    return model


def custom_in(model, every=3):
    for i, (_, m) in enumerate(convs(model)):
        if m.in_channels >= every:
            inp = range(i % every, m.in_channels, every)
            prune.custom_from_mask(m, "weight", channel_mask(m.weight, inp=inp))
    return model


def filter_groups(model, group=4):
    """custom_from_mask removing whole groups of `group` consecutive output channels."""
    for i, (_, m) in enumerate(convs(model)):
        if m.out_channels > group:
            start = (i * group) % (m.out_channels - group + 1)
            prune.custom_from_mask(m, "weight", channel_mask(m.weight, out=range(start, start + group)))
    return model


def global_unstructured(model, amount=0.5):
    params = [(m, "weight") for _, m in convs(model)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    return model


def stacked(model):
    """Two prunings on one weight: output channels (L2), then input channels (random)."""
    torch.manual_seed(1)
    for _, m in convs(model):
        prune.ln_structured(m, "weight", amount=0.25, n=2, dim=0)
        if m.in_channels > 3:
            prune.random_structured(m, "weight", amount=0.25, dim=1)
    return model


class MaskParam(nn.Module):
    """A parametrization multiplying the weight by a registered mask buffer."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        return w * self.mask


def parametrized(model, every=3):
    for i, (_, m) in enumerate(convs(model)):
        out = range(i % every, m.out_channels, every)
        parametrize.register_parametrization(m, "weight", MaskParam(channel_mask(m.weight, out=out)))
    return model


def zero_channels(model, every=3):
    """Exactly-zero output channels written into the weights (no mask)."""
    with torch.no_grad():
        for i, (_, m) in enumerate(convs(model)):
            m.weight[i % every::every] = 0
    return model


def _bn_after(model, conv_name: str):
    mods = dict(model.named_modules())
    for cand in (conv_name.replace("conv", "bn"), conv_name[:-1] + "1" if conv_name.endswith(".0") else None):
        if cand and cand != conv_name and isinstance(mods.get(cand), nn.BatchNorm2d):
            return mods[cand]
    return None


def group_prune(model, groups, zero_bn=False):
    """Torch-Pruning-style consistent masks.

    `groups` is a list of (channels, [out-convs], [bns], [in-convs]): the coupled
    output channels of every out-conv and its BN, and the matching input channels
    of every in-conv, are pruned together with one shared channel set. With
    zero_bn the BN's affine weight and bias are zeroed too; by default they stay
    random, so pruned channels carry non-zero constants.
    """
    mods = dict(model.named_modules())
    for chans, outs, bns, ins in groups:
        chans = list(chans)
        for name in outs:
            m = mods[name]
            prune.custom_from_mask(m, "weight", channel_mask(m.weight, out=chans))
            if m.bias is not None:
                prune.custom_from_mask(m, "bias", _vec_mask(m.bias, chans))
        for name in bns if zero_bn else ():
            bn = mods[name]
            with torch.no_grad():
                bn.weight[chans] = 0
                bn.bias[chans] = 0
        for name in ins:
            m = mods[name]
            if isinstance(m, nn.Linear):
                prune.custom_from_mask(m, "weight", channel_mask(m.weight.t(), out=chans).t().contiguous())
            else:
                prune.custom_from_mask(m, "weight", channel_mask(m.weight, inp=chans))
    return model


def _vec_mask(v: torch.Tensor, chans) -> torch.Tensor:
    m = torch.ones_like(v)
    m[list(chans)] = 0
    return m


def tiny_resnet_groups(model: TinyResNet):
    """The coupled groups of TinyResNet (widths 8 and 16): stem+layer1 residual group,
    layer2 residual group, and each block's internal conv1->conv2 group."""
    return [
        ([1, 4], ["conv1", "layer1.0.conv2"], ["bn1", "layer1.0.bn2"],
         ["layer1.0.conv1", "layer2.0.conv1", "layer2.0.downsample.0"]),
        ([0, 5], ["layer1.0.conv1"], ["layer1.0.bn1"], ["layer1.0.conv2"]),
        ([2, 3, 9], ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"],
         ["layer2.0.bn2", "layer2.0.downsample.1", "layer2.1.bn2"], ["layer2.1.conv1", "fc"]),
        ([1, 7, 12], ["layer2.0.conv1"], ["layer2.0.bn1"], ["layer2.0.conv2"]),
        ([0, 6, 15], ["layer2.1.conv1"], ["layer2.1.bn1"], ["layer2.1.conv2"]),
    ]


def bottleneck_groups():
    """Bottleneck(16, 4) groups: conv1->conv2, conv2->conv3 (the residual group is the output)."""
    return [
        ([1], ["conv1"], ["bn1"], ["conv2"]),
        ([0, 3], ["conv2"], ["bn2"], ["conv3"]),
    ]


MASKS = {
    "ln0": lambda m: ln_structured(m, dim=0),
    "ln1": lambda m: ln_structured(m, amount=0.34, dim=1),
    "random": random_structured,
    "custom_out": custom_out,
    "custom_in": custom_in,
    "filter_groups": filter_groups,
    "stacked": stacked,
    "parametrize": parametrized,
    "zeros": zero_channels,
}


# -- compiling and comparing ------------------------------------------------------------------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=False)
def fresh_dynamo():
    """Dynamo caches per code object: without a reset, the 9th model of one class would
    silently fall back to eager (cache_size_limit) and every comparison would pass."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_model(model, dump_dir, fullgraph=True, dynamic=None, **options):
    """torch.compile with fxsparse; Inductor off unless asked (fast on 2 cores: the FX
    graph fxsparse emits is what is tested, Inductor only re-schedules it)."""
    options.setdefault("inductor", False)
    options["dump_dir"] = str(dump_dir)
    return torch.compile(model, backend="fxsparse", options=options, fullgraph=fullgraph, dynamic=dynamic)


def report(dump_dir) -> dict:
    return json.loads((Path(dump_dir) / "report.json").read_text())


def conv_rows(dump_dir) -> dict:
    """{conv name: report row} over every graph of the report (latest graph wins)."""
    return {c["name"]: c for g in report(dump_dir)["graphs"] for c in g["convs"]}


def assert_matches(compiled, model, shape, seeds=(11, 12), rtol=1e-5, atol=1e-5, **kw):
    """compiled == eager on fresh random inputs (never the compile input)."""
    for s in seeds:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(s), **kw)
        got, want = compiled(x), model(x)
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale)


def after_graph(dump_dir, which=-1) -> str:
    """The text of a graph_N.after.py dump (N is a process-wide counter: the latest by default)."""
    files = sorted(Path(dump_dir).glob("graph_*.after.py"), key=lambda p: int(p.name.split("_")[1].split(".")[0]))
    return files[which].read_text()
