import os

import pytest

# Without a GPU, Triton kernels can only run in its interpreter, and the
# interpreter is chosen when a kernel is decorated: set it before any import.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every candidate tile is a Triton compile: the GPU tests check results with one safe tile per
# shape (FXSPARSE_TUNE=off) unless a test asks for the tuner, and never read a user's tuning cache.
os.environ.setdefault("FXSPARSE_TUNE", "off")
os.environ["FXSPARSE_CACHE_DIR"] = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fxsparse-test-{os.getpid()}")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned_kernel_outputs(monkeypatch):
    """Makes the conv kernel allocate its outputs NaN-filled, so any element it does not write
    shows up in the comparison. Returns a list whose length counts the outputs allocated."""
    kernels = pytest.importorskip("fxsparse.kernels.conv2d")
    real = kernels._new_output
    allocated = []

    def nan_output(shape, x):
        allocated.append(tuple(shape))
        return real(shape, x).fill_(float("nan"))

    monkeypatch.setattr(kernels, "_new_output", nan_output)
    return allocated


# Hypothesis profiles for the property tests (tests/test_fuzz.py): "ci", the default, draws the
# same examples every run (derandomized, no example database) so that CI is never flaky;
# FXSPARSE_FUZZ=long explores afresh with 12x as many examples.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - hypothesis is in the `test` extra
    pass
else:
    _SLOW_EXAMPLES = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large,
                      HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=500, derandomize=True, database=None, deadline=None,
                              print_blob=True, suppress_health_check=_SLOW_EXAMPLES)
    settings.register_profile("long", max_examples=6000, deadline=None, print_blob=True,
                              suppress_health_check=_SLOW_EXAMPLES)
    settings.load_profile(os.environ.get("FXSPARSE_FUZZ", "ci"))
