"""End-to-end: `torch.compile(model, backend="fxsparse")` equals eager, and the report
says what was compacted. Models and masks come from tests/models.py."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune

import models as M
from models import assert_matches, compile_model, conv_rows, fresh_dynamo, report  # noqa: F401

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def compiled_eval(name, mask, tmp_path, **options):
    model, shape = M.build(name)
    M.MASKS[mask](model) if mask else None
    c = compile_model(model, tmp_path, **options)
    with torch.no_grad():
        c(torch.randn(shape))  # compile input; comparisons use fresh ones
    return model, c, shape


# -- the zoo x every structured mask kind x both lowerings ---------------------------------

@pytest.mark.parametrize("lowering", ["aten", "triton"])
@pytest.mark.parametrize("mask", list(M.MASKS))
@pytest.mark.parametrize("name", list(M.ZOO))
def test_zoo_matches_eager_and_compacts(name, mask, lowering, tmp_path):
    model, c, shape = compiled_eval(name, mask, tmp_path, lowering=lowering)
    with torch.no_grad():
        assert_matches(c, model, shape)
    (g,) = report(tmp_path)["graphs"]
    assert g["mode"] == "inference" and g["lowering"] == lowering
    # Structured masks remove work, unless a 1x1 conv writing its residual add's wider layout
    # computes zero rows instead of scattering (dense_out), which the report says per conv.
    traded = any("zero filter rows" in n for r in g["convs"] for n in r["notes"])
    assert g["macs_after"] < g["macs_before"] or traded, "structured masks must remove work"
    rewritten = [r for r in g["convs"] if r["lowering"] != "unchanged"]
    assert rewritten
    for r in rewritten:
        # depthwise convs always go to aten; everything else uses the requested lowering
        assert r["lowering"] == (lowering if r["groups"] == 1 else "aten"), r
        assert r["kept_out_channels"] <= r["out_channels"] and r["kept_in_channels"] <= r["in_channels"]
        assert r["reason"] is None
    for r in g["convs"]:
        if r["lowering"] == "unchanged":
            assert r["reason"], r  # never unchanged without saying why


@pytest.mark.slow
@pytest.mark.parametrize("lowering", ["aten", "triton"])
def test_end_to_end_with_inductor(lowering, tmp_path):
    model, c, shape = compiled_eval("resnet", "ln0", tmp_path, lowering=lowering, inductor=True)
    with torch.no_grad():
        assert_matches(c, model, shape)
    assert report(tmp_path)["graphs"][0]["macs_after"] < report(tmp_path)["graphs"][0]["macs_before"]


def test_inductor_sees_parameters_and_constants_as_static(tmp_path, monkeypatch):
    """AOTAutograd takes static inputs (never copied into CUDA-graph memory) from dynamo's
    metadata: the rewritten graph must carry it, so that every parameter, buffer and folded
    constant is static and only the model's input is not."""
    aot = pytest.importorskip("torch._functorch.aot_autograd")
    real = getattr(aot, "_try_get_metadata_from_dynamo", None)
    if real is None:
        pytest.skip("this torch reads static inputs elsewhere")
    seen = []

    def spy(mod, param_keys, full_args_num, *rest):
        out = real(mod, param_keys, full_args_num, *rest)
        seen.append((full_args_num, sorted(out[1])))
        return out

    monkeypatch.setattr(aot, "_try_get_metadata_from_dynamo", spy)
    model, c, shape = compiled_eval("resnet", "ln0", tmp_path, lowering="aten", inductor=True)
    with torch.no_grad():
        assert_matches(c, model, shape)
    (n_args, static), = seen
    assert n_args > 10 and len(static) == n_args - 1  # all but the image


def test_mask_kinds_reach_the_report(tmp_path):
    """dim-0 masks remove output channels, dim-1 masks input channels; the source is the mask."""
    model, c, shape = compiled_eval("chain", "ln0", tmp_path / "out", lowering="aten", propagate=False)
    rows = conv_rows(tmp_path / "out")
    assert rows["0.0"]["kept_out_channels"] == 4 and rows["0.0"]["out_channels"] == 8
    assert rows["0.0"]["source"] == "mask" and "output channels" in rows["0.0"]["sparsity"]
    torch._dynamo.reset()
    model, c, shape = compiled_eval("chain", "ln1", tmp_path / "in", lowering="aten", propagate=False)
    rows = conv_rows(tmp_path / "in")
    assert rows["1.0"]["kept_in_channels"] < rows["1.0"]["in_channels"] == 8
    assert "input channels" in rows["1.0"]["sparsity"]


def test_global_unstructured_is_not_compacted(tmp_path):
    model, shape = M.build("chain")
    M.global_unstructured(model)
    c = compile_model(model, tmp_path, lowering="aten")
    with torch.no_grad():
        assert_matches(c, model, shape)
    (g,) = report(tmp_path)["graphs"]
    assert g["macs_after"] == g["macs_before"]
    for r in g["convs"]:
        assert r["kept_out_channels"] == r["out_channels"] and r["kept_in_channels"] == r["in_channels"]
        assert any("element-wise" in n for n in r["notes"]) or r["reason"], r


# -- exactness traps ---------------------------------------------------------------------

@pytest.mark.parametrize("lowering", ["aten", "triton"])
def test_pruned_channel_keeps_its_bias(lowering, tmp_path):
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=True).eval()
    with torch.no_grad():
        conv.bias.copy_(torch.arange(1.0, 7.0))
    prune.custom_from_mask(conv, "weight", M.channel_mask(conv.weight, out=[1, 4]))  # bias not pruned
    c = compile_model(conv, tmp_path, lowering=lowering)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        c(torch.randn(2, 3, 5, 5))
        y = c(x)
        torch.testing.assert_close(y, conv(x))
    assert torch.all(y[:, 1] == 2.0) and torch.all(y[:, 4] == 5.0)
    (r,) = report(tmp_path)["graphs"][0]["convs"]
    assert r["kept_out_channels"] == 4


@pytest.mark.parametrize("train", [False, True])
def test_non_binary_mask_values(train, tmp_path):
    """A mask of 0.5s and 0s: rows of zeros are removed, the 0.5 scaling is kept."""
    def make():
        model, shape = M.build("chain")
        for _, m in M.convs(model):
            mask = torch.full_like(m.weight, 0.5)
            mask[0] = 0
            mask[1, :, 0, 0] = 2.0
            prune.custom_from_mask(m, "weight", mask)
        return model, shape

    model, shape = make()
    if not train:
        c = compile_model(model, tmp_path, lowering="aten")
        with torch.no_grad():
            assert_matches(c, model, shape)
    else:
        model.train()
        c = compile_model(model, tmp_path, lowering="aten")
        x = torch.randn(shape)
        ref = make()[0].train()  # pruned modules hold non-leaf weights: no deepcopy
        torch.testing.assert_close(c(x), ref(x), rtol=1e-5, atol=1e-5)
    rows = report(tmp_path)["graphs"][0]["convs"]
    assert all(r["kept_out_channels"] == r["out_channels"] - 1 for r in rows), rows


def test_depthwise_and_grouped(tmp_path):
    """Depthwise: in and out channels are tied; a grouped (groups=4) conv is compacted group by
    group into an aten grouped conv."""
    model, shape = M.build("mobilenet")
    dw = model.conv[1][0]
    prune.custom_from_mask(dw, "weight", M.channel_mask(dw.weight, out=[0, 5, 6, 20]))
    expand = model.conv[0][0]
    prune.custom_from_mask(expand, "weight", M.channel_mask(expand.weight, out=[3, 5, 11]))
    c = compile_model(model, tmp_path, lowering="triton")
    with torch.no_grad():
        c(torch.randn(shape))
        assert_matches(c, model, shape)
    rows = conv_rows(tmp_path)
    assert rows["conv.1.0"]["groups"] == 24 and rows["conv.1.0"]["lowering"] == "aten"
    # its own zero filters go; channels whose input is a constant are still computed
    assert rows["conv.1.0"]["kept_out_channels"] == 20
    # the expand conv drops its own {3, 5, 11} and the channels the depthwise never reads {0, 6, 20}
    assert rows["conv.0.0"]["kept_out_channels"] == 18
    torch._dynamo.reset()
    model, shape = M.build("grouped")
    M.ln_structured(model)
    c = compile_model(model, tmp_path / "g", lowering="aten")
    with torch.no_grad():
        c(torch.randn(shape))
        assert_matches(c, model, shape)
    g = conv_rows(tmp_path / "g")["g"]
    assert g["lowering"] == "aten" and g["groups"] == 4 and g["macs_after"] < g["macs_before"], g


def test_residual_branches_pruned_differently(tmp_path):
    model, shape = M.build("basic")
    prune.custom_from_mask(model.conv2, "weight", M.channel_mask(model.conv2.weight, out=[0, 1, 7]))
    ds = model.downsample[0]
    prune.custom_from_mask(ds, "weight", M.channel_mask(ds.weight, out=[1, 2, 3, 7]))
    for lowering in ("aten", "triton"):
        torch._dynamo.reset()
        c = compile_model(model, tmp_path / lowering, lowering=lowering)
        with torch.no_grad():
            c(torch.randn(shape))
            assert_matches(c, model, shape)
        rows = conv_rows(tmp_path / lowering)
        assert rows["conv2"]["kept_out_channels"] == 13 and rows["downsample.0"]["kept_out_channels"] == 12


def test_masks_on_both_sides_of_concat(tmp_path):
    model, shape = M.build("dense")
    a, b, head = model.a[0], model.b[0], model.head
    prune.custom_from_mask(a, "weight", M.channel_mask(a.weight, out=[0, 4]))
    prune.custom_from_mask(b, "weight", M.channel_mask(b.weight, out=[2], inp=[1, 7]))
    prune.custom_from_mask(head, "weight", M.channel_mask(head.weight, inp=[0, 6, 13, 17]))
    c = compile_model(model, tmp_path, lowering="triton")
    with torch.no_grad():
        c(torch.randn(shape))
        assert_matches(c, model, shape)
    rows = conv_rows(tmp_path)
    # b: its own channel 2, and 1 and 5 which the head never reads (concat offsets 13, 17)
    assert rows["a.0"]["kept_out_channels"] == 4 and rows["b.0"]["kept_out_channels"] == 3
    assert rows["head"]["kept_in_channels"] < 18


@pytest.mark.parametrize("lowering", ["aten", "triton"])
def test_bn_shift_through_padded_conv_border(lowering, tmp_path):
    """A pruned channel is the BN shift (non-zero), which a zero-padded 3x3 conv sees only
    inside the image: the fold must be a bias map, exact at the borders."""
    model = nn.Sequential(M.ConvBNReLU(3, 8), nn.Conv2d(8, 4, 3, 1, 1, bias=False))
    M.randomize_bn(model).eval()
    with torch.no_grad():
        model[0][1].bias.fill_(2.0)  # pruned channels become relu(2 - mean*scale) > 0
        model[0][1].running_mean.zero_()
    c0 = model[0][0]
    prune.custom_from_mask(c0, "weight", M.channel_mask(c0.weight, out=[0, 3, 5]))
    c = compile_model(model, tmp_path, lowering=lowering)
    with torch.no_grad():
        c(torch.randn(2, 3, 7, 7))
        assert_matches(c, model, (2, 3, 7, 7))
        x = torch.randn(1, 3, 7, 7)
        border = (c(x) - model(x))[..., 0, :].abs().max()
    assert border < 1e-5
    after = M.after_graph(tmp_path)
    assert "bias_map" in after
    assert conv_rows(tmp_path)["1"]["kept_in_channels"] == 5


def test_pruned_channel_through_global_pool_into_linear(tmp_path):
    model, shape = M.build("poolhead")
    with torch.no_grad():
        model.f[1].bias.fill_(1.5)  # the pruned channels' constant is non-zero after ReLU
    conv = model.f[0]
    prune.custom_from_mask(conv, "weight", M.channel_mask(conv.weight, out=[1, 2, 9]))
    c = compile_model(model, tmp_path, lowering="aten")
    with torch.no_grad():
        c(torch.randn(shape))
        assert_matches(c, model, shape)
    after = M.after_graph(tmp_path)
    assert "linear_weight" in after and "f32[5, 9]" in after  # the head reads the 9 kept features


# -- things left unchanged, with a reason --------------------------------------------------

UNSUPPORTED = {
    "conv1d": (lambda: nn.Conv1d(4, 8, 3, padding=1), (2, 4, 10), "conv1d"),
    "conv3d": (lambda: nn.Conv3d(4, 8, 3, padding=1), (2, 4, 5, 5, 5), "conv3d"),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(8, 4, 3, padding=1), (2, 8, 5, 5), "transposed"),
}


@pytest.mark.parametrize("kind", list(UNSUPPORTED))
def test_unsupported_convs_left_unchanged_with_reason(kind, tmp_path):
    make, shape, words = UNSUPPORTED[kind]
    torch.manual_seed(0)
    model = make().eval()
    prune.ln_structured(model, "weight", amount=0.5, n=2, dim=0)
    c = compile_model(model, tmp_path, lowering="triton")
    with torch.no_grad():
        c(torch.randn(shape))
        assert_matches(c, model, shape)
    (r,) = report(tmp_path)["graphs"][0]["convs"]
    assert r["lowering"] == "unchanged" and words in r["reason"] and "not rewritten" in r["reason"]


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_padding_modes(mode, tmp_path):
    """nn.Conv2d pads with F.pad(mode) and then convolves with padding 0: the conv may be
    compacted (its input is padded explicitly), and must stay exact."""
    model = nn.Sequential(M.ConvBNReLU(3, 8), nn.Conv2d(8, 6, 3, padding=1, padding_mode=mode))
    M.randomize_bn(model).eval()
    prune.custom_from_mask(model[0][0], "weight", M.channel_mask(model[0][0].weight, out=[2, 5]))
    prune.custom_from_mask(model[1], "weight", M.channel_mask(model[1].weight, out=[0]))
    c = compile_model(model, tmp_path, lowering="triton")
    with torch.no_grad():
        c(torch.randn(2, 3, 6, 6))
        assert_matches(c, model, (2, 3, 6, 6))
    rows = conv_rows(tmp_path)
    r = rows["1"]
    assert r["lowering"] != "unchanged" or r["reason"]
    assert r["kept_out_channels"] in (5, 6)


def test_complex_weights_unchanged(tmp_path):
    model = nn.Conv2d(3, 4, 3, padding=1, dtype=torch.complex64).eval()
    with torch.no_grad():
        model.weight[1] = 0
    c = compile_model(model, tmp_path, lowering="aten")
    with torch.no_grad():
        c(torch.randn(2, 3, 5, 5, dtype=torch.complex64))
        assert_matches(c, model, (2, 3, 5, 5), dtype=torch.complex64)
    (r,) = report(tmp_path)["graphs"][0]["convs"]
    assert r["lowering"] == "unchanged" and "complex64" in r["reason"]


class DynamicWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        with torch.no_grad():
            self.w[2] = 0

    def forward(self, x):
        return F.conv2d(x, self.w * x.mean(), padding=1)


def test_dynamic_weight_unchanged(tmp_path):
    model = DynamicWeight().eval()
    c = compile_model(model, tmp_path, lowering="triton")
    with torch.no_grad():
        c(torch.randn(2, 3, 5, 5))
        assert_matches(c, model, (2, 3, 5, 5))
    (r,) = report(tmp_path)["graphs"][0]["convs"]
    assert r["lowering"] == "unchanged" and "dynamic weight" in r["reason"]


# -- training ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,mask", [("resnet", "ln0"), ("chain", "custom_in"), ("bias", "stacked")])
def test_training_step_matches_eager(name, mask, tmp_path):
    def make():  # pruned modules hold non-leaf weights, which deepcopy refuses
        model, shape = M.build(name)
        M.MASKS[mask](model)
        return model.train(), shape

    model, shape = make()
    ref = make()[0]
    c = compile_model(model, tmp_path)
    opt_c = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    x = torch.randn(shape)
    for step in range(2):
        loss_c, loss_r = c(x).square().mean(), ref(x).square().mean()
        torch.testing.assert_close(loss_c, loss_r, rtol=1e-5, atol=1e-6)
        opt_c.zero_grad(), opt_r.zero_grad()
        loss_c.backward(), loss_r.backward()
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert p.grad is not None, n
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
        for mod in model.modules():
            if hasattr(mod, "weight_mask"):
                assert torch.all(mod.weight_orig.grad[mod.weight_mask == 0] == 0)
        opt_c.step(), opt_r.step()
    g = report(tmp_path)["graphs"][0]
    assert g["mode"] == "training"
    assert any(r["kept_out_channels"] < r["out_channels"] or r["kept_in_channels"] < r["in_channels"]
               for r in g["convs"])


@pytest.mark.slow
@pytest.mark.parametrize("name,mask", [("resnet", "custom_out"), ("chain", "ln0")])
def test_training_step_through_inductor_matches_eager(name, mask, tmp_path):
    """The compacted training graph through Inductor, forward and backward. (Regression: two
    earlier forms of the channel scatter met Inductor bugs: wrong values from index_copy into
    an expanded 0-d base, then wrong gradients / heap corruption from cat + gather.)"""
    def make():
        model, shape = M.build(name)
        M.MASKS[mask](model)
        return model.train(), shape

    model, shape = make()
    ref = make()[0]
    c = compile_model(model, tmp_path, inductor=True)
    x = torch.randn(shape)
    out, expected = c(x), ref(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-3, msg=n)
    assert any(r["kept_out_channels"] < r["out_channels"] for r in report(tmp_path)["graphs"][0]["convs"])


# -- shapes ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_batch_size_change(tmp_path):
    model, c, shape = compiled_eval("resnet", "custom_out", tmp_path, lowering="triton")
    with torch.no_grad():
        for n in (1, 3, 4):
            assert_matches(c, model, (n,) + shape[1:], seeds=(n,))


@pytest.mark.parametrize("lowering", ["aten", "triton"])
def test_dynamic_shapes(lowering, tmp_path):
    """One graph serves every batch and spatial size (7x7 at compile: not the channel count 8,
    which duck sizing would tie the spatial dims to), still compacted."""
    model, shape = M.build("basic")
    M.custom_out(model)
    c = compile_model(model, tmp_path, lowering=lowering, dynamic=True)
    with torch.no_grad():
        c(torch.randn(2, 8, 7, 7))
        for n, h, w in ((3, 6, 6), (4, 10, 10), (2, 9, 9)):  # square: duck sizing ties H and W
            assert_matches(c, model, (n, 8, h, w), seeds=(n,))
    graphs = report(tmp_path)["graphs"]
    assert len(graphs) == 1, "a size change must not recompile with dynamic=True"
    assert {r["name"]: r["kept_out_channels"] for r in graphs[0]["convs"]}["conv1"] == 10


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet", "dense", "bottleneck"])
def test_dynamic_shapes_zoo_through_inductor(name, tmp_path):
    """dynamic=True on the other block kinds, Inductor included. (Regression: dynamo passes
    ReLU6's bounds as symbolic inputs there, which capture tried to read as numbers.)"""
    model, shape = M.build(name)
    M.MASKS["ln0"](model)
    c = compile_model(model, tmp_path, dynamic=True, inductor=True)
    with torch.no_grad():
        for n, hw in ((shape[0], shape[2]), (3, shape[2] + 2), (1, shape[2] + 1)):
            assert_matches(c, model, (n, shape[1], hw, hw), seeds=(n,))
    # (batch 1 is a specialised size: dynamo may compile it apart)
    assert all(any(r["kept_out_channels"] < r["out_channels"] for r in g["convs"])
               for g in report(tmp_path)["graphs"])


# -- bad inputs --------------------------------------------------------------------------------

def test_unknown_option_lists_allowed(tmp_path):
    model = nn.Conv2d(3, 4, 3)
    c = torch.compile(model, backend="fxsparse", options={"lowerin": "aten"})
    with pytest.raises(Exception, match=r"unknown option.*lowerin.*allowed.*lowering"):
        c(torch.randn(1, 3, 5, 5))


@pytest.mark.parametrize("name,value,words", [
    ("lowering", "cuda", r"lowering='cuda'.*\['auto', 'triton', 'aten'\]"),
    ("propagate", "yes", r"propagate must be True or False"),
    ("cudagraphs", 1, r"cudagraphs must be True, False or None"),
    ("dump_dir", 3, r"dump_dir must be a path"),
])
def test_bad_option_value(name, value, words):
    from fxsparse.options import Options

    with pytest.raises(ValueError, match=words):
        Options.parse({name: value})
    c = torch.compile(nn.Conv2d(3, 4, 3), backend="fxsparse", options={name: value})
    with pytest.raises(Exception, match=words):
        c(torch.randn(1, 3, 5, 5))


def test_nan_mask_names_the_module(tmp_path):
    model, shape = M.build("chain")
    conv = model[1][0]
    mask = M.channel_mask(conv.weight, out=[0])
    mask[3, 0, 0, 0] = float("nan")
    prune.custom_from_mask(conv, "weight", mask)
    c = compile_model(model, tmp_path)
    with torch.no_grad(), pytest.raises(Exception, match=r"mask of 1\.0 contains NaN"):
        c(torch.randn(shape))


def test_mask_of_wrong_shape_is_an_error(tmp_path):
    model, shape = M.build("chain")
    conv = model[0][0]
    parametrize.register_parametrization(conv, "weight", M.MaskParam(M.channel_mask(conv.weight, out=[1])))
    c = compile_model(model, tmp_path)
    with torch.no_grad():
        c(torch.randn(shape))
        conv.parametrizations.weight[0].mask = torch.ones(8, 3, 3, 2)
        with pytest.raises(Exception, match=r"size|shape"):
            c(torch.randn(shape))


# -- the real Triton kernel, under the interpreter (slow) -------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name,mask", [("bottleneck", "custom_out"), ("dense", "custom_in")])
def test_compiled_model_runs_the_triton_kernel_on_cpu(name, mask, tmp_path, monkeypatch):
    pytest.importorskip("fxsparse.kernels.conv2d", reason="the Triton conv kernel module is not written yet")
    from fxsparse.ops import triton_interpreter_on, triton_on_cpu

    if not triton_interpreter_on():
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported (tests/conftest.py sets it without a GPU)")
    import fxsparse.kernels.conv2d as K

    calls = []
    real = K.conv2d_triton
    monkeypatch.setattr(K, "conv2d_triton", lambda *a: calls.append(1) or real(*a))
    model, shape = M.build(name)
    M.MASKS[mask](model)
    c = compile_model(model, tmp_path, lowering="triton")
    with torch.no_grad(), triton_on_cpu():
        c(torch.randn(shape))
        assert_matches(c, model, shape, seeds=(5,), rtol=1e-4, atol=1e-4)
    assert calls, "the kernel did not run"


def test_constant_outputs_go_back_in_their_places():
    from fxsparse.backend import with_constant_outputs

    a, b, c = torch.ones(1), torch.zeros(1), torch.full((1,), 2.0)
    run = with_constant_outputs(lambda x: (x, x + 1, x + 2), {0: a, 2: b, 5: c}, 6)
    for _ in range(2):
        out = run(torch.tensor([10.0]))
        assert [float(t) for t in out] == [1.0, 10.0, 0.0, 11.0, 12.0, 2.0]
        assert out[0] is a and out[2] is b and out[5] is c
    out.append(None)  # each call returns a list of its own
    assert len(run(torch.tensor([0.0]))) == 6


@pytest.mark.parametrize("which", ["pruned", "unpruned"])
def test_weight_data_swapped_between_calls_is_used(which):
    """`module.weight.data = t` keeps the Parameter object and its version counter: the guard
    sees the new storage and recompacts (a folded weight would otherwise go stale)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    prune.ln_structured(m[0], "weight", 0.5, 2, 0)
    compiled = torch.compile(m, backend="fxsparse")
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x))
        target = m[0].weight_orig if which == "pruned" else m[2].weight
        target.data = torch.randn_like(target)
        torch.testing.assert_close(compiled(x), m(x))
