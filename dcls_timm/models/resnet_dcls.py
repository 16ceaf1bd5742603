"""ResNet with DCLS 3x3 convolutions in its Bottleneck blocks (ResNet-50-dcls).

Paper: `Dilated convolution with learnable spacings` - https://arxiv.org/abs/2112.03740

The 3x3 ``conv2`` of every Bottleneck becomes a DCLS conv (7x7 grid, 5 elements by default, no bias: BN follows).
Its default interpolation is ``v0`` (bilinear), the construction the published ResNet-50-dcls weights were trained
with; ``dcls_version='v1'`` or ``'gauss'`` builds the others. Positions are shared by the blocks of a stage and live
in the stage's first block (``layerN.0.positions``), so timm's feature wrappers, which run the stages as whole
modules, keep them.
"""
from typing import Any, Dict, Optional

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet

from dcls_timm.checkpoint import share_block_positions
from dcls_timm.layers import Dcls2d, share_positions
from ._pretrained import build_dcls_model, dcls_cfg

__all__ = ['DclsBottleneck', 'ResNetDcls']


class DclsBottleneck(Bottleneck):
    """timm's Bottleneck whose 3x3 conv is a DCLS conv."""

    def __init__(
            self,
            *args,
            dcls_kernel_size: int = 7,
            dcls_kernel_count: int = 5,
            dcls_version: str = 'v0',
            **kwargs,
    ):
        """
        Args:
            dcls_kernel_size: Dense grid size D of the DCLS conv.
            dcls_kernel_count: Elements K per filter.
            dcls_version: ``'v0'`` (bilinear, the default: the published weights), ``'v1'`` or ``'gauss'``.
            *args, **kwargs: timm ``Bottleneck`` arguments.
        """
        if dcls_kernel_size % 2 == 0:
            raise ValueError(f'ResNet-dcls needs an odd dcls_kernel_size, got {dcls_kernel_size}: its 3x3 convs are '
                             'replaced with D // 2 padding on each side, which keeps their output size for odd D only.')
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
            dcls_version: str = 'v0',
            dcls_shared_positions: bool = True,
            block_args: Optional[Dict[str, Any]] = None,
            **kwargs,
    ):
        """
        Args:
            dcls_kernel_size: Dense grid size D of the DCLS convs.
            dcls_kernel_count: Elements K per filter.
            dcls_version: ``'v0'`` (bilinear, the default: the published weights), ``'v1'`` or ``'gauss'``.
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
    # a file with different positions per block (the published ResNet-50-dcls may hold them, SPEC 1.6) builds the
    # model with dcls_shared_positions=False under pretrained=True
    return build_dcls_model(ResNetDcls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                            block_positions=(_BLOCK_POSITIONS,), **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return dcls_cfg(url=url, **{
        'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.95, 'interpolation': 'bicubic',
        'first_conv': 'conv1', 'classifier': 'fc',
        **kwargs
    })


_A3 = dict(input_size=(3, 160, 160), pool_size=(5, 5), test_input_size=(3, 224, 224))  # train 160 px, test 224 px

default_cfgs = generate_default_cfgs({
    # trained at 160 px, tested at 224 px, crop 0.95 (ResNet Strikes Back A3)
    'resnet26_dcls': _cfg(**_A3),
    # the DCLS authors' weights (SPEC 6): timm ResNet layout under "state_dict_ema" of a timm CheckpointSaver file
    # (with args, optimizer...), conv2 P per block (v0, P[0] on rows); no top-1 published in text
    'resnet50_dcls.dcls_in1k': _cfg(
        url='https://zenodo.org/records/8373830/files/resnet_dcls_kernel_5_model_best.pth.tar',
        weights_key='state_dict_ema',
        model_args=dict(dcls_kernel_size=7, dcls_kernel_count=5, dcls_version='v0'), **_A3),
    'resnet101_dcls': _cfg(**_A3),
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
