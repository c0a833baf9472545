"""Which launch fxsparse's conv tuner chose for each conv shape this process has run (CUDA
only: the interpreter and the CPU's aten lowering tune nothing), as rows and as a table. The
rewrite report says which convs became `torch.ops.fxsparse.conv2d`; this says what those calls
run: tile, warps, stages, and the launch kind (TMA GEMM or box, warp-specialised, persistent,
split-K), with the tuner's note (checked against a 4-warp launch, from the disk cache, ...)."""
from __future__ import annotations

from tabulate import tabulate

HEADERS = ("pixels (M)", "out ch", "in ch", "input", "kernel", "stride", "dtype", "launch", "note")


def chosen_launches() -> list:
    """One row per tuned conv shape, in the order the shapes were first run."""
    from fxsparse.kernels import conv2d as K

    rows = []
    for key, choice in K.tuned.items():
        m, nch, cin, h, w, kh, kw, sh, sw, _ph, _pw, _dh, _dw, dtype = key[:14]
        rows.append((m, nch, cin, f"{h}x{w}", f"{kh}x{kw}", f"{sh}x{sw}", str(dtype).replace("torch.", ""),
                     K.describe_launch(choice.config, choice.split_k), choice.note))
    return rows


def format_chosen_launches() -> str:
    rows = chosen_launches()
    if not rows:
        return "no conv launch tuned in this process (CPU, interpreter, or nothing run yet)"
    return tabulate(rows, headers=HEADERS)
