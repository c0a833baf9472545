"""Channel selection that keeps a tensor's memory format (used by the kernels' launcher, the
lowering's graph code and its timing, so that all three build the same layout)."""
from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    # (a 1x1-spatial tensor is both layouts; either path is then the same copy)
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def select_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[:, index] in x's memory format. `index_select` on dim 1 returns a contiguous (NCHW)
    tensor whatever x is: a channels_last activation selected that way reaches the next conv,
    or our kernel's residual read, with a channel stride of H*W (uncoalesced; ResNet-50 with
    per-conv masks ran at 0.6x of Inductor on the H100 with it). On a channels_last x this
    selects along the innermost axis of the NHWC view, so the result is channels_last too."""
    if is_channels_last(x):
        return x.permute(0, 2, 3, 1).index_select(3, index).permute(0, 3, 1, 2)
    return x.index_select(1, index)
