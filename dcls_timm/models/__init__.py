"""timm-registered architectures; importing this package registers them."""
from .convnext_dcls import ConvNeXtDcls, ConvNeXtDenseDw, iso_param_kernel_count
