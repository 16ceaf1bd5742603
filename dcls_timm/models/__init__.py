"""timm-registered architectures; importing this package registers them."""
from .convnext_dcls import ConvNeXtDcls, ConvNeXtDenseDw, iso_param_kernel_count
from .resnet_dcls import DclsBottleneck, ResNetDcls
from .flexnet import FlexNet, FlexNetBlock
from .ccnn import CCNN, CCNNBlock
