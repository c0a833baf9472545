"""Stage boundaries: the compaction plan reaches the lowering frozen, and each stage checks its
output where it makes it, so that a bad result fails with the stage's name and the node, not
later inside Inductor."""
import dataclasses
from types import MappingProxyType

import pytest
import torch
import torch.fx as fx

import models as M
from models import fresh_dynamo  # noqa: F401
from fxsparse.compaction import rules
from fxsparse.compaction.check import check_plan
from fxsparse.compaction.plan import Layout, Storage
from fxsparse.compaction.propagate import propagate
from fxsparse.graph.capture import capture
from fxsparse.lowering import rewrite
from fxsparse.sparsity import read
from fxsparse.stages import StageError

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def captured(model, shape):
    """Stage 1 on the graph dynamo hands a backend for `model` (captured while dynamo's
    metadata on its inputs still exists, as the backend does)."""
    seen = []

    def grab(gm, example_inputs):
        seen.append(capture(gm, example_inputs))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=grab, fullgraph=True)(torch.randn(shape))
    (cap,) = seen
    return cap


def masked_resnet():
    """A tiny ResNet whose masks disagree (output channels only), so layouts are compacted."""
    model, shape = M.build("resnet")
    M.custom_out(model)
    return model.eval(), shape


@pytest.fixture
def stages():
    """(captured graph, sparsity, frozen plan) of the masked tiny ResNet."""
    cap = captured(*masked_resnet())
    sparsity = read.read_all(cap, inference=True)
    return cap, sparsity, propagate(cap, sparsity, storage=Storage.align_channels(1))


def compacted(prop) -> list:
    return [n for n, lay in prop.layout.items() if not lay.is_full]


def with_entry(prop, name: str, key, value) -> None:
    """Replaces one entry of the (frozen) plan mapping `name`, as a faulty stage would make it."""
    entries = dict(getattr(prop, name))
    entries[key] = value
    setattr(prop, name, MappingProxyType(entries))


def test_the_plan_is_frozen(stages):
    _, _, prop = stages
    node = compacted(prop)[0]
    layout = prop.layout[node]
    with pytest.raises(TypeError):
        prop.layout[node] = Layout.full(layout.channels)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.kept = torch.arange(layout.channels)
    conv, plan = next(iter(prop.conv_plans.items()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.weight = plan.weight * 2
    with pytest.raises(TypeError):
        prop.chains[conv] = None
    assert prop.bn_folds and prop.chains, "the plan carries folded BatchNorm and chains"
    for bn, (scale, shift) in prop.bn_folds.items():
        assert scale.shape == shift.shape == (prop.layout[bn].channels,)


def test_a_layout_storing_more_channels_than_its_tensor_fails_in_compaction(stages):
    _, _, prop = stages
    node = compacted(prop)[0]
    c = prop.layout[node].channels
    with_entry(prop, "layout", node, Layout(c, torch.arange(c + 1), torch.zeros(c, dtype=torch.float64)))
    with pytest.raises(StageError, match=rf"^compaction: layout of node {node.name} stores {c + 1} channels of {c}$") as e:
        check_plan(prop)
    assert e.value.stage == "compaction" and e.value.node is node


@pytest.mark.parametrize("kept", [[2, 1], [1, 1]])
def test_unsorted_or_repeated_channels_fail_in_compaction(stages, kept):
    _, _, prop = stages
    node = compacted(prop)[0]
    c = prop.layout[node].channels
    with_entry(prop, "layout", node, Layout(c, torch.tensor(kept), torch.zeros(c, dtype=torch.float64)))
    with pytest.raises(StageError, match=rf"compaction: layout of node {node.name} stores channels not in ascending"):
        check_plan(prop)


def test_a_conv_plan_inconsistent_with_its_input_layout_fails(stages):
    _, _, prop = stages
    conv, plan = next((n, p) for n, p in prop.conv_plans.items() if not p.in_layout.is_full)
    full = Layout.full(plan.in_layout.channels)
    with_entry(prop, "conv_plans", conv, dataclasses.replace(plan, in_layout=full))
    with pytest.raises(StageError, match=rf"compaction: conv plan of node {conv.name} reads .* in a layout the plan"):
        check_plan(prop)


def test_a_conv_plan_weight_of_the_wrong_shape_fails(stages):
    _, _, prop = stages
    conv, plan = next(iter(prop.conv_plans.items()))
    with_entry(prop, "conv_plans", conv, dataclasses.replace(plan, weight=plan.weight[:, :-1]))
    with pytest.raises(StageError, match=rf"compaction: conv plan of node {conv.name} has weight"):
        check_plan(prop)


def test_a_folded_batchnorm_of_the_wrong_shape_fails(stages):
    _, _, prop = stages
    bn, (scale, shift) = next(iter(prop.bn_folds.items()))
    with_entry(prop, "bn_folds", bn, (scale[:-1], shift))
    with pytest.raises(StageError, match=rf"compaction: folded batch_norm {bn.name} has scale"):
        check_plan(prop)


def test_a_faulty_channel_rule_fails_in_compaction_not_later(monkeypatch):
    """A rule that makes a bad layout is caught by the stage that ran it: propagate, and through
    the backend, torch.compile's error names compaction and the node."""
    model, shape = masked_resnet()

    def too_wide(self, prop, n, v, c):
        return Layout(c, torch.arange(c + 1), torch.zeros(c, dtype=torch.float64))

    monkeypatch.setattr(rules.Pointwise, "layout", too_wide)
    cap = captured(model, shape)
    with pytest.raises(StageError, match=r"^compaction: layout of node \w+ stores \d+ channels of \d+$"):
        propagate(cap, read.read_all(cap, inference=True))
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match=r"compaction: layout of node \w+ stores"):
        torch.compile(model, backend="fxsparse", fullgraph=True)(torch.randn(shape))


def test_a_mask_of_the_wrong_length_fails_in_sparsity(monkeypatch):
    cap = captured(*masked_resnet())
    real = read.read_conv

    def short_mask(v, cap, inference):
        sp = real(v, cap, inference)
        return dataclasses.replace(sp, zero_rows=sp.zero_rows[:-1])

    monkeypatch.setattr(read, "read_conv", short_mask)
    with pytest.raises(StageError, match=r"^sparsity: conv \w+: zero-row mask \(\d+,\) torch.bool for \d+ output"):
        read.read_all(cap, inference=True)


def test_a_graph_that_does_not_lint_fails_in_capture():
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.relu, (x,))
    out = g.output(y)
    gm = fx.GraphModule(torch.nn.Module(), g)
    out.append(y)  # y now comes after the output that reads it
    with pytest.raises(StageError, match=r"^capture: graph does not lint"):
        capture(gm, [torch.randn(2)])


def test_lowering_that_drops_an_output_fails_in_lowering(stages, monkeypatch):
    cap, sparsity, prop = stages

    def first_only(self, n):
        outs = n.args[0]
        first = outs[0] if isinstance(outs, (tuple, list)) else outs
        self.graph.output(self.output_value(first))

    real_outputs = rewrite.output_count(cap.gm)
    monkeypatch.setattr(rewrite.Lowering, "emit_output", first_only)
    if real_outputs == 1:  # make the captured graph return two values, the lowering one
        out = cap.gm.graph.find_nodes(op="output")[0]
        out.args = ((out.args[0], out.args[0]),)
    with pytest.raises(StageError, match=rf"^lowering: graph returns 1 outputs, the captured graph {max(real_outputs, 2)}"):
        rewrite.lower(prop, sparsity, "aten", inference=True)


def assert_lowered_matches(cap, sparsity, prop, shape) -> dict:
    """Lowers the plan and checks the lowered graph computes what the captured graph computes
    on a fresh input; returns the lowering's records."""
    gm, records, constant_outputs = rewrite.lower(prop, sparsity, "aten", inference=True)
    args = [cap.values[p] for p in cap.gm.graph.find_nodes(op="placeholder")]
    args = [torch.randn(shape) if isinstance(a, torch.Tensor) and tuple(a.shape) == tuple(shape) else a for a in args]
    with torch.no_grad():
        want, got = cap.gm(*args), gm(*args)
    want = want if isinstance(want, (tuple, list)) else (want,)
    got = list(got if isinstance(got, (tuple, list)) else (got,))
    for i in sorted(constant_outputs):  # (outputs the wrapper returns as constants: prune's weights)
        got.insert(i, constant_outputs[i])
    assert len(got) == len(want)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w)
    return records


def test_the_unperturbed_plan_passes_and_lowers(stages):
    """The checks accept what the stages make, and the plan lowers to the captured graph's values."""
    cap, sparsity, prop = stages
    check_plan(prop)
    assert_lowered_matches(cap, sparsity, prop, masked_resnet()[1])


class _ChannelsLastBlock(torch.nn.Module):
    """conv -> channels last -> layer_norm -> linear -> layer scale: constants of the plan
    beyond convs and BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.norm = torch.nn.LayerNorm(6)
        self.fc = torch.nn.Linear(6, 10)
        self.gamma = torch.nn.Parameter(torch.rand(10) + 0.5)

    def forward(self, x):
        y = self.fc(self.norm(self.conv(x).permute(0, 2, 3, 1))) * self.gamma
        return y.permute(0, 3, 1, 2)


def channels_last_block():
    import torch.nn.utils.prune as prune
    model = _ChannelsLastBlock().eval()
    with torch.no_grad():
        for p in (model.norm.weight, model.norm.bias):
            p.copy_(torch.randn_like(p))
    prune.custom_from_mask(model.conv, "weight", M.channel_mask(model.conv.weight, out=[1, 4]))
    prune.custom_from_mask(model.fc, "weight", M.channel_mask(model.fc.weight, out=[0, 3, 7], inp=[1, 4]))
    return model, (2, 3, 5, 7)


@pytest.mark.parametrize("build", [masked_resnet, channels_last_block])
def test_lowering_reads_only_the_plan(build, monkeypatch):
    """Once the plan is made, the lowering evaluates no weight and re-decides no folding: the
    propagation's evaluators may fail and the graph still lowers (folded BatchNorm, linear,
    layer_norm and layer scale constants all come with the plan) and computes the same."""
    model, shape = build()
    cap = captured(model, shape)
    sparsity = read.read_all(cap, inference=True)
    prop = propagate(cap, sparsity)
    assert prop.linear_plans and (prop.bn_folds or prop.channel_params)

    def no_call_back(*args, **kwargs):
        raise AssertionError("the lowering called back into the compaction stage")

    for name in ("value", "bn_affine", "_foldable_bn", "_foldable_linear", "inference_value_ok"):
        monkeypatch.setattr(type(prop), name, no_call_back)
    records = assert_lowered_matches(cap, sparsity, prop, shape)
    assert records
