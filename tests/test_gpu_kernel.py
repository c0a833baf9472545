"""The Triton conv kernel at real sizes on a CUDA GPU, against cuDNN on the masked
(compacted) problem. Every output is NaN-poisoned before the kernel runs.

Run: PYTHONPATH=. python -m pytest -q tests/test_gpu_kernel.py
"""
import math

import pytest
import torch

import fxsparse.ops  # noqa: F401

from conv_oracle import ORACLE_ACT, oracle

pytestmark = pytest.mark.gpu

K = pytest.importorskip("fxsparse.kernels.conv2d")
from fxsparse.kernels import choices as C  # noqa: E402
from fxsparse.kernels import select as S  # noqa: E402
from fxsparse.kernels.problem import ConvArgs  # noqa: E402


def launch(name, bm, bn, bk, warps, stages, split_k=1, maxnreg=None):
    """A fixed launch of implementation `name`, bypassing the selector."""
    return S.Selection(C.BY_NAME[name], C.tile_config(bm, bn, bk, warps, stages, maxnreg), split_k)
DEV = "cuda"
REL_L2 = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True)
def _poison(poisoned_kernel_outputs):
    """Every kernel output starts as NaN: an element the kernel does not write fails the test."""


@pytest.fixture(autouse=True, scope="module")
def exact_cudnn():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def rel_l2(y, ref):
    assert not torch.isnan(y).any(), "NaN in output: an element was not written"
    y, ref = y.float(), ref.float()
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def cudnn_oracle(x, w, **kw):
    """The shared oracle in fp32 (cuDNN) on the gathered input."""
    return oracle(x, w, dtype=torch.float32, **kw)


def run_op(x, w, **kw):
    return torch.ops.fxsparse.conv2d(*ConvArgs.of(x, w, **kw))


def make(n, cin, cout, k, hw, dtype, stride=1, cin_total=None, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(n, cin_total or cin, hw, hw, device=DEV, generator=g).to(dtype).contiguous(
        memory_format=torch.channels_last)
    w = (torch.randn(cout, cin, k, k, device=DEV, generator=g) / math.sqrt(cin * k * k)).to(dtype).contiguous(
        memory_format=torch.channels_last)
    return x, w, g


# name: (batch, cin, cout, kernel, H=W, stride)
LAYERS = {
    "seed_b16": (16, 64, 128, 3, 56, 1),
    "r50_64_3x3_56": (32, 64, 64, 3, 56, 1),
    "r50_64_256_1x1_56": (32, 64, 256, 1, 56, 1),
    "r50_128_3x3_28": (32, 128, 128, 3, 28, 1),
    "r50_256_3x3_14": (32, 256, 256, 3, 14, 1),
    "r50_512_3x3_7": (32, 512, 512, 3, 7, 1),
    "r50_128_3x3_s2_56": (32, 128, 128, 3, 56, 2),
}


TUNED_LAYERS = ("seed_b16", "r50_64_256_1x1_56", "r50_512_3x3_7")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("keep", [1.0, 0.25])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_benchmark_layers(layer, keep, dtype, monkeypatch):
    """Dense fp16 through the tuner (whichever tile wins must compute the same conv; a 3x3, a
    1x1 and a split-K shape: each candidate is a compile); the rest with one safe tile."""
    if dtype == torch.float16 and keep == 1.0 and layer in TUNED_LAYERS:
        monkeypatch.setenv("FXSPARSE_TUNE", "always")
    n, cin, cout, k, hw, s = LAYERS[layer]
    x, w, _ = make(n, cin, max(1, int(cout * keep)), k, hw, dtype)
    kw = dict(stride=(s, s), padding=(k // 2, k // 2))
    y = run_op(x, w, **kw)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert rel_l2(y, cudnn_oracle(x, w, **kw)) < REL_L2[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compaction_and_epilogue(dtype):
    n, cin_total, cout_total, hw = 8, 96, 80, 28
    g = torch.Generator(device=DEV).manual_seed(1)
    in_index = torch.randperm(cin_total, device=DEV, generator=g)[:48]
    out_index = torch.randperm(cout_total, device=DEV, generator=g)[:37].to(torch.int32)
    x, w, _ = make(n, 48, 37, 3, hw, dtype, cin_total=cin_total)
    r = lambda *s: torch.randn(*s, device=DEV, generator=g).to(dtype)  # noqa: E731
    for after in (False, True):
        kw = dict(padding=(1, 1), in_index=in_index, out_index=out_index, out_channels=cout_total,
                  fill=r(cout_total), bias=r(37), bias_map=r(37, hw, hw),
                  residual=r(n, cout_total, hw, hw).contiguous(memory_format=torch.channels_last),
                  activation="hardswish", residual_after_activation=after)
        assert rel_l2(run_op(x, w, **kw), cudnn_oracle(x, w, **kw)) < REL_L2[dtype]


@pytest.mark.parametrize("activation", list(ORACLE_ACT))
def test_activations(activation):
    x, w, g = make(4, 64, 48, 3, 14, torch.float16)
    kw = dict(padding=(1, 1), bias=torch.randn(48, device=DEV, generator=g).half(), activation=activation,
              residual=torch.randn(4, 48, 14, 14, device=DEV, generator=g).half())
    assert rel_l2(run_op(x, w, **kw), cudnn_oracle(x, w, **kw)) < 1e-3


@pytest.mark.parametrize("geometry", [
    (3, 64, 7, 2, 3, 1, 112),  # ResNet stem
    (13, 17, 3, 1, 1, 1, 31),
    (24, 40, 5, 1, 2, 1, 20),
    (32, 32, 3, 1, 2, 2, 20),  # dilation
    (64, 48, 1, 2, 0, 1, 28),  # strided 1x1 (downsample)
])
def test_geometries(geometry):
    cin, cout, k, s, p, d, hw = geometry
    x, w, _ = make(4, cin, cout, k, hw, torch.float16)
    kw = dict(stride=(s, s), padding=(p, p), dilation=(d, d))
    assert rel_l2(run_op(x, w, **kw), cudnn_oracle(x, w, **kw)) < 1e-3


def test_nchw_input_and_weight():
    x, w, _ = make(4, 64, 64, 3, 28, torch.float16)
    x, w = x.contiguous(), w.contiguous()
    kw = dict(padding=(1, 1))
    assert rel_l2(run_op(x, w, **kw), cudnn_oracle(x, w, **kw)) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tile", [(256, 128, 8, 3), (128, 64, 4, 3), (64, 32, 4, 3)])
@pytest.mark.parametrize("after", [False, True])
def test_tma_pointwise_tiles(dtype, tile, after):
    """1x1 convs through TMA descriptors (kernels/tma.py "gemm"), every epilogue term, on
    sizes that leave partial tiles in rows (M = 3 * 29 * 29) and channels (72 of a 128 tile)."""
    bm, bn, warps, stages = tile
    x, w, g = make(3, 48, 72, 1, 29, dtype)
    r = lambda *s: torch.randn(*s, device=DEV, generator=g).to(dtype)  # noqa: E731
    kw = dict(bias=r(72), activation="silu", residual_after_activation=after,
              residual=r(3, 72, 29, 29).contiguous(memory_format=torch.channels_last))
    out = torch.full((3, 72, 29, 29), float("nan"), device=DEV, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    from fxsparse.kernels import tma
    assert tma.eligible(x, w, out, kw["residual"], None, None, True, (1, 1)) == "gemm"
    y = K.conv2d_triton(ConvArgs.of(x, w, **kw), out=out, launch=launch("tma_gemm", bm, bn, 64, warps, stages))
    assert rel_l2(y, cudnn_oracle(x, w, **kw)) < REL_L2[dtype]


def _epilogue_case(n, cin, cout, k, hw, p, d, s, dtype, activation):
    """A conv of this geometry with every epilogue term: x, w, the conv and epilogue arguments as
    cudnn_oracle takes them (bias, a residual added before
    `activation`), and a NaN-poisoned channels_last output."""
    x, w, g = make(n, cin, cout, k, hw, dtype)
    ho = (hw + 2 * p - d * (k - 1) - 1) // s + 1
    r = lambda *shape: torch.randn(*shape, device=DEV, generator=g).to(dtype)  # noqa: E731
    kw = dict(stride=(s, s), padding=(p, p), dilation=(d, d), bias=r(cout),
              activation=activation, residual=r(n, cout, ho, ho).contiguous(memory_format=torch.channels_last))
    out = torch.full((n, cout, ho, ho), float("nan"), device=DEV, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    return x, w, kw, out


def _check_case(x, w, kw, out, fixed):
    """Runs _epilogue_case's conv with launch `fixed` into `out` and compares with cuDNN."""
    y = K.conv2d_triton(ConvArgs.of(x, w, **kw), out=out, launch=fixed)
    assert y is out
    assert rel_l2(y, cudnn_oracle(x, w, **kw)) < REL_L2[x.dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("geometry", [
    # (n, cin, cout, k, hw, padding, dilation, BLOCK_M, BLOCK_N, warps, stages, stride)
    (8, 64, 128, 3, 56, 1, 1, 128, 128, 8, 3, 1),
    (32, 512, 512, 3, 7, 1, 1, 64, 128, 4, 4, 1),
    (4, 96, 72, 3, 29, 1, 1, 128, 64, 4, 4, 1),  # partial boxes and channel tiles
    (4, 64, 48, 5, 20, 2, 1, 64, 64, 4, 4, 1),
    (4, 32, 32, 3, 20, 2, 2, 128, 32, 4, 4, 1),  # dilation
    (8, 128, 128, 3, 56, 1, 1, 128, 128, 4, 3, 2),  # ResNet-50's strided 3x3
    (8, 256, 512, 1, 28, 0, 1, 128, 128, 8, 3, 2),  # its strided 1x1 shortcut
    (4, 96, 72, 3, 30, 1, 1, 64, 64, 4, 4, 2),  # 96 channels in 64-channel blocks: masked runs
])
def test_tma_box_launches(dtype, geometry):
    """Convs through TMA box loads of one image (kernels/tma.py "box") with every epilogue term."""
    n, cin, cout, k, hw, p, d, bm, bn, warps, stages, s = geometry
    x, w, kw, out = _epilogue_case(n, cin, cout, k, hw, p, d, s, dtype, "relu")
    from fxsparse.kernels import tma
    assert tma.eligible(x, w, out, kw["residual"], None, None, False, (s, s)) == "box"
    _check_case(x, w, kw, out, launch("tma_box", bm, bn, 64, warps, stages))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("geometry", [
    # (n, cin, cout, k, hw, padding, dilation, BLOCK_M, BLOCK_N, warps, stages, stride)
    (8, 64, 128, 3, 56, 1, 1, 128, 128, 8, 4, 1),  # boxes of 2 images x 8x8
    (6, 64, 128, 3, 56, 1, 1, 128, 128, 8, 3, 1),  # 6 images: 3 full groups
    (30, 256, 256, 3, 28, 1, 1, 128, 128, 8, 3, 2),  # strided, 14x14 output: 4 images x 2x16
    (32, 512, 512, 3, 7, 1, 1, 64, 128, 4, 6, 1),  # boxes of 8 images x 1x8
    (30, 512, 512, 3, 7, 1, 1, 128, 256, 8, 3, 1),  # 30 images: the last group runs past the batch
    (4, 96, 72, 3, 29, 1, 1, 128, 64, 4, 6, 1),  # partial boxes and channel tiles, 96 = 64 + 32 channels
    (4, 64, 48, 5, 20, 2, 1, 64, 64, 4, 8, 1),
    (4, 32, 32, 3, 20, 2, 2, 128, 32, 4, 4, 1),  # dilation
    (8, 128, 128, 3, 56, 1, 1, 128, 128, 8, 4, 2),  # ResNet-50's strided 3x3
    (8, 256, 512, 1, 28, 0, 1, 128, 128, 8, 4, 2),  # its strided 1x1 shortcut
    (1, 64, 16, 3, 9, 1, 1, 64, 16, 4, 8, 1),  # batch 1, 16 channels
    (8, 64, 256, 1, 28, 0, 1, 128, 128, 4, 4, 1),  # a 1x1 conv (the TMA GEMM's) as boxes
    (64, 64, 128, 3, 56, 1, 1, 128, 128, 4, 4, 1),  # 1568 tiles: each program walks ~12
])
def test_box_ws_launches(dtype, geometry):
    """The warp-specialised box launch (kernels/box_ws.py, Gluon) with every epilogue term."""
    from fxsparse.kernels import box_ws, tma
    if not box_ws.usable(torch.device(DEV)):
        pytest.skip("needs an sm90 device and Gluon's Hopper API")
    n, cin, cout, k, hw, p, d, bm, bn, warps, stages, s = geometry
    x, w, kw, out = _epilogue_case(n, cin, cout, k, hw, p, d, s, dtype, "silu")
    pointwise = k == 1 and s == 1
    kind = tma.eligible(x, w, out, kw["residual"], None, None, pointwise, (s, s))
    assert kind == ("gemm" if pointwise else "box")
    assert tma.warp_specialisable(kind, x, w, out, kw["residual"], None, (s, s), min(64, cin))
    _check_case(x, w, kw, out, launch("ws_box", bm, bn, min(64, cin), warps, stages))


@pytest.mark.parametrize("split_k", [1, 2, 4])
def test_split_k_forced(split_k):
    x, w, g = make(32, 256, 128, 3, 7, torch.float16)
    bias = torch.randn(128, device=DEV, generator=g).half()
    out = torch.full((32, 128, 7, 7), float("nan"), device=DEV, dtype=torch.float16).contiguous(
        memory_format=torch.channels_last)
    y = K.conv2d_triton(ConvArgs.of(x, w, bias, padding=(1, 1), activation="relu"), out=out, split_k=split_k)
    assert rel_l2(y, cudnn_oracle(x, w, bias=bias, padding=(1, 1), activation="relu")) < 1e-3


def _split_conv(x, w, tma_box):
    fixed = launch("tma_box" if tma_box else "pointer", 64, 64, 64, 4, 3, split_k=4)
    return lambda: K.conv2d_triton(ConvArgs.of(x, w, padding=(1, 1), activation="relu"), launch=fixed)


@pytest.mark.parametrize("tma_box", [False, True])
def test_split_k_replayed_from_a_cuda_graph(tma_box):
    """Each replay zeroes the tiles' arrival counters again (part of the graph), so the last
    slice of every tile is found on every replay: three replays on new inputs match cuDNN."""
    x, w, g = make(32, 256, 128, 3, 7, torch.float16)
    run = _split_conv(x, w, tma_box)
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run()
    for _ in range(3):
        x.copy_(torch.randn(x.shape, device=DEV, generator=g).half())
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_l2(y, cudnn_oracle(x, w, padding=(1, 1), activation="relu")) < 1e-3


@pytest.mark.parametrize("tma_box", [False, True])
def test_split_k_on_two_streams_at_once(tma_box):
    """Split convs in flight on two streams at once each count their own slices (the counters
    are the call's own), so neither finishes a tile with the other's partial sums."""
    convs = [make(32, 256, 128, 3, 7, torch.float16, seed=s)[:2] for s in (1, 2)]
    streams = [torch.cuda.Stream() for _ in convs]
    torch.cuda.synchronize()
    outs = [[], []]
    for _ in range(20):
        for i, ((x, w), stream) in enumerate(zip(convs, streams)):
            with torch.cuda.stream(stream):
                outs[i].append(_split_conv(x, w, tma_box)())
    torch.cuda.synchronize()
    for (x, w), ys in zip(convs, outs):
        ref = cudnn_oracle(x, w, padding=(1, 1), activation="relu")
        assert max(rel_l2(y, ref) for y in ys) < 1e-3


def test_cuda_graph_capture_and_replay():
    x, w, g = make(8, 64, 32, 3, 28, torch.float16)
    out_index = torch.arange(0, 64, 2, device=DEV)
    fill = torch.randn(64, device=DEV, generator=g).half()
    kw = dict(padding=(1, 1), out_index=out_index, out_channels=64, fill=fill, activation="relu")
    run_op(x, w, **kw)  # autotune and index checks happen outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run_op(x, w, **kw)
    x.copy_(torch.randn(x.shape, device=DEV, generator=g).half())
    graph.replay()
    torch.cuda.synchronize()
    assert rel_l2(y, cudnn_oracle(x, w, **kw)) < 1e-3


def test_a_new_process_reads_the_tuned_launch_from_disk(tmp_path, monkeypatch):
    """The winner is written to the tuning cache; with the in-process table emptied (a new
    process), the same shape is launched from the file, untimed, with the same result."""
    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FXSPARSE_TUNE", "cache")
    monkeypatch.setenv("FXSPARSE_SHIPPED_TABLE", "0")  # (the first call must time, whatever fxsparse ships)
    monkeypatch.setattr(S.selector, "table", {})
    x, w, _ = make(4, 48, 40, 3, 14, torch.float16, seed=3)
    kw = dict(padding=(1, 1))
    first = run_op(x, w, **kw).clone()
    (problem, choice), = S.selector.chosen()
    assert choice.timings, "the first call times the candidates"
    assert list(tmp_path.glob("conv2d-tuning-*.json"))
    monkeypatch.setattr(S.selector, "table", {})
    again = run_op(x, w, **kw)
    (_, cached), = S.selector.chosen()
    assert cached.note == "from the tuning cache" and not cached.timings
    assert (cached.choice, cached.config, cached.split_k) == (choice.choice, choice.config, choice.split_k)
    assert torch.equal(again, first)


def test_tune_top_times_only_the_best_ranked(monkeypatch):
    """settings.tune_top = 3: three candidates timed; the winner is one of them and checked."""
    monkeypatch.setenv("FXSPARSE_TUNE", "always")
    monkeypatch.setenv("FXSPARSE_TUNE_TOP", "3")
    monkeypatch.setattr(S.selector, "table", {})
    x, w, _ = make(8, 64, 64, 3, 28, torch.float16, seed=4)
    y = run_op(x, w, padding=(1, 1))
    (_, sel), = S.selector.chosen()
    assert len(sel.timings) == 3
    assert rel_l2(y, cudnn_oracle(x, w, padding=(1, 1))) < 1e-3


def test_shipped_table_launches_its_shapes_untimed(tmp_path, monkeypatch):
    """A conv shape the table shipped for this device holds is launched from it on a fresh cache,
    without timing, and computes the conv (the first such shape of the table; skipped where fxsparse
    ships no table for this device and Triton)."""
    import ast
    import json
    import os

    from fxsparse.kernels import tuning_cache
    from fxsparse.kernels.problem import ConvProblem

    path = S.disk_cache(torch.cuda.current_device()).shipped
    if not path or not os.path.exists(path):
        pytest.skip("no table shipped for this device and Triton")
    monkeypatch.setenv("FXSPARSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FXSPARSE_TUNE", "cache")
    monkeypatch.setattr(S.selector, "table", {})
    monkeypatch.setattr(S.Selector, "tune", lambda *a: pytest.fail("timed a shape the shipped table holds"))
    from fxsparse.kernels.conv2d import conv_call

    def tensors(key):  # the entry's problem, and tensors of its shape if they are offered the same candidates
        call = ast.parse(key, mode="eval").body
        p = ConvProblem(**{kw.arg: ast.literal_eval(kw.value) for kw in call.keywords})
        x, w, _ = make(p.batch, p.in_channels, p.out_channels, p.kernel[0], p.height, getattr(torch, p.dtype))
        c = conv_call(ConvArgs.of(x, w, stride=p.stride, padding=p.padding, dilation=p.dilation))
        return p, x, w, S._signature(C.candidates(c.problem(p.sms), c))

    table = json.load(open(path))
    found = None
    for key in [k for k, v in table.items() if k.startswith("ConvProblem(") and "choice" in v][:40]:
        p, x, w, signature = tensors(key)
        if p.kernel[0] == p.kernel[1] and p.height == p.width and signature == table[key]["candidates"]:
            found = p, x, w
            break
    if found is None:
        pytest.skip("no square conv of the table is offered the same candidates without its epilogue")
    p, x, w = found
    assert tuning_cache.SHIPPED_DIR in path
    kw = dict(stride=p.stride, padding=p.padding, dilation=p.dilation)
    y = run_op(x, w, **kw)
    (_, sel), = S.selector.chosen()
    assert sel.note == "from the shipped table", sel
    assert rel_l2(y, cudnn_oracle(x, w, **kw)) < 1e-3
