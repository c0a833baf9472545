"""fxsparse: a torch.compile backend that makes channel-pruned conv nets run faster."""
from . import ops  # registers torch.ops.fxsparse.*

__version__ = "0.1.0"
