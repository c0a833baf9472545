"""Does profiling once with torch.profiler slow later plain calls in the same process? (H100 check)

    PYTHONPATH=. python tools/profiler_residue.py --model mobilenet_v2 --batch 1
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # common.py and models.py live there
sys.path.insert(0, ROOT)

import common  # noqa: E402
import models  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    common.raise_dynamo_recompile_limit()
    torch.backends.cudnn.benchmark = True
    masked, x, how = models.masked_problem(args.model, args.keep, args.batch)
    rows = []
    with torch.no_grad():
        fns = {
            "Inductor freezing + CUDA graphs": models.compile_inductor(copy.deepcopy(masked), freezing=True,
                                                                       cudagraphs=True, reset=False),
            "fxsparse default + freezing": models.with_freezing(
                torch.compile(copy.deepcopy(masked), backend="fxsparse")),
        }
        for fn in fns.values():
            for _ in range(5):
                fn(x)
        before = {name: common.time_plain(lambda f=fn: f(x)) * 1e3 for name, fn in fns.items()}
        models.count_launches(next(iter(fns.values())), x)
        after = {name: common.time_plain(lambda f=fn: f(x)) * 1e3 for name, fn in fns.items()}
    for name in fns:
        rows.append(dict(variant=name, before=before[name], after=after[name]))
    print(common.model_run_title(args.model, args.keep, args.batch, how, "do_bench plain us"))
    common.print_table(rows, [("variant", "variant"), ("before", "plain us, no profiler yet"),
                              ("after", "plain us, after profiling once")])


if __name__ == "__main__":
    main()
