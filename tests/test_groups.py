"""fxsparse.compaction.groups: channel coupling groups on the dynamo graph."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxsparse.compaction.groups import channel_groups, first_conv, group_importance


class Residual(nn.Module):
    """stem -> conv_a ; conv_b(stem) + conv_c(stem) residual; -> consumer -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_stem = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(6)
        self.c = nn.Conv2d(8, 6, 1, bias=False)
        self.consumer = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        x = F.relu(self.bn_stem(self.stem(x)))
        y = F.relu(self.bn_b(self.b(x)) + self.c(x))
        z = self.consumer(y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


def _find(groups, module, kind):
    hits = [g for g in groups if any(m.module == module and m.kind == kind for m in g.members)]
    assert len(hits) == 1, (module, kind, groups)
    return hits[0]


def _member(group, module, kind):
    return next(m for m in group.members if m.module == module and m.kind == kind)


def test_residual_add_couples_both_producers():
    model = Residual()
    groups = channel_groups(model, torch.randn(2, 3, 8, 8))
    g = _find(groups, "b", "conv_out")
    assert g is _find(groups, "c", "conv_out")  # both add operands' producers in one group
    assert g.size == 6 and g.prunable
    kinds = {(m.module, m.kind) for m in g.members}
    assert kinds == {("b", "conv_out"), ("c", "conv_out"), ("bn_b", "bn"), ("consumer", "conv_in")}
    assert _member(g, "b", "conv_out").indices == _member(g, "c", "conv_out").indices == list(range(6))
    # the stem's output feeds b and c (their inputs), with its BN: one group, separate from b/c's
    s = _find(groups, "stem", "conv_out")
    assert {(m.module, m.kind) for m in s.members} == {
        ("stem", "conv_out"), ("bn_stem", "bn"), ("b", "conv_in"), ("c", "conv_in")}
    # the consumer's outputs reach the linear head only (linear_in member) and are prunable
    h = _find(groups, "consumer", "conv_out")
    assert h.prunable and {(m.module, m.kind) for m in h.members} == {("consumer", "conv_out"), ("fc", "linear_in")}
    assert first_conv(model, torch.randn(1, 3, 8, 8)) == "stem"


def test_channels_reaching_the_output_are_not_prunable():
    class Out(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.mid = nn.Conv2d(4, 6, 3, padding=1)
            self.last = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            m = F.relu(self.mid(self.stem(x)))
            return self.last(m), m  # mid's channels are returned too

    groups = channel_groups(Out(), torch.randn(1, 3, 8, 8))
    for name in ("mid", "last"):
        g = _find(groups, name, "conv_out")
        assert not g.prunable and "output" in g.reason
    assert _find(groups, "stem", "conv_out").prunable


def test_unknown_op_blocks_its_channels():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.a(x)
            y = y.flip(1)  # a channel permutation fxsparse does not model
            return self.head(self.b(y))

    groups = channel_groups(Weird(), torch.randn(1, 3, 6, 6))
    ga = _find(groups, "a", "conv_out")
    assert not ga.prunable and "unknown" in ga.reason
    gb = _find(groups, "b", "conv_out")
    assert gb.prunable
    assert all(m.module != "b" or m.kind != "conv_in" for m in ga.members)  # flip couples nothing


def test_cat_offsets_and_depthwise_ties():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 2, 1)
            self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
            self.bn = nn.BatchNorm2d(6)
            self.pw = nn.Conv2d(6, 3, 1)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            return self.pw(F.relu6(self.bn(self.dw(y))))

    groups = channel_groups(Cat(), torch.randn(1, 3, 6, 6))
    ga, gb = _find(groups, "a", "conv_out"), _find(groups, "b", "conv_out")
    assert ga is not gb
    assert _member(ga, "dw", "conv_out").indices == [0, 1, 2, 3]
    assert _member(gb, "dw", "conv_out").indices == [4, 5]  # offset by a's 4 channels
    assert _member(gb, "pw", "conv_in").indices == [4, 5]
    assert _member(gb, "bn", "bn").indices == [4, 5]
    assert ga.prunable and gb.prunable
    assert not _find(groups, "pw", "conv_out").prunable


def test_group_importance_is_l1_of_all_members():
    model = Residual()
    g = _find(channel_groups(model, torch.randn(1, 3, 8, 8)), "b", "conv_out")
    imp = group_importance(g, p=1)
    expect = (model.b.weight.abs().sum((1, 2, 3)) + model.c.weight.abs().sum((1, 2, 3))
              + model.bn_b.weight.abs() + model.consumer.weight.abs().sum((0, 2, 3)))
    torch.testing.assert_close(imp, expect.detach())
    # masked weights count as zeros
    with torch.no_grad():
        model.c.weight[2] = 0
        model.b.weight[2] = 0
    assert group_importance(g)[2] < imp[2]
    assert group_importance(g, p=2).shape == (6,)


def test_tracing_leaves_the_model_untouched():
    model = Residual().train()
    before = model.bn_b.running_mean.clone()
    channel_groups(model, torch.randn(4, 3, 8, 8) + 3)
    assert model.training and model.bn_b.training
    assert torch.equal(model.bn_b.running_mean, before)


def test_many_models_do_not_hit_recompile_limits():
    sizes = set()
    for i in range(12):  # more than dynamo's default recompile limit (8)
        m = nn.Sequential(nn.Conv2d(3, 4 + i, 1), nn.ReLU(), nn.Conv2d(4 + i, 2, 1))
        g = _find(channel_groups(m, torch.randn(1, 3, 4, 4)), "0", "conv_out")
        sizes.add(g.size)
    assert sizes == {4 + i for i in range(12)}
