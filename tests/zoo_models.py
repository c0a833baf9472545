"""Small replicas of the conv net families people prune, built without torchvision.

Each follows the torchvision (or Ultralytics, for the YOLO-style detector) module structure
and forward code at small widths, so dynamo sees the same ops: residual adds, grouped and
depthwise convs, squeeze-excite gates, concat chains, branch concats, channel split and
shuffle, channels-last LayerNorm + Linear MLPs with layer scale, split/chunk + concat
blocks, repeated max-pool, upsample + concat necks, several outputs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _cbr(cin, cout, k=3, s=1, groups=1, act=nn.ReLU, eps=1e-5):
    layers = [nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=eps)]
    if act is not None:
        layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish) else act())
    return nn.Sequential(*layers)


# -- ResNet / ResNeXt / Wide-ResNet --------------------------------------------------------------

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, groups=1, base_width=64, downsample=None):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet with Bottleneck blocks (ResNeXt: groups > 1; Wide: base_width x2)."""

    def __init__(self, layers=(1, 1, 1), width=8, groups=1, base_width=64, classes=10):
        super().__init__()
        self.inplanes = width
        self.groups, self.base_width = groups, base_width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = [self._make_layer(width * 2 ** i, n, 1 if i == 0 else 2) for i, n in enumerate(layers)]
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, classes)

    def _make_layer(self, planes, blocks, stride):
        down = None
        if stride != 1 or self.inplanes != planes * 4:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
        layers = [Bottleneck(self.inplanes, planes, stride, self.groups, self.base_width, down)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes, 1, self.groups, self.base_width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# -- squeeze-excite ---------------------------------------------------------------------------

class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: pooled features -> fc -> act -> fc -> gate."""

    def __init__(self, cin, squeeze, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(cin, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, cin, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


# -- MobileNet-v2 / v3 -----------------------------------------------------------------------

class InvertedResidual(nn.Module):
    """MobileNet-v2's block (se=None, act ReLU6) and v3's (hardswish, squeeze-excite with
    hardsigmoid)."""

    def __init__(self, cin, cout, stride, expand, act=nn.ReLU6, se=False, k=3):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers.append(_cbr(cin, hidden, 1, act=act))
        layers.append(_cbr(hidden, hidden, k, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcitation(hidden, max(8, hidden // 4), scale_activation=nn.Hardsigmoid))
        layers.append(_cbr(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_res else out


class MobileNetV2(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        cfg = [(1, 8, 1), (4, 12, 2), (4, 12, 1), (4, 16, 2), (4, 16, 1)]
        layers, c = [_cbr(3, 8, 3, 2, act=nn.ReLU6)], 8
        for t, cout, s in cfg:
            layers.append(InvertedResidual(c, cout, s, t))
            c = cout
        layers.append(_cbr(c, 32, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class MobileNetV3(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        cfg = [(1, 8, 2, nn.ReLU, True, 3), (3, 12, 2, nn.ReLU, False, 3), (3, 12, 1, nn.ReLU, False, 3),
               (4, 16, 2, nn.Hardswish, True, 5), (4, 16, 1, nn.Hardswish, True, 5)]
        layers, c = [_cbr(3, 8, 3, 2, act=nn.Hardswish)], 8
        for t, cout, s, act, se, k in cfg:
            layers.append(InvertedResidual(c, cout, s, t, act, se, k))
            c = cout
        layers.append(_cbr(c, 48, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(48, 64), nn.Hardswish(inplace=True), nn.Dropout(0.2),
                                        nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# -- EfficientNet ------------------------------------------------------------------------------

class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth (row mode): identity in eval."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty([x.shape[0], 1, 1, 1], dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class MBConv(nn.Module):
    def __init__(self, cin, cout, expand, k, stride, sd_prob):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers.append(_cbr(cin, hidden, 1, act=nn.SiLU))
        layers.append(_cbr(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU))
        layers.append(SqueezeExcitation(hidden, max(1, cin // 4), activation=nn.SiLU))
        layers.append(_cbr(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x):
        result = self.block(x)
        if self.use_res:
            result = self.stochastic_depth(result)
            result += x
        return result


class EfficientNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        cfg = [(1, 8, 8, 3, 1), (6, 8, 12, 3, 2), (6, 12, 12, 3, 1), (6, 12, 16, 5, 2)]
        layers = [_cbr(3, 8, 3, 2, act=nn.SiLU)]
        for i, (t, cin, cout, k, s) in enumerate(cfg):
            layers.append(MBConv(cin, cout, t, k, s, 0.2 * i / len(cfg)))
        layers.append(_cbr(16, 64, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# -- RegNet ----------------------------------------------------------------------------------------

class ResBottleneckBlock(nn.Module):
    """RegNet's X/Y block: 1x1, grouped 3x3, squeeze-excite (Y), 1x1, residual."""

    def __init__(self, cin, cout, stride, group_width=4, se_ratio=0.25):
        super().__init__()
        groups = cout // group_width
        self.proj = None
        if cin != cout or stride != 1:
            self.proj = _cbr(cin, cout, 1, stride, act=None)
        layers = [_cbr(cin, cout, 1), _cbr(cout, cout, 3, stride, groups=groups)]
        if se_ratio:
            layers.append(SqueezeExcitation(cout, max(1, int(round(se_ratio * cin)))))
        layers.append(_cbr(cout, cout, 1, act=None))
        self.f = nn.Sequential(*layers)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class RegNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = _cbr(3, 8, 3, 2)
        self.trunk_output = nn.Sequential(ResBottleneckBlock(8, 16, 2), ResBottleneckBlock(16, 16, 1),
                                          ResBottleneckBlock(16, 24, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = self.trunk_output(self.stem(x))
        return self.fc(self.avgpool(x).flatten(start_dim=1))


# -- DenseNet --------------------------------------------------------------------------------------

class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size=2):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, inputs):
        concated = torch.cat(inputs, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(concated)))
        return self.conv2(self.relu2(self.norm2(bottleneck)))


class DenseBlock(nn.ModuleDict):
    def __init__(self, layers, cin, growth):
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(cin + i * growth, growth))

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, classes=10, growth=4):
        super().__init__()
        f = nn.Sequential()
        f.add_module("conv0", nn.Conv2d(3, 8, 7, 2, 3, bias=False))
        f.add_module("norm0", nn.BatchNorm2d(8))
        f.add_module("relu0", nn.ReLU(inplace=True))
        f.add_module("pool0", nn.MaxPool2d(3, 2, 1))
        f.add_module("denseblock1", DenseBlock(3, 8, growth))
        c = 8 + 3 * growth
        f.add_module("transition1", nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                                                  nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2, 2)))
        f.add_module("denseblock2", DenseBlock(2, c // 2, growth))
        c = c // 2 + 2 * growth
        f.add_module("norm5", nn.BatchNorm2d(c))
        self.features = f
        self.classifier = nn.Linear(c, classes)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


# -- VGG-BN ---------------------------------------------------------------------------------------

class VGG(nn.Module):
    def __init__(self, classes=10, cfg=(8, "M", 16, "M", 16, 16, "M")):
        super().__init__()
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(c * 4, 32), nn.ReLU(True), nn.Dropout(0.5),
                                        nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(32, classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# -- GoogLeNet / Inception ---------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    def __init__(self, cin, ch1, ch3red, ch3, ch5red, ch5, pool_proj):
        super().__init__()
        self.branch1 = BasicConv2d(cin, ch1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, ch3red, kernel_size=1), BasicConv2d(ch3red, ch3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, ch5red, kernel_size=1), BasicConv2d(ch5red, ch5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), BasicConv2d(cin, pool_proj, kernel_size=1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = BasicConv2d(3, 8, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = BasicConv2d(8, 8, kernel_size=1)
        self.conv3 = BasicConv2d(8, 16, kernel_size=3, padding=1)
        self.inception3a = Inception(16, 8, 8, 12, 4, 4, 4)
        self.inception3b = Inception(28, 12, 8, 12, 4, 8, 8)
        self.maxpool3 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.inception4a = Inception(40, 12, 8, 12, 4, 8, 8)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(40, classes)

    def forward(self, x):
        x = self.conv3(self.conv2(self.maxpool1(self.conv1(x))))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


# -- ShuffleNet-v2 -------------------------------------------------------------------------------------

def channel_shuffle(x, groups: int):
    batchsize, num_channels, height, width = x.size()
    x = x.view(batchsize, groups, num_channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        bf = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, bf, 1, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(cin if stride > 1 else bf, bf, 1, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True),
            nn.Conv2d(bf, bf, 3, stride, 1, groups=bf, bias=False), nn.BatchNorm2d(bf),
            nn.Conv2d(bf, bf, 1, bias=False), nn.BatchNorm2d(bf), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = _cbr(3, 8, 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.stage2 = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1))
        self.stage3 = nn.Sequential(ShuffleUnit(16, 32, 2), ShuffleUnit(32, 32, 1))
        self.conv5 = _cbr(32, 48, 1)
        self.fc = nn.Linear(48, classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.maxpool(self.conv1(x))))
        x = self.conv5(x).mean([2, 3])
        return self.fc(x)


# -- ConvNeXt ------------------------------------------------------------------------------------------

class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim, layer_scale=1e-6 * 1e5, sd_prob=0.1):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=True), Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x):
        result = self.layer_scale * self.block(x)
        result = self.stochastic_depth(result)
        result += x
        return result


class ConvNeXt(nn.Module):
    def __init__(self, classes=10, dims=(8, 16)):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))]
        for i, d in enumerate(dims):
            layers.append(nn.Sequential(CNBlock(d), CNBlock(d)))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(d, eps=1e-6), nn.Conv2d(d, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


# -- YOLO v5 / v8 style ----------------------------------------------------------------------------------

class Conv(nn.Module):
    """Ultralytics' Conv: conv, BN (eps 1e-3), SiLU."""

    def __init__(self, cin, cout, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class YoloBottleneck(nn.Module):
    def __init__(self, cin, cout, shortcut=True, e=1.0):
        super().__init__()
        hidden = int(cout * e)
        self.cv1 = Conv(cin, hidden, 3)
        self.cv2 = Conv(hidden, cout, 3)
        self.add = shortcut and cin == cout

    def forward(self, x):
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8: split in two (chunk), n bottlenecks on the second half, concat of all."""

    def __init__(self, cin, cout, n=1, shortcut=False):
        super().__init__()
        self.c = cout // 2
        self.cv1 = Conv(cin, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(YoloBottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C3(nn.Module):
    """YOLOv5: two 1x1 branches, bottlenecks on one, concat, 1x1."""

    def __init__(self, cin, cout, n=1, shortcut=True):
        super().__init__()
        c_ = cout // 2
        self.cv1 = Conv(cin, c_, 1)
        self.cv2 = Conv(cin, c_, 1)
        self.cv3 = Conv(2 * c_, cout, 1)
        self.m = nn.Sequential(*(YoloBottleneck(c_, c_, shortcut) for _ in range(n)))

    def forward(self, x):
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    def __init__(self, cin, cout, k=5):
        super().__init__()
        c_ = cin // 2
        self.cv1 = Conv(cin, c_, 1)
        self.cv2 = Conv(c_ * 4, cout, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class YoloDetector(nn.Module):
    """Backbone (C2f / C3 stages, SPPF), FPN/PAN neck (upsample + concat, downsample + concat),
    one 1x1 detection conv per scale (several outputs)."""

    def __init__(self, w=8, outputs=6):
        super().__init__()
        self.stem = Conv(3, w, 3, 2)
        self.down1 = Conv(w, 2 * w, 3, 2)
        self.stage1 = C2f(2 * w, 2 * w, 1, shortcut=True)
        self.down2 = Conv(2 * w, 4 * w, 3, 2)
        self.stage2 = C3(4 * w, 4 * w, 1)
        self.down3 = Conv(4 * w, 4 * w, 3, 2)
        self.stage3 = C2f(4 * w, 4 * w, 1, shortcut=True)
        self.sppf = SPPF(4 * w, 4 * w)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down = C2f(8 * w, 4 * w, 1)
        self.top_down2 = C2f(6 * w, 2 * w, 1)
        self.down_pan = Conv(2 * w, 2 * w, 3, 2)
        self.bottom_up = C2f(6 * w, 4 * w, 1)
        self.down_pan2 = Conv(4 * w, 4 * w, 3, 2)
        self.bottom_up2 = C2f(8 * w, 4 * w, 1)
        self.detect = nn.ModuleList(nn.Conv2d(c, outputs, 1) for c in (2 * w, 4 * w, 4 * w))

    def forward(self, x):
        p3 = self.stage1(self.down1(self.stem(x)))
        p4 = self.stage2(self.down2(p3))
        p5 = self.sppf(self.stage3(self.down3(p4)))
        t4 = self.top_down(torch.cat([self.up(p5), p4], 1))
        t3 = self.top_down2(torch.cat([self.up(t4), p3], 1))
        b4 = self.bottom_up(torch.cat([self.down_pan(t3), t4], 1))
        b5 = self.bottom_up2(torch.cat([self.down_pan2(b4), p5], 1))
        return [d(f) for d, f in zip(self.detect, (t3, b4, b5))]


FAMILIES = {
    "resnet": (lambda: ResNet((1, 2, 1)), 32),
    "resnext": (lambda: ResNet((1, 1), width=8, groups=4, base_width=16), 32),
    "wide_resnet": (lambda: ResNet((1, 1), width=8, base_width=128), 32),
    "mobilenet_v2": (MobileNetV2, 32),
    "mobilenet_v3": (MobileNetV3, 32),
    "efficientnet": (EfficientNet, 32),
    "regnet": (RegNet, 32),
    "densenet": (DenseNet, 32),
    "vgg_bn": (VGG, 16),
    "googlenet": (GoogLeNet, 32),
    "shufflenet_v2": (ShuffleNetV2, 32),
    "convnext": (ConvNeXt, 32),
    "yolo": (YoloDetector, 64),
}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and LayerNorm affine, so that a pruned channel carries a
    non-zero constant through every norm."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.normalized_shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.normalized_shape, generator=g) * 0.3)
    return model


def build(name: str, seed: int = 0) -> tuple:
    """(model in eval mode, input shape) of family `name`."""
    make, size = FAMILIES[name]
    torch.manual_seed(seed)
    return randomize(make(), seed).eval(), (2, 3, size, size)
