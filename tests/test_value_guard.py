"""The guard's check, compiled and in Python: the same answers."""
import pytest
import torch

from fxsparse.runtime import guards
from fxsparse.runtime.guards import ValueGuard


@pytest.fixture(params=["compiled", "python"])
def make_guard(request):
    if request.param == "compiled" and guards.native_checker() is None:
        pytest.skip("no C++ toolchain for torch.utils.cpp_extension here")

    def make(positions, args, held=()):
        g = ValueGuard(positions, args, held)
        if request.param == "python":
            g._native = None
        else:
            assert g._native is not None
        return g

    return make


def _args(n=6):
    return (torch.randn(2, 3),) + tuple(torch.nn.Parameter(torch.randn(4)) for _ in range(n))


def test_unchanged_holds_for_tuple_and_list(make_guard):
    args = _args()
    g = make_guard([1, 3, 5], args)
    assert g.holds(args) and g.holds(list(args))
    assert g.holds((torch.randn(2, 3),) + args[1:])  # the model input is not guarded


def test_in_place_write_fails(make_guard):
    args = _args()
    g = make_guard([1, 3, 5], args)
    with torch.no_grad():
        args[3].mul_(2)
    assert not g.holds(args)


def test_new_tensor_at_a_guarded_position_fails(make_guard):
    args = _args()
    g = make_guard([1, 3, 5], args)
    rebound = list(args)
    rebound[5] = torch.nn.Parameter(args[5].detach().clone())
    assert not g.holds(rebound)


def test_held_tensor_written_by_the_caller_fails(make_guard):
    args, held = _args(), torch.randn(3)
    g = make_guard([1], args, [held])
    assert g.holds(args)
    held.add_(1)
    assert not g.holds(args)


def test_too_few_arguments_fail(make_guard):
    args = _args()
    g = make_guard([1, 6], args)
    assert not g.holds(args[:3])


def test_nothing_guarded_always_holds(make_guard):
    g = make_guard([], _args())
    assert g.holds(()) and g.holds(_args())


def test_data_swapped_under_the_same_object_fails(make_guard):
    """`param.data = t` keeps the object and its version but not its values."""
    args = _args()
    g = make_guard([1, 3], args)
    version = args[3]._version
    args[3].data = torch.randn(4)
    assert args[3]._version == version
    assert not g.holds(args)


def test_held_tensor_given_a_new_storage_fails(make_guard):
    args, held = _args(), torch.nn.Parameter(torch.randn(3))
    g = make_guard([1], args, [held])
    held.data = held.data.clone()
    assert not g.holds(args)


def test_view_moved_within_its_storage_fails(make_guard):
    base = torch.randn(8)
    view = base[:4]
    g = make_guard([], (), [view])
    with torch.no_grad():
        view.set_(base.untyped_storage(), 2, (4,))
    assert not g.holds(())


def test_a_new_storage_cannot_take_a_guarded_ones_address(make_guard):
    """Two swaps between calls: the guard keeps the storage it saw alive, so the second new
    storage cannot land where the original was."""
    p = torch.nn.Parameter(torch.randn(1 << 16))
    g = make_guard([], (), [p])
    p.data = torch.randn(1 << 16)
    p.data = torch.randn(1 << 16)
    assert not g.holds(())


def test_content_check_sees_a_write_no_version_counts(make_guard):
    args = _args()
    g = make_guard([1, 3, 5], args)
    g.content = guards.ContentCheck(g.tensors + g.held)
    args[3].data[2] += 1  # a `.data` write: the parameter's version is unchanged
    assert g._versions_hold(args) and not g.holds(args)


def test_content_check_is_exact_on_bytes():
    w = torch.randn(4, 6)
    w[0, 0] = float("nan")
    t = w.t()  # a strided view: its span in the storage is compared
    check = guards.ContentCheck([t, torch.zeros(0), torch.tensor(True)])
    assert check.unchanged(), "NaN must compare equal to itself"
    w.data[3, 5] = -w[3, 5]  # one sign bit
    assert not check.unchanged()
    w.data[3, 5] = -w[3, 5]
    assert check.unchanged()
    w.data[1, 1] = torch.nextafter(w[1, 1], torch.tensor(float("inf")))  # one ulp
    assert not check.unchanged()



_GUARD_IN_A_FRESH_PROCESS = """
import sys, torch
from fxsparse.runtime.guards import ValueGuard, native_checker
module = native_checker()
assert module is not None
w = torch.nn.Parameter(torch.randn(3))
g = ValueGuard([0], (w,))
assert g._native is not None and g.holds((w,))
with torch.no_grad():
    w.add_(1)
assert not g.holds((w,))
print("cpp_extension imported:", "torch.utils.cpp_extension" in sys.modules)
"""


def _guard_process(cache_dir) -> str:
    import os
    import subprocess
    import sys

    env = dict(os.environ, FXSPARSE_CACHE_DIR=str(cache_dir))
    done = subprocess.run([sys.executable, "-c", _GUARD_IN_A_FRESH_PROCESS], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.slow  # two fresh processes
def test_a_later_process_imports_the_built_guard_directly(tmp_path):
    """The first process builds (or finds) the guard through cpp_extension and notes where it
    lives; the next imports it from there without cpp_extension, and it checks as before. A
    damaged note costs only the direct import."""
    if guards.native_checker() is None:
        pytest.skip("no C++ toolchain for torch.utils.cpp_extension here")
    assert _guard_process(tmp_path) == "cpp_extension imported: True"
    notes = list(tmp_path.glob("fxsparse_version_guard_*.json"))
    assert len(notes) == 1
    assert _guard_process(tmp_path) == "cpp_extension imported: False"
    notes[0].write_text("{not json")
    assert _guard_process(tmp_path) == "cpp_extension imported: True"
    assert _guard_process(tmp_path) == "cpp_extension imported: False"
