"""fxsparse.compact: an exact, smaller standalone module, and the ecosystem's tools on it."""
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as prune

import fxsparse
import models as M
from fxsparse.compact import CompactError
from fxsparse.demo import SmallResNet, randomize_batchnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fresh(shape, seed, batch=None, **kw):
    shape = (batch or shape[0], *shape[1:])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), **kw)


def assert_exact(small, model, shape, batches=(1, 2, 5), seed=100, tol=1e-5):
    """small == model.eval() on fresh random inputs of several batch sizes."""
    model.eval()
    for i, b in enumerate(batches):
        x = fresh(shape, seed + i, b)
        with torch.no_grad():
            got, want = small(x), model(x)
        scale = max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got, want, rtol=0, atol=tol * scale)


def dense_size(model: nn.Module) -> int:
    """Elements of the unmasked model: its parameters (weight_orig for a pruned conv) and
    buffers other than prune masks."""
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for n, b in model.named_buffers() if not n.endswith("_mask"))
    return params + buffers


def compact_size(small: nn.Module) -> int:
    return sum(t.numel() for t in small.state_dict().values())


def small_resnet(keep=0.5, width=8, seed=0):
    torch.manual_seed(seed)
    model = SmallResNet(width).eval()
    randomize_batchnorm(model, seed)
    x = fresh((2, 3, 16, 16), seed)
    fxsparse.sparsify(model, keep, kind="channel", example_inputs=(x,))
    return model, x


# -- exactness ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,masks", [
    ("resnet", "ln0"),            # prune.ln_structured, per conv (masks disagree across adds)
    ("resnet", "custom_out"),     # custom_from_mask channel masks
    ("resnet", "zeros"),          # exactly-zero channels, no mask
    ("dense", "custom_out"),      # concat of channel groups
    ("bottleneck", "filter_groups"),
    ("poolhead", "ln0"),          # pooling + linear head
    ("mobilenet", "ln0"),         # depthwise convs, residual add
])
def test_exact_and_smaller(name, masks):
    model, shape = M.build(name)
    M.MASKS[masks](model)
    small = fxsparse.compact(model, fresh(shape, 0))
    assert_exact(small, model, shape)
    assert compact_size(small) < dense_size(model)
    rewritten = [c for g in small.report.graphs for c in g.convs if c.lowering != "unchanged"]
    assert rewritten, str(small.report)


def test_channels_last_with_relayouts():
    """Per-conv masks that disagree across residual adds need channel moves (relayouts) between
    layouts; in channels_last memory format, from a batch-1 example."""
    model, shape = M.build("resnet")
    M.MASKS["ln0"](model)
    model = model.to(memory_format=torch.channels_last)
    x = fresh(shape, 0, 1).to(memory_format=torch.channels_last)
    small = fxsparse.compact(model, x)
    assert "torch.where" in small.code  # the relayouts, as gather + where
    for b in (1, 3):
        y = fresh(shape, 60 + b, b).to(memory_format=torch.channels_last)
        with torch.no_grad():
            torch.testing.assert_close(small(y), model(y), rtol=0, atol=1e-5 * max(1.0, float(model(y).abs().max())))


def test_channel_groups_resnet_shrinks_and_folds_batchnorm():
    """Torch-Pruning-style consistent groups with random BatchNorm statistics: pruned channels
    carry constants (folded into biases), and every parameter holds only kept channels."""
    model, shape = M.build("resnet")
    M.group_prune(model, M.tiny_resnet_groups(model))
    small = fxsparse.compact(model, fresh(shape, 0))
    assert_exact(small, model, shape)
    assert compact_size(small) < 0.85 * dense_size(model)
    # the BatchNorm constants of pruned channels live in biases: no BatchNorm is left
    assert "batch_norm" not in small.code
    assert all(c.kept_out_channels < c.out_channels for g in small.report.graphs for c in g.convs
               if c.name in ("conv1", "layer1.0.conv1", "layer2.0.conv1", "layer2.1.conv1"))


def test_sparsify_groups_half_the_parameters():
    model, x = small_resnet(0.5)
    small = fxsparse.compact(model, x)
    assert_exact(small, model, x.shape)
    assert compact_size(small) < 0.4 * dense_size(model)
    assert sum(p.numel() for p in small.parameters()) < 0.4 * sum(p.numel() for p in model.parameters())


def test_torchvision_resnet18_groups():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=10).eval()
    randomize_batchnorm(model)
    x = fresh((2, 3, 32, 32), 0)
    fxsparse.sparsify(model, 0.5, kind="channel", example_inputs=(x,), skip_stem=False)
    small = fxsparse.compact(model, x)
    assert_exact(small, model, x.shape, batches=(1, 3), tol=1e-4)
    assert compact_size(small) < 0.4 * dense_size(model)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = M.ConvBNReLU(3, 8)
        self.b = M.ConvBNReLU(5, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, a, b):
        return self.head(self.a(a) + self.b(b))


def test_two_inputs_dynamic_batch():
    torch.manual_seed(0)
    model = M.randomize_bn(TwoInputs()).eval()
    M.filter_groups(model, group=2)
    small = fxsparse.compact(model, fresh((2, 3, 6, 6), 0), fresh((2, 5, 6, 6), 1))
    ep = torch.export.export(small, (fresh((2, 3, 6, 6), 0), fresh((2, 5, 6, 6), 1)),
                             dynamic_shapes=({0: torch.export.Dim("batch")}, {0: torch.export.Dim("batch")}))
    for b in (1, 4):
        a, c = fresh((b, 3, 6, 6), 80 + b), fresh((b, 5, 6, 6), 90 + b)
        with torch.no_grad():
            want = model(a, c)
        torch.testing.assert_close(small(a, c), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(ep.module()(a, c), want, rtol=0, atol=1e-5)


def test_under_inductor_freezing():
    """With torch._inductor.config.freezing (grad off), dynamo hands parameters over as graph
    attributes rather than inputs: the same compact module."""
    model, x = small_resnet(0.5)
    with torch._inductor.config.patch(freezing=True):
        small = fxsparse.compact(model, x)
    assert_exact(small, model, x.shape)
    assert compact_size(small) < 0.4 * dense_size(model)


def test_torch_compile_compiles_it():
    """torch.compile of the compact module traces it (its forward first ran inside compact's own
    dynamo backend, which dynamo would otherwise remember as code never to compile) and computes
    the same values."""
    model, x = small_resnet(0.5)
    small = fxsparse.compact(model, x)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(small, backend=counting)
    y = fresh(x.shape, 7)
    with torch.no_grad():
        want = model(y)
        torch.testing.assert_close(compiled(y), want, rtol=0, atol=1e-5 * max(1.0, float(want.abs().max())))
    assert len(graphs) == 1
    assert any(n.target is torch.conv2d for n in graphs[0].graph.nodes)


def test_owns_its_tensors():
    """No tensor of the compact module shares storage with the model: changing or deleting
    the model afterwards changes nothing."""
    model, x = small_resnet(0.5)
    small = fxsparse.compact(model, x)
    with torch.no_grad():
        want = small(x).clone()
    model_ptrs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert not model_ptrs & {t.untyped_storage().data_ptr() for t in small.state_dict().values()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    del model
    torch.testing.assert_close(small(x), want, rtol=0, atol=0)


def test_plain_torch_ops_only():
    """The CPU module's code calls torch only (no fxsparse function or op)."""
    model, shape = M.build("dense")  # concat: channel moves between layouts
    M.MASKS["custom_out"](model)
    small = fxsparse.compact(model, fresh(shape, 0))
    assert "fxsparse" not in small.code
    targets = {getattr(n.target, "__module__", "") for n in small.graph.nodes if n.op == "call_function"}
    assert all(t.startswith("torch") or t in ("_operator",) for t in targets), targets


def test_report_rows_match_explain():
    model, x = small_resnet(0.5)
    small = fxsparse.compact(model, x)
    explained = fxsparse.explain(model, x, options={"lowering": "aten"})
    row = lambda c: (c.name, c.in_channels, c.out_channels, c.kept_in_channels, c.kept_out_channels, c.lowering)
    assert [row(c) for c in small.report.graphs[0].convs] == [row(c) for c in explained.graphs[0].convs]
    assert "convs rewritten" in str(small.report)


def test_caller_inputs_and_modes_untouched():
    model, x = small_resnet(0.5)
    model.train()
    x1 = x[:1].clone()
    before = x1.clone()
    stats = {n: b.clone() for n, b in model.named_buffers()}
    small = fxsparse.compact(model, x1)  # batch 1: traced with a batch of 2, still dynamic
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(x1, before, rtol=0, atol=0)
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, stats[n], rtol=0, atol=0)
    model.eval()
    assert_exact(small, model, x.shape, batches=(1, 4))


# -- what it leaves dense ----------------------------------------------------------------------

class DynamicWeight(nn.Module):
    """The second conv's weight depends on the input: it cannot be folded or compacted."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(6, 8, 3, 3))
        self.c3 = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        w = self.w * torch.sigmoid(x.mean())
        return self.c3(F.conv2d(y, w, padding=1))


class UnknownOp(nn.Module):
    """A channel roll between two convs: an op fxsparse does not understand."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.roll(torch.relu(self.c1(x)), 1, dims=1))


def dense_case(cls):
    torch.manual_seed(0)
    model = cls().eval()
    prune.ln_structured(model.c1, "weight", amount=0.5, n=1, dim=0)
    shape = (2, 3, 6, 6)
    small = fxsparse.compact(model, fresh(shape, 0))
    assert_exact(small, model, shape)
    return {c.name: c for g in small.report.graphs for c in g.convs}, small


def test_dynamic_weight_stays_dense_and_reported():
    rows, small = dense_case(DynamicWeight)
    dynamic = [c for c in rows.values() if c.lowering == "unchanged"]
    assert len(dynamic) == 1 and "dynamic weight" in dynamic[0].reason, str(small.report)
    assert rows["c1"].kept_out_channels == 4


def test_unknown_op_keeps_every_channel_it_reads():
    """torch.roll moves channels: c1's removed channels are restored (their constants) before
    it, and c2 reads all 8 of them."""
    rows, small = dense_case(UnknownOp)
    assert rows["c1"].kept_out_channels == 4
    assert rows["c2"].kept_in_channels == rows["c2"].in_channels == 8, str(small.report)
    assert any("put back" in n and "roll" in n for n in small.report.graphs[0].notes), str(small.report)


class GraphBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.c(x)
        torch._dynamo.graph_break()
        return y + 1


class WritesState(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.c(x)


def test_graph_break_is_an_error_naming_it():
    with pytest.raises(CompactError, match="graph break"):
        fxsparse.compact(GraphBreak().eval(), torch.randn(2, 3, 4, 4))


def test_state_writes_are_an_error_and_state_is_restored():
    model = WritesState().eval()
    with pytest.raises(CompactError, match=r"writes model state \(calls\)"):
        fxsparse.compact(model, torch.randn(2, 3, 4, 4))
    assert float(model.calls) == 0.0


class TupleOut(nn.Module):
    """Returns a dict holding the logits, a parameter-only tensor and the input itself."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 1)
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        return {"y": y, "pair": (self.scale * 2, x)}


def test_structured_outputs_with_constant_and_input():
    torch.manual_seed(0)
    model = TupleOut().eval()
    prune.ln_structured(model.c1, "weight", amount=0.5, n=1, dim=0)
    small = fxsparse.compact(model, torch.randn(2, 3, 5, 5))
    x = fresh((3, 3, 5, 5), 70)
    got, want = small(x), model(x)
    torch.testing.assert_close(got["y"], want["y"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["pair"][0], want["pair"][0], rtol=0, atol=0)
    assert got["pair"][1] is x or torch.equal(got["pair"][1], x)


def test_bad_arguments():
    model, x = small_resnet(0.5)
    with pytest.raises(ValueError, match="unknown option"):
        fxsparse.compact(model, x, lowring="aten")
    with pytest.raises(ValueError, match="lowering"):
        fxsparse.compact(model, x, lowering="fast")
    with pytest.raises(ValueError, match="example inputs"):
        fxsparse.compact(model)
    with pytest.raises(TypeError, match="nn.Module"):
        fxsparse.compact(lambda t: t, x)
    with pytest.raises(ValueError, match="must be tensors"):
        fxsparse.compact(model, x, 3)


class BatchSpecific(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.c(x)
        return y.reshape(2, -1) if x.shape[0] == 2 else y.flatten(1)


def test_batch_specialisation_is_an_error_unless_static():
    model = BatchSpecific().eval()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(CompactError, match="dynamic_batch=False"):
        fxsparse.compact(model, x)
    small = fxsparse.compact(model, x, dynamic_batch=False)
    torch.testing.assert_close(small(x), model(x))


def test_static_batch():
    model, x = small_resnet(0.5)
    small = fxsparse.compact(model, x, dynamic_batch=False)
    assert_exact(small, model, x.shape, batches=(2,))


# -- the ecosystem's tools -------------------------------------------------------------------

def batch_dim():
    return ({0: torch.export.Dim("batch", min=1, max=1024)},)


def test_torch_export_dynamic_batch():
    model, x = small_resnet(0.5)
    small = fxsparse.compact(model, x)
    ep = torch.export.export(small, (x,), dynamic_shapes=batch_dim(), strict=True)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("fxsparse" in t for t in targets), targets
    assert_exact(ep.module(), model, x.shape, batches=(1, 3, 7))


def test_save_and_load(tmp_path):
    model, x = small_resnet(0.5)
    small = fxsparse.compact(model, x)
    # 1. the whole module (pickled code: needs torch and fxsparse, not the model's code)
    torch.save(small, tmp_path / "small.pt")
    loaded = torch.load(tmp_path / "small.pt", weights_only=False)
    assert_exact(loaded, model, x.shape)
    assert str(loaded.report) == str(small.report)
    # 2. state only, into a module of the same structure
    torch.save(small.state_dict(), tmp_path / "state.pt")
    again = fxsparse.compact(model, x)
    with torch.no_grad():
        for t in again.state_dict().values():
            t.zero_()
    again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert_exact(again, model, x.shape)


def test_pt2_loads_without_model_code_or_fxsparse(tmp_path):
    """torch.export.save's .pt2 loads in a process where neither fxsparse nor the model's
    class can be imported."""
    model, x = small_resnet(0.5)
    small = fxsparse.compact(model, x)
    path = tmp_path / "small.pt2"
    torch.export.save(torch.export.export(small, (x,), dynamic_shapes=batch_dim()), path)
    y = fresh(x.shape, 7, 3)
    torch.save(y, tmp_path / "y.pt")
    script = (
        "import sys; sys.modules['fxsparse'] = None\n"  # any import of fxsparse fails
        "import torch\n"
        f"m = torch.export.load({str(path)!r}).module()\n"
        f"torch.save(m(torch.load({str(tmp_path / 'y.pt')!r})), {str(tmp_path / 'out.pt')!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        want = model.eval()(y)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want, rtol=0, atol=1e-5 * max(1.0, float(want.abs().max())))


def test_onnx_runtime_matches_masked_model(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model, shape = M.build("resnet")
    M.group_prune(model, M.tiny_resnet_groups(model))
    x = fresh(shape, 0)
    small = fxsparse.compact(model, x)
    path = tmp_path / "small.onnx"
    torch.onnx.export(small, (x,), dynamo=True, dynamic_shapes=batch_dim()).save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for b, seed in ((1, 31), (6, 32)):
        y = fresh(shape, seed, b)
        got = torch.from_numpy(sess.run(None, {name: y.numpy()})[0])
        with torch.no_grad():
            want = model(y)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * max(1.0, float(want.abs().max())))
    assert os.path.getsize(path) < 4 * compact_size(small) + 200_000


@pytest.mark.slow
def test_aot_inductor_cpu(tmp_path):
    """aoti_compile_and_package / aoti_load_package on the CPU (a C++ compile: tens of seconds)."""
    model, x = small_resnet(0.5)
    small = fxsparse.compact(model, x)
    ep = torch.export.export(small, (x,), dynamic_shapes=batch_dim())
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "small.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    assert_exact(runner, model, x.shape, batches=(1, 5), tol=1e-4)


@pytest.mark.slow
def test_aot_inductor_packages_the_fused_op(tmp_path):
    """Lowering "triton" keeps torch.ops.fxsparse.conv2d (here its CPU reference): torch.export
    carries it (fake kernel) and AOTInductor calls it through its proxy executor."""
    model, x = small_resnet(0.5)
    small = fxsparse.compact(model, x, lowering="triton")
    assert "torch.ops.fxsparse.conv2d" in small.code
    ep = torch.export.export(small, (x,), dynamic_shapes=batch_dim())
    assert any("fxsparse.conv2d" in str(n.target) for n in ep.graph.nodes)
    assert_exact(ep.module(), model, x.shape, batches=(1, 4))
    runner = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "fused.pt2")))
    assert_exact(runner, model, x.shape, batches=(1, 4), tol=1e-4)


# -- the benchmark's test-sized form -------------------------------------------------------------

@pytest.mark.slow
def test_export_benchmark_quick(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "export.py"), "--quick",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["err"] <= 1e-4 for r in rows), rows
    assert all(r["size_ratio"] <= 0.55 and r["size_ratio_baked"] <= 0.55 for r in rows), rows
    assert proc.stdout.strip().splitlines()[-1].startswith("|"), "the table must be printed last"


# -- CUDA -------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("lowering", ["triton", "auto"])
def test_cuda_half_with_fused_op(tmp_path, lowering):
    model, x = small_resnet(0.5, width=16)
    model = model.cuda().half().to(memory_format=torch.channels_last)
    x = x.cuda().half().to(memory_format=torch.channels_last)
    small = fxsparse.compact(model, x, lowering=lowering)
    if lowering == "triton":
        assert "fxsparse.conv2d" in small.code
    for b in (1, 3):
        y = fresh((2, 3, 16, 16), 40 + b, b).cuda().half().to(memory_format=torch.channels_last)
        with torch.no_grad():
            want = model(y).float()
            got = small(y).float()
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * max(1.0, float(want.abs().max())))
    ep = torch.export.export(small, (x,), dynamic_shapes=batch_dim())
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "small.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    y = fresh((2, 3, 16, 16), 50, 4).cuda().half().to(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(y).float()
    torch.testing.assert_close(runner(y).float(), want, rtol=0, atol=2e-2 * max(1.0, float(want.abs().max())))
