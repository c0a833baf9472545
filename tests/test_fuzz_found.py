"""Failures the property tests (tests/test_fuzz.py) found, each minimised to an explicit model."""
import pytest
import torch
import torch.nn as nn

from models import compile_model, fresh_dynamo  # noqa: F401

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class UnreadConv(nn.Module):
    """A conv computed for nothing (its result unused) beside the value returned."""

    def __init__(self, groups):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        self.conv(x)
        return self.bn(x)


@pytest.mark.xfail(strict=True, reason="a conv whose result nothing reads has no live output channel, and "
                   "the rewrite emits a conv of 0 output channels (groups=0 when depthwise): the "
                   "every-channel-pruned crash reached without a mask")
@pytest.mark.parametrize("groups", [1, 4])
def test_conv_whose_result_nothing_reads(groups, tmp_path):
    model = UnreadConv(groups).eval()
    compiled = compile_model(model, tmp_path)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
