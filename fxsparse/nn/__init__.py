"""Modules and helpers for channel-sparse convs (the seed notebook's API, on fxsparse's op).

    TritonConv2d          drop-in nn.Conv2d running torch.ops.fxsparse.conv2d on its kept channels
    keep_count            the keep-count rule: floor(keep_ratio * C + 0.5) clamped to [1, C]
    channel_mask, block_mask, input_channel_mask, apply_mask   L1-norm prune masks
    compare_modules, benchmark_module, finetune                 the seed's helpers
    sparsify              L1 masks on every conv of a model (optionally coupled groups)
"""
from .conv import (TritonConv2d, apply_mask, copy_module, block_mask, channel_mask, input_channel_mask,
                   keep_count)
from .eval import benchmark_module, compare_modules, finetune, masked_weights_zero
from .sparsify import sparsify

__all__ = ["TritonConv2d", "apply_mask", "copy_module", "block_mask", "channel_mask", "input_channel_mask",
           "keep_count", "benchmark_module", "compare_modules", "finetune", "masked_weights_zero", "sparsify"]
