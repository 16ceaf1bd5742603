"""1x1 convolutions over sequences as batched matmuls on CPU.

oneDNN runs a 1x1 ``conv1d`` over ``[B, C, L]`` sequences far below its matmul speed: at CCNN's sMNIST shape
(100 x 140 x 784) ``F.conv1d`` takes 41 ms for inference and 117 ms forward + backward on a 2-core CPU,
``torch.baddbmm`` with the weight broadcast over the batch 18 and 44 ms (``scripts/benchmark_kernels.py
--pointwise``). The result is
the same up to float32 rounding (summation order).
"""
from typing import Optional

import torch
import torch.nn as nn

__all__ = ['PointwiseConv1d', 'pointwise_conv', 'pointwise_matmul']


class PointwiseConv1d(nn.Conv1d):
    """``nn.Conv1d(in_channels, out_channels, 1)`` (same parameters and state dict) computed on CPU as
    ``bias + weight @ x`` per sample (``torch.baddbmm``). Other devices, FX and tracing take ``nn.Conv1d``'s
    forward."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_channels, out_channels, 1, bias=bias, device=device, dtype=dtype)

    @torch.jit.unused
    def _matmul_path(self, x: torch.Tensor) -> bool:
        return not isinstance(x, torch.fx.Proxy) and not torch.jit.is_tracing() and x.device.type == 'cpu' \
            and x.dim() == 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and self._matmul_path(x):
            return pointwise_matmul(x, self.weight.squeeze(-1), self.bias)
        return self._conv_forward(x, self.weight, self.bias)


def pointwise_matmul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``bias + weight @ x`` per sample of ``x`` ``[B, C_in, L]``: a 1x1 convolution as one batched matmul.
    ``weight`` is ``[C_out, C_in]`` (shared by the batch) or ``[B, C_out, C_in]`` (one per sample)."""
    b, length = x.shape[0], x.shape[2]
    weight = weight.expand(b, -1, -1)  # a view when shared
    if bias is None:
        return torch.bmm(weight, x)
    return torch.baddbmm(bias.view(1, -1, 1).expand(b, -1, length), weight, x)


def pointwise_conv(dim: int, in_channels: int, out_channels: int, bias: bool = True, device=None,
                   dtype=None) -> nn.Module:
    """A 1x1 convolution over ``dim`` spatial dimensions: :class:`PointwiseConv1d` for sequences, else
    ``nn.Conv2d``/``nn.Conv3d`` (oneDNN's channels-last 1x1 convolutions already run as matmuls)."""
    dd = {'device': device, 'dtype': dtype}
    if dim == 1:
        return PointwiseConv1d(in_channels, out_channels, bias=bias, **dd)
    if dim in (2, 3):
        return (nn.Conv2d if dim == 2 else nn.Conv3d)(in_channels, out_channels, 1, bias=bias, **dd)
    raise ValueError(f'dim must be 1, 2 or 3, got {dim}.')
