"""The backend's options, validated: an unknown name or a bad value is an error that lists what is allowed."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Optional

_CHOICES = {"lowering": ("auto", "triton", "aten")}


@dataclass(frozen=True)
class Options:
    # which conv implementation the rewritten graph calls: our Triton op ("triton"), compacted
    # aten convs ("aten"), or "auto": Triton for fp16/bf16 on CUDA, aten otherwise
    lowering: str = "auto"
    # carry removed channels across the graph (off: each conv compacts only itself)
    propagate: bool = True
    # hand the rewritten graph to Inductor (off: run it as an FX module, for debugging)
    inductor: bool = True
    # run the compiled graph under CUDA graphs: None = on for CUDA inference with static shapes
    cudagraphs: Optional[bool] = None
    # where graph dumps and report.json go (also env FXSPARSE_DUMP_DIR)
    dump_dir: Optional[str] = None

    @staticmethod
    def parse(options: Optional[dict]) -> "Options":
        options = dict(options or {})
        allowed = {f.name: f for f in fields(Options)}
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"fxsparse: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
        for name, value in options.items():
            _check(name, value)
        if options.get("dump_dir") is None and os.environ.get("FXSPARSE_DUMP_DIR"):
            options["dump_dir"] = os.environ["FXSPARSE_DUMP_DIR"]
        return Options(**options)


def _check(name: str, value) -> None:
    if name in _CHOICES:
        if value not in _CHOICES[name]:
            raise ValueError(f"fxsparse: option {name}={value!r} is not one of {list(_CHOICES[name])}")
    elif name in ("propagate", "inductor"):
        if not isinstance(value, bool):
            raise ValueError(f"fxsparse: option {name} must be True or False, got {value!r}")
    elif name == "cudagraphs":
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"fxsparse: option cudagraphs must be True, False or None (auto), got {value!r}")
    elif name == "dump_dir":
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"fxsparse: option dump_dir must be a path, got {value!r}")
