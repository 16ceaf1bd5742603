"""timm-registered architectures; importing this package registers them."""
from typing import List

import timm

from . import ccnn, ckcnn, convnext_dcls, fastvit_dcls, flexnet, metaformer_dcls, resnet_dcls
from .convnext_dcls import ConvNeXtDcls, ConvNeXtDenseDw, iso_param_kernel_count
from .resnet_dcls import DclsBottleneck, ResNetDcls
from .fastvit_dcls import DclsRepConditionalPosEnc, FastVitDcls
from .metaformer_dcls import MetaFormerDcls
from .flexnet import FlexNet, FlexNetBlock
from .ccnn import CCNN, CCNNBlock
from .ckcnn import CKCNN, CKBlock


def plugin_families() -> List[str]:
    """timm module names of this package's model families (one file of ``dcls_timm/models`` each)."""
    modules = (convnext_dcls, resnet_dcls, fastvit_dcls, metaformer_dcls, flexnet, ccnn, ckcnn)
    return [m.__name__.rsplit('.', 1)[-1] for m in modules]


def plugin_models() -> List[str]:
    """Names of the models this package registers with timm."""
    return timm.list_models(module=plugin_families())
