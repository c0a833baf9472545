"""Limits the README states, each checked: a conv it lists as left as it is is reported unchanged
with its reason, an element-wise mask removes no channel and is noted, and the compiled model
still computes what the eager masked model computes."""
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from models import assert_matches, compile_model, report


def _same_padding_even_kernel():
    return nn.Conv2d(4, 8, 4, padding="same")


CASES = {
    "padding='same', even kernel": (_same_padding_even_kernel, "padding='same'"),
}


def exact_report_row(conv, tmp_path) -> dict:
    """The conv's report row, after the compiled conv + ReLU matched eager."""
    model = nn.Sequential(conv, nn.ReLU()).eval()
    shape = (2, 4, 7, 7)
    compiled = compile_model(model, tmp_path, lowering="aten")
    with torch.no_grad():
        compiled(torch.randn(shape))
        assert_matches(compiled, model, shape)
    (row,) = report(tmp_path)["graphs"][0]["convs"]
    return row


@pytest.mark.parametrize("case", list(CASES))
def test_readme_limit_is_left_unchanged_and_exact(case, tmp_path):
    make, words = CASES[case]
    torch.manual_seed(0)
    conv = make()
    prune.ln_structured(conv, "weight", amount=0.5, n=1, dim=0)
    row = exact_report_row(conv, tmp_path)
    assert row["lowering"] == "unchanged" and words in row["reason"], row


def test_elementwise_mask_keeps_every_channel_and_is_noted(tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    prune.random_unstructured(conv, "weight", amount=0.5)
    row = exact_report_row(conv, tmp_path)
    assert row["kept_out_channels"] == row["out_channels"] == 8
    assert any("element-wise" in note for note in row["notes"]), row
