"""timm-registered architectures; importing this package registers them."""
from typing import List

import timm

from . import ccnn, convnext_dcls, flexnet, resnet_dcls
from .convnext_dcls import ConvNeXtDcls, ConvNeXtDenseDw, iso_param_kernel_count
from .resnet_dcls import DclsBottleneck, ResNetDcls
from .flexnet import FlexNet, FlexNetBlock
from .ccnn import CCNN, CCNNBlock


def plugin_models() -> List[str]:
    """Names of the models this package registers with timm."""
    families = [m.__name__.rsplit('.', 1)[-1] for m in (convnext_dcls, resnet_dcls, flexnet, ccnn)]
    return timm.list_models(module=families)
