"""The seed notebook's channel-sparsity sweep, reproduced on fxsparse and extended.

Layer (the seed's): Conv2d 64->128 3x3 pad 1 on 56x56, B=16, fp16, channels_last (GPU). For each
sparsity kind (output channels, filter blocks of 4, input channels) and keep ratio in
1.0 0.85 0.75 0.65 0.5 0.35 0.25, the conv is a `fxsparse.nn.TritonConv2d` with an L1 prune mask
(keep = round half up of keep_ratio * C, in [1, C]). Columns:

  fx us          TritonConv2d forward (eager, compacted fxsparse op), CUDA-graph replay median
                 per call (20 calls per graph; benchmarks/common.py)
  exec           how TritonConv2d ran the kept channels (fused in/out index in the kernel, or
                 gather / scatter copies around a compact conv: the fastest, timed per shape)
  vs dense op    our dense op (TritonConv2d, no mask) time / fx time
  vs cuDNN       cuDNN dense (the seed's nn.Conv2d, bias=True, channels_last) time / fx time
                 (the bias is a separate pass for cuDNN)
  compact us     the conv with only the kept channels physically present (the op on the
                 compacted weight, the input already compact, only the kept outputs written): what the backend runs when the neighbours consume
                 compact channels; "compact vs cuDNN" = cuDNN dense / compact
  vs Inductor    torch.compile (default) of the SAME masked nn.Conv2d / fx time
  kernel err     fx output vs the masked conv computed in fp32 (eager F.conv2d): mae, max,
                 rel_l2 (must be fp16-small: rel_l2 < 1e-3; "ok" column)
  pruning err    the masked conv vs the dense conv, both fp32: mae, rel_l2 (what the
                 seed's error columns mixed with kernel error)
  (the seed's speedup column was against its own dense Triton conv: "vs dense op" here)

A top-10 by speedup (vs cuDNN by default, `--top-by`), and with `--finetune-steps N` a
recovery table: the pruning rel_l2 at keep 0.5 and 0.25 before and after N steps of
distillation from the dense conv (`fxsparse.nn.finetune`: Adam, lr 1e-3, grad clip 1.0). The
main table is printed last.

    PYTHONPATH=. python benchmarks/seed_sweep.py [--json out.json] [--plot speedup.png]
                                                 [--finetune-steps 200] [--no-inductor] [--quick]

`--quick`: a tiny CPU version (16->32 3x3 at 16x16, B=2, keep 1.0 and 0.5, finetune 3 steps at 0.5,
no Inductor, aten path, wall-clock medians) for CI: well under a minute.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402

from fxsparse.nn import TritonConv2d, apply_mask, compare_modules, copy_module, finetune  # noqa: E402
from fxsparse.kernels.problem import ConvArgs  # noqa: E402

SEED_LAYER = dict(batch=16, cin=64, cout=128, kernel=3, padding=1, hw=56)
QUICK_LAYER = dict(batch=2, cin=16, cout=32, kernel=3, padding=1, hw=16)
SEED_RATIOS = [1.0, 0.85, 0.75, 0.65, 0.5, 0.35, 0.25]
QUICK_RATIOS = [1.0, 0.5]
RECOVERY_RATIOS = (0.5, 0.25)
KERNEL_REL_L2_LIMIT = 1e-3

MAIN_COLUMNS = [
    ("kind", "kind"), ("keep", "keep"), ("kept", "kept out/in"), ("fx_us", "fx us"), ("exec", "exec"),
    ("vs_dense_op", "vs dense op"), ("vs_cudnn", "vs cuDNN"), ("compact_us", "compact us"),
    ("vs_cudnn_compact", "compact vs cuDNN"), ("inductor_us", "Inductor us"),
    ("vs_inductor", "vs Inductor"),
    ("kernel_mae", "kernel mae"), ("kernel_max", "kernel max"), ("kernel_rel_l2", "kernel rel_l2"),
    ("kernel_ok", "ok"),
    ("pruning_mae", "pruning mae"), ("pruning_rel_l2", "pruning rel_l2"),
]
TOP_KEYS = {"cudnn": "vs_cudnn", "dense_op": "vs_dense_op", "inductor": "vs_inductor"}


class _Fp32(nn.Module):
    """Runs a copy of `module` in fp32 on an upcast input (the error reference)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.inner = copy_module(module).float().eval()

    def forward(self, x):
        return self.inner(x.float())


class _Compacted(nn.Module):
    """The conv with only its kept channels physically present ("compacted"): the
    fxsparse op on the compacted weight and an input already holding only the kept channels,
    writing only the kept output channels. What the fxsparse backend runs when the neighbouring
    layers consume the compact channels; the drop-in module must also produce the full output."""

    def __init__(self, tri: TritonConv2d, x: torch.Tensor):
        super().__init__()
        mask = tri.weight_mask.detach()
        rows = mask.flatten(1).any(1).nonzero().flatten()
        cols = mask.transpose(0, 1).flatten(1).any(1).nonzero().flatten()
        fmt = torch.channels_last if x.is_cuda else torch.contiguous_format
        self.w = tri.weight.detach()[rows][:, cols].contiguous(memory_format=fmt)
        self.b = None if tri.bias is None else tri.bias.detach()[rows].contiguous()
        self.cols, self.conv = cols, tri
        self.xc = x[:, cols].contiguous(memory_format=fmt)  # gathered once, untimed

    def forward(self, x):
        c = self.conv
        return torch.ops.fxsparse.conv2d(*ConvArgs.of(self.xc, self.w, self.b, c.stride, c.padding, c.dilation))


def _kind_setter(kind: str, block_size: int):
    if kind == "channel":
        return lambda m, r: m.set_channel_sparsity(r)
    if kind == "block":
        return lambda m, r: m.set_block_sparsity(r, block_size=block_size)
    if kind == "input":
        return lambda m, r: m.set_input_channel_sparsity(r)
    raise ValueError(kind)


def _masked_conv(base: nn.Conv2d, mask: torch.Tensor) -> nn.Conv2d:
    ref = copy_module(base)
    apply_mask(ref, mask.clone())
    return ref


class Timer:
    def __init__(self, device: str, iters: int):
        self.device = device
        self.method = "graph" if device == "cuda" else "cpu"
        self.kwargs = dict(calls=20) if device == "cuda" else dict(repeat=iters)
        self.errors = {}

    def us(self, label: str, module, x):
        module.eval()

        def call():
            with torch.no_grad():
                return module(x)

        ms, err = common.try_time(call, self.method, **self.kwargs)
        if err:
            self.errors[label] = err
            print(f"  ! {label}: {err}", flush=True)
        return None if ms is None else ms * 1e3


def _inductor(module: nn.Module):
    torch._dynamo.reset()  # a fresh compile per masked conv (no recompile-limit fallbacks to eager)
    return torch.compile(module)


def run(args) -> dict:
    quick = args.quick
    device = "cpu" if quick or not torch.cuda.is_available() else "cuda"
    dtype = torch.float16 if device == "cuda" else torch.float32
    layer = dict(QUICK_LAYER if quick else SEED_LAYER)
    if args.batch:
        layer["batch"] = args.batch
    ratios = [float(r) for r in args.ratios.split(",")] if args.ratios else (QUICK_RATIOS if quick else SEED_RATIOS)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    use_inductor = not args.no_inductor and not quick
    finetune_steps = args.finetune_steps if args.finetune_steps is not None else (3 if quick else 0)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        common.raise_dynamo_recompile_limit()
    memory_format = torch.channels_last if device == "cuda" else torch.contiguous_format
    started = time.time()

    torch.manual_seed(0)
    b, cin, cout, hw = layer["batch"], layer["cin"], layer["cout"], layer["hw"]
    base = nn.Conv2d(cin, cout, layer["kernel"], padding=layer["padding"], bias=True)
    base = base.to(device=device, dtype=dtype, memory_format=memory_format).eval()
    x = torch.randn(b, cin, hw, hw, device=device).to(dtype).contiguous(memory_format=memory_format)
    timer = Timer(device, iters=args.iters or (5 if quick else 20))
    dense_fp32 = _Fp32(base)

    # dense baselines, measured in this run
    dense_op = TritonConv2d.from_conv(base).eval()
    baselines = {
        "cudnn_us": timer.us("cudnn", base, x),
        "dense_op_us": timer.us("dense_op", dense_op, x),
    }
    if use_inductor:
        baselines["inductor_dense_us"] = timer.us("inductor_dense", _inductor(copy_module(base)), x)
    dense_err = compare_modules(dense_fp32, dense_op, x)
    baselines["dense_op_rel_l2"] = dense_err["rel_l2"]
    print(f"[{time.time() - started:5.1f}s] dense: cuDNN {baselines['cudnn_us']} us, "
          f"fxsparse op {baselines['dense_op_us']} us", flush=True)

    rows = []
    for kind in kinds:
        setter = _kind_setter(kind, args.block_size)
        label = f"block-{args.block_size}" if kind == "block" else kind
        for r in ratios:
            tri = TritonConv2d.from_conv(base)
            setter(tri, r)
            tri.eval()
            masked = _masked_conv(base, tri.weight_mask).eval()
            row = dict(kind=label, keep=r, kept=f"{tri.kept_out_channels}/{tri.kept_in_channels}",
                       kept_out=tri.kept_out_channels, kept_in=tri.kept_in_channels)
            row["fx_us"] = timer.us(f"fx {label} {r}", tri, x)
            row["exec"] = tri.last_execution
            row["compact_us"] = timer.us(f"compact {label} {r}", _Compacted(tri, x), x)
            row["vs_cudnn_compact"] = common.ratio(baselines["cudnn_us"], row["compact_us"])
            if use_inductor:
                row["inductor_us"] = timer.us(f"inductor {label} {r}", _inductor(masked), x)
            kerr = compare_modules(_Fp32(masked), tri, x)
            perr = compare_modules(dense_fp32, _Fp32(masked), x)
            row.update(kernel_mae=kerr["mae"], kernel_max=kerr["max"], kernel_rel_l2=kerr["rel_l2"],
                       kernel_ok="yes" if kerr["rel_l2"] < KERNEL_REL_L2_LIMIT else "NO",
                       pruning_mae=perr["mae"], pruning_max=perr["max"], pruning_rel_l2=perr["rel_l2"])
            row["vs_dense_op"] = common.ratio(baselines["dense_op_us"], row["fx_us"])
            row["vs_cudnn"] = common.ratio(baselines["cudnn_us"], row["fx_us"])
            row["vs_inductor"] = common.ratio(row.get("inductor_us"), row["fx_us"])
            rows.append(row)
            print(f"[{time.time() - started:5.1f}s] {label} keep {r}: {row['fx_us']} us, "
                  f"kernel rel_l2 {kerr['rel_l2']:.2e}, pruning rel_l2 {perr['rel_l2']:.3f}", flush=True)

    recovery = []
    if finetune_steps > 0:
        eval_x = torch.randn(b, cin, hw, hw, device=device).to(dtype).contiguous(memory_format=memory_format)
        for kind in kinds:
            label = f"block-{args.block_size}" if kind == "block" else kind
            for r in (RECOVERY_RATIOS[:1] if quick else RECOVERY_RATIOS):
                student = TritonConv2d.from_conv(base)
                _kind_setter(kind, args.block_size)(student, r)
                before = compare_modules(dense_fp32, _Fp32(student), eval_x)["rel_l2"]
                losses = finetune(student, base, finetune_steps, lr=args.lr, batch_shape=(b, cin, hw, hw),
                                  grad_clip=1.0, progress=not args.quiet)
                after = compare_modules(dense_fp32, _Fp32(student), eval_x)["rel_l2"]
                recovery.append(dict(kind=label, keep=r, steps=finetune_steps, rel_l2_before=before,
                                     rel_l2_after=after, loss_first=losses[0], loss_last=losses[-1]))
    return dict(device=device, dtype=str(dtype), layer=layer, baselines=baselines, rows=rows,
                recovery=recovery, errors=timer.errors, seconds=time.time() - started)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU version for CI (< 60 s)")
    p.add_argument("--json", metavar="PATH", help="write rows, baselines, recovery and environment")
    p.add_argument("--plot", metavar="PNG", help="speedup vs keep ratio per kind (needs matplotlib)")
    p.add_argument("--finetune-steps", type=int, default=None,
                   help="distillation steps for the recovery table (default 0; --quick: 3)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kinds", default="channel,block,input", help="comma-separated: channel,block,input")
    p.add_argument("--ratios", default="", help="comma-separated keep ratios (default: the seed's)")
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--batch", type=int, default=0, help="batch size (default 16; quick 2)")
    p.add_argument("--iters", type=int, default=0, help="CPU timing repeats")
    p.add_argument("--no-inductor", action="store_true", help="skip the Inductor column (compiles)")
    p.add_argument("--top-by", choices=sorted(TOP_KEYS), default="cudnn", help="speedup the top-10 ranks by")
    p.add_argument("--quiet", action="store_true", help="no fine-tuning progress lines")
    args = p.parse_args(argv)
    for k in args.kinds.split(","):
        if k.strip() and k.strip() not in ("channel", "block", "input"):
            p.error(f"unknown kind {k!r}")
    if not args.quick and not torch.cuda.is_available():
        print("note: no CUDA GPU, running the full sweep on the CPU (aten path, fp32)", flush=True)

    res = run(args)
    rows, base = res["rows"], res["baselines"]
    env = common.environment()
    lay = res["layer"]
    print(f"\nseed sweep: {lay['cin']}->{lay['cout']} {lay['kernel']}x{lay['kernel']} pad {lay['padding']}, "
          f"{lay['hw']}x{lay['hw']}, B={lay['batch']}, {res['dtype']} on {env['device']} "
          f"(torch {env['torch']}, triton {env['triton']}); {res['seconds']:.0f} s")
    common.print_table([dict(impl="cuDNN dense (nn.Conv2d)", us=base["cudnn_us"]),
                        dict(impl="fxsparse op dense (TritonConv2d)", us=base["dense_op_us"],
                             rel_l2=base["dense_op_rel_l2"]),
                        dict(impl="Inductor dense", us=base.get("inductor_dense_us"))],
                       [("impl", "dense baseline"), ("us", "us"), ("rel_l2", "rel_l2 vs fp32")],
                       title="\nDense baselines")
    key = TOP_KEYS[args.top_by]
    ranked = sorted([r for r in rows if r.get(key) is not None], key=lambda r: -r[key])[:10]
    common.print_table(ranked, [("kind", "kind"), ("keep", "keep"), ("fx_us", "fx us"),
                                ("vs_dense_op", "vs dense op"), ("vs_cudnn", "vs cuDNN"),
                                ("vs_inductor", "vs Inductor"), ("pruning_rel_l2", "pruning rel_l2")],
                       title=f"\nTop-10 by speedup {key.replace('_', ' ')}")
    if res["recovery"]:
        common.print_table(res["recovery"], [("kind", "kind"), ("keep", "keep"), ("steps", "steps"),
                                             ("rel_l2_before", "pruning rel_l2 before"),
                                             ("rel_l2_after", "after fine-tuning"),
                                             ("loss_first", "loss first"), ("loss_last", "loss last")],
                           title="\nRecovery by distillation from the dense conv")
    bad = [r for r in rows if r["kernel_ok"] != "yes"]
    if res["errors"]:
        print("\nerrors:", res["errors"])
    common.print_table(rows, MAIN_COLUMNS, title="\nSweep (speedups: > 1 means fxsparse is faster)")
    if bad:
        print(f"\nWARNING: {len(bad)} rows with kernel rel_l2 >= {KERNEL_REL_L2_LIMIT}")
    if args.json:
        common.write_json(args.json, rows, meta=dict(env=env, args=vars(args), layer=lay, device=res["device"],
                                                     dtype=res["dtype"], baselines=base, top10=ranked,
                                                     recovery=res["recovery"], errors=res["errors"],
                                                     seconds=res["seconds"]))
        print(f"wrote {args.json}")
    if args.plot:
        ratios = sorted({r["keep"] for r in rows}, reverse=True)
        kinds = list(dict.fromkeys(r["kind"] for r in rows))
        pivot = [dict(keep=k, **{kind: next((r[key] for r in rows if r["keep"] == k and r["kind"] == kind), None)
                                 for kind in kinds}) for k in ratios]
        out = common.maybe_plot(args.plot, pivot, "keep", kinds, title=f"seed layer: speedup {key} per kind",
                                ylabel=f"speedup ({key})")
        print(f"wrote {out}" if out else "matplotlib not installed: no plot")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
