"""Stale weights: every way a folded value can change after compilation, and the result
must follow eager. Dynamo's own guards never look at values (research.md), so these
are the backend's runtime guard (fxsparse/runtime/guards.py) at work."""
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
import torch.nn.utils.prune as prune

import fxsparse
import models as M
from fxsparse.backend import fxsparse_backend
from fxsparse.runtime import GuardedGraph
from models import assert_matches, fresh_dynamo  # noqa: F401

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class Spy:
    """The fxsparse backend, keeping every GuardedGraph it returns (one per dynamo compile)."""

    def __init__(self, **options):
        self.options = {"inductor": False, **options}
        self.graphs = []

    def __call__(self, gm, example_inputs):
        g = fxsparse_backend(gm, example_inputs, options=self.options)
        self.graphs.append(g)
        return g

    @property
    def recompactions(self) -> int:
        return sum(g.recompactions for g in self.graphs)


def setup(name="chain", mask="custom_out", **options):
    model, shape = M.build(name)
    M.MASKS[mask](model)
    spy = Spy(**options)
    c = torch.compile(model, backend=spy, fullgraph=True)
    with torch.no_grad():
        c(torch.randn(shape))
        assert_matches(c, model, shape)
    assert len(spy.graphs) == 1 and isinstance(spy.graphs[0], GuardedGraph)
    assert spy.recompactions == 0, "unchanged values must not recompact"
    return model, c, shape, spy


def check_follows(model, c, shape, spy, recompactions=1, frames=1):
    with torch.no_grad():
        assert_matches(c, model, shape, seeds=(21, 22, 23))
    assert len(spy.graphs) == frames
    assert spy.recompactions == recompactions
    with torch.no_grad():  # and settles: the next calls reuse the rebuilt graph
        assert_matches(c, model, shape, seeds=(24,))
    assert spy.recompactions == recompactions


LOWERINGS = pytest.mark.parametrize("lowering", ["aten", "triton"])


@LOWERINGS
def test_unchanged_values_do_not_rebuild(lowering):
    model, c, shape, spy = setup(lowering=lowering)
    with torch.no_grad():
        for s in range(5):
            assert_matches(c, model, shape, seeds=(s,))
    assert spy.recompactions == 0 and len(spy.graphs) == 1


def test_unchanged_values_do_not_recompile_counter():
    """The same, counted by dynamo's own CompileCounterWithBackend around the registered backend."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model, shape = M.build("chain")
    M.custom_out(model)
    cnt = CompileCounterWithBackend("fxsparse")
    c = torch.compile(model, backend=cnt)
    with torch.no_grad():
        for s in range(4):
            assert_matches(c, model, shape, seeds=(s,))
    assert cnt.frame_count == 1


@LOWERINGS
def test_new_prune_on_another_channel(lowering):
    model, c, shape, spy = setup(lowering=lowering)
    conv = model[1][0]
    prune.custom_from_mask(conv, "weight", M.channel_mask(conv.weight, out=[2, 9]))  # a new mask buffer
    # the module now holds a PruningContainer: dynamo recompiles, nothing stale is reused
    check_follows(model, c, shape, spy, recompactions=0, frames=2)


@LOWERINGS
def test_mask_buffer_edited_in_place(lowering):
    model, c, shape, spy = setup(lowering=lowering)
    conv = model[0][0]
    with torch.no_grad():
        conv.weight_mask[0] = 1  # un-prune channel 0 (its weight_orig is non-zero)
        conv.weight_mask[5] = 0
    check_follows(model, c, shape, spy)


def test_parametrize_mask_edited_in_place():
    model, c, shape, spy = setup(mask="parametrize")
    p = model[1][0].parametrizations.weight[0]
    with torch.no_grad():
        p.mask.fill_(1)
        p.mask[3:7] = 0
    check_follows(model, c, shape, spy)


@LOWERINGS
def test_weight_orig_add_(lowering):
    model, c, shape, spy = setup(lowering=lowering)
    with torch.no_grad():
        model[2][0].weight_orig.add_(0.5)
    check_follows(model, c, shape, spy)


def test_optimizer_step():
    model, c, shape, spy = setup()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    check_follows(model, c, shape, spy)


def test_load_state_dict_of_different_values():
    model, c, shape, spy = setup()
    other, _ = M.build("chain", seed=5)
    M.custom_in(other)  # other masks too: input channels instead of output channels
    model.load_state_dict(other.state_dict())
    check_follows(model, c, shape, spy)


def test_rebinding_a_new_parameter():
    model, c, shape, spy = setup()
    conv = model[1][0]
    conv.weight_orig = nn.Parameter(torch.randn_like(conv.weight_orig))
    # dynamo may recompile on the new object or hand it to the same graph: either way, fresh values
    with torch.no_grad():
        assert_matches(c, model, shape, seeds=(31, 32))
    assert spy.recompactions + len(spy.graphs) - 1 >= 1


def test_batchnorm_running_stats_change():
    model, c, shape, spy = setup()
    with torch.no_grad():
        model[0][1].running_mean.add_(1.0)
        model[1][1].running_var.mul_(3.0)
    check_follows(model, c, shape, spy)


def test_bn_stats_updated_by_a_train_mode_forward():
    """Eager train-mode forwards update running stats in place without bumping their version;
    the guard watches the module's num_batches_tracked instead, so the eval graph sees them."""
    model, c, shape, spy = setup()
    model.train()
    with torch.no_grad():
        model(torch.randn(shape) * 3 + 1)
    model.eval()
    check_follows(model, c, shape, spy)


def test_value_zeros_become_non_zero():
    """Exactly-zero channels (no mask) are read from the values: writing them must recompact."""
    model, c, shape, spy = setup(mask="zeros")
    with torch.no_grad():
        model[0][0].weight[0].normal_()
    check_follows(model, c, shape, spy)


def test_recompaction_still_compacts(tmp_path):
    """Dynamo drops its placeholder metadata after compiling; a rebuild at call time must still
    know which inputs are parameters (regression: every conv came back 'dynamic weight')."""
    model, c, shape, spy = setup(dump_dir=str(tmp_path))
    with torch.no_grad():
        model[1][0].weight_orig.mul_(2)
    check_follows(model, c, shape, spy)
    rows = M.conv_rows(tmp_path)
    assert all(r["lowering"] == "aten" for r in rows.values()), rows
    assert rows["1.0"]["kept_out_channels"] < rows["1.0"]["out_channels"]


def test_training_graph_follows_weight_updates():
    """Training graphs fold nothing: optimizer steps must not trigger rebuilds, masks do."""
    model, shape = M.build("chain")
    M.custom_out(model)
    model.train()
    spy = Spy()
    c = torch.compile(model, backend=spy)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        loss = c(torch.randn(shape)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert spy.recompactions == 0
    conv = model[0][0]
    with torch.no_grad():
        conv.weight_mask[1] = 0
    x = torch.randn(shape)
    out = c(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert spy.recompactions >= 1


def test_bn_without_a_step_counter_is_named_in_the_report(tmp_path):
    """A BatchNorm whose num_batches_tracked is None updates its statistics with no versioned
    write at all: the guard cannot see a train-mode forward, and the report says which."""
    model, shape = M.build("chain")
    M.MASKS["custom_out"](model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    bns[0].register_buffer("num_batches_tracked", None)
    c = M.compile_model(model, tmp_path)
    with torch.no_grad():
        assert_matches(c, model, shape)
    (g,) = M.report(tmp_path)["graphs"]
    (note,) = [n for n in g["notes"] if "num_batches_tracked" in n]
    names = [name for name, m in model.named_modules() if m is bns[0]]
    assert f"{names[0]}.running_mean" in note and f"{names[0]}.running_var" in note
    assert all(f"{name}.running" not in note for name, m in model.named_modules() if m in bns[1:])


@pytest.mark.slow
@pytest.mark.parametrize("rebind", ["folded conv weight", "head weight"])
def test_rebound_parameter_through_inductor(rebind, tmp_path):
    """Parameters are static inputs of Inductor's graph (keep_dynamo_metadata): a new Parameter
    object in place of a folded weight (the guard recompacts) or of one the graph reads as
    it is (Inductor reads the new tensor) is used by the next call."""
    model, shape = M.build("resnet")
    M.MASKS["custom_out"](model)
    c = M.compile_model(model, tmp_path, inductor=True)
    with torch.no_grad():
        assert_matches(c, model, shape)
        if rebind == "folded conv weight":
            conv = model.layer1[0].conv1
            conv.weight_orig = nn.Parameter(-2.0 * conv.weight_orig)
        else:
            model.fc.weight = nn.Parameter(3.0 * model.fc.weight)
        assert_matches(c, model, shape, seeds=(31, 32))


# -- under Inductor's freezing: parameters reach the backend as graph attributes, not inputs --

def _change(kind, model):
    with torch.no_grad():
        if kind == "weight_orig":
            model.layer1[0].conv1.weight_orig.mul_(2.0)
        elif kind == "mask":
            model.layer2[0].conv1.weight_mask[3].zero_()
        elif kind == "bn_stats":
            model.layer2[1].bn1.running_mean.add_(0.5)
        elif kind == "linear":  # the head's bias: a plain parameter, frozen by Inductor
            model.fc.bias.add_(1.0)
        elif kind == "bn_train_forward":  # updates running stats without a version bump
            model.train()
            model(torch.randn(4, 3, 8, 8))
            model.eval()
        elif kind == "rebind":
            conv = model.layer2[1].conv2
            conv.weight_orig = nn.Parameter(torch.randn_like(conv.weight_orig))
        elif kind == "data_swap":  # same object, same version, new storage
            conv = model.layer1[0].conv1
            conv.weight_orig.data = torch.randn_like(conv.weight_orig)


@pytest.mark.parametrize("kind", ["weight_orig", "mask", "bn_stats", "bn_train_forward", "linear", "rebind",
                                  "data_swap"])
@pytest.mark.slow
def test_freezing_follows_every_frozen_tensor(kind):
    """With `torch._inductor.config.freezing` and grad off, dynamo hands the backend its
    parameters and buffers as graph attributes (no per-call input marshalling: what latency
    serving wants) and Inductor bakes them into the compiled code. Inductor alone then keeps
    returning the old weights after an in-place change; fxsparse's guard watches every
    attribute tensor and recompiles, so the result follows eager whatever changed."""
    model, shape = M.build("resnet")
    M.group_prune(model, M.tiny_resnet_groups(model))
    spy = Spy(inductor=True)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        c = torch.compile(model, backend=spy, fullgraph=True)
        c(torch.randn(shape))
        (g,) = spy.graphs
        assert len(g.guard.held) > 20, "parameters should arrive as attributes under freezing"
        assert_matches(c, model, shape)
        _change(kind, model)
        assert_matches(c, model, shape, seeds=(41, 42))
    assert spy.recompactions + len(spy.graphs) - 1 >= 1


def test_two_instances_of_one_class_take_turns_without_recompacting():
    """Two models of one class share dynamo's graph: each keeps its own build, so calling them in
    turn compacts each once; a change to one model's weight still rebuilds that one only."""
    spy = Spy()
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, shape = M.build("chain")
        M.MASKS["custom_out"](model)
        models.append((model, torch.compile(model, backend=spy, fullgraph=True)))
    with torch.no_grad():
        for s in range(3):
            for model, c in models:
                assert_matches(c, model, shape, seeds=(s,))
    assert len(spy.graphs) == 1 and spy.recompactions == 1, "one build per model, then turns"
    (a, ca), (b, cb) = models
    with torch.no_grad():
        next(m for m in a.modules() if isinstance(m, nn.Conv2d)).weight_orig.mul_(2)
        for s in (7, 8):
            assert_matches(ca, a, shape, seeds=(s,))
            assert_matches(cb, b, shape, seeds=(s,))
    assert spy.recompactions == 2, "the changed model rebuilt once; the other kept its build"
    assert fxsparse.refresh(b) == 1
    with torch.no_grad():
        assert_matches(cb, b, shape, seeds=(9,))
        assert_matches(ca, a, shape, seeds=(9,))
    assert spy.recompactions == 4, "refresh drops every kept build of the graph"
