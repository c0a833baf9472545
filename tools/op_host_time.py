"""Host time of one `torch.ops.fxsparse.conv2d` call, split: torch.library's dispatch, the op's
argument checks, the launcher (kept channels read, output allocated, launch looked up) and the
kernel launch itself; an aten conv on the same tensors for comparison.

On CUDA every part is real, with tensors small enough that the host bounds each call. On the CPU
the Triton kernel's launch is replaced by a no-op (through `triton_on_cpu`, the interpreter's
path), so what is timed is the Python around it.

    PYTHONPATH=. python tools/op_host_time.py [--device cuda] [--calls 5000]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def per_call_us(fn, calls: int, rounds: int = 5) -> float:
    """Median over `rounds` of benchmarks/common.py's host time per call, in us."""
    import common

    return statistics.median(common.time_host_us(fn, calls) for _ in range(rounds))


def example_args(device: str):
    """A 3x3 conv + bias + residual + ReLU on a few pixels (fp16 on CUDA, fp32 on the CPU)."""
    import torch

    dtype = torch.float16 if device == "cuda" else torch.float32
    cl = torch.channels_last
    x = torch.randn(2, 64, 8, 8, device=device, dtype=dtype).contiguous(memory_format=cl)
    w = torch.randn(32, 64, 3, 3, device=device, dtype=dtype).contiguous(memory_format=cl)
    b = torch.randn(32, device=device, dtype=dtype)
    res = torch.randn(2, 32, 8, 8, device=device, dtype=dtype).contiguous(memory_format=cl)
    return (x, w, b, [1, 1], [1, 1], [1, 1], None, None, 32, None, None, res, "relu", False)


def measure(device: str, calls: int) -> dict:
    import torch

    from fxsparse.kernels import choices as C
    from fxsparse.kernels.conv2d import conv2d_triton, conv_call
    from fxsparse.kernels.problem import ConvArgs
    from fxsparse.kernels.select import selector
    from fxsparse.ops.conv2d import check_conv2d_args, triton_on_cpu

    args = example_args(device)
    cuda = device == "cuda"
    with contextlib.ExitStack() as stack:
        if not cuda:
            stack.enter_context(triton_on_cpu())
            for choice in C.KERNELS:  # the Python around the launch, not the interpreter's run
                stack.enter_context(mock.patch.object(choice, "run", lambda *a, **k: None))
        op = torch.ops.fxsparse.conv2d.default
        with torch.no_grad():
            op(*args)
            rows = dict(op=per_call_us(lambda: op(*args), calls),
                        checks=per_call_us(lambda: check_conv2d_args(ConvArgs(*args)), calls),
                        launcher=per_call_us(lambda: conv2d_triton(ConvArgs(*args)), calls))
            if cuda:
                call = conv_call(ConvArgs(*args))
                sel = selector.launch(call)[1]
                rows["launch"] = per_call_us(lambda: sel.choice.run(call, sel.config, sel.split_k), calls)
                rows["launch_kind"] = sel.describe()
            x, w, b = args[:3]
            rows["aten"] = per_call_us(lambda: torch.relu(torch.conv2d(x, w, b, 1, 1) + args[11]), calls)
    rows["dispatch"] = rows["op"] - rows["checks"] - rows["launcher"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--calls", type=int, default=5000)
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # (read when triton is imported: the interpreter's path)
    sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]  # (common.py lives there)
    import torch
    import triton
    from tabulate import tabulate

    rows = measure(args.device, args.calls)
    table = [("the op, as a compiled graph calls it", rows["op"]),
             ("  torch.library's dispatch (the rest)", rows["dispatch"]),
             ("  the op's argument checks", rows["checks"]),
             ("  the launcher" + (", launch included" if "launch" in rows else ", launch mocked"), rows["launcher"])]
    if "launch" in rows:
        table.append((f"    the launch alone ({rows['launch_kind']})", rows["launch"]))
    table.append(("aten conv + add + relu, same tensors", rows["aten"]))
    print(f"{args.device} | torch {torch.__version__} | triton {triton.__version__} | host us per call")
    print(tabulate(table, headers=("part", "us"), floatfmt=".1f", tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
