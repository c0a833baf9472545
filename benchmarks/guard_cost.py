"""Host time per call of fxsparse's value guard: the default check (identity, version counter,
storage of every folded tensor) against guard_values="content" (those, then an exact byte
comparison of every folded tensor with a copy), and what a whole call costs with each.

    PYTHONPATH=. python benchmarks/guard_cost.py                      # ResNet-50 fp16 on CUDA
    PYTHONPATH=. python benchmarks/guard_cost.py --model small_resnet --device cpu --dtype float32
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import models  # noqa: E402


def guarded_bytes(graphs) -> int:
    return sum(t.numel() * t.element_size() for g, _ in graphs for t in g.guard.tensors + g.guard.held)


def row(name: str, keep: float, batch: int, device: str, dtype, guard, calls: int) -> dict:
    model, x, _ = models.masked_problem(name, keep, batch, device=device, dtype=dtype)
    compiled, graphs = models.fxsparse_compiled(model, {"guard_values": guard})
    with torch.no_grad():
        compiled(x)
        call_us = common.time_host_us(lambda: compiled(x), calls=calls)
        guard_us = sum(common.time_host_us(lambda g=g, a=a: g.guard.holds(a), calls=calls) for g, a in graphs)
        assert all(g.recompactions == 0 for g, _ in graphs), "the guard must hold on unchanged values"
    return {"model": name, "device": device, "guard_values": repr(guard), "tensors":
            sum(len(g.guard.tensors) + len(g.guard.held) for g, _ in graphs),
            "MB": guarded_bytes(graphs) / 1e6, "guard_us": guard_us, "call_us": call_us}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--calls", type=int, default=300)
    a = ap.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    rows = [row(a.model, a.keep, a.batch, a.device, dtype, guard, a.calls) for guard in (True, "content")]
    common.print_table(rows, ["model", "device", "guard_values", "tensors", "MB", "guard_us", "call_us"],
                       title=f"value guard per call, {a.model} keep {a.keep} B={a.batch} {a.dtype} "
                             f"({torch.cuda.get_device_name() if a.device == 'cuda' else 'CPU'})")


if __name__ == "__main__":
    main()
