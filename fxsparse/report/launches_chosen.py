"""Which launch the selector chose for each conv shape this process has run (CUDA only: the
interpreter and the CPU's aten lowering choose nothing), as rows and as a table. The rewrite report
says which convs became `torch.ops.fxsparse.conv2d`; this says what those calls run: the
implementation (pointer kernel, TMA GEMM or box, warp-specialised box), tile, warps, stages and
split-K, with the selector's note (checked against a 4-warp launch, from the disk cache, ...)."""
from __future__ import annotations

from tabulate import tabulate

HEADERS = ("pixels (M)", "out ch", "in ch", "input", "kernel", "stride", "dtype", "launch", "note")


def chosen_launches() -> list:
    """One row per conv shape the selector chose a launch for, in the order first run."""
    from fxsparse.kernels.select import selector

    rows = []
    for problem, sel in selector.chosen():
        rows.append((problem.m, problem.out_channels, problem.in_channels, f"{problem.height}x{problem.width}",
                     "x".join(map(str, problem.kernel)), "x".join(map(str, problem.stride)), problem.dtype,
                     sel.describe(), sel.note))
    return rows


def format_chosen_launches() -> str:
    rows = chosen_launches()
    if not rows:
        return "no conv launch chosen in this process (CPU, interpreter, or nothing run yet)"
    return tabulate(rows, headers=HEADERS)
