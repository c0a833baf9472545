"""Masked fine-tuning with DDP: fxsparse against Inductor, both under DDP, and against one GPU.

    PYTHONPATH=. python benchmarks/train_ddp.py               # every GPU of the host, then one GPU
    PYTHONPATH=. python benchmarks/train_ddp.py --gpus 2 --steps 300 --variants fx,ind

One command: it launches `torch.distributed.run` (one process per GPU, NCCL, NVLink multicast
off: NCCL_NVLS_ENABLE=0) for all the GPUs and again for one, and prints the table last.
Model: ResNet-50 (torchvision) with 50% of its channel groups masked (benchmarks/models.py),
AMP (`--dtype`, GradScaler for fp16), channels_last, B=`--batch` per GPU, SGD momentum 0.9.

Variants (each rank): `fx` = DDP(torch.compile(model, backend="fxsparse")) and `fxsplit` =
torch.compile(DDP(model), backend="fxsparse"): both go through DDPOptimizer, which splits the
graph at DDP's bucket boundaries (all-reduce overlaps backward; channels are carried within each
piece, materialised at the cuts); `fxwhole` = the latter with torch._dynamo.config.optimize_ddp
= False (one graph, compacted whole; DDP all-reduces once the compiled backward is done);
`ind` = torch.compile(DDP(model)) (Inductor, DDPOptimizer). Per variant: compile s (first step, the
slowest rank), ms per step (CUDA events over `--steps` steps, the slowest rank), images/s over
all ranks, scaling = images/s on N GPUs / (N * images/s on one GPU), compacted convs and MACs
kept per rank (fxsparse's report), and for fx the exactness run: before timing, `--check-steps`
steps of the compiled model and of eager DDP from the same state on the same batches; max |param
diff| over all ranks (AMP tolerance).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402

COLUMNS = [("variant", "variant"), ("gpus", "GPUs"), ("batch", "B/GPU"), ("ms", "ms/step"),
           ("images_s", "images/s"), ("scaling", "scaling"), ("vs_ind", "vs Ind (same GPUs)"),
           ("compile_s", "compile s (max rank)"), ("compacted", "compacted convs (min rank)"),
           ("macs_kept", "MACs kept (max rank)"), ("param_err", "param err vs eager DDP")]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# --------------------------------------------------------------------------- one rank

def build_masked(name: str, keep: float, seed: int = 0):
    import models as bm
    from train import detached_weights

    torch.manual_seed(seed)
    model, _, how = bm.masked_models(name, keep, torch.randn(1, *bm.build(name)[1]))
    return detached_weights(model), bm.build(name)[1]


def ddp_forward(variant: str, model, device):
    from torch.nn.parallel import DistributedDataParallel

    def DDP(m):  # noqa: N802
        return DistributedDataParallel(m, device_ids=None if device == "cpu" else [device])

    # static shapes: the batch never changes here, and dynamo's profile of earlier runs (the masks
    # are chosen by tracing at batch 1) must not make it compile a symbolic batch
    torch._dynamo.config.optimize_ddp = variant != "fxwhole"
    if variant == "fx":
        return DDP(torch.compile(model, backend="fxsparse", dynamic=False))
    if variant in ("fxsplit", "fxwhole"):
        return torch.compile(DDP(model), backend="fxsparse", dynamic=False)
    if variant == "ind":
        return torch.compile(DDP(model), dynamic=False)
    if variant == "eager":
        return DDP(model)
    raise ValueError(f"unknown variant {variant!r}")


class Step:
    def __init__(self, model, forward, dtype):
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.forward, self.dtype = forward, dtype
        self.scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def __call__(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=self.dtype, enabled=x.is_cuda and self.dtype != torch.float32):
            loss = F.cross_entropy(self.forward(x), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()


def batches(rank: int, n: int, batch: int, shape, device):
    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(n):
        x = torch.randn(batch, *shape, generator=g).to(device).to(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, 10, (batch,), generator=g).to(device)))
    return out


def report_of_rank() -> dict:
    import fxsparse

    graphs = [g for g in fxsparse.report.current_report(None).graphs if g.mode == "training"]
    before = sum(g.macs_before for g in graphs)
    return {"compacted": sum(c.lowering != "unchanged" for g in graphs for c in g.convs),
            "macs_kept": sum(g.macs_after for g in graphs) / before if before else None}


def run_variant(variant: str, args, rank: int, device, dtype) -> dict:
    import torch.distributed as dist

    import fxsparse

    model, shape = build_masked(args.model, args.keep)
    model = model.to(device).to(memory_format=torch.channels_last).train()
    check = variant.startswith("fx") and args.check_steps
    if check:
        ref, _ = build_masked(args.model, args.keep)
        ref = ref.to(device).to(memory_format=torch.channels_last).train()
    # after building: choosing the masks traces the model at batch 1, and a second batch size
    # would make dynamo compile the model with a symbolic batch
    torch._dynamo.reset()
    fxsparse.report.current_report(None).graphs.clear()
    step = Step(model, ddp_forward(variant, model, device), dtype)
    if check:
        ref_step = Step(ref, ddp_forward("eager", ref, device), dtype)
    data = batches(rank, 4, args.batch, shape, device)
    out = {}
    sync()
    t0 = time.perf_counter()
    step(*data[0])
    sync()
    out["compile_s"] = time.perf_counter() - t0
    out.update(report_of_rank())
    if check:
        ref_step(*data[0])
        for i in range(1, args.check_steps):
            step(*data[i % len(data)]), ref_step(*data[i % len(data)])
        out["param_err"] = max(float((p.detach() - q.detach()).abs().max())
                               for p, q in zip(model.parameters(), ref.parameters()))
        del ref, ref_step
    for i in range(3):
        step(*data[i % len(data)])
    dist.barrier()
    sync()
    t0 = time.perf_counter()  # (the step's loss.backward waits on the all-reduce; one sync at the end)
    for i in range(args.steps):
        step(*data[i % len(data)])
    sync()
    out["ms"] = (time.perf_counter() - t0) * 1e3 / args.steps
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def worker(args) -> None:
    import torch.distributed as dist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if args.quick:
        import models as bm

        bm.IMAGE_SIZE["small_resnet"] = 16
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        device = "cpu"
    else:
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        device = local
    common.raise_dynamo_recompile_limit()
    torch.backends.cudnn.benchmark = True
    os.environ.setdefault("FXSPARSE_TUNE", "off")
    results = {}
    for variant in args.variants.split(","):
        try:
            results[variant] = run_variant(variant, args, rank, device, DTYPES[args.dtype])
        except Exception as e:  # noqa: BLE001 - a failed variant is reported, the others still run
            results[variant] = {"error": f"{type(e).__name__}: {e}"}
        print(f"[rank {rank}] {variant}: {results[variant]}", flush=True)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, "ranks": gathered}, f)
    dist.destroy_process_group()


# --------------------------------------------------------------------------- the launcher

def launch(gpus: int, args, out: str) -> dict:
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONPATH=os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           os.path.abspath(__file__), "--worker", "--out", out, "--model", args.model, "--keep", str(args.keep),
           "--batch", str(args.batch), "--steps", str(args.steps), "--check-steps", str(args.check_steps),
           "--dtype", args.dtype, "--variants", args.variants] + (["--quick"] if args.quick else [])
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=False, timeout=args.timeout_s)
    with open(out) as f:
        return json.load(f)


def summarise(result: dict, batch: int) -> list:
    rows = []
    world = result["world"]
    for variant in result["ranks"][0]:
        per_rank = [r[variant] for r in result["ranks"]]
        errors = [r["error"] for r in per_rank if "error" in r]
        if errors:
            rows.append({"variant": variant, "gpus": world, "error": errors[0]})
            continue
        ms = max(r["ms"] for r in per_rank)
        rows.append({
            "variant": variant, "gpus": world, "batch": batch, "ms": ms, "images_s": world * batch * 1e3 / ms,
            "compile_s": max(r["compile_s"] for r in per_rank),
            "compacted": min(r.get("compacted", 0) for r in per_rank),
            "macs_kept": max((r["macs_kept"] for r in per_rank if r.get("macs_kept") is not None), default=None),
            "param_err": max((r["param_err"] for r in per_rank if "param_err" in r), default=None),
        })
    return rows


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=0, help="GPUs of the multi-GPU run (0: all)")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=64, help="per GPU")
    p.add_argument("--dtype", default="fp16", choices=tuple(DTYPES))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--check-steps", type=int, default=5)
    p.add_argument("--variants", default="fx,fxwhole,ind", help="of fx, fxsplit, fxwhole, ind")
    p.add_argument("--no-single", action="store_true", help="skip the one-GPU run")
    p.add_argument("--timeout-s", type=int, default=420, help="per torchrun launch")
    p.add_argument("--quick", action="store_true", help="2 gloo processes on the CPU, a small ResNet, fp32: a smoke test")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.quick:
        args.model, args.batch, args.steps, args.check_steps, args.dtype = "small_resnet", 4, 3, 2, "fp32"
    gpus = 2 if args.quick else (args.gpus or torch.cuda.device_count())
    if gpus < 1:
        raise SystemExit("train_ddp.py needs CUDA GPUs")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [gpus] + ([] if args.no_single or gpus == 1 else [1])
        for n in runs:
            try:
                rows += summarise(launch(n, args, os.path.join(tmp, f"ddp{n}.json")), args.batch)
            except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
                rows.append({"variant": "all", "gpus": n, "error": f"{type(e).__name__}: {e}"})
    single = {r["variant"]: r for r in rows if r.get("gpus") == 1 and "ms" in r}
    multi_ind = {r["gpus"]: r for r in rows if r.get("variant") == "ind" and "ms" in r}
    for r in rows:
        if "ms" not in r:
            continue
        one = single.get(r["variant"])
        r["scaling"] = r["images_s"] / (r["gpus"] * one["images_s"]) if one else None
        ind = multi_ind.get(r["gpus"])
        r["vs_ind"] = common.ratio(ind["ms"], r["ms"]) if ind else None
    env = common.environment()
    if args.json:
        common.write_json(args.json, rows, env)
    for r in rows:
        if "error" in r:
            print(f"{r['variant']} on {r['gpus']} GPU(s) failed: {r['error']}")
    print(f"\n{env['device']} x{gpus} | torch {env['torch']} | {args.model} keep {args.keep} | AMP {args.dtype} "
          f"channels_last | NCCL_NVLS_ENABLE=0")
    common.print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
