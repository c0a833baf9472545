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
