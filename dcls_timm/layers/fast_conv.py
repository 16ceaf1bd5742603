"""Large-kernel depthwise convolution with a cheaper weight gradient on CPU.

On CPU, PyTorch's large-kernel depthwise convolution is far faster on channels-last tensors than on contiguous
ones, and its weight gradient costs many times the forward pass. Here the forward and the input gradient (a
convolution with the flipped kernel) run channels-last, and the weight gradient is the cross-correlation of the
input with the output gradient, summed over the batch in the frequency domain: transforms only long enough that
the wanted lags do not alias (FFTs at sizes with factors 2, 3, 5; on small maps, DFTs as matrix products, which
beat FFT calls there), and only at the lags that reach the input (a kernel wider than twice the map has exactly
zero gradient outside). Values and all gradients equal ``F.conv2d`` to float32 rounding.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._autograd import autograd_function_unsupported

__all__ = ['depthwise_conv2d', 'use_fast_depthwise', 'fft_size']


def use_fast_depthwise(x: torch.Tensor, weight: torch.Tensor, stride: Tuple[int, int], groups: int,
                       padding: Optional[Sequence[int]] = None) -> bool:
    """The fast path applies to CPU float32/64 depthwise 2-D convs with stride 1 and kernels of 7x7 or more, outside
    autocast (which would run its forward in lower precision and hand its backward mixed dtypes), with ``padding``
    (if given) at most ``kernel_size - 1`` per axis: wider zero padding only adds rows of zeros, which
    ``F.conv2d`` handles."""
    if padding is not None and any(p > k - 1 for p, k in zip(padding, weight.shape[-2:])):
        return False
    if x.device.type != 'cpu' or x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
        return False
    if torch.is_autocast_enabled('cpu') or autograd_function_unsupported():
        return False
    if x.dim() != 4 or tuple(stride) != (1, 1) or not (groups == x.shape[1] == weight.shape[0]) or weight.shape[1] != 1:
        return False
    return weight.shape[-2] * weight.shape[-1] >= 49


def _conv_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        padding: Tuple[int, int]) -> torch.Tensor:
    """Stride-1 depthwise ``F.conv2d`` on channels-last ``x``. oneDNN (torch 2.14's) runs kernels 11-13 taps wide
    with an implementation 2-3x slower than the one it uses from 14 taps on (a 13x13 kernel takes longer than a 15x15
    one at every ConvNeXt stage shape), so float32 kernels of those widths get zero columns on both sides up to 14-15
    taps, with the padding widened to match: the same sums plus exact zeros."""
    kw = weight.shape[-1]
    if x.dtype == torch.float32 and 11 <= kw <= 13:
        extra = (15 - kw) // 2 if kw % 2 else 1
        weight = F.pad(weight, (extra, extra))
        padding = (padding[0], padding[1] + extra)
    return F.conv2d(x.contiguous(memory_format=torch.channels_last), weight, bias, 1, padding, 1, x.shape[1])


def fft_size(n: int) -> int:
    """Smallest size >= n with only the factors 2, 3 and 5: FFTs of prime lengths are several times slower."""
    # written for TorchScript too (causal_conv1d of baked models calls it): no //=, one return after the loop
    rest = 0
    while rest != 1:
        rest = n
        for p in (2, 3, 5):
            while rest % p == 0:
                rest = rest // p
        if rest != 1:
            n += 1
    return n


def _weight_grad_lags(n: int, k: int, p: int) -> Tuple[int, int]:
    """The lags ``l = tap - p`` of the weight gradient along an axis of ``n`` input samples that can be non-zero:
    ``grad[l] = sum_y g[y] * x[y + l]`` over the ``n + 2p - k + 1`` outputs ``y`` needs some ``0 <= y + l < n``.
    Taps outside (e.g. beyond 13 of a 23-tap kernel over a 7-wide map with 'same' padding) have an exactly zero
    gradient and are not computed."""
    return max(-p, -(n + 2 * p - k)), min(k - 1 - p, n - 1)


def _transform_size(n: int, out: int, lags: Tuple[int, int]) -> int:
    """Shortest circular correlation of ``n`` inputs with ``out`` output gradients in which no wanted lag aliases
    with another non-zero one (those lie in ``[1 - out, n - 1]``)."""
    lo, hi = lags
    return max(n - lo, hi + out)


def _dft_matrix(n: int, lags: torch.Tensor, size: int, sign: float, dtype: torch.dtype) -> torch.Tensor:
    """``exp(sign * 2 pi i * m * lag / size)`` for ``m < n`` (rows) and the given lags (columns), built in float64."""
    m = torch.arange(n, device=lags.device, dtype=torch.float64)[:, None] * lags.to(torch.float64)[None]
    return torch.polar(torch.ones_like(m), (sign * 2 * math.pi / size) * m).to(dtype)


def _correlation_spectra(x: torch.Tensor, sizes: Tuple[int, int], complex_dtype: torch.dtype) -> torch.Tensor:
    """The half 2-D spectra ``[B, C, size_w // 2 + 1, size_h]`` (note the axis order) of ``x`` zero-padded to
    ``sizes``, as two matrix products with DFT matrices: for maps this small, many times faster than FFT calls."""
    B, C, H, W = x.shape
    (nh, nw), fw = sizes, sizes[1] // 2 + 1
    ew = _dft_matrix(W, torch.arange(fw, device=x.device), nw, -1., complex_dtype)  # [W, fw]
    eh = _dft_matrix(H, torch.arange(nh, device=x.device), nh, -1., complex_dtype)  # [H, nh]
    rows = x.contiguous().view(B * C * H, W) @ torch.view_as_real(ew).reshape(W, 2 * fw)  # real in, interleaved out
    rows = torch.view_as_complex(rows.view(B * C, H, fw, 2)).transpose(1, 2)
    return (rows @ eh).view(B, C, fw, nh)


def _dft_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, lags: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """The weight gradient at ``lags`` (inclusive ranges per axis) through DFTs written as matrix products."""
    (lo_h, hi_h), (lo_w, hi_w) = lags
    sizes = tuple(_transform_size(n, m, lag) for n, m, lag in zip(x.shape[-2:], grad_out.shape[-2:], lags))
    nh, nw = sizes
    fw = nw // 2 + 1
    cdtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
    X = _correlation_spectra(x, sizes, cdtype)
    X.mul_(_correlation_spectra(grad_out, sizes, cdtype).conj_physical_())
    P = X.sum(0)  # [C, fw, nh]
    C, dev = P.shape[0], x.device
    # inverse transform at the wanted lags only; the half spectrum counts twice except its self-conjugate columns
    ih = _dft_matrix(nh, torch.arange(lo_h, hi_h + 1, device=dev), nh, 1., cdtype)  # [nh, kh']
    scale = torch.full((fw, 1), 2. / (nh * nw), dtype=torch.float64, device=dev)
    scale[0] /= 2
    if nw % 2 == 0:
        scale[-1] /= 2
    iw = scale * _dft_matrix(fw, torch.arange(lo_w, hi_w + 1, device=dev), nw, 1., torch.complex128)  # [fw, kw']
    iw = torch.stack((iw.real, -iw.imag), 1).reshape(2 * fw, -1).to(x.dtype)  # Re(q @ iw) as one real product
    q = (P @ ih).transpose(1, 2).contiguous()  # [C, kh', fw]
    return (torch.view_as_real(q).reshape(-1, 2 * fw) @ iw).view(C, hi_h - lo_h + 1, hi_w - lo_w + 1)


def _fft_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, lags: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """The weight gradient at ``lags`` (inclusive ranges per axis) through FFTs."""
    sizes, index = [], []
    for n, m, (lo, hi) in zip(x.shape[-2:], grad_out.shape[-2:], lags):
        size = fft_size(_transform_size(n, m, (lo, hi)))
        sizes.append(size)
        index.append(torch.arange(lo, hi + 1, device=x.device) % size)
    X = torch.fft.rfft2(x.contiguous(), s=sizes)
    X.mul_(torch.fft.rfft2(grad_out.contiguous(), s=sizes).conj_physical_())  # in place: no third spectrum
    corr = torch.fft.irfft2(X.sum(0), s=sizes)
    return corr[:, index[0]][:, :, index[1]]


# maps up to this many pixels take the DFT-matrix weight gradient (ConvNeXt's 14x14 and 7x7 stages), larger ones
# the FFT: `scripts/benchmark_kernels.py --conv` times both (its FFT-only column); the two are about even at 28x28
DFT_MAX_PIXELS = 400


def _weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: Tuple[int, int],
                 padding: Tuple[int, int]) -> torch.Tensor:
    """``grad_w[c, i, j] = sum_{b, y, x} g[b, c, y, x] * x_padded[b, c, y + i, x + j]``: the cross-correlation of
    the unpadded input with the output gradient at lags ``i - padding``, summed over the batch in frequency space,
    with transforms only long enough that no wanted lag aliases with another."""
    if x.numel() == 0:  # MKL's FFTs refuse empty batches; an empty batch has nothing to correlate
        return x.new_zeros(x.shape[1], 1, *kernel_size)
    lags = [_weight_grad_lags(n, k, p) for n, k, p in zip(x.shape[-2:], kernel_size, padding)]
    small = x.shape[-2] * x.shape[-1] <= DFT_MAX_PIXELS
    grad = (_dft_weight_grad if small else _fft_weight_grad)(x, grad_out, lags)
    # taps that reach no input sample: exact zeros around the computed lags
    (lo_h, hi_h), (lo_w, hi_w) = lags
    (kh, kw), (ph, pw) = kernel_size, padding
    grad = F.pad(grad, (lo_w + pw, kw - 1 - pw - hi_w, lo_h + ph, kh - 1 - ph - hi_h))
    return grad.unsqueeze(1)


class _DepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        return _conv_channels_last(x, weight, bias, padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        ph, pw = ctx.padding
        kh, kw = weight.shape[-2:]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # a transposed stride-1 conv is a conv with the flipped kernel and the complementary padding
            grad_x = _conv_channels_last(grad_out, weight.flip(-2, -1), None, (kh - 1 - ph, kw - 1 - pw))
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(x, grad_out, (kh, kw), (ph, pw))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     padding: Tuple[int, int]) -> torch.Tensor:
    """Stride-1 depthwise ``F.conv2d`` with symmetric zero ``padding``: channels-last forward and input gradient,
    FFT weight gradient. The output is channels-last."""
    if any(p > k - 1 for p, k in zip(padding, weight.shape[-2:])):
        raise ValueError('padding must be at most kernel_size - 1.')
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return _conv_channels_last(x, weight, bias, padding)
    return _DepthwiseConv2d.apply(x, weight, bias, tuple(padding))
