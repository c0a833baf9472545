"""Property tests: random small conv nets, random masks, random edits after compiling; the
compiled model computes what its eager twin computes, every call, in outputs, gradients and
state (parameters, running statistics, num_batches_tracked, prune's `weight` attributes).

Nets, masks and edits are drawn by tests/fuzz_models.py. Hypothesis profiles (tests/conftest.py):
`ci`, the default (derandomized: the same examples every run), and a long exploration:
    FXSPARSE_FUZZ=long python -m pytest -q tests/test_fuzz.py
A failure prints the drawn scenario (net, masks, options, edits); each one found so far is a
plain test in tests/test_fuzz_found.py.
"""
from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, event, given, note, settings
from hypothesis import strategies as st

import fuzz_models as FM
from fxsparse.ops import triton_interpreter_on, triton_on_cpu
from fxsparse.report import current_report

pytestmark = pytest.mark.slow  # a few minutes on two cores


def examples(weight: float) -> int:
    """This test's share of the profile's examples (conftest.py: `ci` 500, `long` 6000)."""
    return max(1, int(settings().max_examples * weight))


@pytest.fixture(autouse=True)
def _no_silent_fallback():
    """Past its recompile limit dynamo would fall back to eager and every comparison would
    pass: fail instead."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


# -- a scenario: net, masks, options, edits ---------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    net: FM.Net
    masks: tuple
    options: dict
    train: bool  # mode at compile time
    grad: bool  # grad enabled at the first call
    edits: tuple
    seed: int
    dynamic: bool | None = None  # torch.compile(dynamic=...)
    channels_last: bool = False  # model and inputs in channels_last memory format


# edits that change the call rather than the model: a batch size, a spatial size, grad mode
CALL_EDITS = ("batch", "size", "grad")
FP32_EDITS = ("sgd", "load_state_dict", "mask_edit", "weight_edit", "train", "eval") + CALL_EDITS
FP32_OPTIONS = st.fixed_dictionaries({
    "lowering": st.sampled_from(["auto", "aten", "triton"]),  # (triton on fp32 CPU runs the op's reference)
    "propagate": st.sampled_from([True, True, False]),
    "align_channels": st.sampled_from([None, 1, 3, 8]),
})


@st.composite
def scenarios(draw, features: FM.Features, edit_kinds=FP32_EDITS, max_edits=4, train=st.booleans(),
              grad=st.sampled_from([False, False, True]), options=FP32_OPTIONS, force_masks=(),
              dynamic=st.sampled_from([None, None, None, True]), channels_last=st.booleans(), **net_kw):
    net = draw(FM.nets(features, **net_kw))
    kinds = draw(st.lists(st.sampled_from(edit_kinds), max_size=max_edits))
    return Scenario(net, draw(FM.masks(net, features, force=force_masks)), draw(options), draw(train), draw(grad),
                    tuple(FM.Edit(k, draw(st.integers(0, 2**16))) for k in kinds), draw(st.integers(0, 2**16)),
                    draw(dynamic), draw(channels_last))


# -- running one ----------------------------------------------------------------------------------

def as_tuple(y) -> tuple:
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def compiled_call(compiled, x):
    """The compiled model's result. A failure is re-raised from here, outside the handler, so
    that hypothesis sees one error site (generated code's file names change every compile)."""
    try:
        return compiled(x)
    except Exception as e:  # noqa: BLE001
        where = "".join(traceback.format_exception(e)[-6:])
    raise AssertionError(f"the compiled model raised where eager did not:\n{where}")


def state(model) -> dict:
    """Parameters, buffers, and each layer's `weight` attribute (prune's recomputed weight)."""
    out = dict(model.state_dict())
    for i, layer in enumerate(model.layers):
        if "weight" in layer.__dict__:  # prune keeps the masked weight as a plain attribute
            out[f"layers.{i}.weight (attribute)"] = layer.__dict__["weight"].detach()
    return out


class Check:
    """Calls the compiled model and its eager twin on the same fresh inputs and compares
    outputs, gradients and state."""

    def __init__(self, compiled, module, eager, *, tol, call_context=contextlib.nullcontext, reference=None):
        self.compiled, self.module, self.eager = compiled, module, eager
        self.tol, self.context = tol, call_context
        self.reference = reference or eager

    def call(self, shape, seed: int, grad: bool, dtype, memory_format=torch.contiguous_format):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype, memory_format=memory_format)
        with torch.set_grad_enabled(grad):
            try:
                want = as_tuple(self.reference(x.clone()))
            except (ValueError, RuntimeError) as e:  # the net rejects this input (BN of 1 value in train mode)
                note(f"eager raised {e}")
                assume(False)
            with self.context():
                got = as_tuple(compiled_call(self.compiled, x.clone()))
        assert len(got) == len(want)
        for i, (a, b) in enumerate(zip(got, want)):
            self.close(a, b, f"output {i}")
            assert a.requires_grad == b.requires_grad, f"output {i}: requires_grad differs from eager"
        if any(b.requires_grad for b in want):
            self.backward(got, want, seed)
        self.compare_state()

    def close(self, got, want, what: str):
        scale = max(1.0, float(want.detach().abs().max())) if want.numel() else 1.0
        torch.testing.assert_close(got.detach().to(want.dtype), want.detach(), rtol=self.tol, atol=self.tol * scale,
                                   msg=lambda m: f"{what} differs from eager: {m}")

    def backward(self, got, want, seed):
        g = torch.Generator().manual_seed(seed + 1)
        pairs = [(a, b, torch.randn(b.shape, generator=g).to(b.dtype)) for a, b in zip(got, want) if b.requires_grad]
        torch.autograd.backward([b for _, b, _ in pairs], [up for *_, up in pairs])
        torch.autograd.backward([a for a, _, _ in pairs], [up for *_, up in pairs])
        for (name, p), (_, q) in zip(self.module.named_parameters(), self.eager.named_parameters()):
            if (p.grad is None) != (q.grad is None):
                # AOTAutograd (plain Inductor too) gives zeros where eager gives None to a
                # parameter that only reaches an unused module attribute (prune's `weight`)
                assert not (p.grad if q.grad is None else q.grad).any(), f"gradient of {name}: one side has none"
            elif q.grad is not None:
                self.close(p.grad, q.grad, f"gradient of {name}")
            p.grad = q.grad = None

    def compare_state(self):
        mine, theirs = state(self.module), state(self.eager)
        assert mine.keys() == theirs.keys()
        for name, want in theirs.items():
            if want.is_floating_point():
                torch.testing.assert_close(mine[name], want, rtol=self.tol, atol=self.tol,
                                           msg=lambda m: f"state {name} differs from eager: {m}")
            else:
                assert torch.equal(mine[name], want), f"state {name}: {mine[name]} != eager {want}"


def memory_format(sc: Scenario):
    return torch.channels_last if sc.channels_last else torch.contiguous_format


def build(sc: Scenario, dtype):
    torch.manual_seed(sc.seed)
    model = FM.randomize(FM.FuzzNet(sc.net), sc.seed)
    for m in sc.masks:
        FM.apply_mask(model, m)
    return model.to(dtype, memory_format=memory_format(sc)).train(sc.train)


def in_fp32(module, x):
    """`module(x)` computed in fp32 from its fp16 values: the oracle of the fp16 runs."""
    try:
        return module.float()(x.float())
    finally:
        module.half()  # fp16 -> fp32 -> fp16 is exact
        for m in module.modules():  # prune's recomputed `weight`, as an fp16 forward leaves it
            if "weight" in m.__dict__:
                m.__dict__["weight"] = m.__dict__["weight"].half()


def next_graph_index() -> int:
    return max((g.index for g in current_report(None).graphs), default=-1) + 1


def count_events(first_graph: int) -> None:
    """What the examples exercised (pytest --hypothesis-show-statistics lists these)."""
    for g in current_report(None).graphs:
        if g.index >= first_graph:
            event(f"graph: {g.mode}")
            event("MACs removed" if g.macs_after < g.macs_before else "no MACs removed")
            for r in g.convs:
                event(f"a conv lowered to {r.lowering}")
                if r.reason:
                    event(f"a conv left unchanged: {r.reason.split(':')[0][:60]}")


def run_scenario(sc: Scenario, features: FM.Features, dtype=torch.float32, tol=1e-5, **check_kw):
    note(f"net = {sc.net}\nmasks = {sc.masks}\noptions = {sc.options}, dynamic={sc.dynamic}")
    torch._dynamo.reset()  # dynamo caches per code object, and every FuzzNet shares one forward
    first_graph = next_graph_index()
    model, eager = build(sc, dtype), build(sc, dtype)  # (a pruned module does not deepcopy)
    assume(features.all_channels or not FM.dead_conv(model))
    compiled = torch.compile(model, backend="fxsparse", fullgraph=FM.traceable_whole(sc.net), dynamic=sc.dynamic,
                             options={"inductor": False, **sc.options})
    check = Check(compiled, model, eager, tol=tol, **check_kw)
    if dtype == torch.float16:
        check.reference = lambda x: in_fp32(eager, x)
    shape, grad = sc.net.in_shape, sc.grad
    check.call(shape, sc.seed, grad, dtype, memory_format(sc))  # compiles
    check.call(shape, sc.seed + 1, grad, dtype, memory_format(sc))  # a fresh input through the same compiled graph
    for i, edit in enumerate(sc.edits):
        note(f"edit {i}: {edit}")
        event(f"edit: {edit.kind}")
        if edit.kind == "batch":
            shape = (shape[0] % 3 + 1, *shape[1:])
        elif edit.kind == "size":
            shape = FM.grown(sc.net, shape, edit.seed)
        elif edit.kind == "grad":
            grad = not grad
        else:
            for m in (model, eager):
                FM.apply_edit(m, edit)
            assume(features.all_channels or not FM.dead_conv(model))
        check.call(shape, sc.seed + 2 + i, grad, dtype, memory_format(sc))
    count_events(first_graph)


# -- the tests ------------------------------------------------------------------------------------

KNOWN = FM.Features()


@settings(max_examples=examples(0.7))
@given(scenarios(KNOWN))
def test_fuzz_fp32(sc):
    """fp32 on the CPU (lowering aten, or the op's reference under "triton"), inference and
    training, edits between calls."""
    run_scenario(sc, KNOWN)


FP16_EDITS = ("sgd", "load_state_dict", "mask_edit", "weight_edit", "batch")
TRITON_NETS = dict(max_nodes=4, max_channels=6, max_hw=5, max_batch=2)  # the interpreter is slow


@pytest.mark.skipif(torch.cuda.is_available() or not triton_interpreter_on(),
                    reason="the Triton kernel on the CPU needs TRITON_INTERPRET=1 and no GPU")
@settings(max_examples=examples(0.15))
@given(sc=scenarios(KNOWN, edit_kinds=FP16_EDITS, max_edits=2, train=st.just(False), grad=st.just(False),
                    options=st.just({"lowering": "triton"}), **TRITON_NETS))
def test_fuzz_fp16_triton(poisoned_kernel_outputs, sc):
    """fp16 through the Triton kernel (interpreted; an element it does not write is NaN),
    against fp32 eager on the same fp16 values."""
    launched = len(poisoned_kernel_outputs)
    run_scenario(sc, KNOWN, torch.float16, tol=2e-2, call_context=triton_on_cpu)
    event("the Triton kernel ran" if len(poisoned_kernel_outputs) > launched else "the Triton kernel did not run")


# (dynamic=True with training through Inductor: test_fuzz_found.py's
# test_training_graph_under_dynamic_shapes_through_inductor; not sampled here, each compile is slow)
@settings(max_examples=examples(0.02))
@given(scenarios(KNOWN, edit_kinds=("sgd", "mask_edit", "train", "eval", "batch"), max_edits=2,
                 options=st.fixed_dictionaries({"inductor": st.just(True), "lowering": st.sampled_from(["auto", "triton"])}),
                 dynamic=st.just(None), max_nodes=4))
def test_fuzz_through_inductor(sc):
    """The rewritten graph compiled by Inductor, as users run it (each compile is C++ codegen:
    few examples)."""
    run_scenario(sc, KNOWN)


# -- one behaviour in every example ------------------------------------------------------------

@settings(max_examples=examples(0.1))
@given(scenarios(FM.Features(all_channels=True), force_masks=("all_out",)))
def test_fuzz_all_channels_pruned(sc):
    """A conv with every output channel masked: its output is a per-channel constant."""
    run_scenario(sc, FM.Features(all_channels=True))


TRAIN_FEATURES = FM.Features(bn_cumulative=True)


@settings(max_examples=examples(0.1))
@given(scenarios(TRAIN_FEATURES, edit_kinds=("sgd", "train", "eval", "grad", "batch"), train=st.just(True)))
def test_fuzz_train_mode_buffers(sc):
    """Train mode from the start, BatchNorm with cumulative averages (momentum=None), every
    buffer compared, num_batches_tracked included."""
    run_scenario(sc, TRAIN_FEATURES)


@settings(max_examples=examples(0.1))
@given(scenarios(KNOWN, edit_kinds=("data_write", "mask_edit", "sgd", "batch"),
                 options=st.fixed_dictionaries({"guard_values": st.just("content"),
                                                "lowering": st.sampled_from(["aten", "triton"])})))
def test_fuzz_data_writes_checking_mode(sc):
    """Writes through `.data` (unseen by version counters) caught by the content guard."""
    run_scenario(sc, KNOWN)


@settings(max_examples=examples(0.1))
@given(scenarios(KNOWN, edit_kinds=("data_write_refresh", "weight_edit", "batch")))
def test_fuzz_data_writes_refresh(sc):
    """Writes through `.data`, each announced by fxsparse.refresh(model)."""
    run_scenario(sc, KNOWN)


@settings(max_examples=examples(0.1))
# (inference only: a train-mode BatchNorm before a masked head is
# test_train_mode_batchnorm_statistics_of_channels_the_head_ignores, an expected failure)
@given(scenarios(KNOWN, train=st.just(False)))
def test_fuzz_fp64(sc):
    """float64 models agree with eager to float64 rounding."""
    run_scenario(sc, KNOWN, torch.float64, tol=1e-12)
