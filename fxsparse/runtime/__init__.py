"""What runs at call time: the guard that keeps folded values from going stale."""
from .guards import GuardedGraph, ValueGuard, refresh

__all__ = ["GuardedGraph", "ValueGuard", "refresh"]
