"""torch.compile's `mode` and the CUDA-graph decision (CPU: the CUDA-graph path is never taken)."""
import pytest
import torch
import torch.nn as nn

from fxsparse import backend
from fxsparse.backend import _use_cudagraphs
from fxsparse.options import MODES, Options


def _model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune-no-cudagraphs"])
def test_mode_is_accepted_and_result_equals_eager(mode):
    torch._dynamo.reset()
    m = _model()
    compiled = torch.compile(m, backend="fxsparse", mode=mode)
    with torch.no_grad():
        compiled(torch.randn(2, 3, 8, 8))
        x = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)


def test_unknown_mode_names_the_allowed_ones():
    torch._dynamo.reset()
    compiled = torch.compile(_model(), backend="fxsparse", mode="fastest")
    with pytest.raises(Exception, match=r"mode='fastest' is not one of.*reduce-overhead"):
        with torch.no_grad():
            compiled(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("mode,wants", [("default", None), ("reduce-overhead", True), ("max-autotune", True),
                                        ("max-autotune-no-cudagraphs", None)])
def test_mode_maps_to_cudagraphs(mode, wants):
    opts = Options.parse(None, mode=mode)
    assert opts.mode_wants_cudagraphs() == wants
    assert "triton.cudagraphs" not in opts.inductor_patches()
    assert set(MODES) >= {mode}


def test_cudagraphs_never_chosen_without_a_gpu_even_when_asked():
    cpu_inputs = [torch.randn(2, 3, 8, 8)]
    assert not _use_cudagraphs(Options.parse({"cudagraphs": True}), cpu_inputs, inference=True)
    assert not _use_cudagraphs(Options.parse(None, mode="reduce-overhead"), cpu_inputs, inference=True)
    assert not _use_cudagraphs(Options.parse(None), cpu_inputs, inference=True)


@pytest.mark.parametrize("options,mode", [({"cudagraphs": True}, None), (None, "reduce-overhead")])
def test_training_graphs_are_graphed_when_asked_and_only_then(options, mode, monkeypatch):
    monkeypatch.setattr(backend, "_on_cuda", lambda inputs, floating_only=False: True)
    inputs = [torch.randn(2, 3, 8, 8)]
    assert _use_cudagraphs(Options.parse(options, mode=mode), inputs, inference=False)
    assert _use_cudagraphs(Options.parse(None), inputs, inference=True)
    assert not _use_cudagraphs(Options.parse(None), inputs, inference=False)


def test_cudagraphs_explicit_false_beats_the_mode():
    opts = Options.parse({"cudagraphs": False, "mode": "reduce-overhead"})
    assert not _use_cudagraphs(opts, [torch.randn(1)], inference=True)


def test_guard_values_false_skips_the_check_as_promised():
    """The opt-out is a promise that folded values never change: the guard checks nothing."""
    from torch.nn.utils import prune

    torch._dynamo.reset()
    m = _model()
    prune.ln_structured(m[0], "weight", 0.5, n=1, dim=0)
    x = torch.randn(2, 3, 8, 8)
    frozen = torch.compile(m, backend="fxsparse", options={"guard_values": False})
    with torch.no_grad():
        before = frozen(x).clone()
        m[0].weight_orig.mul_(2.0)
        assert torch.equal(frozen(x), before)  # not re-read: the documented contract
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(m, backend="fxsparse")(x), m(x), rtol=1e-5, atol=1e-5)
