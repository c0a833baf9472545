"""Tuned conv launches kept on disk, so a new process does not re-time shapes it has seen.

Timing every candidate of every conv shape costs a Triton compile each: a ResNet-50 spent most of
its first `torch.compile` there. Like Inductor's autotune cache, a winner is stored per device and
Triton major.minor (a launch that wins on one chip or compiler need not win on another), in
`settings.cache_dir` (default `~/.cache/fxsparse`). Under the user's file lies a read-only table
shipped with fxsparse (`fxsparse/kernels/tuned/<device>.json`, written by
`benchmarks/kernel_tune.py --write-table`): a shape found there is launched untimed on a fresh
machine. The user's file wins where both hold a shape.

An entry also records which candidates it was chosen from (`signature`): when fxsparse offers a
shape new candidates, its old winner no longer counts and the shape is timed again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from typing import Optional

from fxsparse.options import DEFAULT_CACHE_DIR

log = logging.getLogger(__name__)

SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned")


def device_slug(device_name: str, capability: tuple, sms: int, triton_version: str) -> str:
    """e.g. "sm90-132sm-NVIDIA-H100-80GB-HBM3-triton3.6": what a tuned launch depends on."""
    major_minor = ".".join(triton_version.split(".")[:2])
    text = f"sm{capability[0]}{capability[1]}-{sms}sm-{device_name}-triton{major_minor}"
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def cache_path(slug: str, cache_dir: Optional[str] = None) -> str:
    root = cache_dir or DEFAULT_CACHE_DIR
    return os.path.join(root, f"conv2d-tuning-{slug}.json")


def shipped_path(slug: str) -> str:
    return os.path.join(SHIPPED_DIR, f"{slug}.json")


def signature(candidates: list, timing: str = "") -> str:
    """A short digest of a shape's candidates (tuples of JSON-able parts: name, config, split-K)
    and of how they were timed."""
    text = json.dumps([[sorted(p.items()) if isinstance(p, dict) else p for p in c] for c in candidates])
    return hashlib.sha1((text + timing).encode()).hexdigest()[:12]


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            entries = json.load(f)
        return entries if isinstance(entries, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # a damaged file costs a re-tune, never a wrong launch
        log.warning("fxsparse: ignoring unreadable tuning cache %s (%s)", path, e)
        return {}


class TuningCache:
    """{key text: entry} in one JSON file, over an optional read-only table (`shipped`)."""

    def __init__(self, path: str, shipped: Optional[str] = None):
        self.path = path
        self.shipped = shipped
        self._entries: Optional[dict] = None
        self._table: Optional[dict] = None

    @classmethod
    def for_device(cls, device_name: str, capability: tuple, sms: int, triton_version: str,
                   cache_dir: Optional[str] = None) -> "TuningCache":
        slug = device_slug(device_name, capability, sms, triton_version)
        return cls(cache_path(slug, cache_dir), shipped_path(slug))

    def _load(self) -> dict:
        if self._entries is None:
            self._entries = _read(self.path)
        return self._entries

    def _shipped(self) -> dict:
        if self._table is None:
            self._table = _read(self.shipped) if self.shipped else {}
        return self._table

    def get(self, key: str, candidates: Optional[str] = None) -> Optional[dict]:
        """The entry stored for `key` if it was chosen from `candidates` (a `signature`; None:
        whatever it was chosen from): the user's, else the shipped table's ("source" says which)."""
        for source, entries in (("tuning cache", self._load()), ("shipped table", self._shipped())):
            entry = entries.get(key)
            if entry is not None and (candidates is None or entry.get("candidates") == candidates):
                return dict(entry, source=source)
        return None

    def put(self, key: str, entry: dict, candidates: Optional[str] = None) -> None:
        # merged with the file as it is now: another process may have added shapes since
        entries = self._entries = {**_read(self.path), **self._load(), key: dict(entry, candidates=candidates)}
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            # Write then rename: a process reading at the same time sees the old file or the new one.
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only home still runs, it just re-tunes next time
            log.warning("fxsparse: could not write tuning cache %s (%s)", self.path, e)
