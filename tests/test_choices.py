"""The conv implementations as peer choices and the one selector over them (kernels/choices.py,
kernels/select.py), without a GPU: what each offers for a problem, eligibility, ranking, the
check of a winner, the settings, and that the backend, the nn module and the benchmarks all
time through the same selector."""
import ast
import os

import pytest
import torch

from fxsparse import options
from fxsparse.kernels import choices as C
from fxsparse.kernels import select as S
from fxsparse.kernels import timing, tuning_cache
from fxsparse.kernels.problem import ConvCall, ConvProblem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def problem(n=32, hw=7, cin=512, cout=512, k=3, stride=1, sms=132, split_k=None):
    p = k // 2
    return ConvProblem(n, hw, hw, cin, cout, (k, k), (stride, stride), (p, p), (1, 1), "float16", 1, 1, sms, split_k)


def cl(*shape):
    return torch.zeros(*shape, dtype=torch.float16).contiguous(memory_format=torch.channels_last)


def call_of(x, w, out, stride=(1, 1), padding=(1, 1), **kw):
    epi = dict(bias=None, bias_map=None, residual=None, out_index=None, fill=None)
    epi.update(kw)
    return ConvCall(x, w, epi["bias"], epi["bias_map"], epi["residual"], epi["out_index"], epi["fill"], out,
                    stride, padding, (1, 1), "relu", False)


# ------------------------------------------------------------------ what each choice offers

def test_pointer_offers_narrow_tiles_and_split_k_only_where_sms_idle():
    small = C.POINTER.configs(problem(cin=3, cout=24, n=32))  # M = 1568, 24 channels, Cin 3
    assert small and all(c["BLOCK_N"] in (16, 32) and c["BLOCK_K"] == 16 for c, _ in small)
    few_tiles = C.POINTER.configs(problem())  # 512->512 3x3 at 7x7: K = 4608, few tiles
    assert any(s > 1 for _, s in few_tiles)
    assert {s for c, s in C.POINTER.configs(problem(hw=14, cin=256, cout=256)) if c["BLOCK_M"] == 64} == {1}
    assert {s for _, s in C.POINTER.configs(problem(split_k=3))} == {3}  # a forced factor
    big = C.POINTER.configs(problem(n=64, hw=56, cin=64, cout=256, k=1))
    assert all(s == 1 for _, s in big) and any(c["BLOCK_N"] == 256 for c, _ in big)
    assert any(c["num_stages"] == 1 for c, _ in big)  # one K step: single-stage tiles
    assert all(c["num_stages"] > 1 for c, _ in C.POINTER.configs(problem(n=64, hw=56, cin=256, cout=256, k=1)))


def test_max_warps_setting_caps_tap_loops_only():
    with options.configure(conv_max_warps=4):
        assert all(c["num_warps"] <= 4 for c, _ in C.POINTER.configs(problem(hw=14, cin=256, cout=256)))
        assert any(c["num_warps"] == 8 for c, _ in C.POINTER.configs(problem(hw=14, cin=256, cout=256, k=1)))
    assert any(c["num_warps"] == 8 for c, _ in C.POINTER.configs(problem(hw=14, cin=256, cout=256)))


def test_tma_choices_follow_what_a_descriptor_addresses():
    x, w1, w3, out = cl(2, 16, 4, 4), cl(32, 16, 1, 1), cl(32, 16, 3, 3), cl(2, 32, 4, 4)
    p1 = problem(n=2, hw=4, cin=16, cout=32, k=1)
    p3 = problem(n=2, hw=4, cin=16, cout=32, k=3)
    pointwise = call_of(x, w1, out, padding=(0, 0))
    assert C.TMA_GEMM.eligible(p1, pointwise) and not C.TMA_BOX.eligible(p1, pointwise)
    assert C.TMA_BOX.eligible(p3, call_of(x, w3, out)) and not C.TMA_GEMM.eligible(p3, call_of(x, w3, out))
    scatter = call_of(x, w3, out, out_index=torch.arange(32))
    assert not C.TMA_BOX.eligible(p3, scatter)  # a channel scatter: the pointer kernel only
    assert not C.TMA_GEMM.eligible(p1, None)  # tensors unknown: not offered
    assert C.POINTER.eligible(p3, scatter)
    assert not C.WS_BOX.eligible(p3, call_of(x, w3, out))  # a CPU tensor: no sm90 device
    assert all(s > 1 for _, s in C.TMA_BOX.configs(problem(split_k=2)))
    assert all(s == 1 for _, s in C.TMA_GEMM.configs(problem(k=1)))
    assert all(s == 1 for _, s in C.WS_BOX.configs(problem()))


def test_no_launch_kind_the_logs_never_saw_win_is_offered():
    """Persistent pointer launches and non-warp-specialised boxes spanning images are gone."""
    for p in (problem(), problem(n=64, hw=56, cin=64, cout=256, k=1), problem(n=1, hw=56, cin=64, cout=64)):
        for choice in C.KERNELS:
            for cfg, _ in choice.configs(p):
                assert not {"PERSISTENT", "IMAGES", "TMA", "WS"} & set(cfg)


def test_candidates_are_ranked_and_include_every_eligible_kind():
    x, w3, out = cl(2, 16, 4, 4), cl(32, 16, 3, 3), cl(2, 32, 4, 4)
    p = problem(n=2, hw=4, cin=16, cout=32)
    cands = C.candidates(p, call_of(x, w3, out))
    assert {c.name for c, _, _ in cands} == {"pointer", "tma_box"}
    est = [c.estimate(p, cfg, s) for c, cfg, s in cands]
    assert est == sorted(est)


def test_ranking_prefers_the_measured_best_kinds_and_fitting_tiles():
    """On a dense 3x3 at 56x56 (the layer table's seed layer) the warp-specialised box ranks above
    the TMA box, and that above the pointer kernel, for the same tile; a tile twice as wide as the
    kept channels ranks below the one that fits them."""
    p = problem(n=16, hw=56, cin=64, cout=128)
    cfg = C.tile_config(128, 128, 64, 4, 4)
    assert C.WS_BOX.estimate(p, cfg, 1) < C.TMA_BOX.estimate(p, cfg, 1) < C.POINTER.estimate(p, cfg, 1)
    narrow = problem(n=16, hw=56, cin=64, cout=32)
    assert C.POINTER.estimate(narrow, C.tile_config(128, 32, 64, 4, 4), 1) < \
        C.POINTER.estimate(narrow, C.tile_config(128, 64, 64, 4, 4), 1)


def test_safe_launch_is_a_4_warp_pointer_tile():
    for p in (problem(), problem(cin=3, cout=16, hw=9, n=1)):
        choice, cfg, s = C.safe_launch(p)
        assert choice is C.POINTER and cfg["num_warps"] == 4 and C.is_safe(choice, cfg, p)


# ------------------------------------------------------------------ the selector's tuning and check

class FakeChoice(C.Choice):
    def __init__(self, name, value, ms, kind=C.Pointer):
        self.name, self.value, self.ms, self.kind = name, value, ms, kind

    def run(self, call, config, split_k=1):
        call.out.fill_(self.value)


@pytest.mark.parametrize("wrong", [False, True])
def test_a_winner_of_a_checked_kind_is_compared_with_the_safe_launch(monkeypatch, wrong):
    out = torch.zeros(1, 4, 2, 2)
    call = call_of(out, torch.zeros(4, 4, 1, 1), out)
    p = problem(n=1, hw=2, cin=4, cout=4, k=1)
    ws = FakeChoice("ws_box", 7.0 if wrong else 1.0, 1.0)
    monkeypatch.setattr(C, "WS_BOX", ws)
    safe_cfg = C.tile_config(64, 16, 16, 4, 3)
    monkeypatch.setattr(C.POINTER, "run", lambda call, cfg, s=1: call.out.fill_(1.0))
    times = {id(ws): 1.0}
    monkeypatch.setattr(timing, "gpu_time_ms", lambda fn, graphed=True, quick=False: (fn(), 2.0)[1])
    sel = S.Selector().tune(p, call, [(ws, C.tile_config(128, 64, 64, 4, 4), 1), (C.POINTER, safe_cfg, 1)])
    del times
    if wrong:
        assert sel.choice is C.POINTER and "MISMATCH" in sel.note
    else:
        assert sel.choice is ws and sel.note == "warp-specialised output checked"
    assert len(sel.timings) == 2


def shipped_table(monkeypatch, tmp_path, entries: dict) -> None:
    """The selector's disk cache: a shipped table of {problem: (choice, config)}, chosen among
    each problem's candidates for `call_of`'s conv, and an empty user file."""
    import json
    monkeypatch.setattr(S, "sm_count", lambda index: 132)
    monkeypatch.setattr(S, "_device_index", lambda device: 0)
    x, w3, out = cl(2, 16, 4, 4), cl(32, 16, 3, 3), cl(2, 32, 4, 4)
    signature = S._signature(C.candidates(next(iter(entries)), call_of(x, w3, out)))
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({repr(p): dict(choice=choice, config=cfg, split_k=1, candidates=signature)
                                   for p, (choice, cfg) in entries.items()}))
    cache = tuning_cache.TuningCache(str(tmp_path / "user.json"), str(shipped))
    monkeypatch.setattr(S, "disk_cache", lambda index: cache)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)


def test_selector_reads_the_shipped_table_untimed(monkeypatch, tmp_path):
    """A shape found in the table shipped for the device is launched without timing anything."""
    call = call_of(cl(2, 16, 4, 4), cl(32, 16, 3, 3), cl(2, 32, 4, 4))
    p, cfg = call.problem(132), C.tile_config(64, 32, 16, 4, 4)
    shipped_table(monkeypatch, tmp_path, {p: ("tma_box", cfg)})
    monkeypatch.setattr(S.Selector, "tune", lambda *a: pytest.fail("timed a shape the table holds"))
    sel = S.Selector()
    with options.configure(tune="cache"):
        got_p, got = sel.launch(call)
    assert got_p == p and got.choice is C.TMA_BOX and got.config == cfg and got.note == "from the shipped table"
    assert sel.chosen() == [(p, got)]


@pytest.mark.parametrize("wrong", [False, True])
def test_a_launch_tuned_for_one_16_bit_type_serves_the_other(monkeypatch, tmp_path, wrong):
    """bf16 takes the fp16 launch of its shape where only that one is known (and the reverse),
    checked against the safe launch as a tuned winner of its kind is; its own launch where both
    are known; fp32 borrows nothing."""
    def conv(dtype):
        make = lambda *shape: torch.zeros(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
        return call_of(make(2, 16, 4, 4), make(32, 16, 3, 3), make(2, 32, 4, 4))

    fp16, bf16, fp32 = conv(torch.float16), conv(torch.bfloat16), conv(torch.float32)
    tma, ws = C.tile_config(64, 32, 16, 4, 4), C.tile_config(128, 32, 16, 4, 8)
    shipped_table(monkeypatch, tmp_path, {fp16.problem(132): ("tma_box", tma)})
    monkeypatch.setattr(S.Selector, "tune", lambda *a: pytest.fail("timed a shape the table holds"))
    monkeypatch.setattr(C.TMA_BOX, "run", lambda call, cfg, s=1: call.out.fill_(7.0 if wrong else 1.0))
    monkeypatch.setattr(C.POINTER, "run", lambda call, cfg, s=1: call.out.fill_(1.0))
    with options.configure(tune="cache"):
        got_p, got = S.Selector().launch(bf16)
        assert got_p.dtype == "bfloat16"
        if wrong:
            assert got.choice is C.POINTER and "TMA MISMATCH" in got.note
        else:
            assert got.choice is C.TMA_BOX and got.config == tma
            assert got.note == "from the shipped table, tuned for float16, TMA output checked"
        assert not S.Selector().known(fp32)

    both = {fp16.problem(132): ("tma_box", tma), bf16.problem(132): ("pointer", ws)}
    shipped_table(monkeypatch, tmp_path, both)
    with options.configure(tune="cache"):
        _, got = S.Selector().launch(bf16)
    assert got.choice is C.POINTER and got.config == ws and got.note == "from the shipped table"


def test_tune_off_takes_the_safe_launch(monkeypatch):
    x, w3, out = cl(2, 16, 4, 4), cl(32, 16, 3, 3), cl(2, 32, 4, 4)
    monkeypatch.setattr(S, "sm_count", lambda index: 132)
    monkeypatch.setattr(S, "_device_index", lambda device: 0)
    with options.configure(tune="off"):
        _, sel = S.Selector().launch(call_of(x, w3, out))
    assert sel.choice is C.POINTER and sel.config["num_warps"] == 4 and "untuned" in sel.note


def test_pick_keeps_the_fastest_and_skips_failures():
    sel = S.Selector()

    def broken():
        raise RuntimeError("no")

    name, times = sel.pick("k", {"a": lambda: 1, "b": lambda: 2, "c": broken},
                           timer=lambda name, fn: (fn(), {"a": 3.0, "b": 1.0}[name])[1], persist=False)
    assert name == "b" and set(times) == {"a", "b"}
    with pytest.raises(RuntimeError, match="no"):
        sel.pick("k2", {"c": broken}, timer=lambda name, fn: fn(), persist=False)


# ------------------------------------------------------------------ settings

def test_settings_come_from_configure_then_environment(monkeypatch):
    monkeypatch.setenv("FXSPARSE_TUNE", "always")
    monkeypatch.setenv("FXSPARSE_CONV_WS", "0")
    monkeypatch.setenv("FXSPARSE_SPLIT_K", "4")
    s = options.kernel_settings()
    assert (s.tune, s.conv_ws, s.split_k) == ("always", False, 4)
    with options.configure(tune="off", conv_ws=True):
        assert options.kernel_settings().tune == "off" and options.kernel_settings().conv_ws
    assert options.kernel_settings().tune == "always"


@pytest.mark.parametrize("bad", [dict(tune="fast"), dict(conv_max_warps=6), dict(split_k=0), dict(tune_top=-1),
                                 dict(colour="red")])
def test_bad_settings_are_errors(bad):
    with pytest.raises(ValueError, match="fxsparse"):
        options.configure(**bad)


def test_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("FXSPARSE_TUNE", "fast")
    with pytest.raises(ValueError, match="FXSPARSE_TUNE"):
        options.kernel_settings()
    monkeypatch.setenv("FXSPARSE_TUNE", "cache")
    monkeypatch.setenv("FXSPARSE_TUNE_TOP", "many")
    with pytest.raises(ValueError, match="FXSPARSE_TUNE_TOP"):
        options.kernel_settings()


def test_no_environment_read_outside_options():
    """Every knob is read in fxsparse/options.py (TRITON_INTERPRET is Triton's own)."""
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "fxsparse")):
        for f in files:
            path = os.path.join(folder, f)
            if f.endswith(".py") and not path.endswith(os.path.join("fxsparse", "options.py")):
                text = open(path).read()
                if "environ" in text and "TRITON_INTERPRET" not in text:
                    offenders.append(path)
    assert not offenders


# ------------------------------------------------------------------ one selector, one timing, no cycle

def _imports(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_kernels_import_nothing_from_ops():
    folder = os.path.join(ROOT, "fxsparse", "kernels")
    for f in os.listdir(folder):
        if f.endswith(".py"):
            assert not any(m.startswith("fxsparse.ops") for m in _imports(os.path.join("fxsparse", "kernels", f))), f


def test_backend_nn_and_benchmarks_time_through_the_one_selector():
    assert "fxsparse.kernels.select" in _imports("fxsparse/lowering/choose.py")
    assert "fxsparse.kernels.select" in _imports("fxsparse/nn/conv.py")
    assert "fxsparse.kernels.timing" in _imports("benchmarks/common.py")
    assert "fxsparse.kernels.timing" in _imports("fxsparse/nn/eval.py")
    for path in ("fxsparse/lowering/choose.py", "fxsparse/nn/conv.py", "fxsparse/nn/eval.py", "benchmarks/common.py"):
        assert "do_bench(" not in open(os.path.join(ROOT, path)).read(), path


def test_chooser_asks_the_selector(monkeypatch):
    from fxsparse.lowering import choose

    asked = []
    real = S.selector.pick

    def spy(key, runs, **kw):
        asked.append(key)
        return real(key, runs, **kw)

    monkeypatch.setattr(S.selector, "pick", spy)
    shape = choose.ChainShape(1, 4, 5, 5, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), "float32", "cpu", "relu", False,
                              False, None, False, False)
    w = torch.randn(4, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    prob = choose.ChainProblem(shape, w, None, None, None, None, None, (5, 5))
    with choose.override(lambda name, s, fn: (fn(), 1.0 if name == "aten" else 2.0)[1]) as chooser:
        d = chooser.choose(prob)
    assert asked == [("chain", shape)] and d.lowering == "aten" and d.aten_us == 1.0


def test_compile_ahead_launches_every_candidate_once_each_kernel_first_alone(monkeypatch):
    import contextlib
    import threading

    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    order, lock = [], threading.Lock()

    class Recording(C.Choice):
        def __init__(self, name):
            self.name = name

        def run(self, call, config, split_k=1):
            with lock:
                order.append((self.name, config["BLOCK_M"], threading.current_thread() is threading.main_thread()))
            if config["BLOCK_M"] == 32:
                raise RuntimeError("out of shared memory")  # skipped here, met again when timed

    a, b = Recording("a"), Recording("b")
    cands = [(a, C.tile_config(m, 16, 16, 4, 3), 1) for m in (64, 128, 32)] + \
        [(b, C.tile_config(m, 16, 16, 4, 3), 1) for m in (64, 256)]
    call = call_of(cl(1, 16, 4, 4), cl(16, 16, 3, 3), cl(1, 16, 4, 4))
    S.compile_ahead(call, cands, workers=3)
    assert sorted(order[:2]) == [("a", 64, True), ("b", 64, True)]  # each kernel's first, alone
    assert sorted((n, m) for n, m, _ in order) == sorted((c.name, cfg["BLOCK_M"]) for c, cfg, _ in cands)
    assert all(not main for _, _, main in order[2:])


def test_compile_workers_setting(monkeypatch):
    monkeypatch.setenv("FXSPARSE_COMPILE_WORKERS", "8")
    assert options.kernel_settings().compile_workers == 8
    with pytest.raises(ValueError):
        options.configure(compile_workers=-1)


def test_a_chosen_launch_is_found_again_without_building_settings(monkeypatch):
    """The per-call path (every conv call on CUDA) is one dict lookup: no settings, no problem built."""
    x, w3, out = cl(2, 16, 4, 4), cl(32, 16, 3, 3), cl(2, 32, 4, 4)
    monkeypatch.setattr(S, "sm_count", lambda index: 132)
    monkeypatch.setattr(S, "_device_index", lambda device: 0)
    sel = S.Selector()
    with options.configure(tune="off"):
        first = sel.launch(call_of(x, w3, out))
        again = sel.launch(call_of(x, w3, out))  # (from the table; remembered for the per-call lookup)
    monkeypatch.setattr(options, "kernel_settings", lambda: pytest.fail("settings built on the per-call path"))
    assert sel.launch(call_of(x, w3, out)) == first == again


def test_split_k_setting_alone(monkeypatch):
    monkeypatch.delenv("FXSPARSE_SPLIT_K", raising=False)
    assert options.split_k_setting() is None
    monkeypatch.setenv("FXSPARSE_SPLIT_K", "3")
    assert options.split_k_setting() == 3
    with options.configure(split_k=2):
        assert options.split_k_setting() == 2
    monkeypatch.setenv("FXSPARSE_SPLIT_K", "x")
    with pytest.raises(ValueError, match="FXSPARSE_SPLIT_K"):
        options.split_k_setting()


def test_aten_choice_computes_the_op_and_the_lowerings_stand_in():
    """choices.ATEN: "aten" epilogue = the op's exact result (the reference formula); "fused" = cuDNN
    plus one elementwise pass, what the lowering times for its aten path (scatter without a fill
    included)."""
    from fxsparse.lowering.choose import aten_call
    from fxsparse.ops import ConvArgs, conv2d_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 5, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g)
    args = ConvArgs.of(x, w, torch.randn(4, generator=g), padding=(1, 1), in_index=torch.tensor([5, 0, 2]),
                       out_index=torch.tensor([1, 4, 5, 6]), out_channels=7, fill=torch.randn(7, generator=g),
                       bias_map=torch.randn(4, 5, 5, generator=g), residual=torch.randn(2, 7, 5, 5, generator=g),
                       activation="silu", residual_after_activation=True)
    exact = C.ATEN.compute(aten_call(args), "aten")
    torch.testing.assert_close(exact, conv2d_reference(args), rtol=1e-5, atol=1e-5)
    no_fill = args._replace(fill=None, bias_map=None, residual=None, activation="none")
    stand_in = C.ATEN.compute(aten_call(no_fill), "fused")
    assert stand_in.shape == (2, 7, 5, 5)


def test_prefetch_runs_in_the_background_and_wait_finishes_it(monkeypatch):
    """selector.prefetch (settings.compile_workers): a call of the op compiles on a background thread;
    `wait` (at the next op call or timing on the main thread) finishes every pending one, and a
    prefetch thread that reaches `wait` itself does not wait on itself."""
    import threading

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    sel = S.Selector()
    started, release, done = threading.Event(), threading.Event(), []

    def run():
        started.set()
        assert release.wait(10)
        sel.wait()  # on the prefetch thread: returns at once
        done.append(threading.current_thread().name)

    def broken():
        raise RuntimeError("no such launch")

    sel.prefetch(run, 2)
    sel.prefetch(broken, 2)  # a failure is left to the main thread's own call
    assert started.wait(10) and not done
    release.set()
    sel.wait()
    assert len(done) == 1 and done[0].startswith("fxsparse-compile") and not sel._pending
