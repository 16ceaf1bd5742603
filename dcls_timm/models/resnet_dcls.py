"""ResNet with DCLS 3x3 convolutions in its Bottleneck blocks (ResNet-50-dcls).

Paper: `Dilated convolution with learnable spacings` - https://arxiv.org/abs/2112.03740

The 3x3 ``conv2`` of every Bottleneck becomes a DCLS conv (7x7 grid, 5 elements by default, no bias: BN follows);
positions are shared by the blocks of a stage and live in the stage's first block (``layerN.0.positions``), so
timm's feature wrappers, which run the stages as whole modules, keep them.
"""
from typing import Any, Dict, Optional

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet

from dcls_timm.checkpoint import share_block_positions
from dcls_timm.layers import Dcls2d, share_positions

__all__ = ['DclsBottleneck', 'ResNetDcls']


class DclsBottleneck(Bottleneck):
    """timm's Bottleneck whose 3x3 conv is a DCLS conv."""

    def __init__(
            self,
            *args,
            dcls_kernel_size: int = 7,
            dcls_kernel_count: int = 5,
            dcls_version: str = 'v1',
            **kwargs,
    ):
        """
        Args:
            dcls_kernel_size: Dense grid size D of the DCLS conv.
            dcls_kernel_count: Elements K per filter.
            dcls_version: ``'v0'``, ``'v1'`` or ``'gauss'``.
            *args, **kwargs: timm ``Bottleneck`` arguments.
        """
        super().__init__(*args, **kwargs)
        dense = self.conv2
        if dense.dilation != (1, 1):
            raise ValueError('DCLS Bottlenecks do not support dilation (output_stride < 32).')
        self.conv2 = Dcls2d(
            dense.in_channels, dense.out_channels, kernel_count=dcls_kernel_count, stride=dense.stride,
            padding=dcls_kernel_size // 2, dilated_kernel_size=dcls_kernel_size, groups=dense.groups, bias=False,
            version=dcls_version, device=dense.weight.device, dtype=dense.weight.dtype)


class ResNetDcls(ResNet):
    """timm ResNet built from :class:`DclsBottleneck`, with positions shared per stage."""

    def __init__(
            self,
            dcls_kernel_size: int = 7,
            dcls_kernel_count: int = 5,
            dcls_version: str = 'v1',
            dcls_shared_positions: bool = True,
            block_args: Optional[Dict[str, Any]] = None,
            **kwargs,
    ):
        """
        Args:
            dcls_kernel_size: Dense grid size D of the DCLS convs.
            dcls_kernel_count: Elements K per filter.
            dcls_version: ``'v0'``, ``'v1'`` or ``'gauss'``.
            dcls_shared_positions: Share positions (and SIG) across the blocks of each stage.
            block_args: Extra Bottleneck arguments.
            **kwargs: timm ``ResNet`` arguments (``block`` is always :class:`DclsBottleneck`).
        """
        if kwargs.get('output_stride', 32) != 32:
            raise ValueError('ResNet-dcls models support output_stride=32 only.')
        kwargs['block'] = DclsBottleneck
        block_args = dict(block_args or {}, dcls_kernel_size=dcls_kernel_size, dcls_kernel_count=dcls_kernel_count,
                          dcls_version=dcls_version)
        super().__init__(block_args=block_args, **kwargs)
        self.dcls_kernel_size = dcls_kernel_size
        self.dcls_kernel_count = dcls_kernel_count
        self.dcls_version = dcls_version
        self.dcls_shared_positions = dcls_shared_positions
        if dcls_shared_positions:
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                stage[0].positions = share_positions([block.conv2 for block in stage])


_BLOCK_POSITIONS = r'^layer(?P<stage>\d+)\.(?P<block>\d+)\.conv2\.(?P<name>P|SIG)$'


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: ResNetDcls) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to ``model``: positions per block (``layerN.b.conv2.P``, the upstream ResNet-50-dcls
    layout) or per stage (``layerN.0.positions.P``).

    For a model that shares positions, per-block positions are checked to agree and loaded once per stage (blocks
    that disagree raise ``CheckpointMismatchError``: build the model with ``dcls_shared_positions=False``); a model
    without sharing takes per-block positions as they are and per-stage ones copied into every block. The upstream
    file is ``v0`` with ``P[0]`` on rows, this project's convention: nothing is flipped.
    """
    return share_block_positions(state_dict, model, _BLOCK_POSITIONS, 'layer{stage}.0.positions.{name}',
                                 'layer{stage}')


def _create_resnet_dcls(variant: str, pretrained: bool = False, **kwargs) -> ResNetDcls:
    return build_model_with_cfg(ResNetDcls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.95, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'paper_ids': 'arXiv:2112.03740', 'paper_name': 'Dilated convolution with learnable spacings',
        **kwargs
    }


default_cfgs = generate_default_cfgs({
    # trained at 160 px, tested at 224 px (ResNet Strikes Back A3)
    'resnet26_dcls': _cfg(input_size=(3, 160, 160), pool_size=(5, 5), test_input_size=(3, 224, 224)),
    'resnet50_dcls': _cfg(input_size=(3, 160, 160), pool_size=(5, 5), test_input_size=(3, 224, 224)),
    'resnet101_dcls': _cfg(input_size=(3, 160, 160), pool_size=(5, 5), test_input_size=(3, 224, 224)),
})


@register_model
def resnet26_dcls(pretrained: bool = False, **kwargs) -> ResNetDcls:
    """ResNet-26 with DCLS 3x3 convs (7x7 grid, K=5)."""
    return _create_resnet_dcls('resnet26_dcls', pretrained, **dict(dict(layers=(2, 2, 2, 2)), **kwargs))


@register_model
def resnet50_dcls(pretrained: bool = False, **kwargs) -> ResNetDcls:
    """ResNet-50-dcls: Bottleneck 3x3 convs as DCLS (7x7 grid, K=5, positions per stage); 24,008,744 params."""
    return _create_resnet_dcls('resnet50_dcls', pretrained, **dict(dict(layers=(3, 4, 6, 3)), **kwargs))


@register_model
def resnet101_dcls(pretrained: bool = False, **kwargs) -> ResNetDcls:
    """ResNet-101 with DCLS 3x3 convs (7x7 grid, K=5)."""
    return _create_resnet_dcls('resnet101_dcls', pretrained, **dict(dict(layers=(3, 4, 23, 3)), **kwargs))
