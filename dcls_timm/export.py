"""Inference export: bake every DCLS and continuous-kernel layer into a plain convolution with its constructed kernel.

    baked = bake_kernels(model)               # a copy; outputs equal the original's in eval mode
    torch.jit.script(baked); torch.onnx.export(baked, x, 'model.onnx', dynamo=False)

The baked model has no positions, MAGNets or masks left: just ``nn.Conv{1,2,3}d`` (preceded by a padding layer
where the padding is asymmetric or not zeros), so it runs anywhere a plain CNN runs and costs nothing to build.

Causal 1-D layers (CCNN sequence models, the SIREN CKConv) become :class:`CausalConv1d`: left padding, then a direct
or FFT convolution as the original chose. Where the kernel follows the input length (SIREN CKConvs; CCNN with
``kernel_size=-1``), it is baked for one length, ``sequence_length`` (default: the last forward pass's), and any other
length is refused: the same continuous kernel sampled for another length is another kernel.
"""
import copy
from typing import Optional

import torch
import torch.nn as nn
from timm.models.convnext import ConvNeXtBlock

from dcls_timm.layers.dcls import DclsPositions, _DclsNd
from dcls_timm.layers.flexconv import _ContinuousConvNd, causal_conv1d
from dcls_timm.layers.siren import SirenCKConv
from dcls_timm.models.convnext_dcls import ConvNeXtFusedBlock

__all__ = ['bake_kernels', 'CausalConv1d']


class CausalConv1d(nn.Module):
    """A causal 1-D convolution with a fixed kernel: ``out[t] = sum_i weight[..., i] * x[t - (n - 1 - i)] + bias``.

    Args:
        weight: ``[C_out, C_in / groups, n]``; the last tap is lag 0.
        bias: ``[C_out]`` or None.
        groups: 1 or depthwise.
        fft: Convolve through FFTs (long kernels).
        length: The only input length accepted (0: any).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], groups: int, fft: bool, length: int = 0):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.groups, self.fft, self.length = groups, fft, length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.length > 0:
            if x.shape[-1] != self.length:
                raise ValueError(f'This kernel was baked for sequences of length {self.length}, got {x.shape[-1]}: '
                                 f'bake the model again with that sequence_length.')
            # tracing (jit.trace, ONNX) drops the check above: a reshape to the fixed length keeps it in the graph
            # (another length then fails there instead of running with this length's kernel); eager: a no-op view
            x = x.reshape(x.shape[0], x.shape[1], self.length)
        return causal_conv1d(x, self.weight, self.bias, self.groups, self.fft)

    def extra_repr(self) -> str:
        return (f'{self.weight.shape[1] * self.groups}, {self.weight.shape[0]}, taps={self.weight.shape[-1]}, '
                f'groups={self.groups}, fft={self.fft}, length={self.length or "any"}')

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_PADS = {
    ('constant', 1): nn.ConstantPad1d, ('constant', 2): nn.ConstantPad2d, ('constant', 3): nn.ConstantPad3d,
    ('reflect', 1): nn.ReflectionPad1d, ('reflect', 2): nn.ReflectionPad2d, ('reflect', 3): nn.ReflectionPad3d,
    ('replicate', 1): nn.ReplicationPad1d, ('replicate', 2): nn.ReplicationPad2d,
    ('replicate', 3): nn.ReplicationPad3d,
    ('circular', 1): nn.CircularPad1d, ('circular', 2): nn.CircularPad2d, ('circular', 3): nn.CircularPad3d,
}


def _baked_conv(kernel: torch.Tensor, bias, ndim: int, stride, padding, groups: int) -> nn.Module:
    conv = _CONVS[ndim](kernel.shape[1] * groups, kernel.shape[0], tuple(kernel.shape[2:]), stride=stride,
                        padding=padding, groups=groups, bias=bias is not None,
                        device=kernel.device, dtype=kernel.dtype)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def _bake_causal(layer: nn.Module, sequence_length: Optional[int]) -> CausalConv1d:
    """A causal layer, at ``sequence_length`` where its kernel follows the input length."""
    follows_input = isinstance(layer, SirenCKConv) or layer.kernel_size < 0
    length = sequence_length if sequence_length is not None else layer._last_length
    if follows_input and length is None:
        raise ValueError(f'{type(layer).__name__} samples its kernel at the input length: give '
                         'bake_kernels(..., sequence_length=L) (L = H * W for images read as sequences) or run one '
                         'forward pass at that length first.')
    if isinstance(layer, SirenCKConv):
        kernel, groups = layer.construct_kernel(length), 1
        fft = layer._use_fft(kernel.shape[-1])
    else:
        layer._finish_init(length)  # CCNN's one-time rescale, if no forward pass did it yet
        kernel = layer.causal_kernel(length)
        groups = layer.in_channels if layer.depthwise else 1
        fft = layer._use_fft(kernel.shape[2:], autograd=False)  # baked models are for inference
    return CausalConv1d(kernel, layer.bias, groups, fft, length if follows_input else 0)


@torch.no_grad()
def _bake_layer(layer: nn.Module, sequence_length: Optional[int]) -> nn.Module:
    if isinstance(layer, SirenCKConv) or getattr(layer, 'causal', False):
        return _bake_causal(layer, sequence_length)
    if isinstance(layer, _DclsNd):
        conv = _baked_conv(layer.construct_kernel(), layer.bias, layer.ndim, layer.stride, layer._conv_padding,
                           layer.groups)
        if layer._pad is None:
            return conv
        mode = 'constant' if layer.padding_mode == 'zeros' else layer.padding_mode
        pad = _PADS[(mode, layer.ndim)](layer._pad, 0.) if mode == 'constant' else _PADS[(mode, layer.ndim)](layer._pad)
        return nn.Sequential(pad, conv)
    kernel = layer.construct_kernel()
    return _baked_conv(kernel, layer.bias, layer.dim, 1, tuple(s // 2 for s in kernel.shape[2:]),
                       layer.in_channels if layer.depthwise else 1)


def bake_kernels(model: nn.Module, inplace: bool = False, sequence_length: Optional[int] = None) -> nn.Module:
    """Replace every DCLS / CKConv / FlexConv / SIREN CKConv layer by a plain convolution with its current kernel.

    Args:
        model: Any model; other modules are left as they are.
        inplace: Change ``model`` itself instead of a copy.
        sequence_length: For kernels sampled at the input length (SIREN CKConv, CCNN 1-D with ``kernel_size=-1``):
            the one length the baked model will take (default: each layer's last forward pass's).

    Returns:
        The baked model, in eval mode. ConvNeXt blocks become timm's own ``ConvNeXtBlock`` (the fused CPU inference
        forward is eager-only), so the result holds timm and torch modules only.
    """
    model = model if inplace else copy.deepcopy(model)
    for m in model.modules():
        if type(m) is ConvNeXtFusedBlock:
            m.__class__ = ConvNeXtBlock
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, (_DclsNd, _ContinuousConvNd, SirenCKConv, DclsPositions))]
    for name, module in targets:
        parent_name, _, child = name.rpartition('.')
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, DclsPositions):
            delattr(parent, child)  # positions live on in the baked kernels
        else:
            setattr(parent, child, _bake_layer(module, sequence_length))
    return model.eval()
