"""Continuous-kernel convolutions: CKConv, FlexConv (MAGNet kernel x learned Gaussian mask), SeparableFlexConv.

The kernel is a function of coordinates on a ``[-1, 1]^dim`` grid of ``kernel_size`` points per axis. FlexConv
multiplies it by a Gaussian mask with learnable width (and centre) and crops the grid to where the mask exceeds 0.1,
so the kernel grows as the mask widens. The crop size is a host-side integer, so each forward reads the mask's
width (and centre) on the host: always current, whatever changed the parameters; on a GPU one small read per layer,
as in the authors' code.
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from .magnet import MAGNet, coordinate_grid

__all__ = ['CKConv', 'FlexConv', 'SeparableFlexConv', 'fft_conv', 'continuous_convs',
           'set_kernel_resolution', 'anti_aliasing_loss', 'MASK_THRESHOLD']

MASK_THRESHOLD = 0.1
_MASK_RADIUS = math.sqrt(-2 * math.log(MASK_THRESHOLD))  # |x - mu| <= sigma * 2.146 where the mask exceeds 0.1
_SIGMA_EPS = 1e-4
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_FNS_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def fft_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
             groups: int = 1) -> torch.Tensor:
    """``F.convNd(x, weight, bias, padding=k // 2, groups=groups)`` for odd kernels, through FFTs.

    Supports ``groups == 1`` and depthwise (``groups == C_in == C_out``). Computed in float32 at least.
    """
    nd = weight.dim() - 2
    dims = tuple(range(2, 2 + nd))
    ks, spatial = weight.shape[2:], x.shape[2:]
    if any(k % 2 == 0 for k in ks):
        raise ValueError('fft_conv needs odd kernel sizes.')
    dtype = torch.promote_types(x.dtype, torch.float32)
    full = [n + k - 1 for n, k in zip(spatial, ks)]
    X = torch.fft.rfftn(x.to(dtype), s=full, dim=dims)
    K = torch.fft.rfftn(weight.to(dtype).flip(dims), s=full, dim=dims)  # correlation = convolution, flipped
    if groups == 1:
        Y = torch.einsum('bi...,oi...->bo...', X, K)
    elif groups == x.shape[1] == weight.shape[0] and weight.shape[1] == 1:
        Y = X * K[:, 0].unsqueeze(0)
    else:
        raise ValueError('fft_conv supports groups=1 and depthwise convolutions only.')
    y = torch.fft.irfftn(Y, s=full, dim=dims)
    for d, (n, k) in zip(dims, zip(spatial, ks)):
        y = y.narrow(d, (k - 1) - k // 2, n)
    if bias is not None:
        y = y + bias.to(dtype).view(1, -1, *([1] * nd))
    return y.to(x.dtype)


class _ContinuousConvNd(nn.Module):
    """A convolution whose kernel MAGNet generates on a coordinate grid, optionally masked and cropped."""

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_size: int = 33,
            dim: int = 2,
            depthwise: bool = False,
            hidden: int = 32,
            num_layers: int = 3,
            omega_0: float = 25.6,
            mask: bool = True,
            mask_init: float = 0.075,
            mask_learn_mean: bool = True,
            bias: bool = True,
            fft: str = 'auto',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim not in _CONV_FNS:
            raise ValueError(f'dim must be 1, 2 or 3, got {dim}.')
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f'kernel_size (grid points per axis) must be odd and >= 1, got {kernel_size}.')
        if depthwise and in_channels != out_channels:
            raise ValueError('A depthwise continuous conv needs in_channels == out_channels.')
        if fft not in ('auto', 'always', 'never'):
            raise ValueError(f"fft must be 'auto', 'always' or 'never', got {fft!r}.")
        self.in_channels, self.out_channels, self.dim = in_channels, out_channels, dim
        self.depthwise = depthwise
        self.kernel_size = kernel_size  # grid the kernel is sampled on now
        self.train_kernel_size = kernel_size  # grid it was trained on (kernel values scale with the ratio)
        self.fft = fft
        self.kernel_net = MAGNet(dim, in_channels if depthwise else in_channels * out_channels, hidden,
                                 num_layers, omega_0=omega_0, mask_init=mask_init, **dd)
        self.has_mask = mask
        if mask:
            self.mask_sigma = nn.Parameter(torch.full((dim,), float(mask_init), **dd))
            if mask_learn_mean:
                self.mask_mean = nn.Parameter(torch.zeros(dim, **dd))
            else:
                self.register_buffer('mask_mean', torch.zeros(dim, **dd))
        self.bias = nn.Parameter(torch.zeros(out_channels, **dd)) if bias else None

    # -- cropping -------------------------------------------------------------------------------------------------
    def _half_widths_from(self, sigma: Sequence[float], mean: Sequence[float]) -> Tuple[int, ...]:
        full = (self.kernel_size - 1) // 2
        step = 2. / (self.kernel_size - 1) if self.kernel_size > 1 else 1.
        # symmetric about the centre, so the cropped kernel stays odd and centred
        return tuple(min(full, int(math.floor((abs(m) + (abs(s) + _SIGMA_EPS) * _MASK_RADIUS) / step + 1e-6)))
                     for s, m in zip(sigma, mean))

    def crop_half_widths(self) -> Tuple[int, ...]:
        """Half sizes of the cropped kernel per axis, from the mask's current parameters (read on the host)."""
        full = ((self.kernel_size - 1) // 2,) * self.dim
        if not self.has_mask or self.mask_sigma.device.type == 'meta':  # meta tensors have no values to crop by
            return full
        with torch.no_grad():
            values = torch.cat([self.mask_sigma.detach(), self.mask_mean.detach()]).float().cpu().tolist()
        return self._half_widths_from(values[:self.dim], values[self.dim:])

    def kernel_sizes(self) -> Tuple[int, ...]:
        return tuple(2 * h + 1 for h in self.crop_half_widths())

    # -- kernel ---------------------------------------------------------------------------------------------------
    def construct_kernel(self) -> torch.Tensor:
        """The (cropped, masked, resolution-scaled) kernel ``[C_out, C_in or 1, *sizes]``."""
        half = self.crop_half_widths()
        ref = self.kernel_net.output.weight
        full = coordinate_grid([self.kernel_size], device=ref.device, dtype=ref.dtype)[:, 0]
        centre = (self.kernel_size - 1) // 2
        axes = [full[centre - h:centre + h + 1] for h in half]
        coords = torch.stack(torch.meshgrid(*axes, indexing='ij'), dim=-1).reshape(-1, self.dim)
        values = self.kernel_net(coords)  # [N, out * in] or [N, in]
        sizes = [len(a) for a in axes]
        shape = (self.out_channels, 1 if self.depthwise else self.in_channels, *sizes)
        kernel = values.t().reshape(shape)
        if self.has_mask:
            sigma = self.mask_sigma.abs() + _SIGMA_EPS
            mask = None
            for d, a in enumerate(axes):
                m = torch.exp(-0.5 * ((a - self.mask_mean[d]) / sigma[d]) ** 2)
                view = [1] * self.dim
                view[d] = -1
                m = m.view(view)
                mask = m if mask is None else mask * m
            kernel = kernel * mask
        if self.kernel_size != self.train_kernel_size:
            # the same continuous kernel on a finer grid sums over more taps: keep the response
            kernel = kernel * ((self.train_kernel_size - 1) / (self.kernel_size - 1)) ** self.dim
        return kernel

    def _use_fft(self, sizes: Sequence[int]) -> bool:
        if self.fft != 'auto':
            return self.fft == 'always'
        return math.prod(sizes) >= (23 ** 2 if self.dim == 2 else 23 if self.dim == 1 else 9 ** 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.construct_kernel()
        groups = self.in_channels if self.depthwise else 1
        if self._use_fft(kernel.shape[2:]):
            return fft_conv(x, kernel, self.bias, groups)
        return _CONV_FNS[self.dim](x, kernel.to(x.dtype) if not torch.is_autocast_enabled() else kernel, self.bias,
                                   padding=[s // 2 for s in kernel.shape[2:]], groups=groups)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, dim={self.dim}, '
                f'depthwise={self.depthwise}, mask={self.has_mask}, fft={self.fft}')


class CKConv(_ContinuousConvNd):
    """Continuous-kernel convolution: MAGNet kernel over the whole grid, no mask."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 33, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, mask=False, **kwargs)


class FlexConv(_ContinuousConvNd):
    """FlexConv: MAGNet kernel times a learnable Gaussian mask, cropped where the mask is below 0.1.

    Parameters of a 2-D FlexConv with hidden width 32: ``4,068 + 33 * C_in * C_out + C_out``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 33, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, mask=True, **kwargs)


class SeparableFlexConv(nn.Module):
    """Depthwise FlexConv (MAGNet outputs one kernel per input channel) followed by a pointwise conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 33, dim: int = 2,
                 bias: bool = True, device=None, dtype=None, **kwargs):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.depthwise = FlexConv(in_channels, in_channels, kernel_size, dim=dim, depthwise=True, **dd, **kwargs)
        self.pointwise = _CONV_FNS_MODULES[dim](in_channels, out_channels, 1, bias=bias, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))



# The cropped kernel size is host-side data: FX cannot trace through it, so the layers are leaves for timm's FX
# feature extraction.
for _cls in (_ContinuousConvNd, CKConv, FlexConv):
    register_notrace_module(_cls)


def continuous_convs(model: nn.Module) -> List[_ContinuousConvNd]:
    """All CKConv/FlexConv layers of a model (depthwise parts of separable ones included)."""
    return [m for m in model.modules() if isinstance(m, _ContinuousConvNd)]


def set_kernel_resolution(model: nn.Module, kernel_size: int) -> int:
    """Sample every continuous kernel on a ``kernel_size`` grid (e.g. 33 for a model trained at 17 on half-size
    images); kernel values are scaled by ``((train_size - 1) / (kernel_size - 1))^dim``. Returns the layer count."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f'kernel_size must be odd and >= 1, got {kernel_size}.')
    layers = continuous_convs(model)
    for m in layers:
        m.kernel_size = kernel_size
    return len(layers)


def anti_aliasing_loss(model: nn.Module, factor: float = 0.1, target: str = 'gabor+mask') -> torch.Tensor:
    """Penalty on kernel frequencies above the grid's Nyquist frequency ``(k - 1) / 4``.

    Each of the ``L + 1`` Gabor filters gets ``1 / (L + 1)`` of the Nyquist budget (MAGNet frequencies add up);
    with ``target='gabor+mask'`` the mask's ``max(1 / sigma) * 2 / (2 pi)`` is spread over the filters too.
    """
    if target not in ('gabor', 'gabor+mask'):
        raise ValueError(f"target must be 'gabor' or 'gabor+mask', got {target!r}.")
    terms = []
    for m in continuous_convs(model):
        freqs = m.kernel_net.filter_frequencies()
        n = freqs.numel()
        if target == 'gabor+mask' and m.has_mask:
            freqs = freqs + (1. / (m.mask_sigma.abs() + _SIGMA_EPS)).max() * 2 / (2 * math.pi) / n
        nyquist = (m.kernel_size - 1) / 4
        terms.append(torch.relu(freqs - nyquist / n).square().sum())
    if not terms:
        return torch.zeros(())
    return factor * torch.stack(terms).sum()
