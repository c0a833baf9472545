"""The Triton conv kernel, run through the Triton interpreter on CPU tensors.

The oracle is independent of `conv2d_reference`: F.conv2d in fp64 on the
explicitly gathered input, an explicit scatter into the full output and
activation formulas written out here. Every kernel output is allocated
NaN-poisoned, so an element the kernel forgets to write fails the test.
"""
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

import fxsparse.ops  # noqa: F401  (registers torch.ops.fxsparse)
from fxsparse.ops import triton_interpreter_on, triton_on_cpu

from conv_oracle import ORACLE_ACT, oracle

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or not triton_interpreter_on(),
    reason="interpreter tests: CPU only, TRITON_INTERPRET=1",
)

K = pytest.importorskip("fxsparse.kernels.conv2d")
from fxsparse.kernels import choices as C  # noqa: E402
from fxsparse.kernels import pointer  # noqa: E402
from fxsparse.kernels.layout import evenly_strided_rows  # noqa: E402
from fxsparse.kernels.problem import ConvArgs  # noqa: E402
from fxsparse.kernels.select import Selection  # noqa: E402


def launch(name, cfg, split_k=1):
    """A fixed launch of implementation `name` (choices.BY_NAME), bypassing the selector."""
    return Selection(C.BY_NAME[name], dict(cfg), split_k)


@pytest.fixture(autouse=True)
def _poison(poisoned_kernel_outputs):
    """Every kernel output starts as NaN: an element the kernel does not write fails the test."""


def _gen(request):
    g = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


def rnd(g, *shape, dtype=torch.float16, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def run_op(x, w, **kw):
    with triton_on_cpu():
        return torch.ops.fxsparse.conv2d(*ConvArgs.of(x, w, **kw))


TOL = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
       torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def check(y, ref, dtype, out_channels=None):
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert tuple(y.shape) == tuple(ref.shape)
    torch.testing.assert_close(y.double(), ref, **TOL[dtype])


def case(request, cin=5, cout=13, k=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), n=2, hw=(7, 7),
         dtype=torch.float16, channels_last=True, **epi):
    """Runs one conv through the op and checks it against the oracle; returns the output."""
    g = _gen(request)
    x = rnd(g, n, cin, *hw, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = rnd(g, cout, cin, *k, dtype=dtype, scale=1 / math.sqrt(cin * k[0] * k[1])).contiguous(
        memory_format=torch.channels_last)
    kw = dict(stride=stride, padding=padding, dilation=dilation)
    kw.update(epi)
    y = run_op(x, w, **kw)
    check(y, oracle(x, w, **kw), dtype)
    return y


# ------------------------------------------------------------------ geometry

GEOMETRIES = {
    # name: cin, cout, kernel, stride, padding, dilation, batch, (H, W)
    "1x1": (5, 13, (1, 1), (1, 1), (0, 0), (1, 1), 2, (7, 7)),
    "1x1_stride2": (3, 17, (1, 1), (2, 2), (0, 0), (1, 1), 1, (9, 9)),
    "1x1_padded": (5, 3, (1, 1), (1, 1), (1, 1), (1, 1), 1, (5, 6)),
    "3x3_pad1": (13, 17, (3, 3), (1, 1), (1, 1), (1, 1), 2, (9, 9)),
    "3x3_stride2": (17, 5, (3, 3), (2, 2), (1, 1), (1, 1), 1, (9, 8)),
    "3x3_dilation2": (5, 13, (3, 3), (1, 1), (2, 2), (2, 2), 2, (9, 9)),
    "3x3_valid": (20, 20, (3, 3), (1, 1), (0, 0), (1, 1), 1, (6, 7)),
    "3x3_cin32": (32, 20, (3, 3), (1, 1), (1, 1), (1, 1), 1, (5, 5)),
    "5x5": (3, 5, (5, 5), (1, 1), (2, 2), (1, 1), 2, (8, 9)),
    "7x7_stride2": (3, 17, (7, 7), (2, 2), (3, 3), (1, 1), 1, (9, 9)),
    "3x1_asym": (5, 13, (3, 1), (2, 1), (1, 0), (1, 2), 2, (7, 6)),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_geometry(request, name):
    cin, cout, k, s, p, d, n, hw = GEOMETRIES[name]
    case(request, cin, cout, k, s, p, d, n, hw)


def test_batch1_single_pixel_output(request):
    case(request, cin=5, cout=3, k=(3, 3), padding=(0, 0), n=1, hw=(3, 3))


# ------------------------------------------------------------------ dtypes and layouts

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(request, dtype):
    case(request, cin=13, cout=17, dtype=dtype, bias=rnd(_gen(request), 17, dtype=dtype), activation="silu")


def test_nchw_input(request):
    case(request, cin=13, cout=5, channels_last=False)


def test_strided_views_everywhere(request):
    g = _gen(request)
    base = rnd(g, 2, 9, 8, 10)
    x = base[:, 1:8, :, 1:9]  # non-contiguous in every dim but N
    w = rnd(g, 11, 7, 3, 3, scale=0.3)  # NCHW-contiguous weight: slow path, still correct
    res = rnd(g, 2, 11, 8, 8)  # NCHW residual
    bm = rnd(g, 8, 11, 8).transpose(0, 1)  # (C, Ho, Wo) view with odd strides
    kw = dict(padding=(1, 1), bias=rnd(g, 11), bias_map=bm, residual=res, activation="relu")
    y = run_op(x, w, **kw)
    check(y, oracle(x, w, **kw), torch.float16)


@pytest.mark.parametrize("layout", ["flat", "channel_slice", "nchw_x", "nchw_residual", "nchw_out", "w1"])
def test_pointwise_row_addressing(request, layout):
    """1x1 convs address evenly strided rows as a plain GEMM (no division by the image sizes)
    and every other layout through (n, h, w): both give the oracle's answer."""
    g = _gen(request)
    hw = (5, 1) if layout == "w1" else (5, 6)
    base = rnd(g, 3, 21, *hw).contiguous(memory_format=torch.channels_last)
    x = base[:, 4:17] if layout == "channel_slice" else base[:, :13]
    if layout != "channel_slice":
        x = x.contiguous() if layout == "nchw_x" else x.contiguous(memory_format=torch.channels_last)
    w = rnd(g, 9, 13, 1, 1, scale=0.3).contiguous(memory_format=torch.channels_last)
    res = rnd(g, 3, 9, *hw)
    res = res if layout == "nchw_residual" else res.contiguous(memory_format=torch.channels_last)
    kw = dict(bias=rnd(g, 9), residual=res, activation="relu")
    ref = oracle(x, w, **kw)
    if layout == "nchw_out":
        out = torch.full((3, 9, *hw), float("nan"), dtype=torch.float16)  # NCHW: rows not flat
        y = K.conv2d_triton(ConvArgs.of(x, w, kw["bias"], residual=res, activation="relu"), out=out,
                            launch=launch("pointer", pointer.INTERPRET_CONFIG))
        assert y is out
        torch.testing.assert_close(y.double(), ref, **TOL[torch.float16])
        return
    check(run_op(x, w, **kw), ref, torch.float16)


def test_row_flatness_detection():
    cl = torch.empty(2, 8, 3, 4).contiguous(memory_format=torch.channels_last)
    assert evenly_strided_rows(cl)
    assert evenly_strided_rows(cl[:, 2:5])  # a channel slice keeps the row stride
    assert not evenly_strided_rows(torch.empty(2, 8, 3, 4))  # NCHW
    assert not evenly_strided_rows(cl[:, :, :, :3])  # a cropped width breaks the rows
    assert evenly_strided_rows(torch.empty(1, 8, 1, 1))


# ------------------------------------------------------------------ epilogue

EPILOGUES = ["bias", "bias_map", "residual_before", "residual_after", "all"]


@pytest.mark.parametrize("feature", EPILOGUES)
def test_epilogue_feature(request, feature):
    g = _gen(request)
    cout, n, hw = 13, 2, (7, 7)
    parts = {
        "bias": dict(bias=rnd(g, cout)),
        "bias_map": dict(bias_map=rnd(g, cout, *hw)),
        "residual_before": dict(residual=rnd(g, n, cout, *hw), activation="relu"),
        "residual_after": dict(residual=rnd(g, n, cout, *hw), activation="relu", residual_after_activation=True),
    }
    if feature == "all":
        epi = dict(bias=rnd(g, cout), bias_map=rnd(g, cout, *hw),
                   residual=rnd(g, n, cout, *hw).contiguous(memory_format=torch.channels_last),
                   activation="hardswish")
    else:
        epi = parts[feature]
    case(request, cin=5, cout=cout, n=n, hw=hw, **epi)


def test_epilogue_fp32_params_on_fp16_conv(request):
    g = _gen(request)
    case(request, cin=5, cout=13, bias=rnd(g, 13, dtype=torch.float32),
         bias_map=rnd(g, 13, 7, 7, dtype=torch.float32), activation="gelu")


@pytest.mark.parametrize("activation", list(ORACLE_ACT))
def test_activation(request, activation):
    g = _gen(request)
    # scale 3 spreads z over the interesting ranges of relu6/hardswish/sigmoid/tanh
    case(request, cin=5, cout=17, n=1, hw=(5, 5), activation=activation,
         bias=rnd(g, 17, scale=3.0), residual=rnd(g, 1, 17, 5, 5))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_activation_fp32(request, activation):
    case(request, cin=5, cout=13, n=1, hw=(5, 5), dtype=torch.float32, activation=activation,
         bias=rnd(_gen(request), 13, dtype=torch.float32, scale=3.0))


# ------------------------------------------------------------------ compaction

def _perm(g, total, keep):
    return torch.randperm(total, generator=g)[:keep]


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_in_index(request, index_dtype):
    g = _gen(request)
    in_index = _perm(g, 20, 13).to(index_dtype)
    x = rnd(g, 2, 20, 7, 7).contiguous(memory_format=torch.channels_last)
    w = rnd(g, 17, 13, 3, 3, scale=0.1).contiguous(memory_format=torch.channels_last)
    kw = dict(padding=(1, 1), in_index=in_index, bias=rnd(g, 17))
    check(run_op(x, w, **kw), oracle(x, w, **kw), torch.float16)


@pytest.mark.parametrize("with_fill", [False, True])
def test_out_index(request, with_fill):
    g = _gen(request)
    out_index = _perm(g, 20, 5)
    x = rnd(g, 2, 13, 7, 7).contiguous(memory_format=torch.channels_last)
    w = rnd(g, 5, 13, 3, 3, scale=0.1).contiguous(memory_format=torch.channels_last)
    kw = dict(padding=(1, 1), out_index=out_index, out_channels=20, bias=rnd(g, 5), activation="silu",
              fill=rnd(g, 20) if with_fill else None)
    check(run_op(x, w, **kw), oracle(x, w, **kw), torch.float16)


@pytest.mark.parametrize("after", [False, True])
def test_in_and_out_index_with_everything(request, after):
    g = _gen(request)
    in_index, out_index = _perm(g, 17, 5), _perm(g, 19, 13).to(torch.int32)
    x = rnd(g, 2, 17, 6, 7).contiguous(memory_format=torch.channels_last)
    w = rnd(g, 13, 5, 3, 3, scale=0.3).contiguous(memory_format=torch.channels_last)
    kw = dict(stride=(2, 1), padding=(1, 1), in_index=in_index, out_index=out_index, out_channels=19,
              fill=rnd(g, 19), bias=rnd(g, 13), bias_map=rnd(g, 13, 3, 7),
              residual=rnd(g, 2, 19, 3, 7), activation="gelu_tanh", residual_after_activation=after)
    check(run_op(x, w, **kw), oracle(x, w, **kw), torch.float16)


def test_every_channel_pruned(request):
    g = _gen(request)
    x = rnd(g, 1, 5, 5, 5)
    w = rnd(g, 0, 5, 3, 3)
    kw = dict(padding=(1, 1), out_index=torch.zeros(0, dtype=torch.int64), out_channels=7, fill=rnd(g, 7),
              residual=rnd(g, 1, 7, 5, 5), activation="relu")
    check(run_op(x, w, **kw), oracle(x, w, **kw), torch.float16)


def test_out_index_complement_cache_sees_index_change(request):
    g = _gen(request)
    x = rnd(g, 1, 5, 5, 5)
    w = rnd(g, 3, 5, 1, 1)
    out_index = torch.tensor([0, 2, 4])
    kw = dict(out_index=out_index, out_channels=6, fill=rnd(g, 6))
    check(run_op(x, w, **kw), oracle(x, w, **kw), torch.float16)
    out_index.copy_(torch.tensor([5, 1, 3]))  # in place: the cached complement is stale
    check(run_op(x, w, **kw), oracle(x, w, **kw), torch.float16)


def test_empty_batch(request):
    g = _gen(request)
    x, w = rnd(g, 0, 5, 5, 5), rnd(g, 3, 5, 3, 3)
    y = run_op(x, w, padding=(1, 1))
    assert tuple(y.shape) == (0, 3, 5, 5)


# ------------------------------------------------------------------ launcher knobs: tiles and split-K

def _direct(request, config=None, split_k=None, cin=20, cout=33, k=3, dtype=torch.float16, **epi):
    g = _gen(request)
    x = rnd(g, 2, cin, 6, 5, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = rnd(g, cout, cin, k, k, dtype=dtype, scale=0.2).contiguous(memory_format=torch.channels_last)
    args = ConvArgs.of(x, w, padding=(k // 2, k // 2), **epi)
    out = torch.full((2, args.out_channels, 6, 5), float("nan"), dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    fixed = None if config is None else launch("pointer", dict(config, BLOCK_K=config.get("BLOCK_K", 32)))
    y = K.conv2d_triton(args, out=out, launch=fixed, split_k=split_k)
    assert y is out
    return x, w, y


@pytest.mark.parametrize("config", [
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1),
    dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=1),
    dict(BLOCK_M=32, BLOCK_N=64, GROUP_M=8, num_warps=4, num_stages=1),
])
def test_tile_configs(request, config):
    x, w, y = _direct(request, config=config)
    check(y, oracle(x, w, padding=(1, 1)), torch.float16)


@pytest.mark.parametrize("split_k", [2, 3, 7])
def test_split_k(request, split_k):
    g = _gen(request)
    epi = dict(bias=rnd(g, 33), bias_map=rnd(g, 33, 6, 5, dtype=torch.float32), activation="relu6")
    x, w, y = _direct(request, split_k=split_k, **epi)
    check(y, oracle(x, w, padding=(1, 1), **epi), torch.float16)


def test_split_k_runs_in_one_launch(request, monkeypatch):
    """The last K slice of each tile reduces the workspace and runs the epilogue: a split conv
    is one launch of the conv kernel (no reducing launch after it)."""
    launches = []
    kernel = pointer.conv_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(pointer, "conv_kernel", Counting())
    g = _gen(request)
    epi = dict(bias=rnd(g, 33), activation="relu")
    x, w, y = _direct(request, split_k=3, **epi)
    check(y, oracle(x, w, padding=(1, 1), **epi), torch.float16)
    assert len(launches) == 1 and launches[0][1] == 3, launches


def test_split_k_with_out_index(request):
    g = _gen(request)
    out_index = _perm(g, 40, 33)
    epi = dict(out_index=out_index, out_channels=40, fill=rnd(g, 40), bias=rnd(g, 33), activation="sigmoid")
    x, w, y = _direct(request, split_k=2, **epi)
    check(y, oracle(x, w, padding=(1, 1), **epi), torch.float16)


def test_split_k_setting_through_op(request, monkeypatch):
    monkeypatch.setenv("FXSPARSE_SPLIT_K", "2")
    case(request, cin=20, cout=13, bias=rnd(_gen(request), 13), activation="relu")


def test_out_argument_is_checked(request):
    g = _gen(request)
    x, w = rnd(g, 1, 5, 5, 5), rnd(g, 3, 5, 3, 3)
    with pytest.raises(ValueError, match="out must be"):
        K.conv2d_triton(ConvArgs.of(x, w, padding=(1, 1)), out=torch.empty(1, 3, 4, 5, dtype=torch.float16))


@pytest.mark.parametrize("nchw", [False, True])
def test_in_index_gather_is_exact(request, nchw):
    # in_index is gathered into a compact buffer before the dense kernel: bit-identical to
    # running the kernel on x[:, in_index] by hand.
    g = _gen(request)
    in_index = torch.tensor([7, 2, 11, 3, 0, 15, 8])
    x = rnd(g, 2, 16, 6, 5)
    if not nchw:
        x = x.contiguous(memory_format=torch.channels_last)
    w = rnd(g, 9, 7, 3, 3, scale=0.2).contiguous(memory_format=torch.channels_last)
    kw = dict(padding=(1, 1), bias=rnd(g, 9), activation="relu")
    y = run_op(x, w, in_index=in_index, **kw)
    y_hand = run_op(x[:, in_index].contiguous(memory_format=torch.channels_last), w, **kw)
    assert torch.equal(y, y_hand)
    check(y, oracle(x, w, in_index=in_index, **kw), torch.float16)


def test_in_index_contiguous_range_is_a_view(request, monkeypatch):
    g = _gen(request)
    x = rnd(g, 2, 20, 6, 6).contiguous(memory_format=torch.channels_last)
    w = rnd(g, 5, 8, 3, 3, scale=0.2).contiguous(memory_format=torch.channels_last)
    in_index = torch.arange(4, 12)
    monkeypatch.setattr(torch.Tensor, "index_select", lambda *a, **k: pytest.fail("copied a contiguous range"))
    kw = dict(padding=(1, 1), in_index=in_index)
    check(run_op(x, w, **kw), oracle(x, w, **kw), torch.float16)
    assert K._in_plan(in_index) == ("range", 4)
    in_index.copy_(torch.tensor([4, 5, 6, 7, 8, 9, 11, 10]))  # in place: no longer a run
    assert K._in_plan(in_index) == ("gather", 0)


# ------------------------------------------------------------------ TMA launches of 1x1 convs

_TMA_CFG = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)
_BOX_CFG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)


def _pointwise_tensors(g, n, cin, cout, hw, dtype, residual=False, x_channels=None, x_first=0):
    """A 1x1 problem; x may be a channel slice [x_first, x_first + cin) of a wider tensor."""
    full = rnd(g, n, x_channels or cin, *hw, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x = full[:, x_first:x_first + cin]
    w = rnd(g, cout, cin, 1, 1, dtype=dtype, scale=1 / math.sqrt(cin)).contiguous(memory_format=torch.channels_last)
    r = rnd(g, n, cout, *hw, dtype=dtype).contiguous(memory_format=torch.channels_last) if residual else None
    return x, w, r


def _run_pointwise(x, w, residual=None, after=False, **epi):
    out = torch.full((x.shape[0], w.shape[0], *x.shape[2:]), float("nan"), dtype=x.dtype).contiguous(
        memory_format=torch.channels_last)
    y = K.conv2d_triton(ConvArgs.of(x, w, residual=residual, residual_after_activation=after, **epi), out=out,
                        launch=launch("tma_gemm", _TMA_CFG))
    assert y is out
    return y


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("after", [False, True])
def test_tma_pointwise_with_full_epilogue(request, dtype, after):
    """Odd sizes (rows and channels not multiples of the tile), batch 1, every epilogue term."""
    g = _gen(request)
    x, w, r = _pointwise_tensors(g, 1, 40, 24, (5, 7), dtype, residual=True)
    bias = rnd(g, 24, dtype=dtype)
    from fxsparse.kernels import tma
    assert tma.eligible(x, w, torch.empty_like(r), r, None, None, True, (1, 1)) == "gemm"
    y = _run_pointwise(x, w, r, bias=bias, activation="relu6", after=after)
    ref = oracle(x, w, bias=bias, residual=r, activation="relu6", residual_after_activation=after)
    check(y, ref, dtype)


def test_tma_pointwise_reads_an_aligned_channel_slice(request):
    """x = channels [8, 8+24) of a 40-channel tensor: the descriptor reads the slice in place."""
    g = _gen(request)
    x, w, _ = _pointwise_tensors(g, 2, 24, 16, (3, 5), torch.float16, x_channels=40, x_first=8)
    from fxsparse.kernels import tma
    assert tma.eligible(x, w, torch.empty(2, 16, 3, 5, dtype=x.dtype).contiguous(
        memory_format=torch.channels_last), None, None, None, True, (1, 1)) == "gemm"
    check(_run_pointwise(x, w), oracle(x, w), torch.float16)


def test_tma_tile_on_tensors_a_descriptor_cannot_address_runs_the_same_tile(request):
    """A channel slice starting at channel 3 is not 16-byte aligned: a (tuned) TMA tile then
    runs as the same tile of the pointer kernel, with the same results."""
    g = _gen(request)
    x, w, _ = _pointwise_tensors(g, 2, 24, 16, (3, 5), torch.float16, x_channels=40, x_first=3)
    from fxsparse.kernels import tma
    out = torch.empty(2, 16, 3, 5, dtype=x.dtype).contiguous(memory_format=torch.channels_last)
    assert tma.eligible(x, w, out, None, None, None, True, (1, 1)) is None
    check(_run_pointwise(x, w), oracle(x, w), torch.float16)
def test_tma_eligibility():
    from fxsparse.kernels import tma as T

    def cl(*shape, dtype=torch.float16):
        return torch.zeros(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)

    x, w, out = cl(2, 16, 4, 4), cl(32, 16, 1, 1), cl(2, 32, 4, 4)
    w3 = cl(32, 16, 3, 3)
    assert T.eligible(x, w, out, None, None, None, True, (1, 1)) == "gemm"
    assert T.eligible(x, w3, out, None, None, None, False, (1, 1)) == "box"
    assert T.eligible(x, w3, cl(2, 32, 2, 2), None, None, None, False, (2, 2)) == "box"  # strided
    assert T.eligible(cl(2, 16, 5, 4), w3, cl(2, 32, 3, 2), None, None, None, False, (2, 2)) is None  # odd rows
    assert T.eligible(cl(2, 16, 4, 5), w3, cl(2, 32, 2, 3), None, None, None, False, (1, 2)) is None  # odd columns
    assert T.eligible(cl(2, 16, 5, 4), w3, cl(2, 32, 3, 2), None, None, None, False, (1, 2)) == "box"
    # across columns a phase's channel run must end where the pixel does: not in a channel slice
    assert T.eligible(cl(2, 24, 4, 4)[:, :16], w3, cl(2, 32, 2, 2), None, None, None, False, (1, 2)) is None
    assert T.eligible(cl(2, 24, 4, 4)[:, :16], w3, cl(2, 32, 2, 4), None, None, None, False, (2, 1)) == "box"
    assert T.eligible(x, w, out, None, None, torch.zeros(32, 4, 4), True, (1, 1)) == "box"  # bias map
    assert T.eligible(x.float(), w.float(), out.float(), None, None, None, True, (1, 1)) is None  # fp32
    assert T.eligible(x, w, out, None, torch.arange(32), None, True, (1, 1)) is None  # channel scatter
    assert T.eligible(x.contiguous(), w, out, None, None, None, True, (1, 1)) is None  # NCHW input
    assert T.eligible(cl(2, 12, 4, 4), cl(32, 12, 1, 1), out, None, None, None, True, (1, 1)) is None  # 24 B rows
    assert T.eligible(cl(2, 12, 4, 4), cl(32, 12, 3, 3), out, None, None, None, False, (1, 1)) is None
    assert T.eligible(x, w, cl(2, 36, 4, 4)[:, :32], None, None, None, True, (1, 1)) is None


@pytest.mark.parametrize("n,ho,wo,block_m,want,want_images", [
    (32, 56, 56, 128, (1, 2, 64), (2, 8, 8)),  # one image: 12.5% of rows for nothing; two: none
    (32, 56, 56, 64, (1, 8, 8), (1, 8, 8)),
    (32, 7, 7, 64, (1, 8, 8), (8, 1, 8)),
    (32, 14, 14, 128, (1, 8, 16), (4, 2, 16)),
    (32, 28, 28, 128, (1, 4, 32), (1, 4, 32)),  # no better box across images
    (3, 1, 9, 64, (1, 1, 64), (4, 1, 16)),  # a batch of short rows
])
def test_box_shape_fits_the_map(n, ho, wo, block_m, want, want_images):
    from fxsparse.kernels.tma import box_shape

    assert box_shape(block_m, n, ho, wo) == want
    assert box_shape(block_m, n, ho, wo, images=True) == want_images


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("geometry", [
    # (cin, cout, k, padding, dilation, n, (h, w), stride)
    (16, 24, 3, 1, 1, 2, (7, 9), (1, 1)),  # odd map: partial boxes in both directions
    (24, 8, 5, 2, 1, 1, (6, 5), (1, 1)),  # 5x5, batch 1
    (8, 16, 3, 2, 2, 2, (8, 8), (1, 1)),  # dilation
    (16, 16, 3, 0, 1, 2, (9, 6), (1, 1)),  # no padding
    (40, 16, 1, 0, 1, 2, (4, 4), (1, 1)),  # 1x1 with a bias map goes through the box launch
    (16, 24, 3, 1, 1, 2, (8, 10), (2, 2)),  # ResNet's strided 3x3: both phases of each side
    (32, 16, 1, 0, 1, 2, (8, 6), (2, 2)),  # ResNet's strided 1x1 shortcut
    (8, 16, 7, 3, 1, 1, (10, 12), (2, 2)),  # a 7x7 stem, taps reaching 3 pixels past each side
    (24, 16, 3, 1, 1, 2, (6, 9), (2, 3)),  # unequal strides; 24 channels: a partial channel block
    (16, 8, 3, 2, 2, 1, (8, 8), (2, 2)),  # strided and dilated
])
def test_tma_box_launch(request, dtype, geometry):
    """Convs through TMA box loads (tma.py "box"): the zero fill of out-of-image coordinates is
    the padding, strides read phases of the input; every epilogue term; outputs NaN-poisoned."""
    cin, cout, k, p, d, n, hw, stride = geometry
    g = _gen(request)
    x = rnd(g, n, cin, *hw, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = rnd(g, cout, cin, k, k, dtype=dtype, scale=1 / math.sqrt(cin * k * k)).contiguous(
        memory_format=torch.channels_last)
    ho, wo = [(hw[i] + 2 * p - d * (k - 1) - 1) // stride[i] + 1 for i in (0, 1)]
    epi = dict(bias=rnd(g, cout, dtype=dtype), activation="hardswish", residual_after_activation=True,
               bias_map=rnd(g, cout, ho, wo, dtype=torch.float32) if k == 1 else None,
               residual=rnd(g, n, cout, ho, wo, dtype=dtype).contiguous(memory_format=torch.channels_last))
    out = torch.full((n, cout, ho, wo), float("nan"), dtype=dtype).contiguous(memory_format=torch.channels_last)
    from fxsparse.kernels import tma
    pointwise = k == 1 and p == 0 and stride == (1, 1)
    assert tma.eligible(x, w, out, epi["residual"], None, epi["bias_map"], pointwise, stride) == "box"
    args = ConvArgs.of(x, w, stride=stride, padding=(p, p), dilation=(d, d), **epi)
    y = K.conv2d_triton(args, out=out, launch=launch("tma_box", _BOX_CFG))
    ref = oracle(x, w, stride=stride, padding=(p, p), dilation=(d, d), **epi)
    check(y, ref, dtype)


def test_strided_box_keeps_a_neighbours_inf_out_of_a_partial_channel_block(request):
    """Across columns a strided box of 24 channels in 16-channel blocks also reads the first 8
    channels of the next column phase; zero weights meet them, but inf * 0 is NaN: they are
    masked. An inf in pixel (0, 1)'s channel 0 must reach only the outputs whose taps read it."""
    g = _gen(request)
    x = rnd(g, 1, 24, 4, 4).contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, 1] = float("inf")
    w = rnd(g, 8, 24, 1, 1, scale=0.2).abs().contiguous(memory_format=torch.channels_last)
    out = torch.full((1, 8, 2, 2), float("nan"), dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    y = K.conv2d_triton(ConvArgs.of(x, w, stride=(2, 2)), out=out, launch=launch("tma_box", _BOX_CFG))
    # a 1x1 stride-2 conv reads pixels (0, 0), (0, 2), (2, 0), (2, 2): never the inf
    assert torch.isfinite(y).all()
    check(y, oracle(x, w, stride=(2, 2)), torch.float16)


@pytest.mark.parametrize("split_k", [2, 3])
def test_tma_box_split_k(request, split_k):
    """The box launch's K slices meet in the workspace and the last one to arrive runs the
    epilogue (residual and activation included), as the pointer kernel's split-K does."""
    g = _gen(request)
    x = rnd(g, 2, 32, 7, 7).contiguous(memory_format=torch.channels_last)
    w = rnd(g, 24, 32, 3, 3, scale=0.1).contiguous(memory_format=torch.channels_last)
    bias, r = rnd(g, 24), rnd(g, 2, 24, 7, 7).contiguous(memory_format=torch.channels_last)
    out = torch.full((2, 24, 7, 7), float("nan"), dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    args = ConvArgs.of(x, w, bias, padding=(1, 1), residual=r, activation="relu")
    y = K.conv2d_triton(args, out=out, launch=launch("tma_box", _BOX_CFG, split_k))
    check(y, oracle(x, w, bias=bias, padding=(1, 1), residual=r, activation="relu"), torch.float16)
