"""A cache entry per live tensor (the op's checked indices, the launcher's input plans)."""
from __future__ import annotations

import weakref

import torch

Tensor = torch.Tensor


class TensorCache:
    """A cache entry per live tensor, keyed by identity, dropped when the tensor dies.

    (weakref.WeakKeyDictionary compares colliding keys with ==, which on tensors is
    elementwise and raises "Boolean value of Tensor ... is ambiguous".)
    """

    def __init__(self):
        self._entries: dict = {}

    def get(self, t: Tensor):
        entry = self._entries.get(id(t))
        if entry is None or entry[0]() is not t:
            return None
        return entry[1]

    def put(self, t: Tensor, value) -> None:
        key, entries = id(t), self._entries

        def drop(ref, key=key, entries=entries):
            entry = entries.get(key)
            if entry is not None and entry[0] is ref:
                del entries[key]

        entries[key] = (weakref.ref(t, drop), value)
