"""The pruned model zoo: every CNN family people prune, masked by channel groups, on the GPU.

    PYTHONPATH=. python benchmarks/zoo.py --models resnet50,resnext50_32x4d,convnext_tiny --batch 32,1
    PYTHONPATH=. python benchmarks/zoo.py --quick        # two small replicas on the CPU (CI smoke test)
    PYTHONPATH=. python benchmarks/zoo.py --cpu --masks ln --models shufflenet_v2_x1_0 --batch 8 --image-size 128

Per model, at `--keep` (0.5) of every prunable channel group: the masked model (prune masks on
conv and channel-dim linear weights and on channel LayerNorm weights, the groups of
Torch-Pruning's MagnitudePruner where torch_pruning imports and handles the model, else
`fxsparse.sparsify`'s groups), fp16 channels_last, B in `--batch`:

    Ind graph / plain   Inductor on the masked model, the best of default, freezing and (plain
                        call only) freezing + CUDA graphs (mode "reduce-overhead")
    fx graph            fxsparse built with cudagraphs=False, its call replayed in a CUDA graph
    fx plain            fxsparse with its defaults (CUDA graphs on), called as users call it
    physical graph      the physically smaller model under Inductor freezing: Torch-Pruning's
                        where it handles the model, else fxsparse.compact's (exact)
    fx/Ind, fx/physical speed ratios of the graph (kernel) times (fx and physical graph: the
                        median of their first figure and three more rounds, alternating)
    err                 max |fxsparse - eager masked|; physical err: the physical model's
                        (Torch-Pruning's drops the constants pruned channels carry through
                        BatchNorm; fxsparse.compact's folds them)
    compile s           first call of fxsparse and of Inductor (default)
    MACs / ideal        the report's macs_after / macs_ideal (convs)

`--cpu` runs the full models on the CPU (fp32, one thread) and times Inductor against fxsparse
(each with its defaults, in alternating rounds); `--masks ln` prunes every dense conv and
channel-dim linear on its own with `prune.ln_structured` instead of by groups.

`--budget-s` stops starting models once that many seconds have passed (the rest are listed as
skipped), so that a run fits a time-limited machine: split the models over several calls.
The table is printed last.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Optional

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
sys.path.append(os.path.join(os.path.dirname(HERE), "tests"))  # the YOLO-style detector (after benchmarks/models.py)

import common  # noqa: E402
import models as M  # noqa: E402

import fxsparse  # noqa: E402

TORCHVISION = ["resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_large",
               "efficientnet_b0", "regnet_y_400mf", "densenet121", "vgg16_bn", "googlenet", "shufflenet_v2_x1_0",
               "convnext_tiny"]
MODELS = TORCHVISION + ["yolo"]
QUICK = ["convnext", "yolo"]  # replicas of tests/zoo_models.py

COLUMNS = [
    ("model", "model"), ("batch", "B"), ("masks", "masks"), ("macs_kept", "MACs kept"),
    ("macs_vs_ideal", "MACs / ideal"),
    ("ind_graph", "Ind graph"), ("ind_plain", "Ind plain"), ("fx_graph", "fx graph"), ("fx_plain", "fx plain"),
    ("physical", "physical model"), ("tp_graph", "physical graph"), ("speedup_graph", "fx/Ind"), ("vs_tp", "fx/physical"),
    ("fx_err", "fx err"), ("tp_err", "physical err"), ("ind_compile_s", "Ind compile s"), ("fx_compile_s", "fx compile s"),
]
CPU_COLUMNS = [("model", "model"), ("batch", "B"), ("masks", "masks"), ("macs_kept", "MACs kept"),
               ("macs_vs_ideal", "MACs / ideal"), ("eager_plain", "eager ms"), ("ind_plain", "Inductor ms"),
               ("fx_plain", "fxsparse ms"), ("speedup_plain", "fx/Ind"), ("fx_err", "fx err"),
               ("ind_compile_s", "Ind compile s"), ("fx_compile_s", "fx compile s")]


def build(name: str, image: int) -> tuple:
    """(model in eval mode with trained-looking norms, input shape without the batch)."""
    import zoo_models as Z

    if not image:  # the small replicas (--quick); their names overlap torchvision's
        model, shape = Z.build(name)
        return model, tuple(shape[1:])
    if name == "yolo":  # a YOLOv8s-sized detector (widths 64..256 at the backbone's end)
        torch.manual_seed(0)
        return Z.randomize(Z.YoloDetector(w=64, outputs=144)).eval(), (3, image, image)
    import torchvision

    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    return Z.randomize(model).eval(), (3, image, image)


def tp_removed(model: nn.Module, example: torch.Tensor, keep: float) -> tuple:
    """Torch-Pruning's choice of groups: ({module: {"out": set, "in": set}}, physically pruned copy)."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    names = {id(m): n for n, m in pruned.named_modules()}
    outputs = [m for m in pruned.modules() if isinstance(m, nn.Linear)][-1:]  # the classifier's outputs
    pruner = tp.pruner.MagnitudePruner(pruned, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                       pruning_ratio=1.0 - keep, ignored_layers=outputs, round_to=8)
    out_fns = {tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels, tp.prune_linear_out_channels,
               tp.prune_layernorm_out_channels}
    in_fns = {tp.prune_conv_in_channels, tp.prune_depthwise_conv_in_channels, tp.prune_linear_in_channels}
    removed: dict = {}
    alive: dict = {}  # (name, "out" | "in"): the original ids of the channels still there
    for group in pruner.step(interactive=True):
        cuts: dict = {}
        for dep, idxs in group:
            module = dep.target.module
            if not isinstance(module, (nn.Conv2d, nn.Linear, nn.LayerNorm)) or module.weight is None:
                continue
            kind = "out" if dep.handler in out_fns else "in" if dep.handler in in_fns else None
            if kind is None:
                continue
            if isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1:
                kind = "out"  # a depthwise conv's input and output are one set of channels
            key = (names[id(module)], kind)
            alive.setdefault(key, list(range(channel_count(module, kind))))
            cuts.setdefault(key, set()).update(int(i) for i in idxs)
        # a group's idxs are positions in the modules as earlier groups left them (a DenseNet
        # conv's input loses one group per concatenated part): mapped back to original ids
        for (name, kind), cut in cuts.items():
            ids = alive[(name, kind)]
            removed.setdefault(name, {"out": set(), "in": set()})[kind].update(ids[i] for i in cut)
            alive[(name, kind)] = [c for i, c in enumerate(ids) if i not in cut]
        group.prune()
    return removed, pruned.eval()


def channel_count(module: nn.Module, kind: str) -> int:
    """A conv's, linear's or LayerNorm's output ("out") or input ("in") channels."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels if kind == "out" else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if kind == "out" else module.in_features
    return module.normalized_shape[0]


def mask_removed(model: nn.Module, removed: dict) -> None:
    from fxsparse.compaction.groups import zero_input_channels
    from fxsparse.nn.conv import apply_mask

    for name, r in removed.items():
        m = model.get_submodule(name)
        mask = torch.ones_like(m.weight)  # (a LayerNorm's weight too, see fxsparse.sparsify: out only)
        depthwise = isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1
        if r["out"]:
            mask[sorted(r["out"])] = 0
        if r["in"] and depthwise:  # in and out are one channel
            mask[sorted(r["in"])] = 0
        elif r["in"]:
            zero_input_channels(mask, getattr(m, "groups", 1), sorted(r["in"]))
        apply_mask(m, mask)


def masked_models(name: str, keep: float, image: int) -> tuple:
    """(masked model, physically pruned model or None, how the groups were chosen)."""
    model, shape = build(name, image)
    example = torch.randn(1, *shape)
    try:
        removed, pruned = tp_removed(model, example, keep)
        mask_removed(model, removed)
        return model, pruned, "torch-pruning"
    except Exception as e:  # noqa: BLE001 - not installed, or a model it does not handle
        print(f"   {name}: Torch-Pruning not used ({type(e).__name__}: {str(e)[:120]}); fxsparse.sparsify groups",
              flush=True)
        model, _ = build(name, image)
        fxsparse.sparsify(model, keep, example_inputs=(example,), skip_stem=False)
        return model, None, "fxsparse groups"


def ln_masked_model(name: str, keep: float, image: int) -> tuple:
    """(model with `prune.ln_structured` on every dense conv and channel-dim linear on its own
    (L1 over output channels; the classifier kept), None, "ln per layer"): masks that disagree
    across adds and concats."""
    from torch.nn.utils import prune

    model, _ = build(name, image)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)][:-1]
    for m in model.modules():
        dense_conv = isinstance(m, nn.Conv2d) and m.groups == 1 and m.out_channels > 8
        if dense_conv or any(m is lin for lin in linears):
            prune.ln_structured(m, "weight", 1.0 - keep, 1, 0)
    return model, None, "ln per layer"


def report_macs(row: dict) -> None:
    rep = fxsparse.report.current_report(None).graphs
    before, after, ideal = (sum(getattr(g, k) for g in rep) for k in ("macs_before", "macs_after", "macs_ideal"))
    row["macs_kept"] = common.ratio(after, before)
    row["macs_vs_ideal"] = common.ratio(after, ideal)
    row["notes"] = sorted({n for g in rep for n in g.notes})


def first_output(out):
    """One tensor to compare (a detector returns a list, a backbone + FPN a dict)."""
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return torch.cat([o.flatten() for o in out])
    return out


def progress(name: str, batch: int, phase: str, since: float) -> None:
    """One line per finished phase of a model's row, so that a run stopped midway says how far
    each model got and what its phases cost."""
    print(f"   {name} B={batch}: {phase} ({time.perf_counter() - since:.0f} s)", flush=True)


def gpu_row(name: str, keep: float, batch: int, image: int) -> dict:
    t0 = time.perf_counter()
    masked, pruned, how = masked_models(name, keep, image)
    _, shape = build(name, image)
    row = {"model": name, "batch": batch, "masks": how, "physical": "torch-pruning"}
    if pruned is None:  # the exact physically smaller model instead
        pruned = fxsparse.compact(copy.deepcopy(masked), torch.randn(1, *shape))
        row["physical"] = "fxsparse.compact"
    to_gpu = lambda m: m.to("cuda", torch.float16).to(memory_format=torch.channels_last)  # noqa: E731
    masked = to_gpu(masked)
    x = torch.randn(batch, *shape, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    errors: dict = {}
    wrap = lambda m: (lambda t: first_output(m(t)))  # noqa: E731
    with torch.no_grad():
        ref = first_output(masked(x))
        settings = {"ind": {}, "frz": {"freezing": True}, "frzcg": {"freezing": True, "cudagraphs": True}}
        for label, kw in settings.items():  # Inductor's best: default, freezing, freezing + CUDA graphs
            M.measure(label, wrap(M.compile_inductor(copy.deepcopy(masked), **kw)), x, ref, row, label != "frzcg",
                      True, errors)
        for k in ("graph", "plain"):
            times = [row.pop(f"{label}_{k}", None) for label in settings]
            row[f"ind_{k}"] = min((t for t in times if t is not None), default=None)
        progress(name, batch, "masks and Inductor's three settings", t0)
        # fxsparse as users call it (its defaults: CUDA graphs on) for the plain call; its kernel
        # time from the build without CUDA graphs, replayed in one
        fx, _ = M.fxsparse_compiled(copy.deepcopy(masked), {"cudagraphs": False})
        fxsparse.report.current_report(None).graphs.clear()
        M.measure("fx", wrap(fx), x, ref, row, True, False, errors)
        report_macs(row)
        fxcg, _ = M.fxsparse_compiled(copy.deepcopy(masked), {})
        M.measure("fxcg", wrap(fxcg), x, ref, row, False, True, errors)
        row["fx_plain"] = row.pop("fxcg_plain", None)
        progress(name, batch, "fxsparse (its launches tuned on the first compile)", t0)
        pruned = to_gpu(pruned)
        tp = wrap(M.compile_inductor(pruned, freezing=True))
        M.measure("tp", tp, x, None, row, True, False, errors)
        row["tp_err"] = common.max_abs_err(first_output(pruned(x)), ref)
        progress(name, batch, "the physically pruned model", t0)
        alternate_graph_times(row, {"fx": wrap(fx), "tp": tp}, x)
    row["speedup_graph"] = common.ratio(row.get("ind_graph"), row.get("fx_graph"))
    row["vs_tp"] = common.ratio(row.get("tp_graph"), row.get("fx_graph"))
    row["errors"] = errors
    return row


def alternate_graph_times(row: dict, fns: dict, x: torch.Tensor, rounds: int = 3) -> None:
    """Times the kernel time of each of `fns` again, in alternating rounds; its figure becomes
    the median of those and the first measurement, so that a ratio between two is not an effect
    of which was timed last."""
    times = {k: [row[f"{k}_graph"]] for k in fns if row.get(f"{k}_graph") is not None}
    for _ in range(rounds):
        for k in times:
            times[k].append(common.time_cuda_graph(lambda f=fns[k]: f(x)))
    for k, ts in times.items():
        row[f"{k}_graph"] = statistics.median(ts)


def cpu_row(name: str, keep: float, batch: int, image: int, masks: str, quick: bool) -> dict:
    """On the CPU: the small replicas (quick: eager against fxsparse without Inductor, a smoke
    test) or the full models (Inductor against fxsparse, each with its defaults), wall-clock."""
    image = 0 if quick else image
    masked, _, how = ln_masked_model(name, keep, image) if masks == "ln" else masked_models(name, keep, image)
    _, shape = build(name, image)
    x = torch.randn(batch, *shape)
    row = {"model": name, "batch": batch, "masks": how}
    with torch.no_grad():
        ref = first_output(masked(x))
        row["eager_plain"] = common.time_cpu(lambda: masked(x))
        torch._dynamo.reset()
        if not quick:
            ind = torch.compile(copy.deepcopy(masked))
            _, row["ind_compile_s"] = M.first_call(ind, x)
        fxsparse.report.current_report(None).graphs.clear()
        fx = torch.compile(copy.deepcopy(masked), backend="fxsparse", options={"inductor": False} if quick else None)
        out, row["fx_compile_s"] = M.first_call(fx, x)
        row["fx_err"] = common.max_abs_err(first_output(out), ref)
        report_macs(row)
        if quick:
            row["fx_plain"] = common.time_cpu(lambda: fx(x))
        else:  # in alternating rounds: the machine's load falls on both alike
            ind_ms, fx_ms = zip(*[(common.time_cpu(lambda: ind(x)), common.time_cpu(lambda: fx(x))) for _ in range(3)])
            row["ind_plain"], row["fx_plain"] = statistics.median(ind_ms), statistics.median(fx_ms)
            row["speedup_plain"] = common.ratio(row["ind_plain"], row["fx_plain"])
    return row


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"of {','.join(MODELS)}")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of each group's channels kept")
    p.add_argument("--batch", default="32,1")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--budget-s", type=float, default=540, help="start no model after this many seconds")
    p.add_argument("--quick", action="store_true", help="small replicas on the CPU (CI)")
    p.add_argument("--cpu", action="store_true", help="the full models on the CPU, Inductor beside fxsparse")
    p.add_argument("--masks", default="groups", choices=("groups", "ln"),
                   help="channel groups (Torch-Pruning's, else fxsparse.sparsify's), or prune.ln_structured on "
                        "every dense conv and channel-dim linear on its own")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    common.raise_dynamo_recompile_limit()
    torch.backends.cudnn.benchmark = True
    on_gpu = torch.cuda.is_available() and not (args.quick or args.cpu)
    if not on_gpu and not args.quick:
        torch.set_num_threads(1)
    names = QUICK if args.quick else args.models.split(",")
    batches = [2] if args.quick else [int(b) for b in args.batch.split(",")]
    if on_gpu and args.masks != "groups":
        p.error("--masks ln: on the CPU only (--cpu)")
    rows, skipped = [], []
    start = time.perf_counter()
    for name in names:
        for batch in batches:
            if time.perf_counter() - start > args.budget_s:
                skipped.append(f"{name} B={batch}")
                continue
            try:
                row = gpu_row(name, args.keep, batch, args.image_size) if on_gpu else \
                    cpu_row(name, args.keep, batch, args.image_size, args.masks, args.quick)
            except Exception as e:  # noqa: BLE001 - one model's failure is a row, not the end of the run
                row = {"model": name, "batch": batch, "errors": {"run": f"{type(e).__name__}: {str(e)[:300]}"}}
            rows.append(row)
            print(f"[{time.perf_counter() - start:6.1f}s] " + ", ".join(
                f"{k}={common._fmt(v, '.3g')}" for k, v in row.items() if k not in ("errors", "notes")), flush=True)
            for n in row.get("notes", []):
                print("   note:", n, flush=True)
            if row.get("errors"):
                print("   errors:", row["errors"], flush=True)
    env = common.environment()
    if args.json:
        common.write_json(args.json, rows, env)
    if skipped:
        print("skipped (time budget):", ", ".join(skipped))
    print(f"\n{env['device']} | torch {env['torch']} | triton {env['triton']} | keep {args.keep} | "
          f"{'fp16 channels_last, ms' if on_gpu else 'fp32 CPU wall-clock, ms' + ('' if args.quick else ', one thread')}")
    common.print_table(rows, COLUMNS if on_gpu else CPU_COLUMNS)


if __name__ == "__main__":
    main()
