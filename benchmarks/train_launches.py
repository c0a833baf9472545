"""Kernel launches per training step (forward + backward) of a masked model: fxsparse's
compacted training graph against Inductor on the same masked model, counted in the wrapper
code Inductor generates (fxsparse.report.launches), no timing involved.

    PYTHONPATH=. python benchmarks/train_launches.py                      # small ResNet, CPU
    PYTHONPATH=. python benchmarks/train_launches.py --model resnet50 --image-size 64 --batch 4
    PYTHONPATH=. python benchmarks/train_launches.py --model resnet50 --batch 64 --device cuda --dtype fp16

`--triton` counts what Inductor's GPU code generation (Triton kernels, its fusion rules) makes
of the same graphs on a machine without a GPU, channels_last as on the GPU: kernels are
generated, never compiled or run (the step's values are meaningless; only the launch lines
are read).

On the GPU every launch costs host time (~20 us each in a training step of ResNet-50), so a
compacted graph pays for each kernel it adds. Columns: launches in the forward and backward
wrappers (generated kernels, extern calls such as convs, aten fallbacks), Inductor's
generated kernel count, and `scatters`: backward kernels whose name says they scatter
(index_add / scatter): gradients of gathers that Inductor cannot fuse into pointwise kernels.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from contextlib import nullcontext

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import models as bm  # noqa: E402

import fxsparse  # noqa: E402,F401  (registers the backend)
from fxsparse.report.launches import (_call_lines, captured_inductor_code, launch_sites,  # noqa: E402
                                      triton_codegen_without_gpu)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COLUMNS = [("variant", "variant"), ("model", "model"), ("fw", "fw launches"), ("bw", "bw launches"),
           ("kernels_fw", "fw kernels"), ("kernels_bw", "bw kernels"), ("extern", "extern+aten"),
           ("generated", "generated kernels"), ("scatters", "bw scatter kernels")]


def masked_model(name: str, keep: float, image: int, device: str, channels_last: bool, masks: str = "groups"):
    if name == "small_resnet":
        bm.IMAGE_SIZE["small_resnet"] = image
    else:
        bm.IMAGE_SIZE["torchvision"] = image
    torch.manual_seed(0)
    model, physical, _ = bm.masked_models(name, keep, torch.randn(1, *bm.build(name)[1]), masks)

    def place(m):
        m = m.to(device).train()
        return m.to(memory_format=torch.channels_last) if channels_last else m
    return place(model), None if physical is None else place(physical)


def scatter_kernels(code: str) -> int:
    return sum(1 for line in _call_lines(code)
               if any(k in line for k in ("index_add", "scatter")) and "(" in line
               and not line.lstrip().startswith("#"))


def count(model, label: str, x, y, dtype) -> dict:
    from torch._inductor import metrics

    torch._dynamo.reset()
    metrics.reset()
    if label.startswith("fxsparse"):  # fxsparse-triton: every compacted dense conv on the fused op
        options = {"lowering": "triton" if label == "fxsparse-triton" else "auto"}
        fn = torch.compile(model, backend="fxsparse", dynamic=False, options=options)
    else:
        fn = torch.compile(model, dynamic=False)
    fw, bw = [], []
    autocast = torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32)
    with captured_inductor_code(fw):
        with autocast:
            loss = F.cross_entropy(fn(x), y)
    with captured_inductor_code(bw):
        loss.backward()
    sites = {"fw": sum((launch_sites(c) for c in fw), Counter()), "bw": sum((launch_sites(c) for c in bw), Counter())}
    kernels = lambda c: c["inductor_triton"] + c["inductor_cpp"]  # noqa: E731
    return {"variant": label, "fw": sum(sites["fw"].values()), "bw": sum(sites["bw"].values()),
            "kernels_fw": kernels(sites["fw"]), "kernels_bw": kernels(sites["bw"]),
            "extern": sum(c["extern"] + c["aten"] + c["fxsparse"] for c in sites.values()),
            "generated": metrics.generated_kernel_count, "scatters": sum(scatter_kernels(c) for c in bw)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small_resnet", help="small_resnet or a torchvision model name")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--variants", default="inductor,fxsparse",
                   help="inductor, fxsparse (the masked model), fxsparse-triton (its convs on the fused op; on "
                        "the CPU under TRITON_INTERPRET=1), tp (Torch-Pruning's physically pruned model, Inductor)")
    p.add_argument("--masks", default="groups", choices=("groups", "ln"),
                   help="consistent channel groups, or prune.ln_structured on every conv on its own")
    p.add_argument("--triton", action="store_true", help="on the CPU: count Inductor's Triton code generation")
    args = p.parse_args(argv)
    common.raise_dynamo_recompile_limit()
    torch._inductor.config.fx_graph_cache = False  # every graph generated, so metrics count it
    dtype = DTYPES[args.dtype]
    channels_last = args.device == "cuda" or args.triton  # as models train on the GPU
    model, physical = masked_model(args.model, args.keep, args.image_size, args.device, channels_last, args.masks)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=args.device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    classes = bm.classifier(model).out_features
    y = torch.randint(0, classes, (args.batch,), device=args.device)
    with triton_codegen_without_gpu() if args.triton else nullcontext():
        rows = [dict(model=args.model, **count(physical if v == "tp" else model, v, x, y, dtype))
                for v in args.variants.split(",") if v != "tp" or physical is not None]
    codegen = " (Triton code generation)" if args.triton else ""
    print(f"\n{args.model} B={args.batch} {args.image_size}x{args.image_size} {args.device}{codegen} {args.dtype}, "
          f"keep {args.keep}, {args.masks} masks: launches per training step")
    common.print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
