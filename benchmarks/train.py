"""Training step of a masked model: fxsparse against Inductor on the same masked model, and
against the physically pruned model (Torch-Pruning) under Inductor.

    PYTHONPATH=. python benchmarks/train.py --quick       # CPU, one thread, CI: asserts exactness
    PYTHONPATH=. python benchmarks/train.py               # GPU: ResNet-50 and MobileNet-v2, B=64,
                                                          # AMP fp16 and bf16, channels_last
    PYTHONPATH=. python benchmarks/train.py --variants fxa,fx --lowering auto
                                                          # GPU: fxsparse's convs on cuDNN against
                                                          # the faster of the fused op and cuDNN

A step is forward, cross-entropy on random labels, backward and SGD (momentum 0.9) on the
model's own parameters (`weight_orig` of the masked convs); on the GPU under autocast, with a
GradScaler for fp16, the parameters fp32. Masks: 50% of the channel groups (benchmarks/models.py:
Torch-Pruning's groups where it is installed, which also gives the physical model; else
`fxsparse.sparsify`'s coupled groups). Columns (ms per step; GPU: CUDA-event time of `--steps`
steps after warmup, the median of three rounds that take the variants in turn; CPU: median wall
clock):

  eager / Inductor / fxsparse / TP Ind    the masked model eager, under Inductor, under fxsparse
                                          (option `lowering` = `--lowering`, default auto);
                                          Torch-Pruning's physical model under Inductor
  Ind+cg / fx+cg / TP+cg                  the same under CUDA graphs (variants indcg, fxcg, tpcg:
                                          mode "reduce-overhead", for fxsparse option cudagraphs=True)
  fx aten / fx aten+cg                    variants `fxa`, `fxacg`: fxsparse with lowering "aten"
                                          (every compacted conv on cuDNN), beside `fx` / `fxcg`
  triton convs                            fxsparse's report: compacted convs run as the fused op / all
  fx vs Ind, fx vs TP                     speedups, each side the better of with and without CUDA
                                          graphs
  fx vs fx aten                           fx aten / fxsparse, each the better of with and without
                                          CUDA graphs
  compile s                               the first step (forward and backward compiled)
  MACs kept                               fxsparse's report: conv MACs computed / before
  grad / loss / buffer err fx, Ind        fxsparse's and, as the yardstick, Inductor's step against
                                          eager's over `--check-steps` steps, each from the same
                                          parameters and buffers (eager re-synced before each step):
                                          max over steps and parameters of |grad - eager's| / max
                                          |eager's grad|, |loss - eager's|, max |running stat -
                                          eager's| / max(1, |eager's|); nbt ok: num_batches_tracked
                                          equal

`--inductor-config combo_kernels=True` sets Inductor's config for every compiled variant (here:
its horizontal fusion of independent kernels, which packs the many small ones into fewer launches).
`--finetune-steps N` adds the seed's distillation fine-tune (`fxsparse.nn.finetune`, the seed
layer Conv2d 64->128 3x3 on 56x56, B=16, 50% of output channels masked) per step, through
fxsparse and through Inductor. The table is printed last.
"""
from __future__ import annotations

import argparse
import ast
import copy
import os
import statistics
import sys
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
import models as bm  # noqa: E402

import fxsparse  # noqa: E402

COLUMNS = [
    ("model", "model"), ("dtype", "dtype"), ("batch", "B"), ("macs_kept", "MACs kept"),
    ("lowering", "lowering"), ("triton_convs", "triton convs"),
    ("eager_ms", "eager ms"), ("ind_ms", "Inductor ms"), ("indcg_ms", "Ind+cg ms"), ("fxa_ms", "fx aten ms"),
    ("fxacg_ms", "fx aten+cg ms"), ("fx_ms", "fxsparse ms"), ("fxcg_ms", "fx+cg ms"), ("tp_ms", "TP Ind ms"),
    ("tpcg_ms", "TP+cg ms"),
    ("fx_vs_ind", "fx vs Ind"), ("fx_vs_tp", "fx vs TP"), ("fx_vs_fxa", "fx vs fx aten"),
    ("ind_compile_s", "Ind compile s"), ("indcg_compile_s", "Ind+cg compile s"), ("fxa_compile_s", "fx aten compile s"),
    ("fxacg_compile_s", "fx aten+cg compile s"),
    ("fx_compile_s", "fx compile s"), ("fxcg_compile_s", "fx+cg compile s"), ("tp_compile_s", "TP compile s"),
    ("fx_grad_err", "grad err fx"), ("ind_grad_err", "grad err Ind"), ("fx_loss_err", "loss err fx"),
    ("ind_loss_err", "loss err Ind"), ("fx_buffer_err", "buffer err fx"), ("ind_buffer_err", "buffer err Ind"),
    ("fx_counters_ok", "nbt ok"),
]
FINETUNE_COLUMNS = [("what", "fine-tune"), ("ind_ms", "Inductor ms/step"), ("fx_ms", "fxsparse ms/step"),
                    ("fx_vs_ind", "fx vs Ind"), ("loss_err", "max |loss fx - loss Ind|")]
VARIANTS = ("eager", "ind", "indcg", "fxa", "fxacg", "fx", "fxcg", "tp", "tpcg")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- models

def masked_and_physical(name: str, keep: float, image: int, seed: int = 0) -> tuple:
    """(a builder of identical masked models, the physical model or None, how the masks were chosen)."""
    bm.IMAGE_SIZE["torchvision"] = image

    def make():
        torch.manual_seed(seed)
        return bm.masked_models(name, keep, torch.randn(1, *bm.build(name)[1]))

    masked, physical, how = make()

    return (lambda: detached_weights(make()[0])), physical, how


def detached_weights(model: nn.Module) -> nn.Module:
    """The prune hooks recompute `weight` every forward; detached, the model deep-copies."""
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "weight_orig"):
                m.weight = m.weight.detach()
    return model


def place(model: nn.Module, device: str) -> nn.Module:
    model = model.to(device).train()
    return model.to(memory_format=torch.channels_last) if device == "cuda" else model


# --------------------------------------------------------------------------- one training step

class Trainer:
    """`step(x, y)`: forward (through `forward`), loss, backward, SGD on `model`'s parameters."""

    def __init__(self, model: nn.Module, forward, dtype: torch.dtype, device: str, init_scale: float = 2.0**16):
        self.model, self.forward, self.dtype, self.device = model, forward, dtype, device
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        amp = device == "cuda" and dtype != torch.float32
        self.autocast = torch.autocast(device, dtype=dtype, enabled=amp)
        self.scaler = torch.amp.GradScaler(device, init_scale=init_scale, enabled=amp and dtype == torch.float16)

    def step(self, x, y) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            loss = F.cross_entropy(self.forward(x), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss.detach()


def timed_first_step(trainer: Trainer, x, y) -> float:
    t0 = time.perf_counter()
    trainer.step(x, y)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def step_ms(trainer: Trainer, x, y, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        trainer.step(x, y)
    if x.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(steps):
            trainer.step(x, y)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / steps
    samples = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.step(x, y)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def time_steps(trainers: dict, x, y, steps: int, rounds: int = 3) -> dict:
    """ms per step of each trainer, medians over rounds that take the trainers in turn: on the
    GPU `steps` steps of each per round (CUDA events), on the CPU one step of each per round,
    `steps` rounds (a loaded host slows all of them alike)."""
    if x.is_cuda:
        samples = {k: [] for k in trainers}
        for _ in range(rounds):
            for k, t in trainers.items():
                samples[k].append(step_ms(t, x, y, steps))
        return {k: statistics.median(v) for k, v in samples.items()}
    samples = {k: [] for k in trainers}
    for t in trainers.values():
        t.step(x, y)
    for _ in range(steps):
        for k, t in trainers.items():
            t0 = time.perf_counter()
            t.step(x, y)
            samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def training_graphs(start: int = 0) -> list:
    """fxsparse's training graphs in the report, from the `start`th graph on."""
    return [g for g in fxsparse.report.current_report(None).graphs[start:] if g.mode == "training"]


def fxsparse_report_macs(graphs: list) -> Optional[float]:
    before = sum(g.macs_before for g in graphs)
    return sum(g.macs_after for g in graphs) / before if before else None


def triton_convs(graphs: list) -> str:
    """"k/n": of the n compacted convs, k run as the fused op."""
    rows = [c for g in graphs for c in g.convs if c.lowering != "unchanged"]
    return f"{sum(c.lowering == 'triton' for c in rows)}/{len(rows)}"


# --------------------------------------------------------------------------- exactness

def exactness(make, device: str, dtype, batch: int, shape, classes: int, steps: int, lowering: str,
              label: str = "fx") -> dict:
    """Variant `label`'s compiled model against eager, one step at a time: before each step eager
    takes the compiled model's parameters and buffers, both run the step's forward and backward
    on the same batch, and the loss, every gradient and the BatchNorm updates are compared. Each
    error is one step's: over several free-running steps rounding differences grow (a
    small-batch BatchNorm amplifies them), and Inductor's own would look like a bug. Only the
    compiled model's optimizer steps, so later steps run its graphs on moved parameters.
    fp16: the loss times a fixed 256 before backward (no step is skipped on either side)."""
    mine, eager = place(make(), device), place(make(), device)
    torch._dynamo.reset()  # (after building: see model_row)
    forward = compiled(mine, label, lowering)
    opt = torch.optim.SGD(mine.parameters(), lr=0.01, momentum=0.9)
    amp = torch.autocast(device, dtype=dtype, enabled=device == "cuda" and dtype != torch.float32)
    scale = 256.0 if dtype == torch.float16 else 1.0
    g = torch.Generator().manual_seed(1)
    err = {"grad_err": 0.0, "loss_err": 0.0, "buffer_err": 0.0, "counters_ok": True}
    for _ in range(steps):
        eager.load_state_dict(mine.state_dict())
        x, y = batch_of(batch, shape, classes, device, g)
        losses = []
        for model, f in ((eager, eager), (mine, forward)):
            model.zero_grad(set_to_none=True)
            with amp:
                loss = F.cross_entropy(f(x), y)
            (loss.float() * scale).backward()
            losses.append(float(loss))
        err["loss_err"] = max(err["loss_err"], abs(losses[0] - losses[1]))
        err["grad_err"] = max(err["grad_err"], gradient_error(mine, eager))
        bufs = [(n, b, c) for (n, b), (_, c) in zip(mine.named_buffers(), eager.named_buffers())]
        err["buffer_err"] = max([err["buffer_err"]] + [relative(b, c) for n, b, c in bufs
                                                       if b.is_floating_point() and "running" in n])
        err["counters_ok"] &= all(torch.equal(b, c) for n, b, c in bufs if n.endswith("num_batches_tracked"))
        opt.step()
    return err


def gradient_error(model: nn.Module, ref: nn.Module) -> float:
    """max over parameters of |grad - ref's grad| / max |ref's grad| (floored at a thousandth of
    the largest gradient: a parameter whose gradient is rounding noise does not count alone)."""
    pairs = [(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters())]
    if any((a is None) != (b is None) for a, b in pairs):
        return float("inf")
    pairs = [(a.float(), b.float()) for a, b in pairs if b is not None]
    top = max((float(b.abs().max()) for _, b in pairs), default=0.0)
    floor = max(top * 1e-3, 1e-30)
    return max((float((a - b).abs().max()) / max(float(b.abs().max()), floor) for a, b in pairs), default=0.0)


def relative(b: torch.Tensor, c: torch.Tensor) -> float:
    return float((b.double() - c.double()).abs().max()) / max(1.0, float(c.double().abs().max()))


def batch_of(batch: int, shape, classes: int, device: str, g: torch.Generator) -> tuple:
    x = torch.randn(batch, *shape, generator=g).to(device)
    if device == "cuda":
        x = x.to(memory_format=torch.channels_last)
    return x, torch.randint(0, classes, (batch,), generator=g).to(device)


# --------------------------------------------------------------------------- a row

def model_row(name: str, keep: float, dtype_name: str, batch: int, device: str, steps: int, check_steps: int,
              image: int, variants: tuple, lowering: str, check_variants: tuple) -> dict:
    dtype = DTYPES[dtype_name]
    make, physical, how = masked_and_physical(name, keep, image)
    shape = bm.build(name)[1] if name != "small_resnet" else (3, image, image)
    classes = bm.classifier(make()).out_features
    g = torch.Generator().manual_seed(0)
    x, y = batch_of(batch, shape, classes, device, g)
    row = {"model": name, "dtype": dtype_name, "batch": batch, "keep": keep, "masks": how, "lowering": lowering}
    labels = [v for v in VARIANTS if v in variants and (not v.startswith("tp") or physical is not None)]
    models = {v: place(copy.deepcopy(physical) if v.startswith("tp") else make(), device) for v in labels}
    # models built (choosing masks traces at batch 1), then dynamo's caches cleared once: the
    # compiled models stay compiled while they are timed in turns
    torch._dynamo.reset()
    fxsparse.report.current_report(None).graphs.clear()
    trainers = {}
    for label, m in models.items():
        trainers[label] = Trainer(m, compiled(m, label, lowering), dtype, device)
        start = len(fxsparse.report.current_report(None).graphs)
        if label != "eager":
            row[f"{label}_compile_s"] = timed_first_step(trainers[label], x, y)
        if label in ("fx", "fxcg") and "macs_kept" not in row:
            row["macs_kept"] = fxsparse_report_macs(training_graphs(start))
            row["triton_convs"] = triton_convs(training_graphs(start))
    row.update({f"{k}_ms": v for k, v in time_steps(trainers, x, y, steps).items()})
    for label in check_variants if check_steps else ():  # Inductor beside fxsparse: the yardstick
        err = exactness(make, device, dtype, batch, shape, classes, check_steps, lowering, label)
        row.update({f"{label}_{k}": v for k, v in err.items()})
    row["fx_vs_ind"] = common.ratio(best_ms(row, "ind"), best_ms(row, "fx"))
    row["fx_vs_tp"] = common.ratio(best_ms(row, "tp"), best_ms(row, "fx"))
    row["fx_vs_fxa"] = common.ratio(best_ms(row, "fxa"), best_ms(row, "fx"))
    return row


def compiled(model: nn.Module, label: str, lowering: str = "auto"):
    """The step's forward for a variant: eager, or compiled (a "cg" suffix: under CUDA graphs;
    fxsparse with option `lowering`, "aten" for the fxa and fxacg variants)."""
    if label == "eager":
        return model
    graphs = label.endswith("cg")
    if label.startswith("fx"):
        options = {"lowering": "aten" if label.startswith("fxa") else lowering, "cudagraphs": True if graphs else None}
        return torch.compile(model, backend="fxsparse", dynamic=False, options=options)
    return torch.compile(model, dynamic=False, mode="reduce-overhead" if graphs else None)


def best_ms(row: dict, label: str) -> Optional[float]:
    """The faster of a variant with and without CUDA graphs."""
    times = [row[k] for k in (f"{label}_ms", f"{label}cg_ms") if row.get(k) is not None]
    return min(times) if times else None


def finetune_row(steps: int, device: str, quick: bool) -> dict:
    """The seed layer's distillation (fxsparse.nn.finetune) per step, fxsparse vs Inductor."""
    from torch.nn.utils import prune

    cin, cout, size, batch = (8, 16, 12, 2) if quick else (64, 128, 56, 16)

    def student_teacher():
        torch.manual_seed(0)
        teacher = nn.Conv2d(cin, cout, 3, padding=1).to(device)
        student = nn.Conv2d(cin, cout, 3, padding=1).to(device)
        student.load_state_dict(teacher.state_dict())
        prune.ln_structured(student, "weight", amount=0.5, n=1, dim=0)
        return student, teacher

    row, losses = {"what": f"seed layer {cin}->{cout} 3x3 {size}x{size} B={batch}, 50% out channels"}, {}
    for label, backend in (("ind", "inductor"), ("fx", "fxsparse")):
        torch._dynamo.reset()
        student, teacher = student_teacher()
        inputs = lambda step: torch.randn(batch, cin, size, size, generator=torch.Generator().manual_seed(step),  # noqa: E731
                                          device="cpu").to(device)
        fxsparse.nn.finetune(student, teacher, 2, input_fn=inputs, progress=False, backend=backend)  # compiles
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses[label] = fxsparse.nn.finetune(student, teacher, steps, input_fn=inputs, progress=False, backend=backend)
        if device == "cuda":
            torch.cuda.synchronize()
        row[f"{label}_ms"] = (time.perf_counter() - t0) * 1e3 / steps
    row["fx_vs_ind"] = common.ratio(row["ind_ms"], row["fx_ms"])
    row["loss_err"] = max(abs(a - b) for a, b in zip(losses["ind"], losses["fx"]))
    return row


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small ResNet on the CPU, one thread; asserts exactness")
    p.add_argument("--models", default="resnet50,mobilenet_v2", help="'' for the fine-tune row only")
    p.add_argument("--dtypes", default="fp16,bf16", help="AMP dtypes on the GPU (fp32: no autocast)")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--check-steps", type=int, default=3, help="exactness steps against eager (0: skip)")
    p.add_argument("--check-variants", default="fx,ind", help="variants checked against eager")
    p.add_argument("--variants", default="eager,ind,fx,tp",
                   help=f"of {','.join(VARIANTS)} (cg: the compiled graphs under CUDA graphs; fxa: fxsparse "
                        "with lowering aten)")
    p.add_argument("--lowering", default="auto", choices=("auto", "triton", "aten"),
                   help="fxsparse's option `lowering` for the fx variant and the exactness check")
    p.add_argument("--finetune-steps", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=540, help="start no new row after this many seconds")
    p.add_argument("--inductor-config", default="", metavar="KEY=VALUE,...",
                   help="Inductor settings for every compiled variant, e.g. combo_kernels=True")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    common.raise_dynamo_recompile_limit()
    import torch._inductor.config as inductor_config

    for item in filter(None, args.inductor_config.split(",")):
        key, value = item.split("=")
        setattr(inductor_config, key, ast.literal_eval(value))
        print(f"Inductor config: {key} = {getattr(inductor_config, key)!r}", flush=True)
    device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        if args.lowering == "aten":
            os.environ.setdefault("FXSPARSE_TUNE", "off")  # aten convs only: nothing to tune
    if args.quick:
        torch.set_num_threads(1)
        plan = [("small_resnet", "fp32", 16, 16)]
        steps, finetune_steps = 7, 3
    else:
        plan = [(m, d, args.batch, args.image_size) for m in filter(None, args.models.split(","))
                for d in args.dtypes.split(",")]
        steps, finetune_steps = args.steps, args.finetune_steps
    rows, start = [], time.perf_counter()
    for name, dtype_name, batch, image in plan:
        if time.perf_counter() - start > args.budget_s:
            print(f"budget spent: {name} {dtype_name} skipped", flush=True)
            continue
        if name == "small_resnet":
            bm.IMAGE_SIZE["small_resnet"] = image
        row = model_row(name, args.keep, dtype_name, batch, device, steps, args.check_steps, image,
                        tuple(args.variants.split(",")), args.lowering, tuple(args.check_variants.split(",")))
        rows.append(row)
        print(f"[{time.perf_counter() - start:6.1f}s] " + ", ".join(
            f"{k}={common._fmt(v, '.3g')}" for k, v in row.items()), flush=True)
    ft = []
    if finetune_steps and time.perf_counter() - start < args.budget_s:
        ft.append(finetune_row(finetune_steps, device, args.quick))
        print(ft[-1], flush=True)
    env = common.environment()
    if args.json:
        common.write_json(args.json, rows + ft, env)
    if args.quick:
        for r in rows:  # fp32 on the CPU: the compiled model trains as eager does
            assert r["fx_grad_err"] < 1e-4 and r["fx_buffer_err"] < 1e-4 and r["fx_counters_ok"], r
            assert r["macs_kept"] is not None and r["macs_kept"] < 0.5, r
        for r in ft:
            assert r["loss_err"] < 1e-4, r
    print(f"\n{env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"{'AMP channels_last' if device == 'cuda' else 'fp32 CPU, 1 thread'}, ms per train step")
    if ft:
        common.print_table(ft, FINETUNE_COLUMNS)
    common.print_table(rows, COLUMNS)


if __name__ == "__main__":
    main()
