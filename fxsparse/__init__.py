"""fxsparse: a torch.compile backend that makes channel-pruned conv nets run faster."""
from . import ops  # registers torch.ops.fxsparse.*
from . import nn  # TritonConv2d, masks, seed helpers
from .nn.sparsify import sparsify

__version__ = "0.1.0"
