"""Inference export: bake every DCLS and continuous-kernel layer into a plain convolution with its constructed kernel.

    baked = bake_kernels(model)               # a copy; outputs equal the original's in eval mode
    torch.jit.script(baked); torch.onnx.export(baked, x, 'model.onnx', dynamo=False)

The baked model has no positions, MAGNets or masks left: just ``nn.Conv{1,2,3}d`` (preceded by a padding layer
where the padding is asymmetric or not zeros), so it runs anywhere a plain CNN runs and costs nothing to build.
"""
import copy

import torch
import torch.nn as nn

from dcls_timm.layers.dcls import DclsPositions, _DclsNd
from dcls_timm.layers.flexconv import _ContinuousConvNd

__all__ = ['bake_kernels']

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


@torch.no_grad()
def _bake_layer(layer: nn.Module) -> nn.Module:
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


def bake_kernels(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every DCLS / CKConv / FlexConv layer by a plain convolution with its current kernel.

    Args:
        model: Any model; other modules are left as they are.
        inplace: Change ``model`` itself instead of a copy.

    Returns:
        The baked model, in eval mode.
    """
    model = model if inplace else copy.deepcopy(model)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, (_DclsNd, _ContinuousConvNd, DclsPositions))]
    for name, module in targets:
        parent_name, _, child = name.rpartition('.')
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, DclsPositions):
            delattr(parent, child)  # positions live on in the baked kernels
        else:
            setattr(parent, child, _bake_layer(module))
    return model.eval()
