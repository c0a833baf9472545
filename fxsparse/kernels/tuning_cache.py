"""Tuned conv launches kept on disk, so a new process does not re-time shapes it has seen.

Timing every candidate tile of every conv shape costs a Triton compile each: a ResNet-50
spends most of its first `torch.compile` there. Like Inductor's autotune cache, the winner
is stored per device and Triton version (a tile that wins on one chip or compiler need not
win on another) in `$FXSPARSE_CACHE_DIR` (default `~/.cache/fxsparse`).

An entry also records which candidates it was chosen from (`signature`): when fxsparse offers
a shape new candidates, its old winner no longer counts and the shape is timed again.

`FXSPARSE_TUNE` says how launches are chosen:
  cache  (default) the disk cache first, timing on a miss, the winner written back;
  always time every shape again (benchmarks of the tuner itself), still writing back;
  off    no timing: the shape's first safe candidate (quick GPU test runs).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from typing import Optional

log = logging.getLogger(__name__)

MODES = ("cache", "always", "off")


def mode() -> str:
    value = os.environ.get("FXSPARSE_TUNE", "cache")
    if value not in MODES:
        raise ValueError(f"FXSPARSE_TUNE={value!r}: expected one of {', '.join(MODES)}")
    return value


def cache_path(device_name: str, triton_version: str) -> str:
    root = os.environ.get("FXSPARSE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fxsparse")
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{device_name}-triton{triton_version}").strip("-")
    return os.path.join(root, f"conv2d-tuning-{slug}.json")


def signature(candidates: list, timing: str = "") -> str:
    """A short digest of a shape's (config, split_k) candidates and of how they were timed. A
    switch that is off does not count (configs from before it existed are the same launch)."""
    text = json.dumps([[sorted((k, v) for k, v in c.items() if v is not False), s] for c, s in candidates])
    return hashlib.sha1((text + timing).encode()).hexdigest()[:12]


class TuningCache:
    """{shape key: (config, split_k)} in one JSON file; keys are the tuner's tuples, as text."""

    def __init__(self, path: str):
        self.path = path
        self._entries: Optional[dict] = None

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                entries = json.load(f)
            return entries if isinstance(entries, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:  # a damaged file costs a re-tune, never a wrong launch
            log.warning("fxsparse: ignoring unreadable tuning cache %s (%s)", self.path, e)
            return {}

    def _load(self) -> dict:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def get(self, key: tuple, candidates: Optional[str] = None) -> Optional[tuple]:
        """The (config, split_k) stored for `key`, if it was chosen from `candidates` (a
        `signature`; None: whatever it was chosen from)."""
        entry = self._load().get(repr(key))
        if entry is None or candidates is not None and entry.get("candidates") != candidates:
            return None
        return dict(entry["config"]), int(entry["split_k"])

    def put(self, key: tuple, config: dict, split_k: int, candidates: Optional[str] = None) -> None:
        # merged with the file as it is now: another process may have added shapes since
        entry = {"config": config, "split_k": split_k, "candidates": candidates}
        entries = self._entries = {**self._read(), **self._load(), repr(key): entry}
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            # Write then rename: a process reading at the same time sees the old file or the new one.
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only home still runs, it just re-tunes next time
            log.warning("fxsparse: could not write tuning cache %s (%s)", self.path, e)
