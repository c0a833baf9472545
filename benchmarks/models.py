"""Whole models: eager, Inductor and fxsparse on the same masked model, and the physically pruned model.

    PYTHONPATH=. python benchmarks/models.py --models resnet50 --keep 1.0,0.5,0.25 --batch 64,1
    PYTHONPATH=. python benchmarks/models.py --quick          # small ResNet on the CPU (CI)

Masks: consistent channel groups (the whole coupled group pruned together, by L1 importance of
the group, as Torch-Pruning's GroupMagnitudeImportance p=1 does, round_to 8, classifier kept).
With torch-pruning installed its pruner picks the groups, and the same choice yields both
the masks (prune.custom_from_mask on conv weights: the model a user hands to torch.compile) and
the physically pruned model; without it, `fxsparse.sparsify` picks them (no physical column).

Columns (ms): "graph" = CUDA-graph replay of the call (kernel time); "plain" = the compiled
callable called in a loop (`triton.testing.do_bench`: host overhead, guards, launches
included). Inductor: default, freezing=True, and freezing + mode="reduce-overhead" (CUDA
graphs). fxsparse: cudagraphs off (graph and plain), default (CUDA graphs on, plain), and
default traced with freezing=True (plain): the setting Inductor's best column needs, under
which dynamo hands parameters over as constants instead of per-call inputs.
Physically pruned: Inductor freezing (graph) and freezing + reduce-overhead (plain).
Compile = seconds of the first call. err = max |out - eager masked| (fp16).
On the CPU everything is wall-clock (plain) and the baseline is Inductor default.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Optional

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402

import fxsparse  # noqa: E402
from fxsparse.demo import SmallResNet, randomize_batchnorm  # noqa: E402
from fxsparse.report.launches import captured_inductor_code, launch_sites  # noqa: E402

GPU_COLUMNS = [
    ("model", "model"), ("keep", "keep"), ("batch", "B"), ("macs_kept", "MACs kept"),
    ("eager_plain", "eager"),
    ("ind_graph", "Ind graph"), ("ind_plain", "Ind plain"),
    ("frz_graph", "frz graph"), ("frz_plain", "frz plain"), ("frzcg_plain", "frz+cg plain"),
    ("fx_graph", "fx graph"), ("fx_plain", "fx plain"), ("fxcg_plain", "fx+cg plain"),
    ("fxfrzcg_plain", "fx frz+cg plain"),
    ("tpind_graph", "TP Ind graph"), ("tpind_plain", "TP Ind plain"),
    ("tp_graph", "TP frz graph"), ("tp_plain", "TP frz plain"), ("tpcg_plain", "TP frz+cg plain"),
    ("speedup_graph", "fx/Ind best graph"), ("speedup_plain", "fx+cg/Ind best plain"),
    ("speedup_plain_frz", "fx frz+cg/Ind best plain"),
    ("ind_compile_s", "Ind compile s"), ("fx_compile_s", "fx compile s"), ("fx_err", "fx err"),
    ("tp_err", "TP-vs-masked err"), ("fx_report_launches", "fx launches (report)"),
    ("frz_launches", "frz launches"),
    ("guard_us", "guard us"),
]
CPU_COLUMNS = [
    ("model", "model"), ("keep", "keep"), ("batch", "B"), ("macs_kept", "MACs kept"),
    ("eager_plain", "eager ms"), ("ind_plain", "Inductor ms"), ("fx_plain", "fxsparse ms"),
    ("speedup_plain", "fx vs Inductor"), ("ind_compile_s", "Ind compile s"),
    ("fx_compile_s", "fx compile s"), ("fx_err", "fx err"),
]


# --------------------------------------------------------------------------- models and masks

IMAGE_SIZE = {"small_resnet": 32}  # torchvision models: 224 unless --image-size


def build(name: str) -> tuple:
    """(model, input shape) with trained-looking BatchNorm statistics."""
    size = IMAGE_SIZE.get(name, IMAGE_SIZE.get("torchvision", 224))
    if name == "small_resnet":
        model, shape = SmallResNet(32), (3, size, size)
    else:
        import torchvision

        model, shape = getattr(torchvision.models, name)(), (3, size, size)
    randomize_batchnorm(model)
    return model.eval(), shape


def classifier(model: nn.Module) -> nn.Module:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1]


def tp_masks(model: nn.Module, example: torch.Tensor, keep: float):
    """Torch-Pruning's group choice: (masks {conv name: (out idxs, in idxs)}, physically pruned copy)."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    names = {id(m): n for n, m in pruned.named_modules()}
    imp = tp.importance.GroupMagnitudeImportance(p=1)
    pruner = tp.pruner.MagnitudePruner(pruned, example, importance=imp, pruning_ratio=1.0 - keep,
                                       ignored_layers=[classifier(pruned)], round_to=8)
    removed: dict = {}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            module = dep.target.module
            if not isinstance(module, nn.Conv2d):
                continue
            fn = dep.handler
            kind = "out" if fn in (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels) else (
                "in" if fn in (tp.prune_conv_in_channels, tp.prune_depthwise_conv_in_channels) else None)
            if kind is None:
                continue
            entry = removed.setdefault(names[id(module)], {"out": set(), "in": set()})
            entry[kind].update(int(i) for i in idxs)
        group.prune()
    return removed, pruned


def apply_masks(model: nn.Module, removed: dict) -> None:
    """Prune masks (fxsparse.nn.apply_mask: custom_from_mask) zeroing the removed rows/columns."""
    from fxsparse.nn.conv import apply_mask

    modules = dict(model.named_modules())
    for name, r in removed.items():
        conv = modules[name]
        mask = torch.ones_like(conv.weight)
        if r["out"]:
            mask[sorted(r["out"])] = 0
        if r["in"] and conv.groups == 1:
            mask[:, sorted(r["in"])] = 0
        elif r["in"] and conv.groups == conv.in_channels:  # depthwise: in and out are one channel
            mask[sorted(r["in"])] = 0
        apply_mask(conv, mask)


def masked_models(name: str, keep: float, example: torch.Tensor, masks: str = "groups") -> tuple:
    """(masked model, physically pruned model or None, how the masks were chosen).

    masks "groups": consistent channel groups (above); "ln": `prune.ln_structured` (L1, output
    channels) on every conv but the stem, each conv on its own (masks disagree across residual
    adds; no physical counterpart).
    """
    model, _ = build(name)
    if keep >= 1.0:
        return model, None, "none"
    if masks == "ln":
        from torch.nn.utils import prune

        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        for conv in convs[1:]:
            prune.ln_structured(conv, "weight", amount=1.0 - keep, n=1, dim=0)
        return model, None, "ln_structured per conv"
    try:
        removed, pruned = tp_masks(model, example, keep)
        apply_masks(model, removed)
        return model, pruned.eval(), "torch-pruning groups"
    except ImportError:
        fxsparse.sparsify(model, keep, kind="channel", example_inputs=(example,), skip_stem=False)
        return model, None, "fxsparse.sparsify groups"


def masked_problem(name: str, keep: float, batch: int, masks: str = "groups", device: str = "cuda",
                   dtype=torch.half) -> tuple:
    """(masked model, input, how the masks were chosen) on `device` in `dtype`, channels_last,
    for the single-model scripts in tools/ (host_split, host_profile, profiler_residue)."""
    _, shape = build(name)
    masked, _, how = masked_models(name, keep, torch.randn(1, *shape), masks)
    masked = masked.to(device, dtype).to(memory_format=torch.channels_last)
    x = torch.randn(batch, *shape, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    return masked, x, how


# --------------------------------------------------------------------------- timing

def first_call(fn, x) -> tuple:
    t0 = time.perf_counter()
    out = fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def compile_inductor(model, freezing: bool = False, cudagraphs: bool = False, reset: bool = True):
    """torch.compile with Inductor (`reset`: clear dynamo's caches first, which also makes every
    model compiled before recompile on its next call)."""
    if reset:
        torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead" if cudagraphs else None)
    return with_freezing(compiled) if freezing else compiled


def with_freezing(compiled):
    """`compiled` with `torch._inductor.config.freezing` on for its first (tracing, compiling)
    call, which is when dynamo and Inductor read it; later calls skip the patch, so that the
    plain call carries no host cost of ours."""
    patch, _ = common.inductor_config_patch(freezing=True)
    first = True

    def run(x):
        nonlocal first
        if first:
            first = False
            with patch:
                return compiled(x)
        return compiled(x)

    return run


def measure(label: str, fn, x, ref, row: dict, graph: bool, plain: bool, errors: dict) -> None:
    out, secs = first_call(fn, x)
    row[f"{label}_compile_s"] = secs
    if ref is not None:
        row[f"{label}_err"] = common.max_abs_err(out, ref)
    for _ in range(3):
        fn(x)
    if graph:
        row[f"{label}_graph"], e = common.try_time(lambda: fn(x), "graph")
        if e:
            errors[f"{label}_graph"] = e
    if plain:
        row[f"{label}_plain"], e = common.try_time(lambda: fn(x), "plain")
        if e:
            errors[f"{label}_plain"] = e


def count_launches(fn, x) -> int:
    """GPU kernels one call launches (torch.profiler). Not used while anything is still to be
    timed in the process: once the profiler has run, fxsparse's plain call stays slower on the
    host (H100, MobileNet-v2 B=1: 332 -> 376 us, Inductor's 320 -> 318 us;
    tools/profiler_residue.py), so the tables count launches in Inductor's generated code
    instead (inductor_launches)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(x)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def fxsparse_compiled(model, options: dict) -> tuple:
    """torch.compile with backend="fxsparse", also handing back the compiled graph objects."""
    graphs = []

    def backend(gm, example_inputs):
        g = fxsparse.fxsparse_backend(gm, example_inputs, options)
        graphs.append((g, example_inputs))
        return g

    torch._dynamo.reset()
    return torch.compile(model, backend=backend), graphs


def guard_us(graphs) -> float:
    """Microseconds per call of the stale-weight guard (all graphs of the model)."""
    return sum(common.time_host_us(lambda g=g, inputs=inputs: g.guard.holds(inputs), calls=2000)
               for g, inputs in graphs)


VARIANTS = ("ind", "frz", "frzcg", "fx", "fxcg", "fxfrzcg", "tp")


def gpu_row(name: str, keep: float, batch: int, full: bool, lowering: str = "auto", masks: str = "groups",
            variants: tuple = VARIANTS) -> dict:
    device, dtype = "cuda", torch.float16
    _, shape = build(name)
    example = torch.randn(1, *shape)
    masked, pruned, how = masked_models(name, keep, example, masks)
    to_gpu = lambda m: m.to(device, dtype).to(memory_format=torch.channels_last)  # noqa: E731
    masked = to_gpu(masked)
    x = torch.randn(batch, *shape, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    row = {"model": name, "keep": keep, "batch": batch, "masks": how}
    errors: dict = {}
    with torch.no_grad():
        ref = masked(x)
        if "eager" in variants or "ind" in variants:
            measure("eager", masked, x, None, row, graph=False, plain=True, errors=errors)
        if full and "ind" in variants:
            measure("ind", compile_inductor(copy.deepcopy(masked)), x, ref, row, True, True, errors)
        if "frz" in variants:
            frz = compile_inductor(copy.deepcopy(masked), freezing=True)
            with captured_inductor_code([]) as codes:
                measure("frz", frz, x, ref, row, True, full, errors)
            row["frz_launches"] = sum(launch_sites(codes[-1]).values()) if codes else None
        if "frzcg" in variants:
            measure("frzcg", compile_inductor(copy.deepcopy(masked), freezing=True, cudagraphs=True), x, ref, row,
                    False, True, errors)
        if "fx" in variants:
            fx, graphs = fxsparse_compiled(copy.deepcopy(masked), {"cudagraphs": False, "lowering": lowering})
            measure("fx", fx, x, ref, row, True, True, errors)
            row["guard_us"] = guard_us(graphs)
            report = fxsparse.report.current_report(None).graphs[-1]
            row["macs_kept"] = report.macs_after / report.macs_before if report.macs_before else None
            row["macs_ideal"] = report.macs_ideal / report.macs_before if report.macs_before else None
            row["fx_report_launches"] = report.launches
        if "fxcg" in variants:
            torch._dynamo.reset()
            fxcg = torch.compile(copy.deepcopy(masked), backend="fxsparse", options={"lowering": lowering})
            measure("fxcg", fxcg, x, ref, row, False, True, errors)
        if "fxfrzcg" in variants:
            torch._dynamo.reset()
            fxfrzcg = with_freezing(torch.compile(copy.deepcopy(masked), backend="fxsparse",
                                                  options={"lowering": lowering}))
            measure("fxfrzcg", fxfrzcg, x, ref, row, False, True, errors)
        if pruned is not None and "tp" in variants:
            pruned = to_gpu(pruned)
            if full:  # the physically pruned model under the same three Inductor settings
                measure("tpind", compile_inductor(copy.deepcopy(pruned)), x, None, row, True, True, errors)
            measure("tp", compile_inductor(pruned, freezing=True), x, None, row, True, full, errors)
            row["tp_err"] = common.max_abs_err(pruned(x), ref)
            measure("tpcg", compile_inductor(copy.deepcopy(pruned), freezing=True, cudagraphs=True), x, None,
                    row, False, True, errors)
    best_graph = min((v for v in (row.get("ind_graph"), row.get("frz_graph")) if v is not None), default=None)
    best_plain = min((v for v in (row.get("ind_plain"), row.get("frz_plain"), row.get("frzcg_plain")) if v),
                     default=None)
    row["speedup_graph"] = common.ratio(best_graph, row.get("fx_graph"))
    row["speedup_plain"] = common.ratio(best_plain, row.get("fxcg_plain"))
    row["speedup_plain_frz"] = common.ratio(best_plain, row.get("fxfrzcg_plain"))
    row["errors"] = errors
    return row


def cpu_row(name: str, keep: float, batch: int, masks: str = "groups") -> dict:
    _, shape = build(name)
    example = torch.randn(1, *shape)
    masked, _, how = masked_models(name, keep, example, masks)
    x = torch.randn(batch, *shape)
    row = {"model": name, "keep": keep, "batch": batch, "masks": how}
    with torch.no_grad():
        ref = masked(x)
        row["eager_plain"] = common.time_cpu(lambda: masked(x))
        torch._dynamo.reset()
        ind = torch.compile(copy.deepcopy(masked))
        _, row["ind_compile_s"] = first_call(ind, x)
        row["ind_plain"] = common.time_cpu(lambda: ind(x), repeat=7)
        torch._dynamo.reset()
        fx = torch.compile(copy.deepcopy(masked), backend="fxsparse")
        out, row["fx_compile_s"] = first_call(fx, x)
        row["fx_err"] = common.max_abs_err(out, ref)
        row["fx_plain"] = common.time_cpu(lambda: fx(x), repeat=7)
        report = fxsparse.report.current_report(None).graphs[-1]
        row["macs_kept"] = report.macs_after / report.macs_before if report.macs_before else None
    row["speedup_plain"] = common.ratio(row["ind_plain"], row["fx_plain"])
    return row


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50,resnet18,mobilenet_v2")
    p.add_argument("--keep", default="1.0,0.5,0.25", help="fractions of channels kept")
    p.add_argument("--batch", default="64,1")
    p.add_argument("--lean-batch1", action=argparse.BooleanOptionalAction, default=False,
                   help="at B=1 skip Inductor default (masked and pruned) and the frz plain columns")
    p.add_argument("--quick", action="store_true", help="small ResNet on the CPU, for CI")
    p.add_argument("--image-size", type=int, default=224, help="input size of the torchvision models")
    p.add_argument("--masks", default="groups", choices=("groups", "ln"),
                   help="consistent channel groups, or ln_structured on each conv on its own")
    p.add_argument("--plot", metavar="PNG", help="time per model (bars), if matplotlib is installed")
    p.add_argument("--lowering", default="auto", choices=("auto", "triton", "aten"),
                   help="fxsparse's conv lowering on the GPU (auto: measured per conv chain)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"columns to compile and time on the GPU (of {','.join(VARIANTS)}; eager comes with ind)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    IMAGE_SIZE["torchvision"] = args.image_size
    common.raise_dynamo_recompile_limit()
    torch.backends.cudnn.benchmark = True
    on_gpu = torch.cuda.is_available() and not args.quick
    models = ["small_resnet"] if args.quick else args.models.split(",")
    keeps = [1.0, 0.5] if args.quick else [float(k) for k in args.keep.split(",")]
    batches = [8] if args.quick else [int(b) for b in args.batch.split(",")]
    rows = []
    start = time.perf_counter()
    for name in models:
        for keep in keeps:
            for batch in batches:
                full = batch > 1 or not args.lean_batch1
                row = (gpu_row(name, keep, batch, full, args.lowering, args.masks, tuple(args.variants.split(",")))
                       if on_gpu
                       else cpu_row(name, keep, batch, args.masks))
                rows.append(row)
                print(f"[{time.perf_counter() - start:6.1f}s] " + ", ".join(
                    f"{k}={common._fmt(v, '.3g')}" for k, v in row.items() if k != "errors"), flush=True)
                if row.get("errors"):
                    print("   errors:", row["errors"], flush=True)
    env = common.environment()
    if args.json:
        common.write_json(args.json, rows, env)
    print(f"\n{env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"{'fp16 channels_last, ms' if on_gpu else 'fp32 CPU wall-clock, ms'}")
    if args.plot:
        for r in rows:
            r["label"] = f"{r['model']} keep {r['keep']} B={r['batch']}"
        ys = ["frz_graph", "fx_graph", "tp_graph", "frzcg_plain", "fxcg_plain"] if on_gpu else [
            "eager_plain", "ind_plain", "fx_plain"]
        common.maybe_plot(args.plot, rows, "label", ys, title="time per model (ms)", ylabel="ms")
    common.print_table(rows, GPU_COLUMNS if on_gpu else CPU_COLUMNS)


if __name__ == "__main__":
    main()
