"""Checked boundaries between the stages (capture -> sparsity -> compaction -> lowering).

Each stage checks its own output where it makes it, so that a bad result fails in the stage
that made it, with that stage's name and the node concerned, rather than later inside
Inductor or as a wrong answer.
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx


class StageError(RuntimeError):
    """A stage produced an output that breaks its contract: `stage` made it, about `node`."""

    def __init__(self, stage: str, message: str, node: Optional[fx.Node] = None):
        self.stage, self.node = stage, node
        super().__init__(f"{stage}: {message}")


def check_graph(stage: str, gm: fx.GraphModule) -> None:
    """The graph `stage` hands on is well formed (torch.fx's lint: defined before use, one output)."""
    try:
        gm.graph.lint()
    except Exception as e:  # noqa: BLE001 - lint raises plain RuntimeErrors and AssertionErrors
        raise StageError(stage, f"graph does not lint: {e}") from e
