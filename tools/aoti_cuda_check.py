"""Does this install's AOTInductor load a CUDA package at all? (No fxsparse involved.)

    python tools/aoti_cuda_check.py

Exports an `nn.Linear(16, 16)` + ReLU, packages it with `aoti_compile_and_package`, then loads and
runs it, each case in a fresh process so that a crash is reported instead of ending the check.
A crash of this case means the torch build's AOTInductor runtime fails on CUDA, whatever the
model holds. Each device is tried with Inductor's defaults, then with the kernels' binaries
embedded in the package's library (`aot_inductor.embed_kernel_binary`: no cubin files loaded at
run time).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile

CONFIGS = ({}, {"aot_inductor.embed_kernel_binary": True})

CASE = r'''
import json, sys, torch
device, configs = sys.argv[1], json.loads(sys.argv[3])
m = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()).to(device)
x = torch.randn(4, 16, device=device)
path = torch._inductor.aoti_compile_and_package(torch.export.export(m, (x,)), package_path=sys.argv[2],
                                                inductor_configs=configs)
print("packaged", flush=True)
f = torch._inductor.aoti_load_package(path)
print("loaded", flush=True)
print("max error", float((f(x) - m(x)).abs().max()), flush=True)
'''


def run(device: str, configs: dict, timeout: int = 300) -> str:
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CASE, device, f"{d}/linear.pt2",
                               json.dumps(configs)], capture_output=True, text=True, timeout=timeout)
    steps = " / ".join(proc.stdout.split("\n")).strip(" /")
    status = "ok" if proc.returncode == 0 else "crashed" if proc.returncode < 0 else "failed"
    return f"{device} {configs or 'defaults'}: exit {proc.returncode} ({status}) | {steps}"


if __name__ == "__main__":
    import torch

    print(f"torch {torch.__version__}")
    for device in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
        for configs in CONFIGS:
            print(run(device, configs), flush=True)
