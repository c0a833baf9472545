"""Reliability: the compiled model computes what eager computes, in values and in state, after
any edit a user makes, for every mask, dtype and shape it accepts (or it says clearly why not)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as prune

import models as M
from models import assert_matches, fresh_dynamo  # noqa: F401

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def compiled(model, **options):
    return torch.compile(model, backend="fxsparse", options={"inductor": False, **options}, fullgraph=True)


def assert_state_equal(model, ref):
    """Every buffer and parameter of `model` equals `ref`'s (values, dtype)."""
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# -- buffers written inside forward ------------------------------------------------------------

class Mutates(nn.Module):
    """A conv net whose forward writes its own buffers in every way dynamo records."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)  # (a pruned channel is exactly 0)
        self.bn = nn.BatchNorm2d(6)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("scale", torch.ones(6))
        self.register_buffer("hist", torch.zeros(6))

    def forward(self, x):
        self.count.add_(1)
        self.scale.mul_(0.5).add_(0.25)  # a chain: the second op writes through the first's result
        self.hist.copy_(self.scale * 2)
        self.hist[1] = 3.0
        self.hist.index_put_((torch.tensor([2]),), torch.tensor([7.0]))
        return self.bn(self.conv(x)) * self.hist.reshape(1, -1, 1, 1)


def pruned(name):
    """(model, input shape): a zoo model or Mutates, with output channels masked by prune."""
    if name == "mutates":
        torch.manual_seed(0)
        model, shape = M.randomize_bn(Mutates()), (2, 3, 6, 6)
        prune.custom_from_mask(model.conv, "weight", M.channel_mask(model.conv.weight, out=[1, 4]))
        return model, shape
    model, shape = M.build(name)
    return M.custom_out(model), shape


def twins(name):
    """Two equal models: one to compile, one to run eagerly."""
    (model, shape), (ref, _) = pruned(name), pruned(name)
    ref.load_state_dict(model.state_dict())
    return model, ref, shape


@pytest.mark.parametrize("mode", ["train_grad", "train_no_grad", "eval"])
@pytest.mark.parametrize("name", ["mutates", "chain"])
def test_buffers_written_in_forward_follow_eager(mode, name):
    model, ref, shape = twins(name)
    model.train(mode != "eval")
    ref.train(mode != "eval")
    c = compiled(model)
    with torch.set_grad_enabled(mode == "train_grad"):
        for s in range(4):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(s))
            torch.testing.assert_close(c(x), ref(x), rtol=1e-5, atol=1e-5)
            assert_state_equal(model, ref)
    if name == "chain" and mode != "eval":
        assert int(model[0][1].num_batches_tracked) == 4


# -- writes through `.data`: invisible to the version guard, seen by refresh() and "content" --------

def _zero_channel_model():
    model, shape = M.build("chain")
    return M.zero_channels(model), shape  # zeros written into plain Parameters (no mask)


def _masked_model():
    model, shape = M.build("chain")
    return M.custom_out(model), shape


# (model builder, the write): each bypasses `_version` (a `.data` view counts its own writes)
DATA_WRITES = {
    "weight.data.mul_": (_zero_channel_model, lambda m: m[1][0].weight.data.mul_(2)),
    "weight.data.copy_": (_zero_channel_model, lambda m: m[1][0].weight.data.copy_(torch.randn_like(m[1][0].weight))),
    "zero channel filled through .data[...]": (_zero_channel_model, lambda m: m[0][0].weight.data[0].fill_(0.5)),
    "bias.data.add_": (_zero_channel_model, lambda m: m[3].bias.data.add_(1)),
    "bn.running_var.data.fill_": (_masked_model, lambda m: m[0][1].running_var.data.fill_(3.0)),
    "bn.weight.data.mul_": (_masked_model, lambda m: m[1][1].weight.data.mul_(-2)),
    "mask.data[:] = 1": (_masked_model, lambda m: m[0][0].weight_mask.data.__setitem__(slice(None), 1)),
    "weight_orig.data.mul_": (_masked_model, lambda m: m[1][0].weight_orig.data.mul_(2)),
    "weight.numpy() written": (_zero_channel_model, lambda m: m[1][0].weight.detach().numpy().__imul__(2)),
    "untyped_storage().copy_": (_zero_channel_model, lambda m: m[1][0].weight.untyped_storage().copy_(
        torch.randn_like(m[1][0].weight).untyped_storage())),
    # aten's train-mode batch_norm writes the running statistics with no version bump, and
    # outside the module nothing bumps num_batches_tracked either
    "F.batch_norm(training=True) on a module's running buffers": (_masked_model, lambda m: F.batch_norm(
        torch.randn(4, 8, 8, 8), m[0][1].running_mean, m[0][1].running_var, training=True, momentum=0.5)),
}


def _compile_and_write(kind, **options):
    build, write = DATA_WRITES[kind]
    model, shape = build()
    c = compiled(model, **options)
    with torch.no_grad():
        assert_matches(c, model, shape)
        write(model)
    return model, c, shape


@pytest.mark.parametrize("kind", list(DATA_WRITES))
def test_data_write_then_refresh_is_fresh(kind):
    import fxsparse

    model, c, shape = _compile_and_write(kind)
    assert fxsparse.refresh(model) == 1  # the one compiled graph reading the model's values
    with torch.no_grad():
        assert_matches(c, model, shape, seeds=(31, 32))


@pytest.mark.parametrize("kind", list(DATA_WRITES))
def test_content_guard_sees_every_data_write(kind):
    model, c, shape = _compile_and_write(kind, guard_values="content")
    with torch.no_grad():
        assert_matches(c, model, shape, seeds=(31, 32))


def test_refresh_targets_the_models_graphs_only():
    import fxsparse
    from fxsparse.backend import fxsparse_backend

    graphs = {}

    def keeping(key):
        def backend(gm, example_inputs):
            graphs[key] = fxsparse_backend(gm, example_inputs, options={"inductor": False})
            return graphs[key]
        return backend

    (a, shape), (b, _) = _zero_channel_model(), _masked_model()
    ca, cb = (torch.compile(m, backend=keeping(k), fullgraph=True) for k, m in (("a", a), ("b", b)))
    with torch.no_grad():
        assert_matches(ca, a, shape)
        assert_matches(cb, b, shape)
        a[1][0].weight.data.mul_(2)
    assert fxsparse.refresh(ca) == 1  # what torch.compile returned names its module
    with torch.no_grad():
        assert_matches(ca, a, shape, seeds=(31,))
        assert_matches(cb, b, shape, seeds=(31,))
    assert (graphs["a"].recompactions, graphs["b"].recompactions) == (1, 0)
    assert fxsparse.refresh(b) == 1
    with torch.no_grad():
        cb(torch.randn(shape))
    assert (graphs["a"].recompactions, graphs["b"].recompactions) == (1, 1)
    assert fxsparse.refresh() >= 2  # every compiled graph still alive
    with pytest.raises(TypeError, match="nn.Module"):
        fxsparse.refresh(a[1][0].weight)


def test_refresh_recompacts_even_without_the_guard():
    import fxsparse

    model, c, shape = _compile_and_write("weight.data.mul_", guard_values=False)
    assert fxsparse.refresh(model) == 1
    with torch.no_grad():
        assert_matches(c, model, shape, seeds=(31,))


@pytest.mark.parametrize("bad", ["contents", 1, 1.0, None, "version"])
def test_guard_values_rejects_anything_else(bad):
    from fxsparse.options import Options

    with pytest.raises(ValueError, match="guard_values must be True, False or \"content\""):
        Options.parse({"guard_values": bad})


# -- masks that remove every channel ------------------------------------------------------------

def _mask_all(model, name, dim):
    conv = dict(model.named_modules())[name]
    prune.custom_from_mask(conv, "weight", torch.zeros_like(conv.weight) if dim is None else
                           M.channel_mask(conv.weight, **{dim: range(conv.weight.shape[0 if dim == "out" else 1])}))


# (zoo model, conv, which channels): every output channel, every input channel, both
ALL_CHANNELS = {
    "chain: every output of the middle conv": ("chain", "1.0", "out"),
    "chain: every input of the middle conv": ("chain", "1.0", "inp"),
    "chain: all of the head conv": ("chain", "3", None),
    "chain: every output of the first conv": ("chain", "0.0", "out"),
    "resnet: every output of a block's conv2 (before the residual add)": ("resnet", "layer1.0.conv2", "out"),
    "mobilenet: every channel of the depthwise conv": ("mobilenet", "conv.1.0", None),
    "mobilenet: every output of the expansion": ("mobilenet", "conv.0.0", "out"),
}


def _all_channels_model(case):
    name, conv, dim = ALL_CHANNELS[case]
    model, shape = M.build(name)
    _mask_all(model, conv, dim)
    return model, shape


@pytest.mark.parametrize("lowering", ["aten", "triton"])
@pytest.mark.parametrize("case", list(ALL_CHANNELS))
def test_every_channel_removed_inference(case, lowering):
    model, shape = _all_channels_model(case)
    c = compiled(model, lowering=lowering)
    with torch.no_grad():
        assert_matches(c, model, shape, seeds=(1, 2))


@pytest.mark.parametrize("case", list(ALL_CHANNELS))
def test_every_channel_removed_training(case):
    (model, shape), (ref, _) = _all_channels_model(case), _all_channels_model(case)
    ref.load_state_dict(model.state_dict())
    model.train(), ref.train()
    c = compiled(model)
    for s in range(2):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(s))
        got, want = c(x), ref(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        got.square().sum().backward()
        want.square().sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    # gradients that cancel to zero (into a train-mode BatchNorm) are rounding noise of the
    # largest gradient of the model in eager, amplified by 1/sqrt(eps) where the BatchNorm's input
    # channel is constant; the compacted graph sums them in another order, or leaves out a term
    # that BatchNorm cancels, and gets zero (in float64 both agree to 1e-12 of the largest)
    atol = max(1e-4, 2e-5 * max(float(p.grad.abs().max()) for p in ref.parameters()))
    for k, p in ref.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
    assert_state_equal(model, ref)


# -- float64: folded in the model's precision ----------------------------------------------------

@pytest.mark.parametrize("mask", ["custom_out", "custom_in", "zeros"])
@pytest.mark.parametrize("name", ["chain", "resnet", "mobilenet", "dense", "bias", "poolhead"])
def test_float64_model_matches_to_fp64_rounding(name, mask):
    model, shape = M.build(name)
    M.MASKS[mask](model)
    model.double()
    c = compiled(model)
    with torch.no_grad():
        assert_matches(c, model, shape, rtol=1e-12, atol=1e-12, dtype=torch.float64)


# -- what users read is true ----------------------------------------------------------------------

def test_after_dump_annotates_compacted_shapes(tmp_path):
    """Every tensor annotation in graph_N.after.py is the shape the rewritten graph computes."""
    import re

    model, shape = M.build("chain")
    M.group_prune(model, [([0, 2, 5], ["0.0"], ["0.1"], ["1.0"]), ([1, 3, 4, 9], ["1.0"], ["1.1"], ["2.0"])])
    c = M.compile_model(model, tmp_path)
    with torch.no_grad():
        assert_matches(c, model, shape)
    text = M.after_graph(tmp_path)
    assert "shapes not annotated" not in text
    assert re.search(r"f32\[2, 5, 8, 8\]", text), "conv 0 keeps 5 of its 8 channels"
    assert re.search(r"f32\[2, 12, 8, 8\]", text), "conv 1 keeps 12 of its 16 channels"
    assert not re.search(r"f32\[2, 8, 8, 8\].*conv", text), "no compacted conv is annotated with its full width"


# -- dynamic shapes --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["chain", "resnet"])
def test_dynamic_shapes_one_graph_exact_and_reported(name, tmp_path):
    from fxsparse.backend import fxsparse_backend

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(fxsparse_backend(gm, example_inputs, {"inductor": False, "dump_dir": str(tmp_path)}))
        return graphs[-1]

    model, shape = M.build(name)
    M.custom_out(model)
    c = torch.compile(model, backend=counting, dynamic=True, fullgraph=True)
    _, ch, h, w = shape
    # (without duck sizing: dynamo would give batch 3 and the 3 input channels one symbol)
    with torch.no_grad(), torch.fx.experimental._config.patch(use_duck_shape=False):
        for size in [(3, ch, h, w), (4, ch, h, w), (3, ch, h + 4, w + 2)]:
            assert_matches(c, model, size, seeds=(sum(size),))
        assert len(graphs) == 1, "one compiled graph serves every batch and spatial size"
        assert_matches(c, model, (1, ch, h, w))  # dynamo specialises size 1: a graph of its own
        assert_matches(c, model, (4, ch, h + 2, w + 4))
        assert all(g.recompactions == 0 for g in graphs), "the guard holds while no value changes"
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.eps = 0.25  # (dynamo passes float attributes as fresh tensors: the guard compares values)
        assert_matches(c, model, (3, ch, h, w), seeds=(5,))
    rows = M.report(tmp_path)["graphs"][-1]["convs"]
    rewritten = [r for r in rows if r["lowering"] != "unchanged"]
    assert rewritten and all(r["macs_before"] > r["macs_after"] > 0 for r in rewritten)
    assert all(any("symbolic" in note for note in r["notes"]) for r in rows)


def test_explain_names_a_left_alone_convs_geometry():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.t = nn.ConvTranspose2d(8, 6, (3, 2), stride=2, groups=2)
            self.d = nn.Conv1d(6, 5, 3, stride=2)

        def forward(self, x):
            y = self.t(torch.relu(self.a(x)))
            return self.d(y.flatten(2))

    model = Mixed().eval()
    prune.custom_from_mask(model.a, "weight", M.channel_mask(model.a.weight, out=[1, 5]))
    report = __import__("fxsparse").explain(model, torch.randn(2, 3, 6, 6))
    rows = {c.name: c for g in report.graphs for c in g.convs}
    t, d = rows["t"], rows["d"]
    assert (t.in_channels, t.out_channels, t.kernel_size, t.stride) == (8, 6, (3, 2), (2, 2))
    assert (d.in_channels, d.out_channels, d.kernel_size, d.stride) == (6, 5, (3,), (2,))
    assert t.lowering == d.lowering == "unchanged"
    assert "transposed conv" in t.reason and "conv1d" in d.reason
    assert "8->6" in str(report) and "3x2" in str(report)


class Padded(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode=mode, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Conv2d(8, 6, 3, padding=2, dilation=2, padding_mode=mode)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("lowering", ["aten", "triton"])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes_rewritten_exactly(mode, lowering, tmp_path):
    model = M.randomize_bn(Padded(mode)).eval()
    prune.custom_from_mask(model.a[0], "weight", M.channel_mask(model.a[0].weight, out=[0, 3, 4]))
    prune.custom_from_mask(model.b, "weight", M.channel_mask(model.b.weight, out=[2], inp=[1]))
    c = M.compile_model(model, tmp_path, lowering=lowering)
    with torch.no_grad():
        assert_matches(c, model, (2, 3, 7, 6))
    rows = M.conv_rows(tmp_path)
    assert rows["a.0"]["lowering"] != "unchanged" and rows["a.0"]["kept_out_channels"] == 5


def test_bad_option_error_names_it_at_the_first_call():
    c = torch.compile(nn.Conv2d(3, 4, 3), backend="fxsparse", options={"lowerin": "aten"})  # no error yet
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=r"unknown option\(s\) \['lowerin'\]; allowed"):
        c(torch.randn(1, 3, 5, 5))


# -- inf and NaN in the input: exact where eager's result is finite ----------------------------------

@pytest.mark.parametrize("name", ["chain", "resnet"])
def test_inf_input_agrees_wherever_eager_is_finite(name):
    model, shape = M.build(name)
    M.custom_out(model)
    c = compiled(model)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    x[0, :, 1, 2] = float("inf")  # the first sample only: the second stays finite throughout
    x[0, 1, 5, 5] = float("-inf")
    with torch.no_grad():
        got, want = c(x), model(x)
    finite = torch.isfinite(want)
    assert finite.any() and not finite.all()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    # pruned channels are not computed (as after physical pruning): no NaN eager would not have
    assert bool((~torch.isfinite(got) <= ~finite).all())


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["weight.data.mul_", "mask.data[:] = 1", "bn.running_var.data.fill_"])
def test_content_guard_on_cuda_under_cuda_graphs(kind):
    build, write = DATA_WRITES[kind]
    model, shape = build()
    model = model.cuda().half()
    c = torch.compile(model, backend="fxsparse", options={"guard_values": "content"})
    x = torch.randn(shape, device="cuda", dtype=torch.half)
    with torch.no_grad():
        for _ in range(3):  # warm: CUDA graphs recorded
            torch.testing.assert_close(c(x), model(x), rtol=2e-2, atol=2e-2)
        write(model)
        torch.testing.assert_close(c(x).clone(), model(x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", ["train_grad", "eval"])
def test_buffers_written_in_forward_through_inductor(mode):
    model, ref, shape = twins("mutates")
    model.train(mode != "eval")
    ref.train(mode != "eval")
    c = torch.compile(model, backend="fxsparse", fullgraph=True)
    with torch.set_grad_enabled(mode == "train_grad"):
        for s in range(3):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(s))
            torch.testing.assert_close(c(x), ref(x), rtol=1e-5, atol=1e-5)
            assert_state_equal(model, ref)


class LayerScaleBlock(nn.Module):
    """ConvNeXt's residual: `result = layer_scale * branch; result += input` (an in-place add on
    the product, which is a new tensor: the layer scale itself is never written)."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        result = self.layer_scale * self.conv(x)
        result += x
        return self.head(result)


def test_inplace_add_on_a_product_leaves_its_parameter_foldable():
    torch.manual_seed(0)
    model = LayerScaleBlock().eval()
    prune.custom_from_mask(model.conv, "weight", M.channel_mask(model.conv.weight, out=[1, 4, 6]))
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        report = fxsparse_explain(model, x)
        out = compiled(model)(x)
    assert not any("not a parameter" in note for g in report.graphs for note in g.notes), report
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    conv = next(r for g in report.graphs for r in g.convs if r.kept_out_channels < r.out_channels)
    assert conv.macs_after < conv.macs_before


def fxsparse_explain(model, x):
    import fxsparse

    return fxsparse.explain(model, x)
