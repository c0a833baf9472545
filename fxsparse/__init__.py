"""fxsparse: a torch.compile backend that makes channel-pruned conv nets run faster.

    torch.compile(model, backend="fxsparse")   # found through the torch_dynamo_backends entry point
    fxsparse.compact(model, x)                 # the same compaction as a standalone, smaller module

Stages, one package each, data flowing one way:
    graph/       capture: what each node of the dynamo graph means (where a conv is matched)
    sparsity/    which channels of each conv's weight are zero (where masks are read)
    compaction/  which channels each tensor keeps, constants carried across layers
    lowering/    the compacted graph: fused conv chains, relayouts
    ops/, kernels/  torch.ops.fxsparse.conv2d and its Triton kernel
    runtime/     the stale-weight guard
    report/      report.json, graph dumps, tables, log lines
"""
from . import ops  # registers torch.ops.fxsparse.*
from . import nn  # TritonConv2d, masks, seed helpers
from . import report
from .backend import fxsparse_backend
from .compact import compact
from .nn.sparsify import sparsify
from .report.explain import explain
from .runtime import refresh

__version__ = "0.1.0"


def _register_backend() -> None:
    # The entry point makes the name resolve without an import; registering here as well
    # covers a source checkout on PYTHONPATH, where no entry point is installed.
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "fxsparse" not in _BACKENDS:
        register_backend(fxsparse_backend, name="fxsparse")


_register_backend()
