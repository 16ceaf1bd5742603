"""The original CKConv (Romero et al. 2022, SPEC 8.2): a SIREN kernel network and the causal 1-D convolution.

Paper: `CKConv: Continuous Kernel Convolution For Sequential Data` - https://arxiv.org/abs/2102.02611

The kernel network maps the ``L`` points of ``linspace(-1, 1, L)`` (``L`` the input length) through weight-normed
1x1 convolutions ``1 -> hidden -> hidden -> C_out * C_in`` with ``sin(omega_0 * (W x + b))`` after the two hidden
layers; the output ``[C_out * C_in, L]`` is the kernel ``[C_out, C_in, L]``. The convolution is causal: the sample at
+1 is lag 0 and the one at -1 lag ``L - 1`` (the authors pad even-length kernels with one leading zero, a lag the
input never reaches, so it changes nothing). FFT convolution when the kernel has more than 50 taps.

The weight norm is the legacy ``torch.nn.utils.weight_norm`` one (``W = g * v / ||v||`` over all dims but 0), written
out so the parameters are the published ``weight_g`` ``[out, 1, 1]`` / ``weight_v`` ``[out, in, 1]`` / ``bias`` and
the module deep-copies at any time (the legacy hook leaves a non-leaf ``weight`` attribute that ``copy.deepcopy``,
hence timm's EMA, rejects). Init: PyTorch's default Conv1d init for ``v`` and ``bias`` with ``g = ||v||``, which is
what the published weights effectively started from (the authors' SIREN init is undone by weight norm).
"""
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from .flexconv import CAUSAL_FFT_MIN_TAPS, causal_conv1d, continuous_convs

__all__ = ['WeightNormConv1x1', 'SirenKernel', 'SirenCKConv', 'kernel_net_convs']


class WeightNormConv1x1(nn.Module):
    """A weight-normed 1x1 ``Conv1d``: ``conv1d(x, g * v / ||v||, bias)``, norm over all dims but the output."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        conv = nn.Conv1d(in_channels, out_channels, 1, bias=bias, **dd)  # PyTorch's default init
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight_v = nn.Parameter(conv.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(self.weight_v.detach(), dim=(1, 2), keepdim=True))
        self.bias = nn.Parameter(conv.bias.detach().clone()) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / torch.linalg.vector_norm(self.weight_v, dim=(1, 2), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # = F.conv1d(x, self.weight, self.bias), as a matmul (much faster on CPU for [1, C, L] inputs)
        return F.linear(x.transpose(1, 2), self.weight[..., 0], self.bias).transpose(1, 2)

    def extra_repr(self) -> str:
        return f'{self.in_channels}, {self.out_channels}, bias={self.bias is not None}'


class SirenKernel(nn.Module):
    """SIREN kernel network: ``[L]`` coordinates to ``[out_features, L]`` kernel values."""
    checkpoint_settings = ('omega_0',)  # in no state dict: recorded in train.py checkpoints, checked when loading

    def __init__(self, out_features: int, hidden: int = 32, omega_0: float = 1., device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.omega_0 = float(omega_0)
        self.layers = nn.ModuleList([WeightNormConv1x1(1, hidden, **dd), WeightNormConv1x1(hidden, hidden, **dd),
                                     WeightNormConv1x1(hidden, out_features, **dd)])

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        h = coords.view(1, 1, -1)
        for layer in self.layers[:-1]:
            h = torch.sin(self.omega_0 * layer(h))  # omega_0 scales the whole pre-activation W x + b
        return self.layers[-1](h)[0]

    def extra_repr(self) -> str:
        return f'omega_0={self.omega_0}'


class SirenCKConv(nn.Module):
    """Causal 1-D CKConv with a SIREN kernel as long as the input (the original CKConv).

    Parameters: ``1,184 + 34 * C_out * C_in + C_out`` (hidden 32).
    """

    def __init__(self, in_channels: int, out_channels: int, omega_0: float = 1., hidden: int = 32,
                 bias: bool = True, fft: str = 'auto', device=None, dtype=None):
        super().__init__()
        if fft not in ('auto', 'always', 'never'):
            raise ValueError(f"fft must be 'auto', 'always' or 'never', got {fft!r}.")
        self.in_channels, self.out_channels, self.fft = in_channels, out_channels, fft
        self.kernel_net = SirenKernel(out_channels * in_channels, hidden, omega_0, device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None
        self._last_length: Optional[int] = None  # input length of the last forward: the kernel's length

    def construct_kernel(self, length: Optional[int] = None) -> torch.Tensor:
        """The kernel ``[C_out, C_in, length]`` on ``linspace(-1, 1, length)``; the last tap is lag 0. ``length``
        defaults to the last forward pass's input length."""
        length = self._last_length if length is None else length
        if length is None:
            raise RuntimeError('A SIREN CKConv kernel is as long as its input: give length or run a forward pass.')
        ref = self.kernel_net.layers[0].weight_v
        coords = torch.linspace(-1., 1., length, device=ref.device, dtype=ref.dtype)
        return self.kernel_net(coords).view(self.out_channels, self.in_channels, length)

    def sampled_kernel(self) -> torch.Tensor:
        """The kernel the last forward pass convolved with, rebuilt from the current parameters."""
        return self.construct_kernel()

    def _use_fft(self, length: int) -> bool:
        return self.fft == 'always' or (self.fft == 'auto' and length >= CAUSAL_FFT_MIN_TAPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        self._last_length = length
        kernel = self.construct_kernel(length)
        kernel = kernel.to(x.dtype) if not torch.is_autocast_enabled() else kernel
        return causal_conv1d(x, kernel, self.bias, fft=self._use_fft(length))

    def extra_repr(self) -> str:
        return f'{self.in_channels}, {self.out_channels}, fft={self.fft}'


# the kernel length follows the input length (host data): leaves for FX
register_notrace_module(SirenCKConv)


def kernel_net_convs(model: nn.Module) -> List[nn.Module]:
    """Every convolution whose kernel a network samples (CKConv, FlexConv, SIREN CKConv): each has ``kernel_net``,
    ``fft``, ``bias`` and ``sampled_kernel()``."""
    return [m for m in model.modules() if isinstance(m, SirenCKConv)] + list(continuous_convs(model))
