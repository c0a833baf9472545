"""Lowering "auto" measured per chain (fxsparse/lowering/choose.py), driven on the CPU by an
injected fake timer: mixed graphs equal eager, the report says what was chosen and why,
identical shapes are timed once, and a chain lowered to aten (conv + its epilogue as plain
ops) equals eager for every chain form."""
import re

import pytest
import torch
import torch.nn as nn

import models as M
from fxsparse.lowering import choose
from models import after_graph, assert_matches, compile_model, fresh_dynamo, report  # noqa: F401

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

FUSED_OP = "torch.ops.fxsparse.conv2d"


def rule_timer(prefer_aten, run=True, log=None):
    """A fake timer: aten wins where prefer_aten(shape). Runs each candidate once (both must
    work on the chain's real constants) unless run is False."""
    def timer(name, shape, fn):
        if run:
            out = fn()
            assert isinstance(out, torch.Tensor) and out.shape[0] == shape.batch
        if log is not None:
            log.append((name, shape))
        if name == "triton":
            return 10.0
        return 5.0 if prefer_aten(shape) else 20.0
    return timer


def residual_or_1x1(shape):
    return shape.residual or shape.kernel == (1, 1)


def pruned(name):
    model, shape = M.build(name)
    if name == "resnet":
        M.group_prune(model, M.tiny_resnet_groups(model))
    elif name == "bottleneck":
        M.group_prune(model, M.bottleneck_groups())
    else:
        M.custom_out(model)
    return model, shape


def compile_auto(model, shape, tmp_path, **options):
    c = compile_model(model, tmp_path, lowering="auto", **options)
    with torch.no_grad():
        c(torch.randn(shape))  # compile input; comparisons use fresh ones
        assert_matches(c, model, shape)
    (g,) = report(tmp_path)["graphs"]
    return c, g


@pytest.mark.parametrize("mask", ["group", "ln1", "random"])  # ln1: chains that gather input channels
@pytest.mark.parametrize("name", ["resnet", "bottleneck"])
def test_mixed_graph_matches_eager(name, mask, tmp_path):
    if mask == "group":
        model, shape = pruned(name)
    else:
        model, shape = M.build(name)
        M.MASKS[mask](model)
    with choose.override(rule_timer(residual_or_1x1)):
        _, g = compile_auto(model, shape, tmp_path)
    assert g["lowering"] == "auto"
    rows = [r for r in g["convs"] if r["lowering"] != "unchanged"]
    assert {r["lowering"] for r in rows} == {"triton", "aten"}, rows
    for r in rows:
        assert r["reason"] is None
        want = "aten" if (r["kernel_size"] == [1, 1] or "residual" in r["fused"]) else "triton"
        assert r["lowering"] == want, r
        a = "5.0" if want == "aten" else "20.0"
        assert r["choice"] == f"measured: triton 10.0 us vs aten+epilogue {a} us", r
    after = after_graph(tmp_path)
    assert FUSED_OP in after and "torch.conv2d(" in after


def test_mixed_graph_through_inductor(tmp_path):
    model, shape = pruned("resnet")
    with choose.override(rule_timer(residual_or_1x1)):
        _, g = compile_auto(model, shape, tmp_path, inductor=True)
    assert {r["lowering"] for r in g["convs"]} == {"triton", "aten"}


class Repeated(nn.Sequential):
    """Three identical conv-BN-ReLU layers after the stem: one shape signature."""

    def __init__(self):
        super().__init__(M.ConvBNReLU(3, 8), *[M.ConvBNReLU(8, 8) for _ in range(3)])


def test_identical_shapes_are_timed_once(tmp_path):
    torch.manual_seed(0)
    model = M.randomize_bn(Repeated()).eval()
    M.group_prune(model, [([1, 4], [f"{i}.0"], [], []) for i in range(4)])
    shape = (2, 3, 8, 8)
    log = []
    with choose.override(rule_timer(lambda s: s.in_channels == s.out_channels, log=log)) as chooser:
        _, g = compile_auto(model, shape, tmp_path / "a")
        distinct = set(chooser.timed)
        assert len(chooser.timed) == len(distinct) == len(chooser.cache)
        assert len(log) == 2 * len(distinct)  # two candidates per distinct shape
        assert len(distinct) < len([r for r in g["convs"] if r["lowering"] != "unchanged"])
        # a second compile of the same model times nothing new
        torch._dynamo.reset()
        compile_auto(model, shape, tmp_path / "b")
        assert len(log) == 2 * len(distinct)
    rows = {r["name"]: r for r in g["convs"]}
    same = [rows[f"{i}.0"] for i in (1, 2, 3)]  # identical in, out and kept channels
    assert len(distinct) == 2 and all(r["lowering"] == "aten" for r in same), same
    assert rows["0.0"]["lowering"] == "triton"


# -- the aten path with a full epilogue ---------------------------------------------------------

class ActThenAdd(nn.Module):
    """conv -> BN -> ReLU -> add (residual added after the activation)."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x))) + x


class Block(nn.Module):
    """A stem, then one block whose residual is the stem's (compacted) output."""

    def __init__(self, block):
        super().__init__()
        self.stem = M.ConvBNReLU(3, 8)
        self.block = block

    def forward(self, x):
        return self.block(self.stem(x))


def _chain_model(kind):
    torch.manual_seed(0)
    block = {"basic": lambda: M.BasicBlock(8, 8), "act_then_add": lambda: ActThenAdd(8),
             "downsample": lambda: M.BasicBlock(8, 16, stride=2)}[kind]()
    model = M.randomize_bn(Block(block)).eval()
    return model


@pytest.mark.parametrize("mask", ["custom_out", "ln0", "group"])
@pytest.mark.parametrize("kind", ["basic", "act_then_add", "downsample"])
def test_aten_epilogue_full_chain_matches_eager(kind, mask, tmp_path):
    """Every chain lowered to aten: conv (BN folded) + residual add + ReLU as plain ops."""
    model = _chain_model(kind)
    if mask == "group":  # the residual group pruned consistently: the add runs compacted
        conv2 = "block.conv2" if kind != "act_then_add" else "block.conv"
        M.group_prune(model, [([1, 4], ["stem.0", conv2] + (["block.downsample.0"] if kind == "downsample" else []),
                               [], [])])
    else:
        M.MASKS[mask](model)
    shape = (2, 3, 8, 8)
    with choose.override(rule_timer(lambda s: True)):
        _, g = compile_auto(model, shape, tmp_path)
    rows = [r for r in g["convs"] if r["lowering"] != "unchanged"]
    assert rows and all(r["lowering"] == "aten" for r in rows), rows
    assert any("residual" in r["fused"] for r in rows), rows
    after = after_graph(tmp_path)
    assert FUSED_OP not in after and "torch.add(" in after and "relu" in after


# -- where nothing is measured -------------------------------------------------------------------

@pytest.mark.parametrize("lowering", ["triton", "aten"])
def test_forced_lowering_is_not_measured(lowering, tmp_path):
    model, shape = pruned("resnet")
    log = []
    with choose.override(rule_timer(residual_or_1x1, log=log)):
        c = compile_model(model, tmp_path, lowering=lowering)
        with torch.no_grad():
            c(torch.randn(shape))
            assert_matches(c, model, shape)
    (g,) = report(tmp_path)["graphs"]
    assert not log and g["lowering"] == lowering
    assert all(r["lowering"] in (lowering, "unchanged") and r["choice"] is None for r in g["convs"])


def test_auto_on_cpu_without_override_is_aten(tmp_path):
    model, shape = pruned("resnet")
    c = compile_model(model, tmp_path, lowering="auto")
    with torch.no_grad():
        c(torch.randn(shape))
    (g,) = report(tmp_path)["graphs"]
    assert g["lowering"] == "aten"
    assert all(r["choice"] is None for r in g["convs"])


def test_training_is_measured_per_conv_under_its_own_key(tmp_path):
    """In training "auto" times each compacted dense conv, forward and backward, as a
    TrainConvShape (never as an inference chain); a failure there keeps aten."""
    from fxsparse.ops import triton_interpreter_on

    if not triton_interpreter_on():
        pytest.skip("on the CPU the op runs training convs only under the Triton interpreter")
    model, shape = pruned("chain")
    model.train()
    log = []
    with choose.override(rule_timer(lambda s: True, log=log)):
        c = compile_model(model, tmp_path, lowering="auto")
        c(torch.randn(shape)).sum().backward()
    g = report(tmp_path)["graphs"][0]
    rows = [r for r in g["convs"] if r["lowering"] != "unchanged"]
    assert g["lowering"] == "auto" and rows
    assert log and all(isinstance(s, choose.TrainConvShape) for _, s in log), log
    assert all(r["lowering"] == "aten" and r["choice"] == "measured: triton 10.0 us vs aten 5.0 us" for r in rows)

    def broken(name, shape, fn):
        raise RuntimeError("no timer here")

    torch._dynamo.reset()
    with choose.override(broken):
        c = compile_model(model, tmp_path, lowering="auto")
        c(torch.randn(shape)).sum().backward()
    rows = [r for r in report(tmp_path)["graphs"][-1]["convs"] if r["lowering"] != "unchanged"]
    assert rows and all(r["lowering"] == "aten" and r["choice"].startswith("timing failed") for r in rows), rows


def test_timing_failure_keeps_the_fused_op(tmp_path):
    def broken(name, shape, fn):
        raise RuntimeError("no timer here")

    model, shape = pruned("resnet")
    with choose.override(broken) as chooser:
        _, g = compile_auto(model, shape, tmp_path)
    assert not chooser.cache  # failures are not cached
    rows = [r for r in g["convs"] if r["lowering"] != "unchanged"]
    assert rows and all(r["lowering"] == "triton" for r in rows)
    assert all(r["choice"].startswith("timing failed (RuntimeError: no timer here)") for r in rows)


# -- the real timer (GPU) --------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_timer_measures_both_candidates():
    from fxsparse.demo import SmallResNet, randomize_batchnorm
    from torch.nn.utils import prune

    torch.manual_seed(0)
    m = SmallResNet(32)
    randomize_batchnorm(m, 0)
    for conv in [c for c in m.modules() if isinstance(c, nn.Conv2d)][1:]:
        prune.ln_structured(conv, "weight", 0.5, n=1, dim=0)
    m = m.eval().cuda().half().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 32, 32, device="cuda", dtype=torch.half).to(memory_format=torch.channels_last)
    from fxsparse.kernels.select import selector

    selector.forget()  # chains timed by earlier tests would be answered from memory
    with choose.override(choose.cuda_timer, forced=False) as chooser:
        c = torch.compile(m, backend="fxsparse", options={"cudagraphs": False})
        with torch.no_grad():
            y, ref = c(x), m(x)
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-3
    assert chooser.cache and all(d.triton_us > 0 and d.aten_us > 0 for d in chooser.cache.values())


@pytest.mark.parametrize("prefer_aten", [True, False])
def test_bfloat16_chains_keep_their_dtype(prefer_aten, tmp_path):
    """A bias map (constant input channels meeting zero padding) in a bf16 model: the aten
    path adds it in bf16, not fp32 (which would promote the rest of the graph)."""
    model = _chain_model("basic")
    M.MASKS["custom_out"](model)
    model = model.to(torch.bfloat16)
    shape = (2, 3, 8, 8)
    with choose.override(rule_timer(lambda s: prefer_aten)) as chooser:
        c = compile_model(model, tmp_path, lowering="auto")
        with torch.no_grad():
            c(torch.randn(shape, dtype=torch.bfloat16))
            x = torch.randn(shape, dtype=torch.bfloat16)
            y, want = c(x), model(x)
    assert any(s.bias_map for s in chooser.timed)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), rtol=0.05, atol=0.05 * float(want.abs().max()))
    assert {r["lowering"] for r in report(tmp_path)["graphs"][0]["convs"]} == {"aten" if prefer_aten else "triton"}


@pytest.mark.parametrize("graphed", [False, True])
def test_timer_is_told_whether_the_graph_runs_under_cuda_graphs(graphed, tmp_path, monkeypatch):
    """Under CUDA graphs kernel time decides, otherwise the plain call's (host cost included):
    the chain's shape carries which, so the two are never mixed in the cache either."""
    import fxsparse.backend as backend

    monkeypatch.setattr(backend, "_use_cudagraphs", lambda opts, inputs, inference: graphed)
    seen = []
    model, shape = pruned("bottleneck")
    with choose.override(rule_timer(residual_or_1x1, log=seen)):
        compile_auto(model, shape, tmp_path, inductor=False)
    assert seen and all(s.graphed is graphed for _, s in seen)


@pytest.mark.parametrize("mask", ["ln0", "custom_out", "filter_groups"])  # masks that disagree across adds
@pytest.mark.parametrize("name", list(M.ZOO))
def test_aten_everywhere_writes_add_layouts_exactly(name, mask, tmp_path):
    """Lowering "auto" with aten winning every chain: each 1x1 conv feeding a residual add (or
    a downsample branch feeding one) computes the add's wider layout from zero filter rows
    whose bias is the channel's constant (dense_out). Equal to eager on every zoo model."""
    model, shape = M.build(name)
    M.MASKS[mask](model)
    with choose.override(rule_timer(lambda s: True)):
        _, g = compile_auto(model, shape, tmp_path)
    rows = [r for r in g["convs"] if r["lowering"] != "unchanged"]
    assert rows and all(r["lowering"] == "aten" for r in rows), rows
    widened = [r for r in rows if any("zero filter rows" in n for n in r["notes"])]
    for r in widened:  # zero rows are computed work, and the report counts them
        zero = int(re.search(r"computes (\d+) zero filter rows", " ".join(r["notes"])).group(1))
        kin = r["kept_in_channels"]
        taps = r["kernel_size"][0] * r["kernel_size"][1]
        assert zero > 0 and taps == 1
        assert r["macs_after"] % ((r["kept_out_channels"] + zero) * kin * taps) == 0, r
    if name in ("bottleneck", "mobilenet") and mask == "ln0":  # 1x1 convs feeding adds: rows added
        assert widened, rows


def test_training_auto_offers_the_fused_op_only_with_a_known_launch(tmp_path):
    """A training compile does not tune launches: with nothing cached for a conv's shape, "auto"
    keeps aten for it without timing; with tuning off (a safe launch) the op is a candidate."""
    from fxsparse.lowering.choose import TrainConvProblem, TrainConvShape
    from fxsparse.options import configure

    shape = TrainConvShape(2, 8, 6, 6, 4, (3, 3), (1, 1), (1, 1), (1, 1), False, "float32", "cpu", True,
                           True, True)
    problem = TrainConvProblem(shape, torch.device("cpu"))
    with configure(tune="cache", cache_dir=str(tmp_path), shipped_table=False):
        assert not problem.launch_known()
    with configure(tune="off"):
        assert problem.launch_known()
