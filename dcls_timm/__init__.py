"""dcls_timm: learnable-spacing (DCLS) convolutions and the models built on them, as a timm plugin.

Importing the package registers its models with timm: ``timm.create_model('convnext_tiny_dcls')``.
:func:`convert_to_dcls` turns the convolutions of any model into DCLS layers.
"""
from . import layers, models
from .convert import ConversionError, DclsConversion, convert_to_dcls
from .layers import Dcls1d, Dcls2d, Dcls3d, clamp_positions_, share_positions

__version__ = '0.1.0'
