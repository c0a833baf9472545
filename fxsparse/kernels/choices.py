"""Every implementation of a conv as a peer choice, as Inductor's conv lowering lists its extern aten
conv beside its template configs: each says whether it can run a problem (`eligible`), which
launch configs are worth timing for it (`configs`), and runs one (`run`). `select.py` times the
offered ones and keeps the fastest.

    pointer   the pointer kernel (pointer.py): any GPU, the interpreter, channel scatters, split-K
    tma_gemm  1x1 convs as a TMA GEMM (tma.py)
    tma_box   other convs as TMA box loads of one image (tma.py), split-K where tiles are few
    ws_box    the same boxes warp-specialised in Gluon, spanning images (box_ws.py, sm90)
    aten      cuDNN on the compacted tensors, the epilogue in aten ops (the lowering's other path)

Offered tiles were pruned on the tuner's logs (docs/benchmarks.md): persistent pointer launches
and non-warp-specialised boxes spanning images never won once the warp-specialised launch existed.
`estimate` ranks a problem's candidates (waves of tiles over the SMs, each launch kind's measured
efficiency) so that the selector times only the best few.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from fxsparse.kernels import pointer, tma
from fxsparse.kernels.activations import ACTIVATIONS
from fxsparse.kernels.layout import relayout, select_channels
from fxsparse.kernels.problem import ConvCall, ConvProblem

Tensor = torch.Tensor

# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_K = min(64, Cin rounded up to a power of 2).
# 128x128 with 8 warps and 3 stages wins the dense 3x3s at 56x56/28x28 (8 warps halve the fp32
# accumulator per thread, so 3 stages of 64-deep K tiles fit); narrow tiles serve compacted layers.
POINTER_TILES = [
    (128, 256, 8, 3), (256, 128, 8, 3), (128, 128, 8, 3), (128, 128, 4, 3), (64, 128, 4, 4), (128, 64, 8, 3),
    (128, 64, 4, 4), (64, 64, 4, 4), (128, 32, 8, 3), (128, 32, 4, 4), (64, 32, 4, 4), (128, 16, 4, 4),
    (64, 16, 4, 4),
]
# A 1x1 conv with one or two K steps has nothing to pipeline: fewer stages, more programs per SM.
POINTER_SHORT_K_TILES = [(128, 256, 8, 2), (128, 128, 4, 2), (128, 64, 4, 2)]
POINTER_ONE_K_TILES = [(256, 128, 8, 1), (128, 256, 8, 1), (128, 128, 4, 1), (128, 64, 4, 1)]
TMA_GEMM_TILES = [
    (256, 128, 8, 3), (128, 256, 8, 3), (128, 128, 8, 3), (128, 128, 4, 3), (128, 64, 4, 3), (64, 64, 4, 3),
    (128, 32, 4, 3), (64, 32, 4, 3), (128, 16, 4, 3),
]
# (256x128 boxes and 5-8 stage pipelines were measured and lost: docs/benchmarks.md.)
TMA_BOX_TILES = [
    (128, 256, 8, 3), (128, 128, 8, 3), (128, 128, 4, 3), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4),
    (128, 32, 4, 4), (64, 32, 4, 4), (64, 16, 4, 4),
]
# One program per SM of deep operand stages, or two of shallow ones with registers capped at 128 a
# thread (maxnreg), whose epilogues overlap each other's K loops.
WS_BOX_TILES = [
    (128, 256, 8, 3, None), (128, 128, 8, 4, None), (128, 128, 4, 4, None), (128, 128, 4, 2, 128),
    (128, 64, 4, 6, None), (128, 64, 4, 3, 128), (64, 128, 4, 6, None), (64, 64, 4, 8, None),
    (128, 32, 4, 8, None), (128, 16, 4, 8, None),
]
SAFE_TILE = (64, 64, 4, 3)  # the pointer tile a launch that fails its output check falls back to


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_k(cin: int) -> int:
    return min(64, max(16, triton.next_power_of_2(max(int(cin), 1))))


def tile_config(bm: int, bn: int, bk: int, warps: int, stages: int, maxnreg: Optional[int] = None) -> dict:
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    if maxnreg:
        cfg["maxnreg"] = maxnreg
    return cfg


def _widths(problem: ConvProblem) -> set:
    """BLOCK_N: the power of two covering the kept channels (capped at 256) and half of it."""
    cap = min(256, max(16, triton.next_power_of_2(problem.out_channels)))
    return {cap, max(16, cap // 2)}


def _fits(problem: ConvProblem, bm: int, bn: int) -> bool:
    return bn in _widths(problem) and bm <= max(64, triton.next_power_of_2(problem.m))


def split_factors(problem: ConvProblem, tiles: int) -> list:
    """Split-K only where the tiles leave SMs idle (small-batch, long-K layers): up to 4x the SMs in
    programs, >= 4 K steps a slice. Each factor costs a compile."""
    if problem.split_k is not None:
        return [problem.split_k]
    k_iters = problem.taps * _cdiv(problem.in_channels, block_k(problem.in_channels))
    if tiles >= problem.sms:
        return [1]
    sms = problem.sms
    return [1] + [s for s in (2, 4, 8) if k_iters // s >= 4 and sms // 2 <= tiles * s <= 4 * sms]


class Choice:
    """One implementation of the conv. `name` is what the tuning cache and the report call it."""
    name = ""
    splits = False  # whether its configs split K

    def eligible(self, problem: ConvProblem, call: Optional[ConvCall] = None) -> bool:
        """Whether it is offered for `problem` (and `call`'s tensors, where addressing matters)."""
        raise NotImplementedError

    def addressable(self, call: ConvCall) -> bool:
        """Whether a launch chosen for this shape can run on `call`'s tensors (asked on every call
        of a chosen launch: tensor checks only)."""
        return True

    def configs(self, problem: ConvProblem) -> list:
        """[(config, split_k)] worth timing for `problem`."""
        raise NotImplementedError

    def run(self, call: ConvCall, config: dict, split_k: int = 1) -> None:
        """Writes the conv's kept channels into call.out."""
        raise NotImplementedError

    # Relative efficiency by launch kind, fitted on the tuner's logs (kernel_tune runs of the layer
    # table: with `settings.tune_top` = 12 the best-ranked candidates held every logged winner);
    # the ranking only needs it to order kinds and tiles, not to predict times.
    efficiency = 0.5

    def estimate(self, problem: ConvProblem, config: dict, split_k: int) -> float:
        """A relative time: waves of tiles over the SMs times a tile's K loop, over the kind's
        efficiency, smaller tiles a little less efficient."""
        bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
        tiles = _cdiv(problem.m, bm) * _cdiv(problem.out_channels, bn)
        slots = problem.sms * self.per_sm(config)
        k_steps = _cdiv(problem.taps * _cdiv(problem.in_channels, bk), split_k)
        # under one wave, by its fraction (fitted: counting a whole tile's time there ranked worse)
        waves = _cdiv(tiles * split_k, slots) if tiles * split_k > slots else tiles * split_k / slots
        size = (bm * bn / (128.0 * 128.0)) ** 0.2
        warps = 1.0 if config["num_warps"] == 8 or bm * bn <= 128 * 64 else 0.9
        split = 1.0 if split_k == 1 else 1.15
        return waves * bm * bn * k_steps * bk * split / (self.efficiency * size * warps)

    def per_sm(self, config: dict) -> int:
        """Tiles an SM works on at once: one (deep pipelines fill its shared memory), two where
        registers are capped (box_ws.programs). Counting programs by shared memory ranked worse."""
        return 2 if config.get("maxnreg") else 1

    def describe(self, config: dict, split_k: int = 1) -> str:
        return (f"{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']} w{config['num_warps']} "
                f"s{config['num_stages']} {self.name}" + (f" r{config['maxnreg']}" if config.get("maxnreg") else "")
                + (f" k/{split_k}" if split_k > 1 else ""))

    def __repr__(self):
        return f"<choice {self.name}>"


class Pointer(Choice):
    name = "pointer"
    splits = True
    efficiency = 0.5

    def eligible(self, problem, call=None) -> bool:
        return True

    def configs(self, problem: ConvProblem) -> list:
        from fxsparse.options import kernel_settings

        bk = block_k(problem.in_channels)
        k_iters = problem.taps * _cdiv(problem.in_channels, bk)
        tiles = list(POINTER_TILES)
        if problem.pointwise and k_iters <= 2:
            tiles += POINTER_SHORT_K_TILES
        if problem.pointwise and k_iters == 1:
            tiles += POINTER_ONE_K_TILES
        # 8-warp tap loops miscompiled in Inductor's template (pytorch #173068): ours are checked
        # against a 4-warp launch (select.py); the setting keeps them out altogether.
        max_warps = 8 if problem.pointwise else kernel_settings().conv_max_warps
        out, seen = [], set()
        for bm, bn, warps, stages in tiles:
            if not _fits(problem, bm, bn) or warps > max_warps:
                continue
            n_tiles = _cdiv(problem.m, bm) * _cdiv(problem.out_channels, bn)
            if bm == 256 and n_tiles < 2 * problem.sms:
                continue
            for s in split_factors(problem, n_tiles):
                if (bm, bn, warps, stages, s) not in seen:
                    seen.add((bm, bn, warps, stages, s))
                    out.append((tile_config(bm, bn, bk, warps, stages), s))
        if not out:  # tiny problems: the smallest tile always fits
            out.append((tile_config(64, 16, bk, 4, 3), problem.split_k or 1))
        return out

    def run(self, call, config, split_k=1) -> None:
        pointer.launch(call, config, split_k)


class TmaGemm(Choice):
    name = "tma_gemm"
    efficiency = 0.8

    def eligible(self, problem, call=None) -> bool:
        return problem.pointwise and problem.split_k in (None, 1) and call is not None and self.addressable(call)

    def addressable(self, call) -> bool:
        return _tma_kind(call) == "gemm"

    def configs(self, problem) -> list:
        bk = block_k(problem.in_channels)
        return [(tile_config(bm, bn, bk, w, s), 1) for bm, bn, w, s in TMA_GEMM_TILES if _fits(problem, bm, bn)]

    def run(self, call, config, split_k=1) -> None:
        tma.launch_gemm(call, config)


class TmaBox(Choice):
    name = "tma_box"
    splits = True
    efficiency = 0.6

    def eligible(self, problem, call=None) -> bool:
        return call is not None and self.addressable(call)

    def addressable(self, call) -> bool:
        return _tma_kind(call) == "box"

    def configs(self, problem) -> list:
        bk = block_k(problem.in_channels)
        return [(tile_config(bm, bn, bk, w, st), s) for bm, bn, w, st in TMA_BOX_TILES if _fits(problem, bm, bn)
                for s in split_factors(problem, _cdiv(problem.m, bm) * _cdiv(problem.out_channels, bn))]

    def run(self, call, config, split_k=1) -> None:
        tma.launch_box(call, config, split_k)


class WsBox(Choice):
    name = "ws_box"
    efficiency = 0.9

    def eligible(self, problem, call=None) -> bool:
        from fxsparse.options import kernel_settings

        if call is None or problem.split_k not in (None, 1) or not kernel_settings().conv_ws:
            return False
        return self.addressable(call)

    def addressable(self, call) -> bool:
        return tma.warp_specialisable(_tma_kind(call), call.x, call.weight, call.out, call.residual, call.bias_map,
                                      call.stride, block_k(call.weight.shape[1]))

    def configs(self, problem) -> list:
        bk = block_k(problem.in_channels)
        return [(tile_config(bm, bn, bk, w, s, regs), 1) for bm, bn, w, s, regs in WS_BOX_TILES
                if _fits(problem, bm, bn)]

    def run(self, call, config, split_k=1) -> None:
        tma.launch_ws(call, config)


class Aten(Choice):
    """cuDNN on the compacted tensors, then the epilogue. Config {"epilogue": "aten"} computes the
    op's exact result in aten ops; {"epilogue": "fused"} stands in for the lowering's aten path,
    whose epilogue Inductor fuses into one elementwise kernel: one pass, for timing only."""
    name = "aten"

    def eligible(self, problem, call=None) -> bool:
        return call is None or call.x.is_cuda

    def configs(self, problem) -> list:
        return [({"epilogue": "aten"}, 1)]

    def describe(self, config: dict, split_k: int = 1) -> str:
        return f"aten ({config.get('epilogue', 'aten')} epilogue)"

    def run(self, call, config, split_k=1) -> None:
        y = self.compute(call, config.get("epilogue", "aten"))
        call.out.copy_(y)

    @staticmethod
    def compute(call: ConvCall, epilogue: str = "aten") -> Tensor:
        """The conv's result as the aten path computes it (`out` is not written)."""
        y = torch.conv2d(call.x, call.weight, call.bias, call.stride, call.padding, call.dilation, 1)
        if call.out_index is not None:
            fill = call.fill if call.fill is not None else y.new_zeros(call.out.shape[1])
            y = relayout(y, torch.arange(call.weight.shape[0], device=y.device), call.out_index, fill)
        if epilogue == "fused":  # one elementwise pass: what Inductor's fused epilogue costs
            if call.residual is not None:
                return torch.add(y, call.residual)
            if call.bias_map is not None:
                return torch.add(y, call.bias_map.to(y.dtype))
            if call.activation == "none" and call.out_index is None:
                return y
            return ACTIVATIONS[call.activation if call.activation != "none" else "relu"](y)
        if call.bias_map is None and call.residual is None and call.activation == "none":
            return y
        z = y.float()
        if call.bias_map is not None:
            z = z + call.bias_map.float()[None] if call.out_index is None else z.index_add(
                1, call.out_index.long(), call.bias_map.float()[None].expand(z.shape[0], -1, -1, -1))
        if call.residual is not None and not call.residual_after_activation:
            z = z + call.residual.float()
        z = ACTIVATIONS[call.activation](z)
        if call.residual is not None and call.residual_after_activation:
            z = z + call.residual.float()
        return z.to(y.dtype)


def _tma_kind(call: ConvCall) -> Optional[str]:
    # (a few us of host time: asked only while choosing, or where a TMA launch was chosen)
    return tma.eligible(call.x, call.weight, call.out, call.residual, call.out_index, call.bias_map,
                        call.pointwise, call.stride)


POINTER, TMA_GEMM, TMA_BOX, WS_BOX, ATEN = Pointer(), TmaGemm(), TmaBox(), WsBox(), Aten()
KERNELS = (POINTER, TMA_GEMM, TMA_BOX, WS_BOX)  # the fused op's implementations
BY_NAME = {c.name: c for c in KERNELS + (ATEN,)}


def candidates(problem: ConvProblem, call: Optional[ConvCall], choices=KERNELS) -> list:
    """[(choice, config, split_k)] of every eligible choice, ranked by `estimate` (best first)."""
    out = [(c, cfg, s) for c in choices if c.eligible(problem, call) for cfg, s in c.configs(problem)]
    return sorted(out, key=lambda t: t[0].estimate(problem, t[1], t[2]) if t[0] is not ATEN else math.inf)


def is_safe(choice: Choice, config: dict, problem: ConvProblem) -> bool:
    """The launch others are checked against: the pointer kernel, 4 warps (or any 1x1 conv's)."""
    return choice is POINTER and (config["num_warps"] <= 4 or problem.pointwise)


def safe_launch(problem: ConvProblem) -> tuple:
    """(choice, config, split_k) of the pointer kernel's safe tile: the untimed launch."""
    cands = [(POINTER, c, s) for c, s in POINTER.configs(problem) if is_safe(POINTER, c, problem)]
    if cands:
        return min(cands, key=lambda t: POINTER.estimate(problem, t[1], t[2]))
    return POINTER, tile_config(*SAFE_TILE[:2], block_k(problem.in_channels), *SAFE_TILE[2:]), problem.split_k or 1


def select_input(x: Tensor, in_index: Tensor, plan: tuple) -> Tensor:
    """x[:, in_index] for a launch: a view where the index is a contiguous run ("range", start),
    otherwise one gather copy into a compact buffer in x's memory format.

    Gathering in the kernel's K loop (an indirect channel offset per element) made every A-tile load
    a 2-byte scalar load: 4-8x slower on H100 than this memory-bound copy plus the dense conv."""
    kind, start = plan
    if kind == "range":
        return x.narrow(1, start, in_index.numel())
    return select_channels(x, in_index)


__all__ = ["ATEN", "BY_NAME", "Choice", "KERNELS", "POINTER", "TMA_BOX", "TMA_GEMM", "WS_BOX", "candidates",
           "is_safe", "safe_launch", "select_input", "tile_config"]
