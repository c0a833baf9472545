"""The backend on the GPU: Triton lowering, fused chains, CUDA graphs, guards (marked gpu)."""
import copy

import pytest
import torch
from torch.nn.utils import prune

import fxsparse
from fxsparse.demo import SmallResNet, randomize_batchnorm

pytestmark = pytest.mark.gpu


def _masked_model(width=32, keep=0.5, seed=0):
    torch.manual_seed(seed)
    m = SmallResNet(width)
    randomize_batchnorm(m, seed)
    convs = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)][1:]
    for c in convs:
        prune.ln_structured(c, "weight", 1 - keep, n=1, dim=0)
    return m.eval().cuda().half().to(memory_format=torch.channels_last)


def _x(batch=4, size=32):
    return torch.randn(batch, 3, size, size, device="cuda", dtype=torch.half).to(memory_format=torch.channels_last)


def _rel(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.parametrize("cudagraphs", [False, True])
def test_compiled_equals_eager(cudagraphs):
    torch._dynamo.reset()
    m = _masked_model()
    c = torch.compile(m, backend="fxsparse", options={"cudagraphs": cudagraphs})
    with torch.no_grad():
        c(_x())
        for _ in range(3):
            x = _x()
            assert _rel(c(x), m(x)) < 2e-3
    g = fxsparse.report.current_report(None).graphs[-1]
    assert g.lowering == "auto"  # per chain, measured (fxsparse/lowering/choose.py)
    rewritten = [c for c in g.convs if c.lowering != "unchanged" and c.groups == 1]
    assert rewritten and all(c.choice.startswith("measured: ") for c in rewritten), rewritten


def test_weight_change_in_place_is_picked_up():
    torch._dynamo.reset()
    m = _masked_model()
    c = torch.compile(m, backend="fxsparse", options={"cudagraphs": True})
    x = _x()
    with torch.no_grad():
        c(x)
        m.layers[1].conv1.weight_orig.mul_(-1.5)
        m.layers[2].bn1.running_mean.add_(0.3)
        assert _rel(c(x), m(x)) < 2e-3


@pytest.mark.parametrize("rebind", ["folded conv weight", "head weight"])
def test_a_parameter_rebound_under_cuda_graphs_is_picked_up(rebind):
    """Parameters are static inputs of the CUDA graph (never copied, read at their address). A
    new Parameter object in place of one (here a folded conv weight, which the value guard
    watches, and the classifier's weight, which the graph reads as it is) must be used by
    the next call, as under Inductor's reduce-overhead."""
    torch._dynamo.reset()
    m = _masked_model()
    c = torch.compile(m, backend="fxsparse", options={"cudagraphs": True})
    x = _x()
    with torch.no_grad():
        for _ in range(3):
            c(x)
        if rebind == "folded conv weight":
            conv = m.layers[1].conv1
            conv.weight_orig = torch.nn.Parameter(-2.0 * conv.weight_orig)
        else:
            m.fc.weight = torch.nn.Parameter(3.0 * m.fc.weight)
        for _ in range(2):
            assert _rel(c(x), m(x)) < 2e-3


def test_new_batch_size_works():
    torch._dynamo.reset()
    m = _masked_model()
    c = torch.compile(m, backend="fxsparse")
    with torch.no_grad():
        for batch in (4, 1, 7):
            x = _x(batch)
            assert _rel(c(x), m(x)) < 2e-3


def test_outputs_of_one_call_survive_the_next_without_cudagraphs():
    torch._dynamo.reset()
    m = _masked_model()
    c = torch.compile(m, backend="fxsparse", options={"cudagraphs": False})
    with torch.no_grad():
        x1, x2 = _x(), _x()
        y1 = c(x1).clone()
        y1_live = c(x1)
        c(x2)
        assert torch.equal(y1_live, y1)


def test_unpruned_model_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(1)
    m = SmallResNet(32)
    randomize_batchnorm(m)
    m = m.eval().cuda().half().to(memory_format=torch.channels_last)
    c = torch.compile(copy.deepcopy(m), backend="fxsparse")
    with torch.no_grad():
        x = _x()
        assert _rel(c(x), m(x)) < 2e-3


def test_training_step_on_cuda_matches_eager():
    """Masks in training: compaction inside the graph, Inductor on CUDA, gradients as eager's."""
    torch._dynamo.reset()

    def make():
        torch.manual_seed(0)
        m = SmallResNet(16)
        for conv in [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)][1:]:
            prune.ln_structured(conv, "weight", 0.5, n=1, dim=0)
        return m.cuda().train()

    model, ref = make(), make()
    c = torch.compile(model, backend="fxsparse")
    x = torch.randn(4, 3, 32, 32, device="cuda")
    out, expected = c(x), ref(x)
    assert _rel(out, expected) < 5e-3  # fp32 convs run as TF32 on both sides
    out.square().sum().backward()
    expected.square().sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert _rel(p.grad, q.grad) < 2e-2, n


def test_freezing_under_cuda_graphs_follows_in_place_changes():
    """Under Inductor's freezing dynamo hands parameters over as graph attributes (the
    latency-serving setup): still equal to eager, and an in-place change of a folded weight
    and of a BatchNorm statistic, both frozen constants, is picked up."""
    torch._dynamo.reset()
    m = _masked_model()
    x = _x(batch=1)
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        c = torch.compile(m, backend="fxsparse")
        c(x)
        assert _rel(c(x), m(x)) < 2e-3
        m.layers[1].conv1.weight_orig.mul_(-1.5)
        m.layers[2].bn1.running_mean.add_(0.3)
        assert _rel(c(x), m(x)) < 2e-3
