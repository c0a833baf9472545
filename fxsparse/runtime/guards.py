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

What the version check cannot see: a write through `.data` (`w.data.mul_(2)`, `w.data[0] = 1`)
goes through a separate tensor with its own version counter, and aten's train-mode batch_norm
writes running statistics without bumping theirs; neither the storage nor its address
changes. No cheap signal of such a write exists (a storage has no version), so two tools
cover it: `refresh(model)` tells every compiled graph reading the model's tensors that values
changed, and the option guard_values="content" also compares, before every call, the bytes
of every guarded tensor with a copy taken when the graph was compacted (`ContentCheck`).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import operator
import os
import re
import sys
import weakref
from collections import defaultdict
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


_GUARD_CFLAGS = ("-O3",)


@functools.lru_cache(maxsize=None)
def native_checker():
    """The compiled VersionGuard module, or None (then ValueGuard checks in Python)."""
    from fxsparse.options import DEFAULT_CACHE_DIR, kernel_settings

    settings = kernel_settings()
    if not settings.native_guard:
        return None
    source = Path(__file__).with_name("version_guard.cpp").resolve()
    # one build per torch version and per checkout: checkouts sharing a build directory
    # rebuild it in turn (ninja sees another source path), 20 s in the first call each time
    checkout = hashlib.sha1(str(source).encode()).hexdigest()[:8]
    name = "fxsparse_version_guard_" + re.sub(r"\W", "_", torch.__version__) + "_" + checkout
    built = Path(settings.cache_dir or DEFAULT_CACHE_DIR) / f"{name}-{sys.implementation.cache_tag}.json"
    digest = hashlib.sha1(source.read_bytes() + repr(_GUARD_CFLAGS).encode()).hexdigest()
    module = _import_built(built, name, digest)
    if module is not None:
        return module
    try:
        from torch.utils.cpp_extension import load

        module = load(name, sources=[str(source)], extra_cflags=list(_GUARD_CFLAGS), verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no headers: the Python check is exact too
        log.info("fxsparse: compiled guard unavailable (%s: %s); checking in Python", type(e).__name__, e)
        return None
    _note_built(built, module.__file__, digest)
    return module


def _import_built(note: Path, name: str, digest: str):
    """The guard module an earlier process built from this very source, imported directly: a
    warm first compile then skips cpp_extension's import and its compiler and ninja checks. None
    where there is no such build (then `load` builds or finds it)."""
    try:
        entry = json.loads(note.read_text())
        if entry.get("source") != digest or not os.path.isfile(entry["library"]):
            return None
        spec = importlib.util.spec_from_file_location(name, entry["library"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except Exception:  # noqa: BLE001 - no note, a damaged one, a library that will not load: build
        return None


def _note_built(note: Path, library: str, digest: str) -> None:
    """Where the built guard module lives, for the next process (written atomically; a cache
    that cannot be written only costs the next process cpp_extension's checks)."""
    try:
        note.parent.mkdir(parents=True, exist_ok=True)
        tmp = note.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"library": library, "source": digest}))
        os.replace(tmp, note)
    except OSError as e:
        log.info("fxsparse: could not note the built guard's location (%s)", e)


def _byte_span(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over the bytes `t` spans in its storage (made once: it aliases the
    storage, so it sees every later write; the gaps of a strided view are compared too, which
    can only cause a needless recompaction)."""
    itemsize = t.element_size()
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))  # (torch's strides are >= 0)
    span = torch.empty(0, dtype=torch.uint8, device=t.device)
    return span.set_(t.untyped_storage(), t.storage_offset() * itemsize, (extent * itemsize,))


class ContentCheck:
    """The bytes of `tensors` now against a copy taken at construction: exact (a bitwise
    comparison, so a NaN equals itself and any written bit counts), one concatenation and one
    comparison per device per call: it reads every guarded byte twice and writes it once."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        spans = defaultdict(list)
        for t in tensors:
            if _storage_or_none(t) is not None and t.numel():
                spans[t.device].append(_byte_span(t.detach()))
        for d, ts in spans.items():  # padded to whole int64 words: compared 8 bytes at a time
            ts.append(torch.zeros(-sum(t.numel() for t in ts) % 8, dtype=torch.uint8, device=d))
        self.spans = dict(spans)
        self.copies = {d: self._words(ts) for d, ts in self.spans.items()}

    @staticmethod
    def _words(spans: list) -> torch.Tensor:
        return torch.cat(spans).view(torch.int64)

    def unchanged(self) -> bool:
        return all(torch.equal(self._words(ts), self.copies[d]) for d, ts in self.spans.items())


class ValueGuard:
    """Before each call: whether every tensor whose value the compiled graph folded is as it
    was. `check`: "version" (identity, version counter, storage: the default), "content"
    (those, then the bytes themselves, see ContentCheck) or "off" (always holds; the tensors
    are still recorded, for refresh())."""

    def __init__(self, positions: Sequence[int], args: Sequence, held: Sequence[torch.Tensor] = (),
                 check: str = "version", by_value: Sequence[int] = ()):
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
        self.check = check
        # positions of tensors made anew each call whose values the graph read: 0-d floats dynamo
        # wraps under dynamic shapes, a mask an earlier piece of a split graph passes on
        self.by_value = [(i, args[i].detach().clone()) for i in by_value]
        self.content = ContentCheck(self.tensors + self.held) if check == "content" else None
        native = native_checker() if check != "off" else None
        self._native = native.VersionGuard(list(self.positions), self.tensors + self.held) if native else None

    def holds(self, args: Sequence) -> bool:
        if self.check == "off":
            return True
        if not self._versions_hold(args):
            return False
        if self.by_value and not all(i < len(args) and torch.equal(args[i], v) for i, v in self.by_value):
            return False
        return self.content is None or self.content.unchanged()

    def watches(self, args: Sequence) -> bool:
        """Whether `args` hold the very tensors this guard watches: a failed check is then a
        change of their values, for good (versions only grow), not a call from another model."""
        try:
            return all(map(operator.is_, self._pick(args), self.tensors))
        except IndexError:
            return False

    def storages(self) -> set:
        """Addresses of the storages this guard's tensors rest on (what refresh() matches)."""
        return {s.data_ptr() for s in self._storages if s is not None}

    def _versions_hold(self, args: Sequence) -> bool:
        if self._native is not None:
            return self._native.holds(args)
        try:
            current = self._pick(args)
        except IndexError:
            return False
        return (all(map(operator.is_, current, self.tensors))
                and list(map(_footprint, current)) == self.footprints
                and list(map(_footprint, self.held)) == self.held_footprints)


class _Expired:
    """The guard of a graph told that values changed (refresh): fails once, then is replaced."""

    @staticmethod
    def holds(args: Sequence) -> bool:
        return False

    @staticmethod
    def watches(args: Sequence) -> bool:
        return True


# every live compiled graph, for refresh()
_graphs: "weakref.WeakSet[GuardedGraph]" = weakref.WeakSet()


# builds a graph keeps beside its current one for other models: two instances of one model class
# (a student and its teacher, two variants being compared) share dynamo's graph and take turns
KEPT_BUILDS = 4


class GuardedGraph:
    """A compiled graph that recompacts itself when a value it folded changes."""

    def __init__(self, build: Callable, example_inputs: Sequence, built: Optional[tuple] = None):
        self._build = build  # (inputs) -> (callable, ValueGuard)
        # `built`: the first build, where it was made otherwise than from example_inputs
        self.fn, self.guard = built if built is not None else build(example_inputs)
        self._kept: list = []  # (callable, ValueGuard) of other models' tensors, latest first
        self.recompactions = 0
        _graphs.add(self)

    def expire(self) -> None:
        """Recompact before the next call, whatever the guard says."""
        if not isinstance(self.guard, _Expired):
            self._storages = self.guard.storages() | {p for _, g in self._kept for p in g.storages()}
            self.guard = _Expired()
            self._kept.clear()

    def reads(self, storages: set) -> bool:
        """Whether a value this graph folded lives in one of `storages` (data addresses)."""
        mine = self._storages if isinstance(self.guard, _Expired) else (
            self.guard.storages().union(*(g.storages() for _, g in self._kept)))
        return not mine.isdisjoint(storages)

    def __call__(self, *args):
        if _fake(args):
            # DDPOptimizer runs each compiled piece on fake tensors to propagate shapes to the
            # next: nothing to read or recompact there (and fakes hold no values to read)
            return self.fn(*args)
        if not self.guard.holds(args):
            self._switch(args)
        return self.fn(*args)

    def _switch(self, args: Sequence) -> None:
        """The build whose folded values are the call's: one kept for these tensors, else a new
        compaction; the build left keeps only if it watches other tensors than the call's."""
        left = (self.fn, self.guard)
        found = next((i for i, (_, g) in enumerate(self._kept) if g.holds(args)), None)
        if found is not None:
            self.fn, self.guard = self._kept.pop(found)
        else:
            log.info("fxsparse: a folded weight, mask or statistic changed: recompacting")
            self.fn, self.guard = self._build(args)
            self.recompactions += 1
        if not left[1].watches(args):
            self._kept.insert(0, left)
            del self._kept[KEPT_BUILDS:]


def _fake(args: Sequence) -> bool:
    """Whether the call is on fake tensors (DDPOptimizer fakes every tensor argument, so the
    first one tells; cheap on the per-call path)."""
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    return isinstance(first, FakeTensor)


def refresh(model=None) -> int:
    """Tells fxsparse that values changed in a way its guard cannot see (a write through
    `.data`, a train-mode `F.batch_norm` on a module's running statistics outside the module):
    every compiled graph that folded a parameter or buffer of `model` (a module, or the module
    torch.compile returned) recompacts before its next call. With no argument, every compiled
    graph does. Returns how many graphs will recompact."""
    graphs = list(_graphs)
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"fxsparse.refresh takes an nn.Module (or what torch.compile returned for one), "
                            f"got {type(model).__name__}")
        module = getattr(model, "_orig_mod", model)
        storages = {s.data_ptr() for s in map(_storage_or_none, list(module.parameters()) + list(module.buffers()))
                    if s is not None}
        graphs = [g for g in graphs if g.reads(storages)]
    for g in graphs:
        g.expire()
    return len(graphs)
