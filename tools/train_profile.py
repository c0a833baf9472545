"""Where a training step's time goes: fxsparse against Inductor and the physically pruned model.

Per variant, on the GPU: ms per step (CUDA events over `--steps` steps), the kernel time and
the number of kernels per step from the profiler (a step much longer than its kernel time is
bound by the host launching kernels), the kernels that take the most time, and the kernel time
by what the kernels do, read off their names (CATEGORIES).

    PYTHONPATH=. python tools/train_profile.py --model resnet50 --dtype fp16 --variants ind,fx,tp,indcg

Variants: ind (Inductor on the masked model), fx (fxsparse), tp (Torch-Pruning's physically
pruned model under Inductor); indcg, fxcg and tpcg: the same under CUDA graphs (mode
"reduce-overhead"; fxsparse's option cudagraphs=True). Then each variant's host ops
by self time: where a step bound by launching kernels spends its host time.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402
import train  # noqa: E402

import fxsparse  # noqa: E402,F401  (registers the backend)


# What a kernel of a training step does, read off its name; the first matching rule wins
# (Inductor names a fused kernel after every op it holds, so the rarer ops are tested first).
CATEGORIES = (
    ("fxsparse conv op", ("conv_kernel", "_gemm_kernel", "_box_kernel", "_box_ws_kernel")),
    ("cuDNN / cuBLAS conv, matmul", ("xmma", "cudnn", "cutlass", "convolve", "implicit_gemm", "gemm", "nhwc",
                                      "nchwToNhwc", "nhwcToNchw")),
    ("kept-weight slice (scatter)", ("index_put",)),
    ("gradient expansion to full size", ("masked_fill",)),
    ("optimizer", ("multi_tensor_apply", "foreach")),
    ("memory copy / fill", ("Memcpy", "Memset", "fill")),
    ("batch norm", ("batch_norm",)),
    ("other generated kernels", ("triton_",)),
)


def kernel_category(name: str) -> str:
    """The category of a kernel of a training step (CATEGORIES), "other" where none matches."""
    return next((cat for cat, keys in CATEGORIES if any(k in name for k in keys)), "other")


def by_category(per_kernel: dict) -> dict:
    """{category: ms per step} of {kernel name: ms per step}."""
    out = defaultdict(float)
    for name, ms in per_kernel.items():
        out[kernel_category(name)] += ms
    return dict(out)


def kernel_profile(trainer, x, y, steps: int) -> tuple:
    """(kernel ms per step, kernels per step, {kernel name: ms per step}, {host op: (self ms
    per step, calls per step)})."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer.step(x, y)
        torch.cuda.synchronize()
    per_kernel, count = defaultdict(float), 0
    host = defaultdict(lambda: [0.0, 0.0])
    for e in prof.events():
        if getattr(e, "is_user_annotation", False):
            continue  # a range such as the optimizer step's, over kernels counted on their own
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name] += e.device_time_total / 1e3 / steps
            count += 1
        else:
            host[e.name][0] += e.self_cpu_time_total / 1e3 / steps
            host[e.name][1] += 1 / steps
    return sum(per_kernel.values()), count / steps, per_kernel, host


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--dtype", default="fp16", choices=sorted(train.DTYPES))
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--variants", default="ind,fx,tp")
    p.add_argument("--top", type=int, default=12, help="kernels listed per variant")
    args = p.parse_args(argv)
    common.raise_dynamo_recompile_limit()
    torch.backends.cudnn.benchmark = True
    os.environ.setdefault("FXSPARSE_TUNE", "off")  # nothing tuned: lowering auto keeps aten convs
    dtype = train.DTYPES[args.dtype]
    make, physical, how = train.masked_and_physical(args.model, args.keep, 224)
    shape = train.bm.build(args.model)[1]
    classes = train.bm.classifier(make()).out_features
    x, y = train.batch_of(args.batch, shape, classes, "cuda", torch.Generator().manual_seed(0))
    variants = [v for v in args.variants.split(",") if not (v.startswith("tp") and physical is None)]
    torch._dynamo.reset()
    trainers, rows = {}, []
    # every step timed before anything is profiled: after torch.profiler has run, later plain
    # calls in the process stay slower (fxsparse's graphs more than Inductor's)
    for variant in variants:
        model = train.place(physical if variant.startswith("tp") else make(), "cuda")
        trainers[variant] = train.Trainer(model, train.compiled(model, variant), dtype, "cuda")
        compile_s = train.timed_first_step(trainers[variant], x, y)
        rows.append({"variant": variant, "step_ms": train.step_ms(trainers[variant], x, y, args.steps),
                     "compile_s": compile_s})
    categories = {}
    for row in rows:
        kernel_ms, kernels, per_kernel, host = kernel_profile(trainers[row["variant"]], x, y, 5)
        row.update(kernel_ms=kernel_ms, kernels=kernels, host_bound=row["step_ms"] - kernel_ms)
        categories[row["variant"]] = by_category(per_kernel)
        print(f"\n{row['variant']}: {row['step_ms']:.2f} ms/step, kernels {kernel_ms:.2f} ms in {kernels:.0f} launches",
              flush=True)
        for name, ms in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"   {ms:7.3f} ms  {name[:140]}")
        print(f"  host ops by self time (profiled: {sum(v[0] for v in host.values()):.1f} ms/step)")
        for name, (ms, calls) in sorted(host.items(), key=lambda kv: -kv[1][0])[:args.top]:
            print(f"   {ms:7.3f} ms  {calls:6.0f} calls  {name[:120]}")
    names = [c for c, _ in CATEGORIES] + ["other"]
    common.print_table([{"category": c, **{v: round(categories[v].get(c, 0.0), 3) for v in categories}}
                        for c in names], [("category", "kernel ms / step by name")] + [(v, v) for v in categories])
    env = common.environment()
    common.print_table(rows, [("variant", "variant"), ("step_ms", "ms/step"), ("kernel_ms", "kernel ms/step"),
                              ("kernels", "kernels/step"), ("host_bound", "step - kernel ms"),
                              ("compile_s", "compile s")],
                       title=f"\n{args.model} {args.dtype} B={args.batch} keep {args.keep} ({how}) | {env['device']} | "
                             f"torch {env['torch']} | triton {env['triton']}")


if __name__ == "__main__":
    main()
