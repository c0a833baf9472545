"""What a layout stores (`compaction.plan.Storage`): on CUDA, channel counts rounded up
to whole 16-byte rows and near-full layouts stored full. The added channels are real
channels of the model, so compiled still equals eager; the tests run the rounding on the CPU
through the `align_channels` option (small multiples: the zoo's layers are 8-16 wide)."""
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import models as M
from models import after_graph, assert_matches, compile_model, conv_rows, fresh_dynamo, report  # noqa: F401
from fxsparse.compaction.plan import Storage
from fxsparse.options import Options

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def mask(n, kept):
    m = torch.zeros(n, dtype=torch.bool)
    m[list(kept)] = True
    return m


def test_exact_storage_keeps_what_is_needed():
    m = mask(16, [1, 5, 9])
    assert torch.equal(Storage().round(m), m)
    assert torch.equal(Storage.align_channels(1).round(m), m)
    assert not Storage().reads_whole(1, 16)


def test_rounds_up_with_the_lowest_unkept_channels():
    s = Storage.align_channels(8)
    got = s.round(mask(32, [3, 7, 9, 20, 21]))
    assert torch.equal(got, mask(32, [0, 1, 2, 3, 7, 9, 20, 21]))
    assert int(got.sum()) == 8
    # agreeing masks round alike (a conv's output and the depthwise conv reading it)
    assert torch.equal(s.round(mask(32, [3, 7, 9, 20, 21])), got)


def test_near_full_is_stored_full_and_edges_stay():
    s = Storage.align_channels(8)
    assert bool(s.round(mask(512, range(495))).all())  # 495 of 512 > 7/8
    assert int(s.round(mask(512, range(440))).sum()) == 440  # 440 = 0.86: aligned already
    assert torch.equal(s.round(mask(24, [])), mask(24, []))
    assert bool(s.round(torch.ones(13, dtype=torch.bool)).all())
    assert int(s.round(mask(12, range(5))).sum()) == 8


def test_reads_whole_only_for_few_unused_channels():
    s = Storage.align_channels(8)
    assert s.reads_whole(4, 16)  # fewer than one row's worth
    assert s.reads_whole(32, 256)  # an eighth
    assert not s.reads_whole(64, 256)  # a gather is cheaper than a quarter of zero columns
    assert not s.reads_whole(0, 16)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64).flatmap(lambda n: st.tuples(st.lists(st.booleans(), min_size=n, max_size=n),
                                                        st.lists(st.booleans(), min_size=n, max_size=n))),
       st.sampled_from([1, 4, 8]))
def test_a_conv_reads_its_used_channels_in_whole_rows(masks, multiple):
    """A conv reads every stored channel its filters use and nothing unstored; where it gathers,
    the count is a multiple of `multiple` (or all that is stored), padded with unused ones."""
    used, stored = (torch.tensor(m, dtype=torch.bool) for m in masks)
    s = Storage.align_channels(multiple)
    read = s.conv_reads(used, stored)
    assert not bool((read & ~stored).any())
    assert bool(read[used & stored].all())
    k, total = int(read.sum()), int(stored.sum())
    if multiple == 1:
        assert torch.equal(read, used & stored)
    elif k:
        assert k % multiple == 0 or k == total


def test_a_gathered_input_is_padded_to_whole_rows():
    s = Storage.align_channels(8)
    stored, used = mask(64, range(40)), mask(64, range(0, 40, 3))  # 14 used of 40 stored
    read = s.conv_reads(used, stored)
    assert int(read.sum()) == 16 and bool(read[used].all())
    assert torch.equal(s.conv_reads(mask(64, range(37)), stored), stored)  # 3 unused: read whole


def test_option_is_validated():
    assert Options.parse({"align_channels": 8}).align_channels == 8
    for bad in (0, -8, 2.0, True, "8"):
        with pytest.raises(ValueError, match="align_channels"):
            Options.parse({"align_channels": bad})


def _stored_counts_aligned(rows, multiple, inputs=True):
    for name, r in rows.items():
        pairs = [(r["kept_out_channels"], r["out_channels"])]
        if inputs:
            pairs.append((r["kept_in_channels"], r["in_channels"]))
        for kept, full in pairs:
            assert kept == full or kept % multiple == 0, (name, r)


@pytest.mark.parametrize("lowering", ["aten", "triton"])
@pytest.mark.parametrize("name,masks", [("resnet", "ln0"), ("bottleneck", "ln0"), ("resnet", "random"),
                                        ("mobilenet", "custom_out"), ("dense", "ln0"), ("chain", "ln1")])
def test_aligned_storage_equals_eager(name, masks, lowering, tmp_path):
    model, shape = M.build(name)
    M.MASKS[masks](model)
    c = compile_model(model, tmp_path, lowering=lowering, align_channels=4)
    with torch.no_grad():
        c(torch.randn(shape))
        assert_matches(c, model, shape)
    rows = conv_rows(tmp_path)
    # (a concat with the model's 6-channel input stores 6 + 4: only conv outputs are rounded)
    _stored_counts_aligned({k: r for k, r in rows.items() if r["lowering"] != "unchanged"}, 4, inputs=name != "dense")


def _wide_chain():
    """conv(3->24)-BN-ReLU -> conv(24->16)-BN-ReLU -> 1x1 head, the middle group pruned to 10
    of 24 channels on both sides (Torch-Pruning style)."""
    torch.manual_seed(0)
    model = M.randomize_bn(M.chain((3, 24, 16))).eval()
    M.group_prune(model, [(list(range(1, 24, 2)) + [0, 2], ["0.0"], ["0.1"], ["1.0"])])
    return model, (2, 3, 6, 6)


@pytest.mark.parametrize("align,stored", [(1, 10), (4, 12)])
def test_conv_reads_rounded_input_whole(align, stored, tmp_path):
    """10 kept channels are stored as 12 under align 4 (two pruned channels, holding their
    constant); the next conv reads all 12 with zero weight columns instead of gathering 10."""
    model, shape = _wide_chain()
    c = compile_model(model, tmp_path, lowering="triton", align_channels=align)
    with torch.no_grad():
        c(torch.randn(shape))
        assert_matches(c, model, shape)
    rows = conv_rows(tmp_path)
    assert rows["0.0"]["kept_out_channels"] == stored
    assert rows["1.0"]["kept_in_channels"] == stored
    after = after_graph(tmp_path)
    assert not re.search(r"select_channels|in_index", after), after


def test_cpu_default_is_exact(tmp_path):
    model, shape = _wide_chain()
    c = compile_model(model, tmp_path, lowering="aten")
    with torch.no_grad():
        c(torch.randn(shape))
    (g,) = report(tmp_path)["graphs"]
    assert g["macs_after"] == g["macs_ideal"]
