"""The rewrite report: one entry per compiled graph, one row per conv.

`report.json` (in the dump directory) holds every graph the backend compiled
in this process with that directory; `fxsparse.explain` returns the same
structure. Each conv row is a `ConvRecord` (fxsparse/lowering/rewrite.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch.fx as fx
from tabulate import tabulate

log = logging.getLogger("fxsparse")


@dataclass
class GraphReport:
    index: int
    mode: str  # inference | training
    lowering: str
    propagate: bool
    convs: list = field(default_factory=list)  # ConvRecord
    launches: Optional[int] = None  # kernel launches per call, where measured
    notes: list = field(default_factory=list)

    @property
    def macs_before(self) -> int:
        return sum(c.macs_before for c in self.convs)

    @property
    def macs_after(self) -> int:
        return sum(c.macs_after for c in self.convs)

    @property
    def macs_ideal(self) -> int:
        return sum(c.macs_ideal for c in self.convs)

    @property
    def rewritten(self) -> int:
        return sum(c.lowering != "unchanged" for c in self.convs)

    def to_dict(self) -> dict:
        return {
            "index": self.index, "mode": self.mode, "lowering": self.lowering, "propagate": self.propagate,
            "macs_before": self.macs_before, "macs_after": self.macs_after, "macs_ideal": self.macs_ideal,
            "launches": self.launches, "notes": list(self.notes),
            "convs": [dataclasses.asdict(c) for c in self.convs],
        }


@dataclass
class Report:
    graphs: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"graphs": [g.to_dict() for g in self.graphs]}

    def write(self, directory) -> Path:
        path = Path(directory) / "report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return path

    def __str__(self) -> str:
        return format_table(self)


_reports: dict = {}


def current_report(dump_dir: Optional[str]) -> Report:
    """The report shared by every graph compiled in this process with this dump directory."""
    key = os.path.abspath(dump_dir) if dump_dir else None
    return _reports.setdefault(key, Report())


def format_table(report: Report) -> str:
    rows = []
    for g in report.graphs:
        for c in g.convs:
            rows.append([g.index, c.name, f"{c.in_channels}->{c.out_channels}",
                         f"{c.kept_in_channels}->{c.kept_out_channels}",
                         "x".join(map(str, c.kernel_size)), "x".join(map(str, c.stride)), c.lowering,
                         "+".join(c.fused) or "-", _ratio(c.macs_after, c.macs_before),
                         c.reason or getattr(c, "choice", None) or ""])
    table = tabulate(rows, headers=["graph", "conv", "channels", "kept", "kernel", "stride", "lowering",
                                    "fused", "MACs kept", "reason"])
    totals = [f"graph {g.index} ({g.mode}): {g.rewritten}/{len(g.convs)} convs rewritten, MACs kept "
              f"{_ratio(g.macs_after, g.macs_before)} (ideal {_ratio(g.macs_ideal, g.macs_before)})"
              + (f", {g.launches} launches" if g.launches is not None else "")
              + "".join(f"\n  note: {n}" for n in g.notes) for g in report.graphs]
    return table + "\n" + "\n".join(totals)


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.1%}" if b else "-"


def log_graph(g: GraphReport) -> None:
    log.info("fxsparse graph %d (%s, %s): %d/%d convs rewritten, MACs kept %s (ideal %s)", g.index, g.mode,
             g.lowering, g.rewritten, len(g.convs), _ratio(g.macs_after, g.macs_before),
             _ratio(g.macs_ideal, g.macs_before))


def write_dumps(directory, index: int, before: fx.GraphModule, after: fx.GraphModule, inputs=None) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"graph_{index}.before.py").write_text(before.print_readable(print_output=False))
    (d / f"graph_{index}.after.py").write_text(readable_with_computed_shapes(after, inputs))


_VALUE_KEYS = ("val", "tensor_meta", "example_value")


def readable_with_computed_shapes(gm: fx.GraphModule, inputs) -> str:
    """`gm`'s code annotated with the shapes it computes: the rewrite copies each node's
    metadata from the captured graph, whose shapes are the uncompacted ones, so the values
    are propagated anew (fake tensors, from `inputs`) for the print only. Where that fails,
    the code is printed with no shapes rather than wrong ones."""
    saved = {n: dict(n.meta) for n in gm.graph.nodes}
    # (nodes the rewrite made without a value, its own gathers and fills, stay unannotated)
    annotated = [n for n in gm.graph.nodes if any(k in n.meta for k in _VALUE_KEYS)]
    try:
        for n in gm.graph.nodes:
            for k in _VALUE_KEYS:
                n.meta.pop(k, None)
        header = ""
        try:
            _propagate_fake_values(gm, inputs)
            values = {n: n.meta.pop("val", None) for n in gm.graph.nodes}
            for n in annotated:
                n.meta["val"] = values[n]
        except Exception as e:  # noqa: BLE001 - an op without a fake kernel: print without shapes
            for n in gm.graph.nodes:
                for k in _VALUE_KEYS:
                    n.meta.pop(k, None)
            header = f"# shapes not annotated: propagating them failed ({type(e).__name__}: {e})\n"
        if inputs is not None and any(isinstance(a, int) and not isinstance(a, bool) for a in inputs):
            header += ("# sizes are symbolic in this graph (its int inputs): the shapes shown are those it "
                       "computes for the inputs it was compacted with\n")
        return header + gm.print_readable(print_output=False)
    finally:
        for n in gm.graph.nodes:
            n.meta = saved[n]


def _propagate_fake_values(gm: fx.GraphModule, inputs) -> None:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    if inputs is None:
        raise ValueError("no example inputs")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs]
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fakes)
