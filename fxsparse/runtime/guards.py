"""Stale-weight protection.

Dynamo guards check a parameter's shape, dtype and device, never its values,
so a backend that folds values at compile time must check them itself. The
compiled graph remembers, for every placeholder whose value a decision read
(weights, masks, BatchNorm statistics, biases), the tensor's identity, its
`_version` counter (bumped by every in-place write: an optimizer step,
`load_state_dict`, `copy_`) and where its data lives (`param.data = t` swaps the
storage under the same object and leaves the version as it was). Before each
call one pass over those tensors compares all three; on any change the graph is
recompacted from the new values before it runs. A new Parameter bound in place
of the old one fails the identity check. The guard keeps the storages it saw
alive, so a new storage cannot take an old one's address.

The check runs in C++ (version_guard.cpp, built once per machine with
torch.utils.cpp_extension): read from Python, a version counter costs 50-190 ns,
so a ResNet-50's 320 guarded tensors cost 61 us a call on the H100's host. Where
no compiler is available (or FXSPARSE_NATIVE_GUARD=0) the same check runs in Python.
"""
from __future__ import annotations

import functools
import logging
import operator
import os
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor

log = logging.getLogger("fxsparse")


def _footprint(t: torch.Tensor) -> tuple:
    """(version, data address): what the Python check compares. The guard keeps the storages
    alive, so an address names one storage (version_guard.cpp compares the storage itself)."""
    try:
        return t._version, t.data_ptr()
    except (RuntimeError, NotImplementedError):  # no storage (e.g. a wrapper subclass)
        return t._version, None


def _storage_or_none(t: torch.Tensor):
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


@functools.lru_cache(maxsize=None)
def native_checker():
    """The compiled VersionGuard module, or None (then ValueGuard checks in Python)."""
    if os.environ.get("FXSPARSE_NATIVE_GUARD", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        name = "fxsparse_version_guard_" + re.sub(r"\W", "_", torch.__version__)
        return load(name, sources=[str(Path(__file__).with_name("version_guard.cpp"))], extra_cflags=["-O3"],
                    verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no headers: the Python check is exact too
        log.info("fxsparse: compiled guard unavailable (%s: %s); checking in Python", type(e).__name__, e)
        return None


class ValueGuard:
    def __init__(self, positions: Sequence[int], args: Sequence, held: Sequence[torch.Tensor] = ()):
        self.positions = tuple(positions)
        self._pick = operator.itemgetter(*self.positions) if len(self.positions) > 1 else (
            (lambda a, i=self.positions[0]: (a[i],)) if self.positions else (lambda a: ()))
        self.tensors = tuple(self._pick(args))
        self.footprints = list(map(_footprint, self.tensors))
        # tensors checked by footprint alone (no identity), held here rather than passed in:
        # those the compiled graph hands out (a pruned module's `weight`: a caller writing into
        # one must not change what the next call returns), BatchNorm step counters (see
        # graph/capture.py: running_stat_counter) and, under Inductor's freezing, every
        # tensor the graph holds as an attribute (backend.frozen_tensors)
        self.held = tuple(held)
        self.held_footprints = list(map(_footprint, self.held))
        self._storages = [_storage_or_none(t) for t in self.tensors + self.held]  # (see the module doc)
        native = native_checker()
        self._native = native.VersionGuard(list(self.positions), self.tensors + self.held) if native else None

    def holds(self, args: Sequence) -> bool:
        if self._native is not None:
            return self._native.holds(args)
        try:
            current = self._pick(args)
        except IndexError:
            return False
        return (all(map(operator.is_, current, self.tensors))
                and list(map(_footprint, current)) == self.footprints
                and list(map(_footprint, self.held)) == self.held_footprints)


class GuardedGraph:
    """A compiled graph that recompacts itself when a value it folded changes."""

    def __init__(self, build: Callable, example_inputs: Sequence, built: Optional[tuple] = None):
        self._build = build  # (inputs) -> (callable, ValueGuard)
        # `built`: the first build, where it was made otherwise than from example_inputs
        self.fn, self.guard = built if built is not None else build(example_inputs)
        self.recompactions = 0

    def __call__(self, *args):
        if _fake(args):
            # DDPOptimizer runs each compiled piece on fake tensors to propagate shapes to the
            # next: nothing to read or recompact there (and fakes hold no values to read)
            return self.fn(*args)
        if not self.guard.holds(args):
            log.info("fxsparse: a folded weight, mask or statistic changed: recompacting")
            self.fn, self.guard = self._build(args)
            self.recompactions += 1
        return self.fn(*args)


def _fake(args: Sequence) -> bool:
    """Whether the call is on fake tensors (DDPOptimizer fakes every tensor argument, so the
    first one tells; cheap on the per-call path)."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return isinstance(first, FakeTensor)
