"""CCNN: the continuous CNN of residual separable FlexConv blocks, on images (2-D) and sequences (causal 1-D).

Paper: `Towards a General Purpose CNN for Long Range Dependencies in ND` - https://arxiv.org/abs/2206.03398

Stem ``SeparableFlexConv -> BN -> GELU``, then pre-norm blocks
``x + GELU(Conv1x1(Dropout(GELU(SeparableFlexConv(BN(x))))))`` (channel-wise dropout), a final BN, global pooling
(1-D: the mean over time) and a linear head. The masks learn their widths only (2-D: centred, as the paper's
parameter counts imply; 1-D: the mean is a fixed buffer at the causal end +1). The kernel networks use CCNN's own
init (:mod:`dcls_timm.layers.magnet`, ``init='ccnn'``), with its one-time output rescale at the first forward pass
guarded by the persistent ``initialized`` buffers (SPEC 8.1).

``data_dim=1`` (SPEC 8.1): a causal sequence model reading ``[B, C, L]`` sequences or ``[B, C, H, W]`` images flattened
row major (sMNIST, sCIFAR10), optionally permuted (``permute=True``, ``permutation_seed``: pMNIST); by default its
kernel grid has as many points as the input is long (``kernel_size=-1``) and FFT convolutions serve kernels of 5 taps
or more under autograd, of more than 100 taps without (whichever is faster on a CPU).
"""
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from timm.layers import ClassifierHead
from timm.models import generate_default_cfgs, register_model

from dcls_timm.layers import FlexConv, SeparableFlexConv
from dcls_timm.layers.pointwise import PointwiseConv1d, pointwise_conv, pointwise_matmul
from dcls_timm.layers.fused import (
    batch_norm_affine, conv2d_args, conv_channels_last, eager_inference, eager_unhooked, eval_batch_norm, fused_conv2d,
    identity_in_eval, use_fused_conv)

from ._classifier_net import ConvNormActStem, SequenceHead, SequenceInput, StemBlocksClassifier
from ._pretrained import build_dcls_model

__all__ = ['CCNN', 'CCNNBlock', 'checkpoint_filter_fn']

_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_CHANNEL_DROPOUTS = {1: nn.Dropout1d, 2: nn.Dropout2d}
DEFAULT_OMEGA_0 = {1: 2976.5, 2: 4231.6}  # sMNIST and CIFAR-10 CCNN-4,140 (SPEC 8.1)


def _sep_flexconv(cin: int, cout: int, data_dim: int, kernel_size: int, hidden: int, mask_init: float,
                  omega_0: float, fft: str, dd: Dict[str, Any]) -> SeparableFlexConv:
    return SeparableFlexConv(cin, cout, kernel_size, dim=data_dim, hidden=hidden, mask_init=mask_init,
                             mask_learn_mean=False, omega_0=omega_0, fft=fft, causal=data_dim == 1, init='ccnn',
                             **dd)


class CCNNBlock(nn.Module):
    """Pre-norm residual block around a separable FlexConv and a pointwise linear layer.

    Eager no-grad evaluation skips the module calls after the depthwise convolution: in 2-D (float32, CPU) both 1x1
    convolutions run with their GELU inside one oneDNN call (:func:`dcls_timm.layers.fused.fused_conv2d`, float32
    rounding); elsewhere the GELUs and the residual add are written in place. The eval BatchNorm costs no pass of its
    own: in 1-D it is applied while the causal convolution pads its input, in 2-D it is folded into the depthwise
    kernel and bias where that conv is direct (float32 rounding, :func:`dcls_timm.layers.affine_input_conv`).
    Hooks, FX, tracing, scripting, training and autograd keep the module path, as does ``fast_path = False``.
    """
    fast_path: bool = True

    def __init__(self, channels: int, kernel_size: int, hidden: int, dropout: float, mask_init: float, fft: str,
                 data_dim: int = 2, omega_0: float = DEFAULT_OMEGA_0[2], device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm = _NORMS[data_dim](channels, **dd)
        self.conv = _sep_flexconv(channels, channels, data_dim, kernel_size, hidden, mask_init, omega_0, fft, dd)
        self.act1 = nn.GELU()
        self.drop = _CHANNEL_DROPOUTS[data_dim](dropout)
        self.linear = pointwise_conv(data_dim, channels, channels, **dd)
        self.act2 = nn.GELU()

    @torch.jit.unused
    def _inplace_inference(self, x: torch.Tensor) -> bool:
        """Eager no-grad evaluation of the default block, with no hooks that could see (or miss) a tensor."""
        parts = (self.norm, self.conv, self.act1, self.drop, self.linear, self.act2)
        return self.fast_path and not self.training and eager_inference(x, parts) and identity_in_eval(self.drop) \
            and type(self.act1) is nn.GELU \
            and type(self.act2) is nn.GELU and type(self.conv) is SeparableFlexConv \
            and type(self.linear) in (PointwiseConv1d, nn.Conv1d, nn.Conv2d) \
            and isinstance(self.norm, nn.modules.batchnorm._BatchNorm)

    @torch.jit.unused
    def _fused_inference(self, x: torch.Tensor) -> torch.Tensor:
        # dropout is the identity in eval; 2-D float32 on CPU: each 1x1 conv runs with its GELU inside (oneDNN)
        depthwise = self.conv.depthwise
        # a baked model's depthwise conv is a plain convolution module: it takes the normalised input
        if isinstance(depthwise, FlexConv) and eval_batch_norm(self.norm, depthwise.dim):
            # no BatchNorm pass: sequences write its affine map straight into the causal conv's zero-padded input,
            # images fold it into the kernel and bias (with a border correction) where the conv is direct
            h = depthwise(x, input_affine=batch_norm_affine(self.norm))
        else:
            h = depthwise(self.norm(x))
        pointwise, linear = conv2d_args(self.conv.pointwise), conv2d_args(self.linear)
        if pointwise is not None and linear is not None \
                and use_fused_conv(h, self.act1) and use_fused_conv(h, self.act2):
            y = fused_conv2d(h, *pointwise, self.act1, channels_last=conv_channels_last(self.conv.pointwise, h))
            return fused_conv2d(y, *linear, self.act2, channels_last=conv_channels_last(self.linear, y)).add_(x)
        # elsewhere the same ops, the element-wise ones written into the tensors the convolutions just made: a fresh
        # activation-sized tensor faults its pages in on first touch, 3-7x the cost of GELU or the residual add on a
        # 2-core CPU
        y = torch.ops.aten.gelu_(self.conv.pointwise(h), approximate=self.act1.approximate)
        y = torch.ops.aten.gelu_(self.linear(y), approximate=self.act2.approximate)
        return y.add_(x)

    @torch.jit.unused
    def _sequence_path(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Sequences on CPU outside the in-place inference path (training, autograd): a live channel dropout's
        mask, one value per sample and channel, scales the input channels of the linear layer's weight, one weight
        per sample (``[B, C, C]``), so no activation-sized multiply, forward or backward (the masks are those
        ``nn.Dropout1d`` draws from the same generator state); the residual is added into the last GELU's output,
        which its backward does not keep (no fresh activation-sized tensor). Float32 rounding. None where a hook
        could see (or keep) an intermediate tensor."""
        drop, linear = self.drop, self.linear
        if not self.fast_path or type(drop) is not nn.Dropout1d or type(self.act2) is not nn.GELU \
                or type(linear) is not PointwiseConv1d or not linear._matmul_path(x) or not eager_unhooked(x, (self,)) \
                or not 0. <= drop.p <= 1.:  # the module raises its own error for an invalid p
            return None
        h = self.act1(self.conv(self.norm(x)))
        weight, p = linear.weight[..., 0], drop.p
        if drop.training and p > 0:
            # as F.dropout1d: bernoulli(1 - p) / (1 - p) per sample and channel; all zeros for p = 1
            mask = h.new_zeros(h.shape[:2]) if p == 1 else h.new_empty(h.shape[:2]).bernoulli_(1 - p).div_(1 - p)
            weight = weight.unsqueeze(0) * mask.unsqueeze(1)
        return self.act2(pointwise_matmul(h, weight, linear.bias)).add_(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self._inplace_inference(x):
                return self._fused_inference(x)
            out = self._sequence_path(x)
            if out is not None:
                return out
        return x + self.act2(self.linear(self.drop(self.act1(self.conv(self.norm(x))))))


class CCNN(StemBlocksClassifier):
    """CCNN-B,C: B blocks of width C at constant resolution, 2-D (images) or causal 1-D (sequences)."""

    def __init__(
            self,
            depth: int = 4,
            width: int = 140,
            num_classes: int = 10,
            in_chans: int = 3,
            data_dim: int = 2,
            kernel_size: Optional[int] = None,
            hidden: int = 32,
            omega_0: Optional[float] = None,
            dropout: float = 0.1,
            dropout_in: float = 0.,
            drop_rate: float = 0.,
            global_pool: str = 'avg',
            mask_init: float = 0.075,
            fft: str = 'auto',
            permute: bool = False,
            permutation_seed: int = 0,
            permutation_length: int = 784,
            device=None,
            dtype=None,
    ):
        """
        Args:
            depth: Number of residual blocks B.
            width: Channels C.
            num_classes: Classifier outputs.
            in_chans: Input channels.
            data_dim: 2 (images) or 1 (causal sequence model).
            kernel_size: FlexConv grid points per axis; default 33 (32 px images) for 2-D, -1 (the input length) for
                1-D.
            hidden: MAGNet width (32 for CCNN-4,140, 64 for CCNN-6,380).
            omega_0: MAGNet frequency scale; default 4231.6 (2-D, CIFAR-10), 2976.5 (1-D, sMNIST). Per task: pMNIST
                2985.6, sCIFAR10 2386.5.
            dropout: Channel-wise dropout inside the blocks.
            dropout_in: Dropout on the input (pMNIST: 0.2).
            drop_rate: Dropout before the classifier.
            global_pool: 2-D: timm's pooling type; 1-D: 'avg' (mean over time, the paper's) or 'last'.
            mask_init, fft: Initial mask sigma, FFT use ('auto', 'always', 'never').
            permute: 1-D: reorder the steps by a fixed permutation (pMNIST), stored as a buffer.
            permutation_seed, permutation_length: The permutation is numpy's ``RandomState(seed).permutation(length)``.
            device, dtype: Where and in which dtype to create the parameters.
        """
        super().__init__()
        if data_dim not in (1, 2):
            raise ValueError(f'data_dim must be 1 or 2, got {data_dim}.')
        if permute and data_dim != 1:
            raise ValueError('permute=True needs data_dim=1 (a sequence model).')
        dd = {'device': device, 'dtype': dtype}
        kernel_size = (33 if data_dim == 2 else -1) if kernel_size is None else kernel_size
        omega_0 = DEFAULT_OMEGA_0[data_dim] if omega_0 is None else omega_0
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.data_dim = data_dim
        if data_dim == 1:
            self.seq_input = SequenceInput(permute, permutation_seed, permutation_length, device=device)
        self.drop_in = nn.Dropout(dropout_in) if dropout_in > 0 else None
        self.stem = ConvNormActStem(
            _sep_flexconv(in_chans, width, data_dim, kernel_size, hidden, mask_init, omega_0, fft, dd),
            _NORMS[data_dim](width, **dd), nn.GELU())
        self.blocks = nn.Sequential(*[
            CCNNBlock(width, kernel_size, hidden, dropout, mask_init, fft, data_dim, omega_0, **dd)
            for _ in range(depth)])
        self.norm = _NORMS[data_dim](width, **dd)
        self.feature_info = [dict(num_chs=width, reduction=1, module='stem.2')] + [
            dict(num_chs=width, reduction=1, module=f'blocks.{i}') for i in range(depth)]
        self.num_features = self.head_hidden_size = width
        if data_dim == 1:
            self.head = SequenceHead(width, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        else:
            self.head = ClassifierHead(width, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^stem', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """State dicts saved before the ``initialized`` buffers existed hold trained weights: loaded as initialized.
    A permuted model keeps its own permutation when the file has none."""
    own = model.state_dict()
    out = dict(state_dict)
    for key, value in own.items():
        if key not in out and key.endswith('.initialized'):
            out[key] = torch.ones_like(value)
        elif key not in out and key == 'seq_input.permutation':
            out[key] = value
    return out


def _create_ccnn(variant: str, pretrained: bool = False, **kwargs) -> CCNN:
    # the project's loader: strict keys and shapes whatever num_classes (timm's goes non-strict when it changes)
    return build_dcls_model(
        CCNN, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2)), **kwargs)


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
    """CCNN-4,140 (CIFAR-10 2-D: 201,042 params; ``data_dim=1``: sMNIST 198,769, sCIFAR10 199,117)."""
    return _create_ccnn('ccnn_4_140', pretrained, **dict(dict(depth=4, width=140, hidden=32), **kwargs))


@register_model
def ccnn_6_380(pretrained: bool = False, **kwargs) -> CCNN:
    """CCNN-6,380 (CIFAR-10 2-D: 1,999,366 params; ``data_dim=1``: sMNIST 1,993,091, sCIFAR10 1,993,983)."""
    return _create_ccnn('ccnn_6_380', pretrained, **dict(dict(depth=6, width=380, hidden=64), **kwargs))
