"""The backend's options, validated: an unknown name or a bad value is an error that lists what is allowed."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Optional, Union

# torch.compile's modes; each maps to Inductor settings (torch._inductor.list_mode_options)
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CHOICES = {"lowering": ("auto", "triton", "aten"), "mode": MODES}


@dataclass(frozen=True)
class Options:
    # which conv implementation the rewritten graph calls: our Triton op ("triton"), compacted
    # aten convs ("aten"), or "auto": for fp16/bf16 inference on CUDA, per conv chain the faster
    # of the two, timed at compile time (lowering/choose.py); aten otherwise
    lowering: str = "auto"
    # carry removed channels across the graph (off: each conv compacts only itself)
    propagate: bool = True
    # stored activations keep a multiple of this many channels, and near-full ones (more than
    # 7/8 kept) all of them: aligned rows for the GPU's vector loads. None: 8 on CUDA, 1
    # (exact compaction) elsewhere
    align_channels: Optional[int] = None
    # hand the rewritten graph to Inductor (off: run it as an FX module, for debugging)
    inductor: bool = True
    # run the compiled graph under CUDA graphs: None = on for CUDA inference with static shapes
    cudagraphs: Optional[bool] = None
    # check before every call that no folded weight, mask or statistic changed (and recompact if
    # one did): True compares identity, version counter and storage; "content" also compares
    # their bytes with a copy (sees writes through `.data`, at the cost of reading every folded
    # tensor each call); False promises, as Inductor's `freezing` does, that they never change
    # after compiling, and saves the check (fxsparse.refresh still recompacts on request)
    guard_values: Union[bool, str] = True
    # where graph dumps and report.json go (also env FXSPARSE_DUMP_DIR)
    dump_dir: Optional[str] = None
    # torch.compile's `mode`, applied to the Inductor half; "reduce-overhead" and "max-autotune"
    # turn CUDA graphs on unless `cudagraphs` says otherwise
    mode: str = "default"

    def guard_check(self) -> str:
        """ValueGuard's `check` for this option: "version", "content" or "off"."""
        return {True: "version", False: "off", "content": "content"}[self.guard_values]

    def inductor_patches(self) -> dict:
        """Inductor config for the rest of the graph, from `mode` (without its cudagraphs key)."""
        from torch._inductor import list_mode_options

        patches = dict(list_mode_options(self.mode)) if self.mode != "default" else {}
        patches.pop("triton.cudagraphs", None)
        return patches

    def mode_wants_cudagraphs(self) -> Optional[bool]:
        from torch._inductor import list_mode_options

        return list_mode_options(self.mode).get("triton.cudagraphs") if self.mode != "default" else None

    @staticmethod
    def parse(options: Optional[dict], mode: Optional[str] = None) -> "Options":
        options = dict(options or {})
        if mode is not None:
            options["mode"] = mode
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
    elif name == "guard_values":
        if not (isinstance(value, bool) or isinstance(value, str) and value == "content"):
            raise ValueError(f"fxsparse: option guard_values must be True, False or \"content\", got {value!r}")
    elif name in ("propagate", "inductor"):
        if not isinstance(value, bool):
            raise ValueError(f"fxsparse: option {name} must be True or False, got {value!r}")
    elif name == "cudagraphs":
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"fxsparse: option cudagraphs must be True, False or None (auto), got {value!r}")
    elif name == "align_channels":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"fxsparse: option align_channels must be a positive int or None (auto), got {value!r}")
    elif name == "dump_dir":
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"fxsparse: option dump_dir must be a path, got {value!r}")
