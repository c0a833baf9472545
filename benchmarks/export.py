"""The compact model exported: ONNX Runtime on the CPU, AOTInductor on CUDA, against the masked original.

    PYTHONPATH=. python benchmarks/export.py --quick                       # test-sized, CPU (CI)
    PYTHONPATH=. python benchmarks/export.py --models small_resnet,resnet50   # needs torchvision
    PYTHONPATH=. python benchmarks/export.py --gpu --models resnet50 --batch 1,64   # CUDA, fp16

CPU: the masked model (channel groups at `--keep`, prune hooks) and `fxsparse.compact` of it,
each exported with torch.onnx.export(dynamo=True) and run in onnxruntime with one intra-op
thread and with all of them; also the masked model with its masks made permanent
(prune.remove: "baked", the dense model with zeros, no per-call mask product). ms = median
wall-clock per run; "compact vs X" = X ms / compact ms; err = max |ORT output of compact -
masked eager output| / max(1, max |masked eager output|); size = the .onnx files.

GPU (--gpu): fp16, channels_last, per batch: AOTInductor packages (aoti_compile_and_package,
aoti_load_package, one static-shape package per batch; --runner compile: the exported program's
module under torch.compile with freezing instead, the same generated code in-process) of the
compact model (lowering "auto"; --lowerings auto,aten adds aten), of Torch-Pruning's physically
pruned model (where torch_pruning imports; --with-masked adds the masked model), and
torch.compile(backend="fxsparse") on the masked model. ms = median plain call
(triton.testing.do_bench: host time included); err = max |out - masked eager fp16 out|.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import models  # noqa: E402

import fxsparse  # noqa: E402

CPU_COLUMNS = [
    ("model", "model"), ("keep", "keep"), ("batch", "B"), ("threads", "ORT threads"),
    ("masked_ms", "masked ms"), ("baked_ms", "baked ms"), ("compact_ms", "compact ms"),
    ("speedup", "compact vs masked"), ("speedup_baked", "compact vs baked"),
    ("err", "compact err (rel)"),
    ("masked_mb", "masked MB"), ("baked_mb", "baked MB"), ("compact_mb", "compact MB"),
    ("size_ratio", "size vs masked"), ("size_ratio_baked", "size vs baked"),
]
GPU_COLUMNS = [
    ("model", "model"), ("keep", "keep"), ("batch", "B"),
    ("aoti_compact_auto", "AOTI compact auto ms"), ("aoti_compact_aten", "AOTI compact aten ms"),
    ("fx_compile", "compile(fxsparse) masked ms"), ("aoti_masked", "AOTI masked ms"),
    ("aoti_tp", "AOTI TP-pruned ms"),
    ("compact_vs_fx", "compact auto vs fxsparse"), ("compact_vs_tp", "compact auto vs TP"),
    ("err_compact_auto", "compact auto err"), ("err_compact_aten", "compact aten err"),
    ("err_fx_compile", "fxsparse err"), ("err_masked", "AOTI masked err"), ("err_tp", "TP err"),
]


def masked_model(name: str, keep: float, example: torch.Tensor) -> tuple:
    """(masked model, Torch-Pruning's pruned model or None, how the masks were chosen)."""
    masked, pruned, how = models.masked_models(name, keep, example, "groups")
    return masked.eval(), (pruned.eval() if pruned is not None else None), how


def baked(masked) -> torch.nn.Module:
    """A copy of `masked` whose prune masks are made permanent (plain weights with zeros)."""
    from torch.nn.utils import prune

    model = copy.deepcopy(masked)
    for m in model.modules():
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(m, hook._tensor_name)
    return model


def relative_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return common.max_abs_err(got, want) / max(1.0, float(want.abs().max()))


# --------------------------------------------------------------------------- CPU: ONNX Runtime

def onnx_file(module, x: torch.Tensor, path: str) -> str:
    batch = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=batch, verbose=False).save(path)
    return path


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # 0: onnxruntime's default, all cores
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def ort_time_ms(sess, x: torch.Tensor, repeat: int, min_time_s: float) -> tuple:
    name = sess.get_inputs()[0].name
    feed = {name: x.contiguous().numpy()}
    out = torch.from_numpy(sess.run(None, feed)[0])
    return common.time_cpu(lambda: sess.run(None, feed), repeat=repeat, warmup=2, min_time_s=min_time_s), out


def cpu_rows(name: str, keep: float, batches: list, threads: list, repeat: int, min_time_s: float) -> list:
    _, shape = models.build(name)
    example = torch.randn(2, *shape)
    masked, _, how = masked_model(name, keep, example)
    t0 = time.perf_counter()
    small = fxsparse.compact(masked, example)
    compact_s = time.perf_counter() - t0
    rows = []
    with tempfile.TemporaryDirectory() as d:
        paths = {"masked": onnx_file(masked, example, os.path.join(d, "masked.onnx")),
                 "baked": onnx_file(baked(masked), example, os.path.join(d, "baked.onnx")),
                 "compact": onnx_file(small, example, os.path.join(d, "compact.onnx"))}
        sizes = {k: os.path.getsize(p) / 2**20 for k, p in paths.items()}
        for batch in batches:
            x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
            with torch.no_grad():
                ref = masked(x)
            for n in threads:
                row = {"model": name, "keep": keep, "batch": batch, "threads": n or "all", "masks": how,
                       "compact_s": compact_s, "size_ratio": sizes["compact"] / sizes["masked"],
                       "size_ratio_baked": sizes["compact"] / sizes["baked"],
                       **{f"{k}_mb": v for k, v in sizes.items()}}
                for kind, path in paths.items():
                    ms, out = ort_time_ms(ort_session(path, n), x, repeat, min_time_s)
                    row[f"{kind}_ms"] = ms
                    row[f"{kind}_err" if kind != "compact" else "err"] = relative_err(out, ref)
                row["speedup"] = row["masked_ms"] / row["compact_ms"]
                row["speedup_baked"] = row["baked_ms"] / row["compact_ms"]
                rows.append(row)
                print(f"{name} B={batch} threads={n or 'all'}: masked {row['masked_ms']:.2f} ms, baked "
                      f"{row['baked_ms']:.2f} ms, compact {row['compact_ms']:.2f} ms, err {row['err']:.2e}", flush=True)
    return rows


# --------------------------------------------------------------------------- GPU: AOTInductor

def aoti_package(module, x: torch.Tensor, path: str, runner: str = "aoti"):
    """`module` exported, then packaged by AOTInductor and loaded ("aoti"), or the exported
    program's module compiled by Inductor in this process with freezing ("compile": the same
    generated code behind a Python wrapper, where an install's AOTInductor runtime fails)."""
    with torch.no_grad():
        ep = torch.export.export(module, (x,))
        if runner == "compile":
            torch._dynamo.reset()
            return torch.compile(ep.module(), options={"freezing": True})
        return torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(ep, package_path=path))


def gpu_rows(name: str, keep: float, batches: list, lowerings: list, with_masked: bool, runner: str = "aoti") -> list:
    _, shape = models.build(name)
    masked, pruned, how = masked_model(name, keep, torch.randn(1, *shape))
    to_gpu = lambda m: m.to("cuda", torch.half).to(memory_format=torch.channels_last)  # noqa: E731
    masked = to_gpu(masked)
    pruned = to_gpu(pruned) if pruned is not None else None
    rows = []
    for batch in batches:
        x = torch.randn(batch, *shape, device="cuda", dtype=torch.half).to(memory_format=torch.channels_last)
        with torch.no_grad():
            ref = masked(x)
        row = {"model": name, "keep": keep, "batch": batch, "masks": how}
        builders = {}  # each is built, then timed, before the next: a crash leaves the rows before it printed
        if pruned is not None:
            builders["aoti_tp"] = lambda d: aoti_package(pruned, x, os.path.join(d, "tp.pt2"), runner)
        builders["fx_compile"] = lambda d: compiled_fxsparse(masked)
        if with_masked:
            builders["aoti_masked"] = lambda d: aoti_package(copy.deepcopy(masked), x, os.path.join(d, "masked.pt2"),
                                                           runner)
        for lowering in sorted(lowerings, key=lambda low: low != "aten"):  # "auto" times each conv chain at this batch
            builders[f"aoti_compact_{lowering}"] = lambda d, low=lowering: aoti_package(
                fxsparse.compact(masked, x, lowering=low), x, os.path.join(d, f"compact_{low}.pt2"), runner)
        with tempfile.TemporaryDirectory() as d:
            for label, build in builders.items():
                fn = build(d)
                err_key = "err_" + label.replace("aoti_", "")
                with torch.no_grad():
                    row[err_key] = common.max_abs_err(fn(x), ref)
                    row[label], e = common.try_time(lambda fn=fn: fn(x), "plain")
                if e:
                    row[f"{label}_error"] = e
                print(f"{name} B={batch} {label}: {row[label]} ms, err {row[err_key]:.3g}", flush=True)
        row["compact_vs_fx"] = common.ratio(row.get("fx_compile"), row.get("aoti_compact_auto"))
        row["compact_vs_tp"] = common.ratio(row.get("aoti_tp"), row.get("aoti_compact_auto"))
        rows.append(row)
    return rows


def compiled_fxsparse(masked):
    torch._dynamo.reset()
    return torch.compile(masked, backend="fxsparse")


# --------------------------------------------------------------------------- main

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small_resnet,resnet50")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--batch", default=None, help="comma-separated batch sizes (CPU: 1,8; GPU: 1,64)")
    parser.add_argument("--threads", default="1,0", help="ORT intra-op threads, 0 = all cores")
    parser.add_argument("--gpu", action="store_true", help="AOTInductor on CUDA, fp16")
    parser.add_argument("--lowerings", default="auto", help="GPU: compact lowerings to package (auto,aten)")
    parser.add_argument("--with-masked", action="store_true", help="GPU: also package the masked model")
    parser.add_argument("--runner", choices=("aoti", "compile"), default="aoti",
                        help="GPU: load AOTInductor packages, or compile the exported programs in-process")
    parser.add_argument("--quick", action="store_true", help="test-sized: small ResNet, B=8, CPU")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    names = args.models.split(",")
    if args.quick:
        names, args.batch = ["small_resnet"], args.batch or "8"
    if args.gpu:
        batches = [int(b) for b in (args.batch or "1,64").split(",")]
        rows = [r for n in names for r in gpu_rows(n, args.keep, batches, args.lowerings.split(","),
                                                   args.with_masked, args.runner)]
        columns, how = GPU_COLUMNS, "AOTInductor / torch.compile plain call, fp16, CUDA"
        if args.runner == "compile":
            columns = [(k, title.replace("AOTI", "export+compile")) for k, title in GPU_COLUMNS]
            how = "exported programs under torch.compile (freezing) / torch.compile plain call, fp16, CUDA"
    else:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        batches = [int(b) for b in (args.batch or "1,8").split(",")]
        threads = [int(t) for t in args.threads.split(",")]
        repeat, min_time = (5, 0.5) if args.quick else (10, 2.0)
        rows = [r for n in names for r in cpu_rows(n, args.keep, batches, threads, repeat, min_time)]
        columns, how = CPU_COLUMNS, "onnxruntime CPU, wall clock"
    if args.json:
        common.write_json(args.json, rows, {"environment": common.environment(), "how": how})
    errors = {k: v for r in rows for k, v in r.items() if k.endswith("_error")}
    for k, v in errors.items():
        print(f"{k}: {v}")
    env = common.environment()
    common.print_table(rows, columns, title=f"\n{how} | {env['device']} | torch {env['torch']} | "
                                            f"masks: {rows[0]['masks'] if rows else '-'}")


if __name__ == "__main__":
    main()
