"""The demo: prune a ResNet, compile it with backend="fxsparse", show the report and a timing table.

    python -m fxsparse.demo            # GPU if there is one (fp16, channels_last), else CPU (fp32)
    python -m fxsparse.demo --keep 0.25 --batch 8

On the GPU the model is torchvision's ResNet-18 when torchvision imports, else
the small ResNet below; on the CPU it is the small ResNet at a small size.
"""
from __future__ import annotations

import argparse
import copy
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


def main(argv=None) -> None:
    import fxsparse
    from fxsparse.nn import benchmark_module

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of channels kept")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    model, label, shape = build_model(device)
    batch = args.batch or (64 if device == "cuda" else 16)
    iters = args.iters or (100 if device == "cuda" else 20)
    randomize_batchnorm(model)
    model.eval()
    example = torch.randn(batch, *shape)
    fxsparse.sparsify(model, args.keep, kind="channel", example_inputs=(example,))
    model = model.to(device, dtype).to(memory_format=torch.channels_last)
    x = torch.randn(batch, *shape, device=device, dtype=dtype).to(memory_format=torch.channels_last)

    print(f"fxsparse demo: {label}, channels kept {args.keep}, batch {batch}, {device}, {dtype}")
    rows = []
    with torch.no_grad():
        ref = model(x)
        variants = [("eager", model), ("inductor", torch.compile(copy.deepcopy(model))),
                    ("fxsparse", torch.compile(model, backend="fxsparse"))]
        for name, fn in variants:
            t0 = time.perf_counter()
            out = fn(x)
            compile_s = time.perf_counter() - t0
            # the plain call, as users call it (host overhead and guards included)
            ms = benchmark_module(fn, x, iters=iters, warmup=3, cuda_graph=False)
            err = (out.float() - ref.float()).abs().max().item()
            rows.append([name, f"{ms:.3f}", f"{compile_s:.1f}", f"{err:.2e}"])
    base = float(rows[1][1])
    for r in rows:
        r.append(f"{base / float(r[1]):.2f}x")
    print(fxsparse.report.current_report(None))
    if device == "cuda":
        print("\nconv launches chosen by the tuner:")
        print(fxsparse.report.format_chosen_launches())
    print()
    print(tabulate(rows, headers=["model", "ms / call (median)", "first call s", "max |err| vs eager",
                                  "speed vs inductor"]))


if __name__ == "__main__":
    main()
