"""Plain ``torch.nn`` building blocks: DCLS convolutions and their kernel construction."""
from .dcls import (
    Dcls1d, Dcls2d, Dcls3d, DclsPositions, clamp_positions_, dcls_layers, position_owners, position_parameters,
    share_positions,
)
from .kernel import DCLS_VERSIONS, construct_kernel, interpolation_profiles
