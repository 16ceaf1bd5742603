"""CCNN: the continuous CNN of residual separable FlexConv blocks (2-D image version).

Paper: `Towards a General Purpose CNN for Long Range Dependencies in ND` - https://arxiv.org/abs/2206.03398

Stem ``SeparableFlexConv -> BN -> GELU``, then pre-norm blocks
``x + GELU(Conv1x1(Dropout(GELU(SeparableFlexConv(BN(x))))))``, a final BN, global pooling and a linear head.
The masks learn their widths only (centred), as the paper's parameter counts imply.
"""
from typing import Any, Dict

import torch
import torch.nn as nn
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from dcls_timm.layers import SeparableFlexConv

from ._classifier_net import StemBlocksClassifier

__all__ = ['CCNN', 'CCNNBlock']


class CCNNBlock(nn.Module):
    """Pre-norm residual block around a separable FlexConv and a pointwise linear layer."""

    def __init__(self, channels: int, kernel_size: int, hidden: int, dropout: float, mask_init: float, fft: str,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm = nn.BatchNorm2d(channels, **dd)
        self.conv = SeparableFlexConv(channels, channels, kernel_size, hidden=hidden, mask_init=mask_init,
                                      mask_learn_mean=False, fft=fft, **dd)
        self.act1 = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.linear = nn.Conv2d(channels, channels, 1, **dd)
        self.act2 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act2(self.linear(self.drop(self.act1(self.conv(self.norm(x))))))


class CCNN(StemBlocksClassifier):
    """CCNN-B,C: B blocks of width C at constant resolution."""

    def __init__(
            self,
            depth: int = 4,
            width: int = 140,
            num_classes: int = 10,
            in_chans: int = 3,
            kernel_size: int = 33,
            hidden: int = 32,
            dropout: float = 0.1,
            drop_rate: float = 0.,
            global_pool: str = 'avg',
            mask_init: float = 0.075,
            fft: str = 'auto',
            device=None,
            dtype=None,
    ):
        """
        Args:
            depth: Number of residual blocks B.
            width: Channels C.
            num_classes: Classifier outputs.
            in_chans: Input channels.
            kernel_size: FlexConv grid points per axis (33 for 32 px images).
            hidden: MAGNet width (32 for CCNN-4,140, 64 for CCNN-6,380).
            dropout: Dropout inside the blocks (a default, not a paper-verified value).
            drop_rate: Dropout before the classifier.
            global_pool, mask_init, fft: Pooling type, initial mask sigma, FFT use.
            device, dtype: Where and in which dtype to create the parameters.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.stem = nn.Sequential(
            SeparableFlexConv(in_chans, width, kernel_size, hidden=hidden, mask_init=mask_init,
                              mask_learn_mean=False, fft=fft, **dd),
            nn.BatchNorm2d(width, **dd), nn.GELU())
        self.blocks = nn.Sequential(*[CCNNBlock(width, kernel_size, hidden, dropout, mask_init, fft, **dd)
                                      for _ in range(depth)])
        self.norm = nn.BatchNorm2d(width, **dd)
        self.feature_info = [dict(num_chs=width, reduction=1, module='stem.2')] + [
            dict(num_chs=width, reduction=1, module=f'blocks.{i}') for i in range(depth)]
        self.num_features = self.head_hidden_size = width
        self.head = ClassifierHead(width, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stem', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])


def _create_ccnn(variant: str, pretrained: bool = False, **kwargs) -> CCNN:
    return build_model_with_cfg(
        CCNN, variant, pretrained, feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2)), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (32, 32), 'crop_pct': 1.0,
        'interpolation': 'bilinear', 'mean': (0.4914, 0.4822, 0.4465), 'std': (0.2470, 0.2435, 0.2616),
        # the weights whose shape follows in_chans: the depthwise kernel network's output layer and the pointwise conv
        'first_conv': ('stem.0.depthwise.kernel_net.output', 'stem.0.pointwise'), 'classifier': 'head.fc', 'paper_ids': 'arXiv:2206.03398',
        'paper_name': 'Towards a General Purpose CNN for Long Range Dependencies in ND', **kwargs,
    }


default_cfgs = generate_default_cfgs({'ccnn_4_140': _cfg(), 'ccnn_6_380': _cfg()})


@register_model
def ccnn_4_140(pretrained: bool = False, **kwargs) -> CCNN:
    """CCNN-4,140 (CIFAR-10 2-D: 201,042 params)."""
    return _create_ccnn('ccnn_4_140', pretrained, **dict(dict(depth=4, width=140, hidden=32), **kwargs))


@register_model
def ccnn_6_380(pretrained: bool = False, **kwargs) -> CCNN:
    """CCNN-6,380 (CIFAR-10 2-D: 1,999,366 params)."""
    return _create_ccnn('ccnn_6_380', pretrained, **dict(dict(depth=6, width=380, hidden=64), **kwargs))
