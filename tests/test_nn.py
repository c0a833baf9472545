"""fxsparse.nn: TritonConv2d parity with a pruned nn.Conv2d, the L1 masks, the seed helpers,
and fxsparse.sparsify on small residual / concat models compiled with backend="fxsparse"."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import prune

import fxsparse
from fxsparse.nn import (TritonConv2d, benchmark_module, block_mask, channel_mask, compare_modules,
                         copy_module, finetune, input_channel_mask, keep_count, masked_weights_zero)

KINDS = {
    "channel": lambda m, r: m.set_channel_sparsity(r),
    "block4": lambda m, r: m.set_block_sparsity(r, block_size=4),
    "block5": lambda m, r: m.set_block_sparsity(r, block_size=5),  # 5 does not divide 12
    "input": lambda m, r: m.set_input_channel_sparsity(r),
}
RATIOS = [1.0, 0.85, 0.5, 0.35, 0.0]  # 0.85 * 12 and 0.35 * 12 are not integers; 0.0 -> keep 1


def _pruned_reference(conv: nn.Conv2d, mask: torch.Tensor) -> nn.Conv2d:
    ref = copy.deepcopy(conv)
    prune.custom_from_mask(ref, "weight", mask.clone())
    return ref


def _conv(cin=10, cout=12, **kw):
    torch.manual_seed(0)
    kw.setdefault("padding", 1)
    return nn.Conv2d(cin, cout, 3, **kw)


# -- the keep-count rule and the masks --------------------------------------------------

def test_keep_count_rule():
    assert keep_count(0.5, 12) == 6
    assert keep_count(0.85, 12) == 10  # 10.2 -> 10
    assert keep_count(0.35, 12) == 4  # 4.2 -> 4
    assert keep_count(0.125, 12) == 2  # 1.5 -> 2 (half up)
    assert keep_count(0.0, 12) == 1
    assert keep_count(1.0, 12) == 12
    with pytest.raises(ValueError):
        keep_count(1.5, 12)


def test_channel_mask_keeps_largest_filters():
    w = torch.zeros(6, 2, 3, 3)
    for c, s in enumerate([5, 1, 4, 2, 6, 3]):
        w[c] = s
    m = channel_mask(w, 0.5)
    kept = m.flatten(1).any(1).nonzero().flatten().tolist()
    assert kept == [0, 2, 4]
    assert bool((m[kept] == 1).all())


def test_block_mask_partial_last_group():
    w = torch.ones(10, 2, 1, 1)
    w[8:] = 100.0  # the partial last group (channels 8, 9) has the largest sum
    m = block_mask(w, 0.34, block_size=4)  # 3 groups -> keep 1
    assert m.flatten(1).any(1).nonzero().flatten().tolist() == [8, 9]
    m = block_mask(w, 0.67, block_size=4)  # keep 2: the partial group and one full group
    assert m.flatten(1).any(1).sum() == 6


def test_input_mask_keeps_largest_columns():
    w = torch.ones(4, 5, 3, 3)
    w[:, 3] = 10
    w[:, 1] = 5
    m = input_channel_mask(w, 0.4)  # keep 2 of 5
    assert m.transpose(0, 1).flatten(1).any(1).nonzero().flatten().tolist() == [1, 3]


# -- module parity ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("ratio", RATIOS)
def test_triton_conv_matches_pruned_conv(kind, ratio):
    base = _conv()
    tri = TritonConv2d.from_conv(base)
    KINDS[kind](tri, ratio)
    mask = tri.weight_mask
    units = {"channel": 12, "input": 10, "block4": 3, "block5": 3}[kind]
    assert bool((mask == 1).all()) == (keep_count(ratio, units) == units)
    ref = _pruned_reference(base, mask)
    x = torch.randn(2, 10, 9, 7)
    out, expect = tri(x), ref(x)
    assert out.shape == expect.shape and out.is_contiguous()
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    # the channels it dropped really are dropped: kept counts follow the rule
    if kind == "channel":
        assert tri.kept_out_channels == keep_count(ratio, 12)
    if kind == "input":
        assert tri.kept_in_channels == keep_count(ratio, 10)
    if kind.startswith("block"):
        bs = int(kind[-1])
        groups = -(-12 // bs)
        assert tri.kept_out_channels <= keep_count(ratio, groups) * bs
    # eval / no_grad path (cached compacted weight) gives the same
    tri.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(tri(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(stride=2, padding=1, dilation=1, bias=False),
                                dict(stride=1, padding=2, dilation=2, bias=True)])
def test_triton_conv_strides_dilation_no_bias(kw):
    base = _conv(**kw)
    tri = TritonConv2d.from_conv(base).set_channel_sparsity(0.5).set_input_channel_sparsity(0.6, accumulate=True)
    assert tri.kept_out_channels == 6 and tri.kept_in_channels == 6
    ref = _pruned_reference(base, tri.weight_mask)
    x = torch.randn(2, 10, 11, 11)
    torch.testing.assert_close(tri(x), ref(x), rtol=1e-5, atol=1e-5)


def test_triton_conv_channels_last_input_gives_channels_last():
    tri = TritonConv2d.from_conv(_conv()).set_channel_sparsity(0.5)
    x = torch.randn(2, 10, 8, 8).contiguous(memory_format=torch.channels_last)
    y = tri(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, _pruned_reference(_conv(), tri.weight_mask)(x), rtol=1e-5, atol=1e-5)


def test_cache_is_never_stale():
    tri = TritonConv2d.from_conv(_conv()).set_channel_sparsity(0.5).eval()
    x = torch.randn(2, 10, 8, 8)
    with torch.no_grad():
        y1 = tri(x)
        cached = tri._weight_cache[1][0]
        assert tri(x) is not None and tri._weight_cache[1][0] is cached  # second call: cache hit
        tri.weight_orig.mul_(2)  # an in-place update (as an optimizer step)
        y2 = tri(x)
        b = tri.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(y2 - b, 2 * (y1 - b), rtol=1e-5, atol=1e-5)
        tri.set_channel_sparsity(0.25)  # new mask: new indices
        assert tri.kept_out_channels == 3
        ref = _pruned_reference(_conv(), tri.weight_mask)
        ref.weight_orig.mul_(2)
        torch.testing.assert_close(tri(x), ref(x), rtol=1e-5, atol=1e-5)


def test_fallback_configs_match_pruned_conv():
    for kw, reason in [(dict(groups=2), "groups"), (dict(padding_mode="reflect"), "padding_mode"),
                       (dict(padding="same"), "padding")]:
        base = _conv(**kw)
        tri = TritonConv2d.from_conv(base).set_channel_sparsity(0.5)
        assert reason in tri.fallback_reason
        x = torch.randn(2, 10, 8, 8)
        torch.testing.assert_close(tri(x), _pruned_reference(base, tri.weight_mask)(x))
    assert TritonConv2d.from_conv(_conv()).fallback_reason is None


def test_from_conv_keeps_an_existing_mask():
    base = _conv()
    mask = channel_mask(base.weight, 0.5)
    prune.custom_from_mask(base, "weight", mask)
    tri = TritonConv2d.from_conv(base)
    assert torch.equal(tri.weight_mask, mask)
    x = torch.randn(1, 10, 6, 6)
    torch.testing.assert_close(tri(x), base(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["channel", "input", "block4"])
def test_training_gradients_equal_pruned_conv(kind):
    base = _conv()
    tri = TritonConv2d.from_conv(base)
    KINDS[kind](tri, 0.5)
    ref = _pruned_reference(base, tri.weight_mask)
    tri.train()
    ref.train()
    x = torch.randn(2, 10, 8, 8)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    g = torch.randn(2, 12, 8, 8)
    (tri(xs[0]) * g).sum().backward()
    (ref(xs[1]) * g).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tri.weight_orig.grad, ref.weight_orig.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tri.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)
    assert bool((tri.weight_orig.grad[tri.weight_mask == 0] == 0).all())
    assert tri.weight_orig.grad.abs().sum() > 0


def test_triton_conv_under_torch_compile():
    base = _conv()
    tri = TritonConv2d.from_conv(base).set_channel_sparsity(0.5).eval()
    ref = _pruned_reference(base, tri.weight_mask).eval()
    x = torch.randn(2, 10, 8, 8)
    with torch.no_grad():
        for backend in ("fxsparse", "eager"):
            torch.testing.assert_close(torch.compile(tri, backend=backend)(x), ref(x), rtol=1e-5, atol=1e-5)


def test_copy_module_after_training_forward():
    tri = TritonConv2d.from_conv(_conv()).set_channel_sparsity(0.5).train()
    tri(torch.randn(1, 10, 5, 5)).sum().backward()
    with pytest.raises(RuntimeError):
        copy.deepcopy(tri)  # torch's own limitation on pruned modules
    c = copy_module(tri)
    assert torch.equal(c.weight_mask, tri.weight_mask)
    x = torch.randn(1, 10, 5, 5)
    torch.testing.assert_close(c(x), tri(x))


# -- helpers --------------------------------------------------------------------------------

def test_compare_modules_values():
    a = nn.Identity()

    class Shift(nn.Module):
        def forward(self, x):
            return x + torch.tensor([0.0, 0.0, 0.0, 4.0])

    x = torch.tensor([[3.0, 0.0, 0.0, 4.0]])
    r = compare_modules(a, Shift(), x)
    assert r["mae"] == pytest.approx(1.0)
    assert r["max"] == pytest.approx(4.0)
    assert r["rel_l2"] == pytest.approx(4.0 / 5.0)
    z = compare_modules(a, a, x)
    assert z == {"mae": 0.0, "max": 0.0, "rel_l2": 0.0}


def test_benchmark_module_cpu_restores_mode():
    m = TritonConv2d.from_conv(_conv()).set_channel_sparsity(0.5).train()
    ms = benchmark_module(m, torch.randn(1, 10, 8, 8), iters=3, warmup=1)
    assert ms > 0
    assert m.training


def test_finetune_lowers_loss_and_keeps_masks(capsys):
    torch.manual_seed(0)
    teacher = _conv(cin=4, cout=8)
    student = TritonConv2d.from_conv(teacher).set_input_channel_sparsity(0.5)
    mask = student.weight_mask.clone()
    # correlated inputs: the kept input channels can learn to stand in for the dropped ones
    mix = torch.randn(4, 4)

    def inputs(step):
        z = torch.randn(8, 1, 6, 6).expand(8, 4, 6, 6) + 0.1 * torch.randn(8, 4, 6, 6)
        return torch.einsum("nchw,cd->ndhw", z, mix)

    losses = finetune(student, teacher, steps=40, lr=1e-2, input_fn=inputs, progress=True)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert torch.equal(student.weight_mask, mask)
    assert bool((student.weight[mask == 0] == 0).all())
    assert masked_weights_zero(student)
    assert not student.training
    out = capsys.readouterr().out
    assert out.count("[finetune") == 6  # every 40 // 5 steps, and the last


def test_masked_weights_zero_detects_a_leak():
    m = TritonConv2d.from_conv(_conv()).set_channel_sparsity(0.5)
    assert masked_weights_zero(m)
    m.weight = m.weight_orig.detach().clone()  # what a broken training loop could leave behind
    assert not masked_weights_zero(m)


# -- sparsify on small models, compiled with the fxsparse backend ----------------------------

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Down(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return F.relu(self.short(x) + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.layer2 = Down(8, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 1)
        self.bn_a = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(8, 10, 3, padding=1)
        self.mix = nn.Conv2d(16, 12, 3, padding=1)
        self.bn_mix = nn.BatchNorm2d(12)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.bn_a(self.a(x))), torch.sigmoid(self.b(x))], 1)
        y = F.relu(self.bn_mix(self.mix(y)))
        return F.max_pool2d(self.head(y), 2)


def randomize_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def _masks(model):
    return {n: m.weight_mask.clone() for n, m in model.named_modules() if hasattr(m, "weight_mask")}


def _check_compiled_equals_eager(model, shape):
    model.eval()
    compiled = torch.compile(model, backend="fxsparse")
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(*shape)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["channel", "block", "input"])
def test_sparsify_per_conv(kind):
    torch.manual_seed(0)
    model = randomize_bn(TinyResNet())
    fxsparse.sparsify(model, 0.5, kind=kind, skip=("layer2.short.0",))
    masks = _masks(model)
    assert "stem" not in masks and "layer2.short.0" not in masks
    assert len(masks) == 6
    for name, mk in masks.items():
        if kind == "input":
            cols = mk.transpose(0, 1).flatten(1).any(1)
            assert cols.sum() == keep_count(0.5, mk.shape[1]), name
        else:
            rows = mk.flatten(1).any(1)
            assert rows.sum() < mk.shape[0], name
    _check_compiled_equals_eager(model, (2, 3, 16, 16))


def test_sparsify_groups_residual_model():
    torch.manual_seed(0)
    model = randomize_bn(TinyResNet())
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16)
    fxsparse.sparsify(model, 0.5, example_inputs=(x,))
    masks = _masks(model)
    # the stem writes the layer1 residual stream: that whole group is kept
    assert "stem" not in masks
    for blk in ("layer1.0", "layer1.1"):
        m1, m2 = masks[blk + ".conv1"], masks[blk + ".conv2"]
        pruned_mid = ~m1.flatten(1).any(1)
        assert pruned_mid.sum() == 4
        # consumer columns masked exactly where the producer rows are
        assert torch.equal(~m2.transpose(0, 1).flatten(1).any(1), pruned_mid)
        assert bool(m2.flatten(1).any(1).all())  # conv2 writes the stream: not pruned
    # layer2's stream (conv2 + shortcut, added) reaches the classifier -> prunable; both
    # producers pruned on the same channels
    rows_c2 = masks["layer2.conv2"].flatten(1).any(1)
    rows_sc = masks["layer2.short.0"].flatten(1).any(1)
    assert torch.equal(rows_c2, rows_sc) and rows_c2.sum() == 8
    _check_compiled_equals_eager(model, (3, 3, 16, 16))
    # the masked model is a real pruning (it differs from the dense one)
    dense.eval()
    model.eval()
    with torch.no_grad():
        assert (dense(x) - model(x)).abs().max() > 1e-3


def test_sparsify_groups_concat_model():
    torch.manual_seed(0)
    model = randomize_bn(ConcatNet())
    x = torch.randn(2, 3, 12, 12)
    fxsparse.sparsify(model, 0.5, example_inputs=(x,))
    masks = _masks(model)
    assert "stem" not in masks
    assert bool(masks["head"].flatten(1).any(1).all())  # head's outputs reach the graph output
    mix_cols_pruned = ~masks["mix"].transpose(0, 1).flatten(1).any(1)
    a_rows_pruned = ~masks["a"].flatten(1).any(1)
    b_rows_pruned = ~masks["b"].flatten(1).any(1)
    assert a_rows_pruned.sum() == 3 and b_rows_pruned.sum() == 5
    assert torch.equal(mix_cols_pruned, torch.cat([a_rows_pruned, b_rows_pruned]))  # cat offsets
    head_cols_pruned = ~masks["head"].transpose(0, 1).flatten(1).any(1)
    assert torch.equal(head_cols_pruned, ~masks["mix"].flatten(1).any(1))
    _check_compiled_equals_eager(model, (2, 3, 12, 12))


def test_sparsify_with_triton_convs_compiles_and_matches():
    torch.manual_seed(0)
    model = randomize_bn(ConcatNet())
    for name in ("a", "b", "mix"):
        setattr(model, name, TritonConv2d.from_conv(getattr(model, name)))
    reference = copy.deepcopy(model)
    fxsparse.sparsify(model, 0.4, example_inputs=(torch.randn(1, 3, 8, 8),))
    assert isinstance(model.mix, TritonConv2d) and model.mix.kept_out_channels == keep_count(0.4, 12)
    _check_compiled_equals_eager(model, (2, 3, 8, 8))
    # eager TritonConv2d model == the same masks on plain nn.Conv2d
    for name, mask in _masks(model).items():
        conv = getattr(reference, name)
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
        plain.load_state_dict({"weight": conv.weight, "bias": conv.bias})
        prune.custom_from_mask(plain, "weight", mask)
        setattr(reference, name, plain)
    assert set(_masks(model)) == {"a", "b", "mix", "head"}
    model.eval()
    reference.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["channel", "block4", "input"])
def test_triton_conv_cuda_fp16(kind):
    base = nn.Conv2d(64, 128, 3, padding=1).cuda().half().to(memory_format=torch.channels_last)
    tri = TritonConv2d.from_conv(base)
    KINDS[kind](tri, 0.35)
    ref = _pruned_reference(base, tri.weight_mask).float().eval()
    tri.eval()
    x = torch.randn(4, 64, 28, 28, device="cuda").half().contiguous(memory_format=torch.channels_last)
    err = compare_modules(lambda v: ref(v.float()), tri, x)
    assert err["rel_l2"] < 1e-3
    assert benchmark_module(tri, x) > 0
    tri.train()
    xg = x.float().requires_grad_(True)
    tri32 = TritonConv2d.from_conv(tri).float()
    (tri32(xg) ** 2).mean().backward()
    assert bool((tri32.weight_orig.grad[tri32.weight_mask == 0] == 0).all())


@pytest.mark.parametrize("execution", ["fused", "gather", "scatter", "gather+scatter", "dense"])
@pytest.mark.parametrize("bias", [True, False])
def test_execution_plans_agree(execution, bias):
    base = _conv(bias=bias)
    tri = TritonConv2d.from_conv(base).set_channel_sparsity(0.5).set_input_channel_sparsity(0.5, accumulate=True)
    tri.execution = execution
    tri.align_channels = 4  # 6 kept of 12 out, 5 of 10 in -> 8 and 8 computed (zero-weight extras)
    ref = _pruned_reference(base, tri.weight_mask)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 10, 7, 9).contiguous(memory_format=fmt)
        with torch.no_grad():
            y = tri.eval()(x)
            torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
            assert y.is_contiguous(memory_format=fmt)
            assert tri.last_execution == execution
    assert tri.kept_out_channels == 6 and tri.kept_in_channels == 5
    out_idx, in_idx, _, _ = tri._indices()
    assert len(out_idx) == 8 and len(in_idx) == 8
