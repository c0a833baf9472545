"""Stage 5: the ops the lowered graph calls (`torch.ops.fxsparse.*`)."""
from fxsparse.kernels.problem import ConvArgs, output_size

from .activations import ACTIVATION_CODES, ACTIVATIONS, apply_activation
from .conv2d import check_conv2d_args, conv2d, triton_interpreter_on, triton_on_cpu
from .reference import conv2d_reference

__all__ = ["ACTIVATIONS", "ACTIVATION_CODES", "ConvArgs", "apply_activation", "check_conv2d_args", "conv2d",
           "conv2d_reference", "output_size", "triton_interpreter_on", "triton_on_cpu"]
