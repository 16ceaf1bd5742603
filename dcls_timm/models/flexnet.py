"""FlexNet: residual networks of FlexConvs (learned kernel sizes), no pooling or striding.

Paper: `FlexConv: Continuous Kernel Convolutions with Differentiable Kernel Sizes` - https://arxiv.org/abs/2110.08059

Stem ``FlexConv -> BN -> ReLU``, then blocks ``FlexConv -> BN -> ReLU -> Dropout -> FlexConv -> BN (+ shortcut, a
1x1 conv only where the width changes) -> ReLU``, global average pool and a 1x1-conv classifier.
"""
from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import ClassifierHead
from timm.models import generate_default_cfgs, register_model

from dcls_timm.layers import FlexConv
from dcls_timm.layers.dropout import dropout as fast_dropout
from dcls_timm.layers.fused import (
    conv2d_args, conv_channels_last, eager_inference, fused_conv2d, identity_in_eval, use_fused_conv)

from ._classifier_net import ConvNormActStem, StemBlocksClassifier
from ._pretrained import build_dcls_model

__all__ = ['FlexNet', 'FlexNetBlock']


class FlexNetBlock(nn.Module):
    """Residual block of two convolutions (FlexConv by default).

    CPU float32 inference runs each convolution with its BatchNorm folded in and the ReLU (and the residual add)
    fused, as one oneDNN call (:func:`dcls_timm.layers.fused.fused_conv2d`): the same numbers to float32 rounding,
    three passes over the activations fewer per convolution. Training, autograd, FX, tracing, compile, autocast,
    GPUs, hooks, FFT-sized kernels and non-default parts keep the module path; ``fast_path = False`` switches it off.
    The dropout is an ``nn.Dropout`` whose eager CPU training masks come from :func:`dcls_timm.layers.dropout`.
    """
    fast_path: bool = True

    def __init__(self, in_chs: int, out_chs: int, conv_layer: Callable[[int, int], nn.Module], dropout: float = 0.2,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv1 = conv_layer(in_chs, out_chs)
        self.bn1 = nn.BatchNorm2d(out_chs, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout)
        self.conv2 = conv_layer(out_chs, out_chs)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)
        self.shortcut = nn.Conv2d(in_chs, out_chs, 1, **dd) if in_chs != out_chs else nn.Identity()
        self.act2 = nn.ReLU(inplace=True)

    @torch.jit.unused
    def _fused_inference(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The block through two fused convolutions, or None where that path does not apply."""
        if not self.fast_path or not identity_in_eval(self.drop) or not eager_inference(x, tuple(self.children())) \
                or not (use_fused_conv(x, self.act1, self.bn1)
                        and use_fused_conv(x, self.act2, self.bn2, residual=True)):
            return None
        conv1, conv2 = conv2d_args(self.conv1), conv2d_args(self.conv2)
        if conv1 is None or conv2 is None:
            return None
        out = fused_conv2d(x, *conv1, self.act1, self.bn1, channels_last=conv_channels_last(self.conv1, x))
        shortcut = self.shortcut(x)
        # the module path's sum takes the format of its first operand, the second conv's output
        return fused_conv2d(out, *conv2, self.act2, self.bn2, residual=shortcut,
                            channels_last=conv_channels_last(self.conv2, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            fused = self._fused_inference(x)
            if fused is not None:
                return fused
        out = self.act1(self.bn1(self.conv1(x)))
        if torch.jit.is_scripting():
            out = self.drop(out)
        else:  # CPU training masks from integer bits (the module itself under FX, hooks, GPUs, eval)
            out = fast_dropout(self.drop, out)
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class FlexNet(StemBlocksClassifier):
    """FlexNet for image classification at constant resolution."""

    def __init__(
            self,
            widths: Sequence[int] = (24, 36, 48),
            num_classes: int = 10,
            in_chans: int = 3,
            kernel_size: int = 33,
            conv_type: str = 'flex',
            dropout: float = 0.2,
            drop_rate: float = 0.,
            global_pool: str = 'avg',
            hidden: int = 32,
            mask_init: float = 0.075,
            fft: str = 'auto',
            device=None,
            dtype=None,
    ):
        """
        Args:
            widths: Width of each residual block (the stem has the first width).
            num_classes: Classifier outputs.
            in_chans: Input channels.
            kernel_size: FlexConv grid points per axis (33 for 32 px images).
            conv_type: ``'flex'`` (FlexConv) or ``'conv3'`` (plain 3x3 convs, the paper's baseline).
            dropout: Dropout inside each block.
            drop_rate: Dropout before the classifier.
            global_pool: timm pooling type.
            hidden, mask_init, fft: FlexConv settings (MAGNet width, initial mask sigma, FFT use).
            device, dtype: Where and in which dtype to create the parameters.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if conv_type == 'flex':
            conv_layer = partial(FlexConv, kernel_size=kernel_size, hidden=hidden, mask_init=mask_init, fft=fft, **dd)
        elif conv_type == 'conv3':
            conv_layer = partial(nn.Conv2d, kernel_size=3, padding=1, **dd)
        else:
            raise ValueError(f"conv_type must be 'flex' or 'conv3', got {conv_type!r}.")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.stem = ConvNormActStem(
            conv_layer(in_chans, widths[0]), nn.BatchNorm2d(widths[0], **dd), nn.ReLU(inplace=True))
        blocks, prev = [], widths[0]
        self.feature_info = [dict(num_chs=prev, reduction=1, module='stem.2')]
        for i, w in enumerate(widths):
            blocks.append(FlexNetBlock(prev, w, conv_layer, dropout, **dd))
            self.feature_info.append(dict(num_chs=w, reduction=1, module=f'blocks.{i}'))
            prev = w
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.Identity()
        self.num_features = self.head_hidden_size = prev
        self.head = ClassifierHead(prev, num_classes, pool_type=global_pool, drop_rate=drop_rate, use_conv=True, **dd)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stem', blocks=r'^blocks\.(\d+)')


def _create_flexnet(variant: str, pretrained: bool = False, **kwargs) -> FlexNet:
    # the project's loader: strict keys and shapes whatever num_classes (timm's goes non-strict when it changes)
    return build_dcls_model(
        FlexNet, variant, pretrained, feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (32, 32), 'crop_pct': 1.0,
        'interpolation': 'bilinear', 'mean': (0.4914, 0.4822, 0.4465), 'std': (0.2470, 0.2435, 0.2616),
        # the weights whose shape follows in_chans: the kernel network's output layer (C_out * C_in values)
        'first_conv': 'stem.0.kernel_net.output', 'classifier': 'head.fc', 'paper_ids': 'arXiv:2110.08059',
        'paper_name': 'FlexConv: Continuous Kernel Convolutions with Differentiable Kernel Sizes', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'flexnet_3': _cfg(), 'flexnet_5': _cfg(), 'flexnet_7': _cfg(), 'flexnet_7_conv3': _cfg(first_conv='stem.0'),
})


@register_model
def flexnet_3(pretrained: bool = False, **kwargs) -> FlexNet:
    """FlexNet-3 (CIFAR-10: 277,090 params, 90.4 %)."""
    return _create_flexnet('flexnet_3', pretrained, **dict(dict(widths=(24, 36, 48)), **kwargs))


@register_model
def flexnet_5(pretrained: bool = False, **kwargs) -> FlexNet:
    """FlexNet-5 (CIFAR-10: 454,046 params, 91.0 %)."""
    return _create_flexnet('flexnet_5', pretrained, **dict(dict(widths=(22, 33, 33, 44, 44)), **kwargs))


@register_model
def flexnet_7(pretrained: bool = False, **kwargs) -> FlexNet:
    """FlexNet-7 (CIFAR-10: 671,650 params, 92.2 %)."""
    return _create_flexnet('flexnet_7', pretrained, **dict(dict(widths=(24, 24, 36, 36, 36, 48, 48)), **kwargs))


@register_model
def flexnet_7_conv3(pretrained: bool = False, **kwargs) -> FlexNet:
    """FlexNet-7 with plain 3x3 convs (CIFAR-10: 169,990 params, 89.5 %)."""
    return _create_flexnet('flexnet_7_conv3', pretrained,
                           **dict(dict(widths=(24, 24, 36, 36, 36, 48, 48), conv_type='conv3'), **kwargs))
