"""Every family people prune compiles exactly, with the coverage a physical pruning gets.

Three ways to prune each family (tests/zoo_models.py, torchvision's structure at small
widths): (a) the consistent channel groups `channel_groups` finds, half of each group's
channels masked with `prune.custom_from_mask` (as Torch-Pruning picks them); (b) the same
channels zeroed in the values (inference, no masks); (c) `prune.ln_structured` on every
conv on its own (masks disagree across adds and concats). The compiled model equals eager on
fresh inputs every time; with (a) and (b) the convs' MACs after compaction are within 5% of
what a physical pruning of the same channels keeps, counted here from the masks themselves.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

import zoo_models as Z

import fxsparse
from models import compile_model, fresh_dynamo, report  # noqa: F401
from fxsparse.compaction.groups import channel_groups, group_importance, zero_input_channels

FAMILIES = sorted(Z.FAMILIES)


# -- masks --------------------------------------------------------------------------------------

def group_masks(model: nn.Module, shape, keep: float = 0.5) -> dict:
    """{(module path, "weight" | "bias"): mask}: the lowest-importance (1 - keep) of every
    prunable group's channels, on every member that owns weights of them."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    masks: dict = {}
    mods = dict(model.named_modules())

    def mask(path, name):
        key = (path, name)
        if key not in masks:
            masks[key] = torch.ones_like(getattr(mods[path], name))
        return masks[key]

    for g in channel_groups(model, x):
        if not g.prunable or g.size < 2:
            continue
        drop = group_importance(g).argsort()[: g.size - max(1, round(keep * g.size))]
        for m in g.members:
            idx = torch.tensor(m.indices)[drop]
            if m.kind in ("conv_out", "linear_out"):
                mask(m.module, "weight")[idx] = 0
                if getattr(mods[m.module], "bias", None) is not None:
                    mask(m.module, "bias")[idx] = 0
            elif m.kind == "conv_in":
                zero_input_channels(mask(m.module, "weight"), mods[m.module].groups, idx)
            elif m.kind == "linear_in":
                mask(m.module, "weight")[:, idx] = 0
    return masks


def apply_masks(model, masks) -> None:
    mods = dict(model.named_modules())
    for (path, name), m in masks.items():
        prune.custom_from_mask(mods[path], name, m)


def zero_values(model, masks) -> None:
    mods = dict(model.named_modules())
    with torch.no_grad():
        for (path, name), m in masks.items():
            getattr(mods[path], name).mul_(m)


def ln_every_conv(model) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            prune.ln_structured(m, "weight", amount=0.5, n=1, dim=0)


def physical_macs(model, shape) -> int:
    """MACs of the convs (and channel-dim linears) of `model` physically pruned by its zero
    filters: each keeps its non-zero output filters and, per filter, its non-zero input columns."""
    total, hooks = [0], []

    def hook(m, inp, out):
        # a grouped conv keeps as many rows and columns in every group as in its fullest
        nz = (m.weight.detach() != 0).flatten(2).any(2)  # [Cout, Cin / groups]
        g = m.groups if m.groups < m.in_channels else 1  # (depthwise: one input per row)
        rows = nz.any(1).reshape(g, -1)
        kout = g * int(rows.sum(1).max())
        kin = 1 if m.groups == m.in_channels > 1 else int(nz.reshape(g, -1, nz.shape[1]).any(1).sum(1).max())
        total[0] += out.shape[2] * out.shape[3] * kout * kin * m.weight.shape[2] * m.weight.shape[3]

    def linear_hook(m, inp, out):  # on the channels of a channels-last activation: a 1x1 conv
        if inp[0].dim() == 4:
            nz = m.weight.detach() != 0
            total[0] += inp[0].shape[1] * inp[0].shape[2] * int(nz.any(1).sum()) * int(nz.any(0).sum())

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    with torch.no_grad():
        model(torch.zeros(shape))
    for h in hooks:
        h.remove()
    return total[0]


def prune_family(name: str, how: str):
    model, shape = Z.build(name)
    if how == "ln_structured":
        ln_every_conv(model)
    else:
        masks = group_masks(model, shape)
        assert masks, f"{name}: no prunable group"
        (apply_masks if how == "groups" else zero_values)(model, masks)
    return model, shape


def assert_close_outputs(got, want, tol=1e-5):
    got, want = (got, want) if isinstance(want, (list, tuple)) else ([got], [want])
    assert len(got) == len(want)
    for g, w in zip(got, want):
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * scale)


def compile_and_check(model, shape, tmp_path, **options) -> dict:
    with torch.no_grad():
        compiled = compile_model(model, tmp_path, fullgraph=False, **options)
        for seed in (11, 12):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            assert_close_outputs(compiled(x), model(x))
    return report(tmp_path)


# -- the tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["groups", "values", "ln_structured"])
@pytest.mark.parametrize("name", FAMILIES)
def test_family_compiles_exactly(name, how, tmp_path, fresh_dynamo):
    model, shape = prune_family(name, how)
    rep = compile_and_check(model, shape, tmp_path)
    after = sum(g["macs_after"] for g in rep["graphs"])
    ideal = sum(g["macs_ideal"] for g in rep["graphs"])
    before = sum(g["macs_before"] for g in rep["graphs"])
    assert after < before, f"{name}/{how}: nothing removed"
    if how != "ln_structured":
        physical = physical_macs(model, shape)
        notes = [n for g in rep["graphs"] for n in g["notes"]]
        assert after <= 1.05 * physical, f"{name}/{how}: {after} MACs against {physical} physical ({ideal} ideal); {notes}"
        assert after <= 1.05 * ideal


def test_convnext_linears_are_compacted(tmp_path, fresh_dynamo):
    """The pointwise MLP of a ConvNeXt block is a linear over channels in channels-last layout:
    both of its linears run on their kept rows and columns only."""
    from models import after_graph
    model, shape = prune_family("convnext", "groups")
    compile_and_check(model, shape, tmp_path)
    graph = after_graph(tmp_path)
    block = model.features[1][0].block
    fc1, fc2 = block[3], block[5]
    k_hidden = int((fc1.weight != 0).any(1).sum())
    k_dim = int((fc1.weight != 0).any(0).sum())
    assert k_hidden < fc1.out_features and k_dim < fc1.in_features
    assert f'"f32[{k_hidden}, {k_dim}]"' in graph, graph
    assert f'"f32[{int((fc2.weight != 0).any(1).sum())}, {k_hidden}]"' in graph or k_hidden == fc2.in_features


def test_sparsify_masks_channel_layernorms(tmp_path, fresh_dynamo):
    """fxsparse.sparsify masks a channel LayerNorm's weight with its group: the removed channels
    leave it as constants (its bias), so the residual stream after ConvNeXt's stem stays
    compacted (no relayout back to full width), and the compiled model is exact."""
    from models import after_graph
    model, shape = Z.build("convnext")
    fxsparse.sparsify(model, 0.5, example_inputs=(torch.randn(shape),), skip_stem=False)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm) and hasattr(m, "weight_mask")]
    assert norms and all(bool((m.weight_mask == 0).any()) for m in norms)
    compile_and_check(model, shape, tmp_path)
    assert "relayout" not in after_graph(tmp_path)


def test_unknown_op_is_named_in_the_report(tmp_path, fresh_dynamo):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            return self.conv2(torch.cummax(self.conv1(x), 1).values)

    model = Z.randomize(Odd()).eval()
    prune.ln_structured(model.conv1, "weight", amount=0.5, n=1, dim=0)
    rep = compile_and_check(model, (2, 3, 8, 8), tmp_path)
    notes = [n for g in rep["graphs"] for n in g["notes"]]
    assert any("cummax" in n for n in notes), notes


def test_layer_norm_over_kept_channels_matches_layer_norm():
    from fxsparse.compaction.rules import layer_norm_kept

    g = torch.Generator().manual_seed(0)
    c, kept = 12, torch.tensor([0, 2, 3, 7, 11])
    full = torch.randn(2, 5, 5, c, generator=g)
    const = torch.randn(c, dtype=torch.float64, generator=g)
    dropped = torch.ones(c, dtype=torch.bool)
    dropped[kept] = False
    full[..., dropped] = const[dropped].float()
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    want = torch.nn.functional.layer_norm(full, (c,), w, b, 1e-6)[..., kept]
    got = layer_norm_kept(full[..., kept], c, float(const[dropped].sum()), float((const[dropped] ** 2).sum()),
                          w[kept], b[kept], 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- the real torchvision models (where torchvision imports) ---------------------------------------

TORCHVISION = {  # name: (builder arguments, input size)
    "resnet50": ({}, 64), "resnext50_32x4d": ({}, 64), "wide_resnet50_2": ({}, 64),
    "mobilenet_v2": ({}, 64), "mobilenet_v3_large": ({}, 64), "efficientnet_b0": ({}, 64),
    "regnet_y_400mf": ({}, 64), "densenet121": ({}, 64), "vgg11_bn": ({}, 32), "googlenet": ({"aux_logits": False, "init_weights": True}, 64),
    "shufflenet_v2_x1_0": ({}, 64), "convnext_tiny": ({}, 64),
}


def torchvision_model(name: str):
    tv = pytest.importorskip("torchvision")
    if name.startswith("fpn_"):  # a detection backbone with its feature pyramid
        from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
        if name == "fpn_resnet50":
            model = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5)
        else:
            model = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True, trainable_layers=6)
        return Z.randomize(model).eval(), (1, 3, 128, 128)
    kwargs, size = TORCHVISION[name]
    torch.manual_seed(0)
    model = tv.models.get_model(name, weights=None, **kwargs)
    return Z.randomize(model).eval(), (1, 3, size, size)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["groups", "values", "ln_structured"])
@pytest.mark.parametrize("name", sorted(TORCHVISION) + ["fpn_resnet50", "fpn_mobilenet_v3"])
def test_torchvision_family(name, how, tmp_path, fresh_dynamo):
    model, shape = torchvision_model(name)
    if how == "ln_structured":
        ln_every_conv(model)
    else:
        (apply_masks if how == "groups" else zero_values)(model, group_masks(model, shape))
    with torch.no_grad():
        compiled = compile_model(model, tmp_path, fullgraph=False)
        for seed in (11, 12):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
            got, want = compiled(x), model(x)
            if isinstance(want, dict):
                got, want = list(got.values()), list(want.values())
            assert_close_outputs(got, want, tol=1e-4)
    rep = report(tmp_path)
    after = sum(g["macs_after"] for g in rep["graphs"])
    assert after < sum(g["macs_before"] for g in rep["graphs"])
    if how != "ln_structured":
        physical = physical_macs(model, shape)
        notes = [n for g in rep["graphs"] for n in g["notes"]]
        assert after <= 1.05 * physical, f"{name}/{how}: {after} MACs against {physical} physical; {notes}"


class _FrozenBatchNorm(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d (detection backbones): x * scale + shift, both computed
    from buffers and shaped (1, C, 1, 1)."""

    def __init__(self, c):
        super().__init__()
        g = torch.Generator().manual_seed(c)
        for name, v in (("weight", torch.rand(c, generator=g) + 0.5), ("bias", torch.randn(c, generator=g)),
                        ("running_mean", torch.randn(c, generator=g)), ("running_var", torch.rand(c, generator=g) + 0.5)):
            self.register_buffer(name, v)

    def forward(self, x):
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + 1e-5).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift


def test_frozen_batch_norm_and_spatial_mean_carry_channels(tmp_path, fresh_dynamo):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _FrozenBatchNorm(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
                          _FrozenBatchNorm(6))
    head = nn.Linear(6, 3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = model, head

        def forward(self, x):
            return self.head(self.body(x).mean([2, 3]))

    net = Net().eval()
    ln_every_conv(net)
    rep = compile_and_check(net, (2, 3, 8, 8), tmp_path)
    rows = {c["name"]: c for g in rep["graphs"] for c in g["convs"]}
    assert rows["body.3"]["kept_in_channels"] == 4, rows  # the first conv's 4 kept channels only
    assert not [n for g in rep["graphs"] for n in g["notes"] if "full width" in n]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["convnext", "efficientnet", "resnext", "shufflenet_v2", "yolo"])
def test_family_on_the_gpu(name, tmp_path, fresh_dynamo):
    """fp16 channels_last on CUDA with the default options (lowering auto, Inductor, CUDA
    graphs): the compiled model matches eager within fp16 rounding."""
    model, shape = prune_family(name, "groups")
    model = model.cuda().half().to(memory_format=torch.channels_last)
    with torch.no_grad():
        compiled = torch.compile(model, backend="fxsparse", options={"dump_dir": str(tmp_path)})
        for seed in (11, 12):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).cuda().half()
            x = x.to(memory_format=torch.channels_last)
            got, want = compiled(x), model(x)
            got, want = (got, want) if isinstance(want, list) else ([got], [want])
            for g, w in zip(got, want):
                scale = max(1.0, float(w.abs().max()))
                torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2 * scale)
    rep = report(tmp_path)
    assert sum(g["macs_after"] for g in rep["graphs"]) < sum(g["macs_before"] for g in rep["graphs"])


@pytest.mark.slow
def test_zoo_benchmark_quick(tmp_path):
    """benchmarks/zoo.py --quick: two replicas on the CPU, exact, compacted, table printed last."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "zoo.json"
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "zoo.py"), "--quick", "--json", str(out)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("| yolo"), "the table must be printed last"
    rows = json.loads(out.read_text())["rows"]
    assert {r["model"] for r in rows} == {"convnext", "yolo"}
    assert all(r["fx_err"] < 1e-4 and r["macs_kept"] < 0.6 and r["macs_vs_ideal"] <= 1.05 for r in rows), rows


@pytest.mark.parametrize("name", ["densenet", "googlenet", "mobilenet_v2", "convnext", "resnet"])
def test_zoo_masks_name_the_channels_torch_pruning_removes(name):
    """benchmarks/zoo.py masks the channels Torch-Pruning removes: each module's weight with
    the recorded rows and columns deleted is the physically pruned module's weight (group by
    group, Torch-Pruning names positions in the already-shrunk module; a DenseNet conv reading a
    concat is cut once per part)."""
    pytest.importorskip("torch_pruning")
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from zoo import tp_removed

    model, shape = Z.build(name)
    if name == "densenet":  # growth 16: groups of 8 channels to remove (Torch-Pruning rounds to 8)
        model = Z.randomize(Z.DenseNet(growth=16)).eval()
    removed, pruned = tp_removed(model, torch.randn(1, *shape[1:]), 0.5)
    assert any(r["in"] for r in removed.values()), "no conv lost input channels"
    for path, r in removed.items():
        m, p = model.get_submodule(path), pruned.get_submodule(path)
        w = m.weight.detach()
        keep_out = [i for i in range(w.shape[0]) if i not in r["out"]]
        w = w[keep_out]
        if w.dim() > 1 and getattr(m, "groups", 1) == 1:
            w = w[:, [i for i in range(w.shape[1]) if i not in r["in"]]]
        elif w.dim() > 1:  # grouped: Torch-Pruning's own bookkeeping, checked by shape only
            assert w.shape[0] == p.weight.shape[0], path
            continue
        assert torch.equal(w, p.weight.detach()), path
