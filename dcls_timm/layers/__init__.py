"""Plain ``torch.nn`` building blocks: DCLS convolutions, their kernel construction, continuous-kernel convs."""
from .dcls import (
    Dcls1d, Dcls2d, Dcls3d, DclsPositions, clamp_positions_, dcls_layers, position_owners, position_parameters,
    share_positions,
)
from .dropout import cpu_dropout  # not its dropout(): that name stays the submodule, dcls_timm.layers.dropout
from .kernel import DCLS_VERSIONS, construct_kernel, interpolation_profiles
from .flexconv import (
    CKConv, FlexConv, SeparableFlexConv, affine_input_conv, anti_aliasing_loss, causal_conv1d, continuous_convs,
    fft_conv, set_kernel_resolution,
)
from .magnet import MAGNet, coordinate_grid
from .pointwise import PointwiseConv1d, pointwise_conv
from .siren import SirenCKConv, SirenKernel, WeightNormConv1x1, kernel_net_convs
