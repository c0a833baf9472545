"""The per-op channel rule table (fxsparse/compaction/rules.py)."""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

import zoo_models as Z
from models import after_graph, channel_mask, compile_model, conv_rows, fresh_dynamo, report  # noqa: F401
from fxsparse.compaction.groups import trace_graphs
from fxsparse.compaction.rules import RULES, STOP, channel_axis, channel_count, rule_for
from fxsparse.graph import capture


def test_every_kind_capture_names_has_a_rule():
    kinds = set(re.findall(r"^  (\w+) ", capture.__doc__, re.M)) - {"unknown"}
    assert kinds and kinds <= set(RULES), kinds - set(RULES)
    assert rule_for(None) is STOP


class _ChannelsLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        y = self.fc(self.norm(self.conv(x).permute(0, 2, 3, 1)))
        return y.permute(0, 3, 1, 2)


def test_channel_axis_follows_permute_and_linear():
    (gm, _), = trace_graphs(_ChannelsLast(), torch.randn(1, 3, 5, 7))
    by_kind = {capture.view(n).kind: n for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    first_permute = next(n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
                         and capture.view(n).kind == "permute")
    assert channel_axis(by_kind["conv2d"]) == 1 and channel_count(by_kind["conv2d"]) == 6
    assert channel_axis(first_permute) == 3 and channel_count(first_permute) == 6
    assert channel_axis(by_kind["layer_norm"]) == 3
    assert channel_axis(by_kind["linear"]) == 3 and channel_count(by_kind["linear"]) == 10
    assert channel_count(by_kind["permute"]) == 10  # the last permute: back to NCHW, axis 1
    assert channel_axis(by_kind["permute"]) == 1


def test_layer_norm_and_linear_in_channels_last_are_compacted(tmp_path, fresh_dynamo):
    model = Z.randomize(_ChannelsLast()).eval()
    prune.custom_from_mask(model.conv, "weight", channel_mask(model.conv.weight, out=[1, 4]))
    # (the linear's columns of the pruned channels too: else LayerNorm's outputs there are live,
    # and not constant, so its inputs would be materialised)
    prune.custom_from_mask(model.fc, "weight", channel_mask(model.fc.weight, out=[0, 3, 7], inp=[1, 4]))
    with torch.no_grad():
        c = compile_model(model, tmp_path)
        for seed in (1, 2):
            x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(c(x), model(x), rtol=1e-5, atol=1e-5)
    graph = after_graph(tmp_path)
    # conv: 4 rows; LayerNorm over the 4 stored channels with the 2 constants folded in;
    # linear: 7 rows (3 are its bias) reading the 4 stored channels
    assert 'f32[4, 3, 3, 3]' in graph and "layer_norm_kept" in graph and 'f32[7, 4]' in graph, graph
    assert "relayout" not in graph.split("layer_norm_kept")[0], graph


class _SplitShuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        x1, x2 = self.a(x).chunk(2, dim=1)
        return self.c(Z.channel_shuffle(torch.cat((x1, torch.relu(self.b(x2))), 1), 2))


def test_split_and_shuffle_keep_compacted_storage(tmp_path, fresh_dynamo):
    model = _SplitShuffle().eval()
    prune.custom_from_mask(model.a, "weight", channel_mask(model.a.weight, out=[0, 5]))
    prune.custom_from_mask(model.b, "weight", channel_mask(model.b.weight, out=[2]))
    with torch.no_grad():
        c = compile_model(model, tmp_path)
        x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(c(x), model(x), rtol=1e-5, atol=1e-5)
    graph = after_graph(tmp_path)
    assert "narrow" in graph and "select_channels" in graph and "relayout" not in graph, graph
    assert "transpose" not in graph  # the shuffle's view/transpose/view became one gather
    # c reads a's 6 kept channels (one of them is b's input slice) and b's 3: 8 - 1 (a's 0) - 1 (b's 2)
    assert conv_rows(tmp_path)["c"]["kept_in_channels"] == 6


def test_squeeze_excite_gate_keeps_pruned_channels_constant(tmp_path, fresh_dynamo):
    """The gate of a pruned channel is sigmoid(fc2's bias) and its input a constant: the product
    is a constant, so the projection after the gate reads the kept channels only."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.se = Z.SqueezeExcitation(8, 4)
            self.proj = nn.Conv2d(8, 6, 1)

        def forward(self, x):
            return self.proj(self.se(torch.relu(self.dw(x))))

    model = Block().eval()
    pruned = [1, 2, 6]
    prune.custom_from_mask(model.dw, "weight", channel_mask(model.dw.weight, out=pruned))
    prune.custom_from_mask(model.se.fc2, "weight", channel_mask(model.se.fc2.weight, out=pruned))
    with torch.no_grad():
        c = compile_model(model, tmp_path)
        x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(c(x), model(x), rtol=1e-5, atol=1e-5)
    rows = conv_rows(tmp_path)
    assert rows["proj"]["kept_in_channels"] == 5 and rows["se.fc1"]["kept_in_channels"] == 5, rows
    assert not [n for g in report(tmp_path)["graphs"] for n in g["notes"] if "full width" in n]


def test_unknown_op_stops_and_is_never_assumed_elementwise(tmp_path, fresh_dynamo):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(torch.flip(self.a(x), [1]))  # mixes channels: not elementwise

    model = Net().eval()
    prune.custom_from_mask(model.a, "weight", channel_mask(model.a.weight, out=[0, 1]))
    with torch.no_grad():
        c = compile_model(model, tmp_path)
        x = torch.randn(2, 3, 4, 4)
        torch.testing.assert_close(c(x), model(x), rtol=1e-5, atol=1e-5)
    notes = [n for g in report(tmp_path)["graphs"] for n in g["notes"]]
    assert any("flip" in n for n in notes), notes
    assert conv_rows(tmp_path)["b"]["kept_in_channels"] == 8


from hypothesis import given, settings, strategies as st  # noqa: E402


class _Grouped(nn.Module):
    def __init__(self, groups, k):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.bn_a = nn.BatchNorm2d(12)
        self.g = nn.Conv2d(12, 12, k, padding=k // 2, groups=groups, bias=False)
        self.bn_g = nn.BatchNorm2d(12)
        self.c = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        return self.c(torch.relu(self.bn_g(self.g(torch.relu(self.bn_a(self.a(x)))))))


@settings(max_examples=6, deadline=None)
@given(groups=st.sampled_from([2, 3, 4]), k=st.sampled_from([1, 3]), seed=st.integers(0, 10_000))
def test_grouped_conv_exact_under_odd_masks(groups, k, seed):
    """Random rows of the producer, random rows and per-group columns of the grouped conv:
    groups end up with different counts (padded to the fullest), constants feed padded taps."""
    g = torch.Generator().manual_seed(seed)
    model = Z.randomize(_Grouped(groups, k), seed).eval()
    prune.custom_from_mask(model.a, "weight", (torch.rand(12, 1, 1, 1, generator=g) > 0.4).float().expand(12, 3, 1, 1))
    rows = (torch.rand(12, 1, 1, 1, generator=g) > 0.4).float()
    cols = (torch.rand(12, 12 // groups, 1, 1, generator=g) > 0.3).float()
    prune.custom_from_mask(model.g, "weight", (rows * cols).expand_as(model.g.weight).contiguous())
    torch._dynamo.reset()  # a fresh compile per example (dynamo's cache is per code object)
    with torch.no_grad():
        c = torch.compile(model, backend="fxsparse", options={"inductor": False})
        x = torch.randn(2, 3, 5, 5, generator=g)
        torch.testing.assert_close(c(x), model(x), rtol=1e-5, atol=1e-5)
    import fxsparse.report

    (row,) = [r for r in fxsparse.report.current_report(None).graphs[-1].convs if r.name == "g"]
    assert row.lowering == "aten" and row.groups == groups, row  # compacted group by group
