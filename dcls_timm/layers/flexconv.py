"""Continuous-kernel convolutions: CKConv, FlexConv (MAGNet kernel x learned Gaussian mask), SeparableFlexConv.

The kernel is a function of coordinates on a ``[-1, 1]^dim`` grid of ``kernel_size`` points per axis. FlexConv
multiplies it by a Gaussian mask with learnable width (and centre) and crops the grid to where the mask exceeds 0.1,
so the kernel grows as the mask widens. The crop size is a host-side integer, so each forward reads the mask's
width (and centre) on the host: always current, whatever changed the parameters; on a GPU one small read per layer,
as in the authors' code.

Causal 1-D layers (``causal=True``, the CCNN sequence models, SPEC 8.1): the grid point +1 is lag 0 and -1 lag
``size - 1``; the mask's mean is a fixed buffer at +1 (only its width learns) and the kernel is cropped to the last
``n = ceil(size * ((1 - mu) + 2.146 sigma) / 2) + 1`` grid points (65 taps for 784 points at sigma 0.075); the input
is padded on the left only. ``kernel_size=-1`` samples the grid with as many points as the input is long.
FFT convolution (``fft='auto'``) for kernels of more than 50 taps; depthwise ones (CCNN): from 5 taps under autograd
and on inputs of 16 MiB and more, above 100 taps otherwise (whichever is faster on a CPU; the two paths agree to
float32 rounding). On a CPU the depthwise causal FFT convolution runs over chunks of a few samples.

``init='ccnn'`` (CCNN's kernel-network init, :mod:`.magnet`) also rescales the MAGNet output layer once by
``sqrt(1/n)`` (n: taps of the initial cropped kernel) at the first forward pass, guarded by the persistent
``initialized`` buffer so a loaded checkpoint never gets it again (a state dict without the buffer loads as
initialized).
"""
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from ._autograd import autograd_function_unsupported, differentiable_grads, functorch_transforms_active
from .fast_conv import fft_size
from .magnet import MAGNet, coordinate_grid
from .fused import eager_unhooked
from .pointwise import PointwiseConv1d, pointwise_conv, pointwise_matmul

__all__ = ['CKConv', 'FlexConv', 'SeparableFlexConv', 'fft_conv', 'causal_conv1d', 'affine_input_conv',
           'continuous_convs', 'set_kernel_resolution', 'anti_aliasing_loss', 'MASK_THRESHOLD']

MASK_THRESHOLD = 0.1
_MASK_RADIUS = math.sqrt(-2 * math.log(MASK_THRESHOLD))  # |x - mu| <= sigma * 2.146 where the mask exceeds 0.1
_SIGMA_EPS = 1e-4
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CAUSAL_FFT_MIN_TAPS = 51  # full causal 1-D kernels longer than 50 taps use the FFT path (fft='auto')
# depthwise causal kernels (CCNN 1-D): with autograd the FFT path (its backward written out) is faster from 5 taps up;
# without it too on large inputs (its chunks reuse memory where the direct convolution's padded copy and output are
# fresh pages: sMNIST inference at batch 100, 674 -> 533 ms), on smaller ones the direct convolution up to about 100
# taps (2 cores, [16, 140, 784])
DEPTHWISE_CAUSAL_FFT_MIN_TAPS = {'autograd': 5, 'inference': 101}
DEPTHWISE_CAUSAL_FFT_LARGE_INPUT = 16 << 20  # bytes from which inference takes the autograd threshold
# on a CPU the depthwise causal FFT convolution runs over chunks of samples whose spectra take about this many bytes:
# the transforms' buffers stay in cache and in memory the allocator reuses, where the transforms of a whole
# [100, 140, 784] batch fault some 90 MB of fresh pages in per call (``scripts/benchmark_cpu_memory.py``)
CAUSAL_FFT_CHUNK_BYTES = 4 << 20


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
    if x.numel() == 0:  # MKL's FFTs refuse empty batches; the direct convolution of nothing is free
        return _CONV_FNS[nd](x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype),
                             padding=[k // 2 for k in ks], groups=groups).to(x.dtype)
    full = [fft_size(n + k - 1) for n, k in zip(spatial, ks)]  # longer than the linear convolution: no aliasing
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


def _writes_allowed(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> bool:
    """Eager, without autograd or function transforms, on a non-empty input: where writing into fresh tensors
    (``out=``) is safe."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or x.numel() == 0:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or scale.requires_grad
                                    or shift.requires_grad):
        return False
    return not autograd_function_unsupported()


def _affine(x: torch.Tensor, input_affine: Tuple[torch.Tensor, torch.Tensor],
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x * scale + shift`` per channel (dim 1), in ``x``'s dtype; written into ``out`` if given."""
    scale, shift = input_affine
    view = [-1] + [1] * (x.dim() - 2)
    if out is None:
        return torch.addcmul(shift.to(x.dtype).view(view), x, scale.to(x.dtype).view(view))
    return torch.addcmul(shift.to(x.dtype).view(view), x, scale.to(x.dtype).view(view), out=out)


def _padded(x: torch.Tensor, left: int, right: int,
            input_affine: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """``F.pad(x * scale + shift, (left, right))`` with ``input_affine = (scale, shift)`` per channel: the affine
    map is written straight into the padded tensor, so a BatchNorm before a convolution costs no pass of its own."""
    if input_affine is None:
        return F.pad(x, (left, right))
    length = x.shape[-1]
    out = x.new_empty(list(x.shape[:-1]) + [left + length + right])
    out[..., :left].zero_()
    out[..., left + length:].zero_()
    _affine(x, input_affine, out=out[..., left:left + length])
    return out


def _add_border(y: torch.Tensor, correction: torch.Tensor, widths: List[int]) -> None:
    """``y += correction`` (broadcast over the batch) only within ``widths[d]`` of both ends of each spatial axis."""
    if any(2 * w >= n for w, n in zip(widths, y.shape[2:])):
        y.add_(correction)
        return
    for d, w in enumerate(widths):
        if w == 0:
            continue
        dim, n = d + 2, y.shape[d + 2]
        for start in (0, n - w):
            y.narrow(dim, start, w).add_(correction.narrow(dim, start, w))
        # the slabs just corrected are excluded from the next axes' strips
        y, correction = y.narrow(dim, w, n - 2 * w), correction.narrow(dim, w, n - 2 * w)


def affine_input_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: List[int],
                      groups: int, input_affine: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``F.convNd(x * scale + shift, weight, bias, padding=padding, groups=groups)`` (stride 1, zero padding) with no
    pass over ``x`` of its own, for ``input_affine = (scale, shift)`` per input channel (e.g. an eval BatchNorm).

    The kernel takes the scale; the shift, convolved with a constant map, is a per-channel constant wherever every
    tap lands inside the input and goes into the bias; within ``padding`` of the border, where taps land on the
    zero padding (which is not shifted), a correction map computed from one shift-only image is added in place.
    Float32 rounding against normalising first.
    """
    scale, shift = input_affine
    nd, (out_ch, per_group) = weight.dim() - 2, weight.shape[:2]
    if len(padding) != nd or x.shape[1] != per_group * groups or out_ch % groups:
        raise ValueError(f'affine_input_conv: input {list(x.shape)}, kernel {list(weight.shape)}, groups {groups} '
                         f'and padding {padding} do not match.')

    def per_tap(v: torch.Tensor) -> torch.Tensor:
        # weight[o, j] reads input channel (o // (out_ch // groups)) * per_group + j
        v = v.to(weight.dtype).view(groups, 1, per_group).expand(groups, out_ch // groups, per_group)
        return v.reshape([out_ch, per_group] + [1] * nd)

    conv = _CONV_FNS[nd]
    spatial = list(range(2, 2 + nd))
    interior = (weight * per_tap(shift)).sum([1] + spatial)
    y = conv(x, weight * per_tap(scale), interior if bias is None else bias + interior, padding=padding,
             groups=groups)
    shift_image = shift.to(weight.dtype).view([1, -1] + [1] * nd).expand([1, x.shape[1]] + list(x.shape[2:]))
    correction = conv(shift_image, weight, None, padding=padding, groups=groups) - interior.view([1, -1] + [1] * nd)
    # in y's memory layout (channels-last on CPU): mixed layouts make the strided strip adds several times slower
    _add_border(y, torch.empty_like(y[:1]).copy_(correction), padding)
    return y


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, groups: int = 1,
                  fft: bool = False, input_affine: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                  ) -> torch.Tensor:
    """Causal 1-D convolution ``out[t] = sum_i weight[..., i] * x[t - (n - 1 - i)] (+ bias)``, n the kernel length.

    The last kernel tap is lag 0 (the input is padded with ``n - 1`` zeros on the left), so the output at step t
    never depends on later steps. ``fft=True`` computes the same through FFTs (float32 at least); supports
    ``groups == 1`` and depthwise convolutions. ``input_affine = (scale, shift)`` (``[C_in]`` each) convolves
    ``x * scale[:, None] + shift[:, None]`` instead, e.g. an eval BatchNorm before the convolution: without autograd
    it is applied while the input is zero-padded, in the same pass.
    """
    n, length = weight.shape[-1], x.shape[-1]
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f'causal_conv1d: the input has {x.shape[1]} channels, the kernel takes '
                         f'{weight.shape[1] * groups}.')
    if input_affine is not None:
        # is_scripting() first: TorchScript (baked models) drops the branch below; it still compiles _writes_allowed,
        # which returns at its own is_scripting() before the checks TorchScript cannot compile
        if torch.jit.is_scripting() or not _writes_allowed(x, weight, input_affine[0], input_affine[1]):
            x = _affine(x, input_affine)  # in the input's dtype, as the padded route writes it
            input_affine = None
    if not fft:
        return F.conv1d(_padded(x, n - 1, 0, input_affine), weight, bias, groups=groups)
    dtype = torch.promote_types(x.dtype, torch.float32)
    if x.numel() == 0:  # MKL's FFTs refuse empty batches; the direct convolution of nothing is free
        return F.conv1d(F.pad(x.to(dtype), (n - 1, 0)), weight.to(dtype), None if bias is None else bias.to(dtype),
                        groups=groups).to(x.dtype)
    full = fft_size(length + n - 1)  # e.g. 784 steps and 784 taps: 1600, not the prime 1567 (2-4x faster FFTs)
    if groups == weight.shape[0] and weight.shape[1] == 1:  # depthwise
        if torch.jit.is_scripting():  # autograd.Function is not scriptable: the same forward, autograd's backward
            y = _depthwise_causal_fft(x.to(dtype), weight.to(dtype), full)[0]
        else:  # the bias is added chunk by chunk
            return _depthwise_causal_fft_conv(x.to(dtype), weight.to(dtype), full, input_affine,
                                              None if bias is None else bias.to(dtype)).to(x.dtype)
    elif groups == 1:
        X = torch.fft.rfft(_padded(x.to(dtype), 0, full - length, input_affine))
        K = torch.fft.rfft(weight.to(dtype).flip(-1), n=full)  # correlation with w = convolution with w flipped
        y = torch.fft.irfft(torch.einsum('bil,oil->bol', X, K), n=full)[..., :length]
    else:
        raise ValueError('causal_conv1d(fft=True) supports groups=1 and depthwise convolutions only.')
    if bias is not None:
        bias = bias.to(dtype).view(1, -1, 1)
        # y is fresh here: without autograd add in place (a new activation-sized tensor faults its pages in on CPU)
        y = y.add_(bias) if not (torch.is_grad_enabled() and (y.requires_grad or bias.requires_grad)) else y + bias
    return y.to(x.dtype)


def _depthwise_causal_fft(x: torch.Tensor, weight: torch.Tensor, size: int
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output of a depthwise causal FFT convolution, with the spectra of the input and the kernel."""
    X = torch.fft.rfft(x, n=size)
    K = torch.fft.rfft(weight[:, 0].flip(-1), n=size)  # correlation with w = convolution with w flipped
    return torch.fft.irfft(X * K, n=size)[..., :x.shape[-1]], X, K


def _batch_sum_of_products(a: torch.Tensor, b: torch.Tensor, accumulate: Optional[bool] = None,
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(a * b).sum(0)`` (added into ``out`` if given). ``accumulate`` (default: on CPU) adds the products up sample
    by sample in place, so no ``a``-sized product is materialised (2-3x faster on CPU than the product and sum, or
    an einsum, whose batched matmul has 1x1 outputs); elsewhere one fused kernel beats a launch per sample."""
    if not (a.device.type == 'cpu' if accumulate is None else accumulate):
        total = (a * b).sum(0)
        return total if out is None else out.add_(total)
    out = a.new_zeros(a.shape[1:]) if out is None else out
    for i in range(a.shape[0]):
        out.addcmul_(a[i], b[i])
    return out


def _chunk(x: torch.Tensor, size: int) -> int:
    """Samples per chunk of a depthwise causal FFT convolution of length ``size``: the whole batch off the CPU
    (one launch per transform), about ``CAUSAL_FFT_CHUNK_BYTES`` of spectra on it."""
    if x.device.type != 'cpu':
        return max(1, x.shape[0])
    per_sample = x.shape[1] * (size // 2 + 1) * 2 * x.element_size()
    return max(1, CAUSAL_FFT_CHUNK_BYTES // per_sample)


def _add_bias(y: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor) -> None:
    if bias is None:
        out.copy_(y)
    else:
        torch.add(y, bias.view(1, -1, 1), out=out)


class _DepthwiseCausalFFTConv(torch.autograd.Function):
    """Depthwise causal convolution ``[B, C, L] x [C, 1, n] -> [B, C, L]`` through FFTs of length ``size`` (at least
    ``L + n - 1``, so the circular convolution holds the linear one), with the backward written out: autograd's
    would zero-fill and copy the cropped gradient and run complex-to-complex FFTs, about twice the work. The
    gradients are circular cross-correlations: of the output gradient with the kernel (input) and with the input,
    summed over the batch in frequency space (kernel); the zero padding keeps both free of wrap-around. On a CPU
    forward and backward run over chunks of samples (:func:`_chunk`), each chunk's input spectrum kept for the
    kernel gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, size: int) -> torch.Tensor:
        K = torch.fft.rfft(weight[:, 0].flip(-1), n=size)  # correlation with w = convolution with w flipped
        need_x, need_w = ctx.needs_input_grad[:2]
        length, step = x.shape[-1], _chunk(x, size)
        y, spectra = (x.new_empty(x.shape) if step < x.shape[0] else None), []
        for i in range(0, x.shape[0], step):
            X = torch.fft.rfft(x[i:i + step], n=size)
            part = torch.fft.irfft(X * K if need_w else X.mul_(K), n=size)[..., :length]
            if y is None:
                y = part
            else:
                y[i:i + step].copy_(part)
            if need_w:
                # the kernel gradient sums G * conj(X) over the batch: keep conj(X), made in place (a lazily
                # conjugated operand would be copied whole in the backward)
                spectra.append(X.conj_physical_())
        # x and weight (references) serve a double backward
        ctx.save_for_backward(K if need_x else None, x, weight, *spectra)
        ctx.lengths = (length, weight.shape[-1], size, step)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        K, x, weight, *spectra = ctx.saved_tensors
        length, taps, size, step = ctx.lengths
        if torch.is_grad_enabled():  # create_graph: differentiable gradients, through the plain FFT ops
            return differentiable_grads(ctx, grad, (x, weight), lambda: _depthwise_causal_fft(x, weight, size)[0]) \
                + (None,)
        need_x, need_w = ctx.needs_input_grad[:2]
        grad_x = grad.new_empty(grad.shape) if need_x and step < grad.shape[0] else None
        spectrum = None
        for j, i in enumerate(range(0, grad.shape[0], step)):
            G = torch.fft.rfft(grad[i:i + step], n=size)
            if need_w:
                spectrum = _batch_sum_of_products(G, spectra[j], out=spectrum)
            if need_x:  # last use of G: in place, one spectrum-sized tensor fewer
                part = torch.fft.irfft(G.mul_(K.conj()), n=size)[..., :length]
                if grad_x is None:
                    grad_x = part
                else:
                    grad_x[i:i + step].copy_(part)
        grad_w = torch.fft.irfft(spectrum, n=size)[:, :taps].flip(-1).unsqueeze(1) if need_w else None
        return grad_x, grad_w, None


def _depthwise_causal_fft_conv(x: torch.Tensor, weight: torch.Tensor, size: int,
                               input_affine: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                               bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    # input_affine only comes here where causal_conv1d found writes allowed (x, weight, scale and shift need no
    # gradient): the branches without the autograd Function below
    # jit.trace cannot record a custom autograd.Function: traced graphs get the same forward, autograd's backward
    if torch.jit.is_tracing() or autograd_function_unsupported():
        y = _depthwise_causal_fft(x, weight, size)[0]
        return y if bias is None else y + bias.view(1, -1, 1)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        y = _DepthwiseCausalFFTConv.apply(x, weight, size)
        return y if bias is None else y + bias.view(1, -1, 1)
    if torch.is_grad_enabled() and bias is not None and bias.requires_grad:  # e.g. bias-only fine-tuning
        return _depthwise_causal_fft_conv(x, weight, size, input_affine) + bias.view(1, -1, 1)
    # nothing to save for a backward: the kernel's spectrum multiplies each chunk's in place, the affine map is
    # written while padding, the bias added while writing the output (one activation-sized tensor in all)
    length, step = x.shape[-1], _chunk(x, size)
    K = torch.fft.rfft(weight[:, 0].flip(-1), n=size)
    out = x.new_empty(x.shape)
    for i in range(0, x.shape[0], step):
        X = torch.fft.rfft(_padded(x[i:i + step], 0, size - length, input_affine))
        _add_bias(torch.fft.irfft(X.mul_(K), n=size)[..., :length], bias, out[i:i + step])
    return out


class _ContinuousConvNd(nn.Module):
    """A convolution whose kernel MAGNet generates on a coordinate grid, optionally masked and cropped."""
    # what the outputs depend on beyond the state dict (the grid built with and the one sampled on now, which
    # set_kernel_resolution changes, also before training): recorded in train.py checkpoints, checked when loading
    checkpoint_settings = ('train_kernel_size', 'kernel_size', 'causal')

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
            causal: bool = False,
            init: str = 'flexconv',
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim not in _CONV_FNS:
            raise ValueError(f'dim must be 1, 2 or 3, got {dim}.')
        if causal:
            if dim != 1:
                raise ValueError('causal=True needs dim=1.')
            if kernel_size < 1 and kernel_size != -1:
                raise ValueError(f'A causal kernel_size must be >= 1, or -1 (the input length), got {kernel_size}.')
        elif kernel_size < 1 or kernel_size % 2 == 0:
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
        self.causal = causal
        self._last_length: Optional[int] = None  # input length of the last forward (grid size when kernel_size=-1)
        self.kernel_net = MAGNet(dim, in_channels if depthwise else in_channels * out_channels, hidden,
                                 num_layers, omega_0=omega_0, mask_init=mask_init, init=init, causal=causal, **dd)
        self.has_mask = mask
        if mask:
            self.mask_sigma = nn.Parameter(torch.full((dim,), float(mask_init), **dd))
            if causal:  # fixed at the causal end: only the width learns
                self.register_buffer('mask_mean', torch.ones(dim, **dd))
            elif mask_learn_mean:
                self.mask_mean = nn.Parameter(torch.zeros(dim, **dd))
            else:
                self.register_buffer('mask_mean', torch.zeros(dim, **dd))
        self.bias = nn.Parameter(torch.zeros(out_channels, **dd)) if bias else None
        if init == 'ccnn':
            # the one-time output rescale of CCNN's init ("Chang init") is pending while this is 0
            self.register_buffer('initialized', torch.zeros((), dtype=torch.uint8, device=device))
            self._register_load_state_dict_pre_hook(_initialized_when_missing, with_module=True)
            if kernel_size > 0:
                # the initial crop is known now: rescale at once, so copies made before any forward pass (EMA,
                # bake_kernels, export) see the initialised model; input-length kernels wait for their first input
                self._finish_init(None)
        else:
            self.initialized = None

    # -- grid -----------------------------------------------------------------------------------------------------
    def grid_size(self, length: Optional[int] = None) -> Optional[int]:
        """Grid points per axis: ``kernel_size``, or for ``kernel_size=-1`` the input length (given, or the last
        forward's; None if neither)."""
        if self.kernel_size > 0:
            return self.kernel_size
        return length if length is not None else self._last_length

    def _causal_taps_from(self, size: int, sigma: float, mean: float) -> int:
        return min(size, int(math.ceil(size * ((1. - mean) + (abs(sigma) + _SIGMA_EPS) * _MASK_RADIUS) / 2. - 1e-6))
                   + 1)

    def causal_taps(self, length: Optional[int] = None) -> int:
        """Taps of the cropped causal kernel (the last grid points, nearest +1), from the mask (read on the host)."""
        size = self.grid_size(length)
        if size is None:
            raise RuntimeError('kernel_size=-1: the grid size follows the input; run a forward pass or give length.')
        if not self.has_mask or self.mask_sigma.device.type == 'meta':
            return size
        with torch.no_grad():
            sigma, mean = torch.cat([self.mask_sigma.detach(), self.mask_mean.detach()]).float().cpu().tolist()
        return self._causal_taps_from(size, sigma, mean)

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

    def kernel_sizes(self, length: Optional[int] = None) -> Tuple[int, ...]:
        """Sizes of the cropped kernel (a causal layer: its taps)."""
        if self.causal:
            return (self.causal_taps(length),)
        return tuple(2 * h + 1 for h in self.crop_half_widths())

    # -- kernel ---------------------------------------------------------------------------------------------------
    def causal_kernel(self, length: Optional[int] = None) -> torch.Tensor:
        """The cropped, masked causal kernel ``[C_out, C_in or 1, n]``: the last tap is lag 0 (grid point +1)."""
        size = self.grid_size(length)
        n = self.causal_taps(length)
        ref = self.kernel_net.output.weight
        coords = coordinate_grid([size], device=ref.device, dtype=ref.dtype)[size - n:]
        values = self.kernel_net(coords)  # [n, out * in] or [n, in]
        kernel = values.t().reshape(self.out_channels, 1 if self.depthwise else self.in_channels, n)
        if self.has_mask:
            sigma = self.mask_sigma.abs() + _SIGMA_EPS
            kernel = kernel * torch.exp(-0.5 * ((coords[:, 0] - self.mask_mean[0]) / sigma[0]) ** 2)
        return kernel

    def construct_kernel(self, length: Optional[int] = None) -> torch.Tensor:
        """The (cropped, masked, resolution-scaled) kernel ``[C_out, C_in or 1, *sizes]``, to be used with
        symmetric ``size // 2`` padding (what ``bake_kernels`` does). A causal layer returns its n taps followed by
        ``n - 1`` zeros (the future side), so a plain centred convolution computes the causal one;
        :meth:`causal_kernel` gives the n taps alone."""
        if self.causal:
            kernel = self.causal_kernel(length)
            return F.pad(kernel, (0, kernel.shape[-1] - 1))
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

    def sampled_kernel(self) -> torch.Tensor:
        """The kernel the last forward pass convolved with (cropped and masked; causal: its taps alone), rebuilt
        from the current parameters. Input-length kernels need a forward pass first."""
        return self.causal_kernel() if self.causal else self.construct_kernel()

    def direct_kernel(self) -> Optional[torch.Tensor]:
        """The kernel a non-causal forward pass convolves with directly (centred, ``size // 2`` padding); None for a
        causal layer, one that takes the FFT path, or a CCNN init still pending."""
        if self.causal or (self.initialized is not None and not bool(self.initialized)) \
                or self._use_fft(self.kernel_sizes()):  # decided before building: FFT-sized kernels are built once
            return None
        return self.construct_kernel()

    def _use_fft(self, sizes: Sequence[int], autograd: Optional[bool] = None, input_bytes: int = 0) -> bool:
        """Whether a kernel of these sizes takes the FFT path; ``autograd`` (default: grad mode is on) and the
        input's size in bytes matter for depthwise causal kernels."""
        if self.fft != 'auto':
            return self.fft == 'always'
        if self.causal and self.depthwise:
            autograd = torch.is_grad_enabled() if autograd is None else autograd
            large = input_bytes >= DEPTHWISE_CAUSAL_FFT_LARGE_INPUT
            return sizes[0] >= DEPTHWISE_CAUSAL_FFT_MIN_TAPS['autograd' if autograd or large else 'inference']
        if self.causal:
            return sizes[0] >= CAUSAL_FFT_MIN_TAPS
        return math.prod(sizes) >= (23 ** 2 if self.dim == 2 else 23 if self.dim == 1 else 9 ** 3)

    def _finish_init(self, length: Optional[int]) -> None:
        """CCNN init: rescale the MAGNet output layer once by ``sqrt(1 / fan_in)`` of the initial cropped kernel."""
        if self.initialized is None or self.initialized.device.type == 'meta' or bool(self.initialized):
            return
        fan_in = math.prod(self.kernel_sizes(length)) * (1 if self.depthwise else self.in_channels)
        with torch.no_grad():
            self.kernel_net.output.weight.mul_(math.sqrt(1. / fan_in))
            self.initialized.fill_(1)

    def _in_dtype_of(self, x: torch.Tensor, kernel: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Kernel and bias in the input's dtype (autocast chooses its own), so every path takes any float input."""
        if torch.is_autocast_enabled():
            return kernel, self.bias
        return kernel.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)

    def forward(self, x: torch.Tensor, input_affine: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                skip_bias: bool = False) -> torch.Tensor:
        """Convolve ``x``, or with ``input_affine = (scale, shift)`` (``[C_in]`` each, e.g. an eval BatchNorm's)
        ``x * scale + shift`` per channel: without autograd, causal layers apply it while padding their input and
        direct (non-FFT) non-causal ones fold it into the kernel (:func:`affine_input_conv`), with no pass of its
        own. ``skip_bias=True`` leaves the bias out (a caller that adds it elsewhere)."""
        length = x.shape[-1] if self.causal else None
        self._last_length = length
        self._finish_init(length)
        groups = self.in_channels if self.depthwise else 1
        if self.causal:
            kernel = self.causal_kernel(length)
            kernel, bias = self._in_dtype_of(x, kernel)
            return causal_conv1d(x, kernel, None if skip_bias else bias, groups, input_affine=input_affine,
                                 fft=self._use_fft(kernel.shape[2:], input_bytes=x.numel() * x.element_size()))
        kernel = self.construct_kernel()
        fft = self._use_fft(kernel.shape[2:])
        if input_affine is not None:
            # without autograd the direct route folds it into the kernel and bias (affine_input_conv): no pass
            if torch.jit.is_scripting() or fft or not _writes_allowed(x, kernel, input_affine[0], input_affine[1]):
                x = _affine(x, input_affine)
                input_affine = None
        if fft:
            return fft_conv(x, kernel, None if skip_bias else self.bias, groups)
        if self.dim == 2 and x.device.type == 'cpu' and not functorch_transforms_active():
            # CPU convolutions (oneDNN) run 1.3-3x faster, forward and backward, on channels-last tensors; the
            # output stays channels-last, so the next layer pays no conversion (vmap cannot query the layout)
            x = x.contiguous(memory_format=torch.channels_last)
        kernel, bias = self._in_dtype_of(x, kernel)
        bias = None if skip_bias else bias
        padding = [s // 2 for s in kernel.shape[2:]]
        if input_affine is not None:
            return affine_input_conv(x, kernel, bias, padding, groups, input_affine)
        return _CONV_FNS[self.dim](x, kernel, bias, padding=padding, groups=groups)

    def extra_repr(self) -> str:
        return (f'{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, dim={self.dim}, '
                f'depthwise={self.depthwise}, mask={self.has_mask}, fft={self.fft}'
                + (', causal=True' if self.causal else '') + (", init='ccnn'" if self.initialized is not None else ''))


def _initialized_when_missing(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
    """A state dict saved before the ``initialized`` buffer existed holds trained (or already rescaled) weights."""
    key = prefix + 'initialized'
    if key not in state_dict and module.initialized is not None:
        state_dict[key] = torch.ones((), dtype=torch.uint8)


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
        self.pointwise = pointwise_conv(dim, in_channels, out_channels, bias=bias, **dd)

    @torch.jit.unused
    def _bias_folded(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Sequences on CPU: the depthwise bias carried through the pointwise conv into its bias
        (``W @ b_depthwise + b_pointwise``), so no activation-sized bias add, forward or backward (float32 rounding;
        gradients reach both biases through the fold). None where a hook could see the unbiased output, and for a
        baked model's depthwise conv (a plain convolution module)."""
        depthwise, pointwise = self.depthwise, self.pointwise
        if not isinstance(depthwise, FlexConv) or depthwise.bias is None or type(pointwise) is not PointwiseConv1d \
                or not pointwise._matmul_path(x) or not eager_unhooked(x, (self,)):
            return None
        weight = pointwise.weight[..., 0]
        # one dtype throughout: the module path casts between layers of different dtypes, the fold would mix them
        if any(t.dtype != x.dtype for t in (weight, depthwise.bias) + (() if pointwise.bias is None
                                                                          else (pointwise.bias,))):
            return None
        bias = weight @ depthwise.bias if pointwise.bias is None else torch.addmv(pointwise.bias, weight,
                                                                                   depthwise.bias)
        return pointwise_matmul(depthwise(x, skip_bias=True), weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            folded = self._bias_folded(x)
            if folded is not None:
                return folded
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
    images); kernel values are scaled by ``((train_size - 1) / (kernel_size - 1))^dim``. Causal 1-D layers are left
    as they are. Returns the count of layers changed."""
    if kernel_size < 3 or kernel_size % 2 == 0:  # one point has no spacing to scale by
        raise ValueError(f'kernel_size must be odd and >= 3, got {kernel_size}.')
    layers = [m for m in continuous_convs(model) if not m.causal]  # causal 1-D grids follow the sequence length
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
        size = m.grid_size()
        if size is None:  # kernel_size=-1 before any forward pass: no grid yet
            continue
        nyquist = (size - 1) / 4
        terms.append(torch.relu(freqs - nyquist / n).square().sum())
    if not terms:
        return torch.zeros(())
    return factor * torch.stack(terms).sum()
