"""`fxsparse.explain(model, *inputs)`: what the backend would do to a model, without compiling it.

Dynamo traces the model with a backend that runs fxsparse's rewrite stages (capture,
sparsity, propagation, lowering) on each graph and then runs the graph as captured, so
nothing is handed to Inductor. The reports of all graphs come back as one `Report`
(printed as a table).
"""
from __future__ import annotations

from typing import Optional

import torch

from .report import Report

def explain(model, *example_inputs, options: Optional[dict] = None, no_grad: bool = True) -> Report:
    # imported here: fxsparse.backend imports this package
    from fxsparse.backend import rewrite
    from fxsparse.options import Options

    opts = Options.parse(options)
    report = Report()

    def backend(gm, inputs):
        report.graphs.append(rewrite(gm, inputs, opts, len(report.graphs)).report)
        return gm.forward  # run the graph unchanged: explaining never changes results

    compiled = torch.compile(model, backend=backend)
    with torch.no_grad() if no_grad else torch.enable_grad():
        compiled(*example_inputs)
    print(report)
    return report
