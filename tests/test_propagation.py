"""Channels carried across the graph: with Torch-Pruning-style consistent group masks the
compacted graph does the ideal work, fuses the bottleneck's epilogues and reads only kept
input channels, and still equals eager."""
import contextlib
import re

import pytest
import torch
import torch.nn as nn

import models as M
from models import after_graph, assert_matches, compile_model, conv_rows, fresh_dynamo, report  # noqa: F401

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def grouped_resnet(zero_bn):
    model, shape = M.build("resnet")
    return M.group_prune(model, M.tiny_resnet_groups(model), zero_bn=zero_bn), shape


@pytest.mark.parametrize("zero_bn", [True, False])
@pytest.mark.parametrize("lowering", ["aten", "triton"])
def test_group_masks_reach_ideal_macs(lowering, zero_bn, tmp_path):
    """zero_bn=False: pruned channels carry non-zero BN constants through the residual adds,
    which must be folded, not computed."""
    model, shape = grouped_resnet(zero_bn)
    c = compile_model(model, tmp_path, lowering=lowering)
    with torch.no_grad():
        c(torch.randn(shape))
        assert_matches(c, model, shape)
    (g,) = report(tmp_path)["graphs"]
    assert g["propagate"] is True
    assert g["macs_after"] == g["macs_ideal"] < g["macs_before"]
    rows = conv_rows(tmp_path)
    # every conv reads exactly the input channels its group left (e.g. layer1.0.conv1: 8 - 2 residual)
    assert rows["layer1.0.conv1"]["kept_in_channels"] == 6 and rows["layer1.0.conv1"]["kept_out_channels"] == 6
    assert rows["layer1.0.conv2"]["kept_in_channels"] == 6 and rows["layer1.0.conv2"]["kept_out_channels"] == 6
    assert rows["layer2.0.conv1"]["kept_in_channels"] == 6 and rows["layer2.0.conv1"]["kept_out_channels"] == 13
    assert rows["layer2.1.conv2"]["kept_in_channels"] == 13 and rows["layer2.1.conv2"]["kept_out_channels"] == 13
    assert rows["layer2.0.downsample.0"]["kept_out_channels"] == 13


@pytest.mark.parametrize("masks,carried", [("group", False), ("out_only", True)])
def test_propagation_off_compacts_per_conv(masks, carried, tmp_path):
    """propagate=False: each conv only drops its own zero rows/columns. With group masks (both
    sides masked) that is already ideal; with output-channel masks only, the next conv's
    inputs are removed only by propagation."""
    if masks == "group":
        model, shape = grouped_resnet(zero_bn=False)
    else:
        model, shape = M.build("resnet")
        M.custom_out(model)
    macs = {}
    for prop in (False, True):
        torch._dynamo.reset()
        d = tmp_path / str(prop)
        c = compile_model(model, d, lowering="aten", propagate=prop)
        with torch.no_grad():
            c(torch.randn(shape))
            assert_matches(c, model, shape)
        (g,) = report(d)["graphs"]
        assert g["propagate"] is prop and g["macs_after"] < g["macs_before"]
        macs[prop] = g["macs_after"]
    assert (macs[True] < macs[False]) if carried else (macs[True] == macs[False])


@pytest.mark.parametrize("downsample", [True, False])
def test_bottleneck_fuses_into_fxsparse_convs(downsample, tmp_path):
    torch.manual_seed(0)
    model = M.randomize_bn(M.Bottleneck(16, 4, downsample=downsample)).eval()
    M.group_prune(model, M.bottleneck_groups())
    shape = (2, 16, 6, 6)
    c = compile_model(model, tmp_path, lowering="triton")
    with torch.no_grad():
        c(torch.randn(shape))
        assert_matches(c, model, shape)
    after = after_graph(tmp_path)
    calls = re.findall(r"torch\.ops\.fxsparse\.conv2d", after)
    assert len(calls) == 3 + downsample, after
    for op in ("batch_norm(", "functional.relu(", "torch.relu(", "torch.add(", "iadd(", "operator.add("):
        assert op not in after, f"{op} left outside the fused convs:\n{after}"
    rows = conv_rows(tmp_path)
    assert rows["conv2"]["kept_in_channels"] == 3 and rows["conv2"]["kept_out_channels"] == 2
    assert rows["conv3"]["kept_in_channels"] == 2
    assert rows["conv1"]["fused"] == ["batch_norm", "activation"]
    assert "residual" in rows["conv3"]["fused"] or (downsample and "residual" in rows["downsample.0"]["fused"])
    g = report(tmp_path)["graphs"][0]
    assert g["macs_after"] == g["macs_ideal"] < g["macs_before"]


def test_compacted_conv_reads_only_kept_inputs(tmp_path):
    """The after-graph's conv weights have the kept channel counts (not just the report)."""
    model, shape = M.build("chain")
    M.group_prune(model, [([0, 3, 4], ["0.0"], ["0.1"], ["1.0"]), ([1, 2, 8, 15], ["1.0"], ["1.1"], ["2.0"])])
    c = compile_model(model, tmp_path, lowering="aten")
    with torch.no_grad():
        c(torch.randn(shape))
        assert_matches(c, model, shape)
    after = after_graph(tmp_path)
    assert 'f32[5, 3, 3, 3]' in after and 'f32[12, 5, 3, 3]' in after and 'f32[16, 12, 3, 3]' in after
    rows = conv_rows(tmp_path)
    assert (rows["1.0"]["kept_in_channels"], rows["1.0"]["kept_out_channels"]) == (5, 12)
    assert rows["2.0"]["kept_in_channels"] == 12


def test_concat_offsets(tmp_path):
    """Channels pruned on both sides of a concat map to the right offsets of the consumer."""
    model, shape = M.build("dense")
    M.group_prune(model, [([1, 4], ["a.0"], ["a.1"], []), ([0, 5], ["b.0"], ["b.1"], [])])
    c = compile_model(model, tmp_path, lowering="aten")
    with torch.no_grad():
        c(torch.randn(shape))
        assert_matches(c, model, shape)
    rows = conv_rows(tmp_path)
    # b reads x (6) and a's 4 kept channels; a's pruned ones are constants folded into b's bias map
    assert rows["b.0"]["kept_in_channels"] == 10
    assert rows["head"]["kept_in_channels"] == 18 - 4


class _StdMeanHead(nn.Module):
    """A compacted activation read by an op with no channel result (a tuple): it must see
    every channel, constants included."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        sd, mean = torch.std_mean(torch.relu(self.bn(self.conv(x))), dim=(2, 3))
        return sd + mean


def test_op_without_channel_result_reads_full_width():
    from torch.nn.utils import prune

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = _StdMeanHead().eval()
    m.bn.bias.data.uniform_(0.5, 1.0)  # pruned channels carry a non-zero constant
    prune.ln_structured(m.conv, "weight", 0.5, n=1, dim=0)
    compiled = torch.compile(m, backend="fxsparse")
    with torch.no_grad():
        compiled(torch.randn(2, 3, 6, 6))
        x = torch.randn(2, 3, 6, 6)
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)


class _StrideRecorder(torch.fx.Interpreter):
    """Runs a graph and keeps every 4-D activation it computes (node name -> tensor)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.seen = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function" and isinstance(out, torch.Tensor) and out.dim() == 4:
            self.seen[n.name] = out
        return out


@pytest.mark.parametrize("lowering", ["aten", "triton"])
@pytest.mark.parametrize("name", ["bottleneck", "resnet"])
def test_channels_last_stays_channels_last(name, lowering, fresh_dynamo):
    """Per-conv masks that disagree across residual adds make the pass gather and relayout
    channels; each of those must keep the input's channels_last layout (an NCHW tensor read by
    the next NHWC kernel is an uncoalesced read: ResNet-50 ran at 0.6x of Inductor on the H100)."""
    from fxsparse.backend import rewrite
    from fxsparse.options import Options

    model = M.ln_structured(M.build(name)[0], amount=0.5, dim=0)
    model = M.ln_structured(model, amount=0.34, dim=1)
    x = torch.randn(2, *M.build(name)[1][1:]).to(memory_format=torch.channels_last)
    graphs = []

    def backend(gm, inputs):
        graphs.append((rewrite(gm, inputs, Options.parse({"lowering": lowering}), 0).gm, inputs))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(x)
        (gm, inputs), = graphs
        rec = _StrideRecorder(gm)
        out = rec.run(*inputs)
        ref = model(x)
    assert_close = torch.testing.assert_close
    assert_close(out[0] if isinstance(out, (tuple, list)) else out, ref, rtol=1e-4, atol=1e-4)
    moved = [k for k in rec.seen if "relayout" in k or "select_channels" in k or "fxsparse" in k]
    assert moved, "the masks were meant to make the pass gather or relayout channels"
    nchw = {k: tuple(t.stride()) for k, t in rec.seen.items()
            if t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1
            and not t.is_contiguous(memory_format=torch.channels_last)}
    assert not nchw, f"activations not channels_last: {nchw}"


class _Stage(nn.Module):
    """A ResNet stage: a downsampling Bottleneck, then two that add their input (the stream)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(M.Bottleneck(16, 4), M.Bottleneck(16, 4, downsample=False),
                                    M.Bottleneck(16, 4, downsample=False))

    def forward(self, x):
        return self.blocks(x)


@pytest.mark.parametrize("lowering", ["aten", "triton", "auto"])
def test_residual_stream_keeps_one_layout(lowering, tmp_path, fresh_dynamo):
    """Per-conv masks that disagree: each add keeps the union of its operands, so the stream
    would grow from block to block and each block would copy its identity into the next,
    wider layout. The stream takes the width of its last add instead: no identity is copied.
    The convs feeding an add (each conv3, the downsample branch) write the add's layout
    themselves where the lowering is the fused op (a scatter) or measured ("auto": a 1x1
    aten conv with zero filter rows); forced aten scatters their outputs, which Inductor
    fuses into the add's own pass on the CPU."""
    from fxsparse.lowering import choose

    torch.manual_seed(3)
    model = M.randomize_bn(_Stage()).eval()
    M.ln_structured(model, amount=0.5, dim=0)
    shape = (2, 16, 6, 6)
    prefer_aten = choose.override(lambda name, shape, fn: (fn(), 10.0 if name == "triton" else 5.0)[1])
    with prefer_aten if lowering == "auto" else contextlib.nullcontext(), torch.no_grad():
        c = compile_model(model, tmp_path, lowering=lowering)
        c(torch.randn(shape))
        assert_matches(c, model, shape)
    after = after_graph(tmp_path)
    calls = re.findall(r"(relayout(?:_\d+)?) = \S*relayout\((\w+),", after)
    returned = re.search(r"return \((.*)\)", after).group(1)
    inside = [(r, arg) for r, arg in calls if not re.search(rf"\b{r}\b", returned)]  # the output is full width
    assert not [arg for _, arg in inside if arg.startswith(("relu", "add"))], after  # no identity copies
    assert len(inside) == (4 if lowering == "aten" else 0), after
    rows = {r["name"]: r for r in report(tmp_path)["graphs"][-1]["convs"]}
    assert all(rows[f"blocks.{i}.conv3"]["kept_out_channels"] < 16 for i in range(3)), rows  # still compacted
    if lowering == "auto":  # what the zero rows cost is in the report
        assert all(rows[f"blocks.{i}.conv3"]["macs_after"] > rows[f"blocks.{i}.conv3"]["macs_ideal"]
                   for i in range(3)), rows
