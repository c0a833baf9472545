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
    # aten convs ("aten"), or "auto": on CUDA the faster of the two, timed at compile time
    # (lowering/choose.py), per conv chain for fp16/bf16 inference and per compacted conv, forward
    # and backward, for training convs in fp16/bf16 (autocast); aten otherwise
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


# --------------------------------------------------------------------------- process-wide kernel settings
# How conv launches are chosen and kept is a property of the process (the op tunes a shape on its first
# call, whichever compiled model or module calls it), not of one torch.compile call: these are set with
# `configure(...)`; an environment variable gives each one's default.

TUNE_MODES = ("cache", "always", "off")
# fxsparse's disk cache (tuned launches, the built guard's location) unless cache_dir says otherwise
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "fxsparse")


@dataclass(frozen=True)
class KernelSettings:
    # "cache": the disk cache (then the table shipped with fxsparse) first, timing on a miss; "always":
    # time every shape again; "off": no timing, a safe launch (quick test runs)      env FXSPARSE_TUNE
    tune: str = "cache"
    # time only this many of a shape's candidate launches, best ranked first (0: all)  env FXSPARSE_TUNE_TOP
    tune_top: int = 12
    # where tuned launches are kept (None: ~/.cache/fxsparse)                        env FXSPARSE_CACHE_DIR
    cache_dir: Optional[str] = None
    # read the table of tuned launches shipped with fxsparse beneath that cache       env FXSPARSE_SHIPPED_TABLE
    shipped_table: bool = True
    # compile a shape's candidates on this many threads before timing them (0: one by one, as
    # they are timed)                                                                env FXSPARSE_COMPILE_WORKERS
    compile_workers: int = 0
    # offer the warp-specialised (Gluon, sm90) box launches                          env FXSPARSE_CONV_WS
    conv_ws: bool = True
    # most warps of a tap-loop (non-1x1) launch: 4 or 8                               env FXSPARSE_CONV_MAX_WARPS
    conv_max_warps: int = 8
    # force this split-K factor on every conv (None: chosen with the tile)           env FXSPARSE_SPLIT_K
    split_k: Optional[int] = None
    # check weights with the compiled C++ guard (False: the Python check, as exact)  env FXSPARSE_NATIVE_GUARD
    native_guard: bool = True


_ENV = {"tune": "FXSPARSE_TUNE", "tune_top": "FXSPARSE_TUNE_TOP", "cache_dir": "FXSPARSE_CACHE_DIR",
        "shipped_table": "FXSPARSE_SHIPPED_TABLE", "compile_workers": "FXSPARSE_COMPILE_WORKERS",
        "conv_ws": "FXSPARSE_CONV_WS", "conv_max_warps": "FXSPARSE_CONV_MAX_WARPS", "split_k": "FXSPARSE_SPLIT_K",
        "native_guard": "FXSPARSE_NATIVE_GUARD"}
_configured: dict = {}


def _from_env(name: str, text: str):
    if name in ("conv_ws", "native_guard", "shipped_table"):
        return text != "0"
    if name in ("tune_top", "conv_max_warps", "compile_workers"):
        return int(text)
    if name == "split_k":
        return max(1, int(text)) if text else None
    if name == "cache_dir":
        return text or None
    return text


def _check_setting(name: str, value) -> None:
    bad = {"tune": value not in TUNE_MODES,
           "tune_top": isinstance(value, bool) or not isinstance(value, int) or value < 0,
           "compile_workers": isinstance(value, bool) or not isinstance(value, int) or value < 0,
           "cache_dir": value is not None and not isinstance(value, (str, os.PathLike)),
           "conv_ws": not isinstance(value, bool), "native_guard": not isinstance(value, bool),
           "shipped_table": not isinstance(value, bool),
           "conv_max_warps": value not in (4, 8),
           "split_k": value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1)}
    if bad[name]:
        allowed = {"tune": ", ".join(TUNE_MODES), "tune_top": "an int >= 0", "compile_workers": "an int >= 0",
                   "cache_dir": "a path or None",
                   "conv_ws": "True or False", "native_guard": "True or False", "shipped_table": "True or False",
                   "conv_max_warps": "4 or 8",
                   "split_k": "an int >= 1 or None"}[name]
        raise ValueError(f"fxsparse: setting {name}={value!r} (env {_ENV[name]}) must be {allowed}")


def kernel_settings() -> KernelSettings:
    """The settings in force: what `configure` set, else the environment, else the defaults."""
    values = {}
    for name, env in _ENV.items():
        if name in _configured:
            values[name] = _configured[name]
        elif os.environ.get(env) is not None:
            try:
                values[name] = _from_env(name, os.environ[env])
            except ValueError:
                raise ValueError(f"fxsparse: {env}={os.environ[env]!r} is not a valid {name}") from None
            _check_setting(name, values[name])
    return KernelSettings(**values)


def split_k_setting() -> Optional[int]:
    """settings.split_k alone: read on every conv call, where building the whole settings would
    cost microseconds of host time a call."""
    if "split_k" in _configured:
        return _configured["split_k"]
    text = os.environ.get(_ENV["split_k"])
    if not text:
        return None
    try:
        value = _from_env("split_k", text)
    except ValueError:
        raise ValueError(f"fxsparse: {_ENV['split_k']}={text!r} is not a valid split_k") from None
    _check_setting("split_k", value)
    return value


class configure:
    """Sets kernel settings for the process (`fxsparse.options.configure(tune="off")`), or for a block
    (`with configure(conv_ws=False): ...`, restored after). An unknown name or a bad value is an error."""

    def __init__(self, **settings):
        allowed = {f.name for f in fields(KernelSettings)}
        unknown = sorted(set(settings) - allowed)
        if unknown:
            raise ValueError(f"fxsparse: unknown setting(s) {unknown}; allowed: {sorted(allowed)}")
        for name, value in settings.items():
            _check_setting(name, value)
        self._previous = dict(_configured)
        _configured.update(settings)

    def __enter__(self) -> KernelSettings:
        return kernel_settings()

    def __exit__(self, *exc) -> None:
        _configured.clear()
        _configured.update(self._previous)
