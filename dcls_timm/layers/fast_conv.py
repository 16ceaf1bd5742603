"""Large-kernel depthwise convolution with a cheaper weight gradient on CPU.

On CPU, PyTorch's large-kernel depthwise convolution is far faster on channels-last tensors than on contiguous
ones, and its weight gradient costs many times the forward pass. Here the forward and the input gradient (a
convolution with the flipped kernel) run channels-last, and the weight gradient is the cross-correlation of the
input with the output gradient, computed through FFTs (no padding: only long enough that the wanted lags do not
alias, at sizes with factors 2, 3, 5) and summed over the batch in the frequency domain. Values and all gradients
equal ``F.conv2d`` to float32 rounding.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._autograd import autograd_function_unsupported

__all__ = ['depthwise_conv2d', 'use_fast_depthwise', 'fft_size']


def use_fast_depthwise(x: torch.Tensor, weight: torch.Tensor, stride: Tuple[int, int], groups: int) -> bool:
    """The fast path applies to CPU float32/64 depthwise 2-D convs with stride 1 and kernels of 7x7 or more, outside
    autocast (which would run its forward in lower precision and hand its backward mixed dtypes)."""
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


def _fft_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: Tuple[int, int],
                     padding: Tuple[int, int]) -> torch.Tensor:
    """``grad_w[c, i, j] = sum_{b, y, x} g[b, c, y, x] * x_padded[b, c, y + i, x + j]``: a circular
    cross-correlation of the unpadded input with the output gradient at lags ``i - padding``, summed over the batch
    in frequency space. The FFT only needs to be long enough that no wanted lag aliases with another."""
    if x.numel() == 0:  # MKL's FFTs refuse empty batches; an empty batch has nothing to correlate
        return x.new_zeros(x.shape[1], 1, *kernel_size)
    sizes, lags = [], []
    for n, k, p in zip(x.shape[-2:], kernel_size, padding):
        size = fft_size(n + max(p, k - 1 - p))
        sizes.append(size)
        lags.append((torch.arange(k, device=x.device) - p) % size)
    X = torch.fft.rfft2(x.contiguous(), s=sizes)
    X.mul_(torch.fft.rfft2(grad_out.contiguous(), s=sizes).conj_physical_())  # in place: no third spectrum
    corr = torch.fft.irfft2(X.sum(0), s=sizes)
    return corr[:, lags[0]][:, :, lags[1]].unsqueeze(1)


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
            grad_w = _fft_weight_grad(x, grad_out, (kh, kw), (ph, pw))
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
