"""The demo: prune a ResNet, compile it with backend="fxsparse", show the report and a timing table.

    python -m fxsparse.demo            # GPU if there is one (fp16, channels_last), else CPU (fp32)
    python -m fxsparse.demo --keep 0.25 --batch 8

On the GPU the model is torchvision's ResNet-18 when torchvision imports, else
the small ResNet below; on the CPU it is the small ResNet at a small size.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn
from tabulate import tabulate


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: `out += identity` in place, ReLU(inplace=True)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.layers = nn.Sequential(
            BasicBlock(width, width), BasicBlock(width, 2 * width, 2),
            BasicBlock(2 * width, 2 * width), BasicBlock(2 * width, 4 * width, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Trained-looking BatchNorm statistics, so pruned channels carry non-zero constants."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(c, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.rand(c, generator=g) * 0.2 - 0.1)


def build_model(device: str):
    if device == "cuda":
        try:
            import torchvision

            return torchvision.models.resnet18(), "torchvision resnet18", (3, 224, 224)
        except Exception:  # torchvision missing or not matching this torch
            pass
        return SmallResNet(64), "small resnet (width 64)", (3, 128, 128)
    return SmallResNet(32), "small resnet (width 32)", (3, 32, 32)


REPORT_LEGEND = """\
channels: in->out of the conv as written; kept: in->out after compaction. lowering: triton (the fused
Triton op, CUDA fp16/bf16), aten (a compacted aten conv) or unchanged. fused: what runs inside the conv.
MACs kept: this conv's multiply-adds after compaction. reason: why a conv was left unchanged (blank
when it was rewritten)."""


def time_in_rounds(variants, x, iters: int, min_rounds: int, max_rounds: int, tolerance: float = 0.03,
                   measure=None):
    """Per variant, ms per call in each round. Rounds interleave the variants, so a busy machine
    slows them alike; they go on until the median speed of the last variant against the second
    moves by less than `tolerance` from one round to the next (or `max_rounds`).
    `measure(fn, x, iters)` gives one round's ms per call; by default the plain call, as users
    call it (host overhead and guards included)."""
    if measure is None:
        from fxsparse.nn import benchmark_module

        def measure(fn, x, iters):
            return benchmark_module(fn, x, iters=iters, warmup=2, cuda_graph=False)

    times = {name: [] for name, _ in variants}
    last, first = variants[-1][0], variants[1][0]
    previous = None
    for r in range(max_rounds):
        for name, fn in variants:
            times[name].append(measure(fn, x, iters))
        speed = statistics.median(a / b for a, b in zip(times[first], times[last]))
        if r + 1 >= min_rounds and previous is not None and abs(speed / previous - 1) < tolerance:
            break
        previous = speed
    return times


def spread(values) -> str:
    """median [min-max]"""
    return f"{statistics.median(values):.3g} [{min(values):.3g}-{max(values):.3g}]"


def main(argv=None) -> None:
    import fxsparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of channels kept")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None, help="calls per timing round")
    parser.add_argument("--rounds", type=int, default=15, help="at most this many timing rounds (at least 5)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    model, label, shape = build_model(device)
    batch = args.batch or (64 if device == "cuda" else 16)
    iters = args.iters or (100 if device == "cuda" else 10)
    randomize_batchnorm(model)
    model.eval()
    example = torch.randn(batch, *shape)
    fxsparse.sparsify(model, args.keep, kind="channel", example_inputs=(example,))
    model = model.to(device, dtype).to(memory_format=torch.channels_last)
    x = torch.randn(batch, *shape, device=device, dtype=dtype).to(memory_format=torch.channels_last)

    print(f"fxsparse demo: {label}, channels kept {args.keep}, batch {batch}, {device}, {dtype}")
    with torch.no_grad():
        ref = model(x)
        variants = [("eager", model), ("inductor", torch.compile(copy.deepcopy(model))),
                    ("fxsparse", torch.compile(model, backend="fxsparse"))]
        first_call, err = {}, {}
        for name, fn in variants:
            t0 = time.perf_counter()
            out = fn(x)  # a compiled model compiles on its first call
            first_call[name] = time.perf_counter() - t0
            err[name] = (out.float() - ref.float()).abs().max().item()
        times = time_in_rounds(variants, x, iters, min_rounds=5, max_rounds=max(5, args.rounds))
    print(fxsparse.report.current_report(None))
    print(REPORT_LEGEND)
    if device == "cuda":
        print("\nconv launches chosen by the tuner:")
        print(fxsparse.report.format_chosen_launches())
    rounds = len(times["eager"])
    rows = []
    for name, _ in variants:
        speeds = [spread([b / t for b, t in zip(times[base], times[name])]) + "x" if base != name else "-"
                  for base in ("eager", "inductor")]
        rows.append([name, spread(times[name]), f"{first_call[name]:.2f}", f"{err[name]:.2e}", *speeds])
    print()
    print(tabulate(rows, headers=["model", "ms / call", "first call s", "max |err| vs eager",
                                  "speed vs eager", "speed vs inductor"]))
    print(f"\nms / call and speeds: median [min-max] over {rounds} interleaved rounds of {iters} calls each\n"
          "(a round's figure is the median of its calls; speeds are taken per round). first call s: the\n"
          "first call, which for inductor and fxsparse includes compiling the model. max |err|: against\n"
          "the eager masked model on the same input.")


if __name__ == "__main__":
    main()
