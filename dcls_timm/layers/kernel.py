"""Construction of dense DCLS kernels.

Every DCLS interpolation is a product of 1-D profiles, one per spatial axis, so the dense kernel of each filter is
``sum_k w_k * prof_0[:, k] (x) prof_1[:, k] (x) ...``. Built as a batched matmul of the 1-D profiles it needs
``O(C_out * C_in/g * K * sum(D))`` memory instead of the ``prod(D) * K`` per filter that a direct construction
materialises. In 2-D (every model here) the bilinear versions go further: an element touches 4 taps, so the kernel
is a scatter of ``4 K`` values per filter, whatever the grid size; the Gaussian one is the matmul. Both 2-D paths
have hand-written backward passes that recompute what they need from the parameters, so nothing larger than the
parameters is kept for backward.

A ``window`` restricts the construction to a sub-grid: with ``v0``/``v1`` an element only touches (and only gets
gradient from) the two taps around it per axis, so every tap outside the window spanned by the positions is exactly
zero and the kernel can be built, and convolved, at that size. Gaussian profiles are zero below ``_GAUSS_FLOOR``
(1e-12 of their peak), i.e. beyond ``GAUSS_RADIUS`` (7.43) widths of their position, so a Gaussian kernel is exactly
zero outside the positions' span widened by that radius, and its window is exact too (normalised over the whole
grid, as without a window).
"""
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .derived_cache import DerivedCache
from ._autograd import autograd_function_unsupported, differentiable_grads

__all__ = ['DCLS_VERSIONS', 'SIG_OFFSET', 'SIG_INIT', 'GAUSS_RADIUS', 'construct_kernel', 'interpolation_profiles',
           'position_window']

DCLS_VERSIONS = ('v0', 'v1', 'gauss')
SIG_OFFSET = 0.27  # sigma = |SIG| + SIG_OFFSET keeps the Gaussian at least ~one tap wide
SIG_INIT = 0.23  # sigma = 0.5 at init
_NORM_EPS = 1e-7
# Gaussian tails below this fraction of their peak are zero: 4+ orders below float32's resolution of the kernel
# (2^-23 of its largest value), and without a floor they reach denormal floats, which CPUs multiply ~100x slower (a
# ConvNeXt-T-gauss at init ran 4x slower). It bounds each profile's support to GAUSS_RADIUS widths of its centre,
# which makes Gaussian kernels croppable to the taps the positions reach.
_GAUSS_FLOOR = 1e-12
GAUSS_RADIUS = math.sqrt(-2. * math.log(_GAUSS_FLOOR))  # exp(-r^2 / 2) = floor: 7.43


def interpolation_profiles(
        P: torch.Tensor,
        SIG: Optional[torch.Tensor],
        dilated_kernel_size: Sequence[int],
        version: str,
        window: Optional[Sequence[Tuple[int, int]]] = None,
) -> List[torch.Tensor]:
    """1-D interpolation profiles of every kernel element along every axis.

    Args:
        P: Centred positions, ``[ndim, C_out, C_in/g, K]``.
        SIG: Gaussian widths (same shape as ``P``), only for ``version='gauss'``.
        dilated_kernel_size: Grid size per axis.
        version: ``'v0'`` (bilinear, unnormalised), ``'v1'`` (triangle) or ``'gauss'``.
        window: Optional ``(start, stop)`` grid taps per axis to evaluate (default: the whole grid).

    Returns:
        One tensor ``[C_out, C_in/g, D_a, K]`` per axis ``a`` (not normalised), ``D_a`` the window length.
    """
    profiles = []
    for axis, size in enumerate(dilated_kernel_size):
        # grid coordinates: position 0 sits on tap size // 2, also for even sizes
        p = P[axis].unsqueeze(-2) + (size // 2)
        start, stop = (0, size) if window is None else window[axis]
        grid = torch.arange(start, stop, device=P.device, dtype=P.dtype).unsqueeze(-1)
        if version == 'v0':
            # explicit floor/frac rather than a triangle: identical values, and the same gradient as the dcls
            # package also at integer positions (clamped ones sit exactly on the border)
            lower = p.floor()
            frac = p - lower
            offset = grid - lower
            prof = torch.where(offset == 0, 1. - frac, torch.where(offset == 1, frac, torch.zeros_like(frac)))
        elif version == 'v1':
            prof = torch.relu(1. - (grid - p).abs())
        elif version == 'gauss':
            sig = SIG[axis].unsqueeze(-2).abs() + SIG_OFFSET
            prof = torch.exp(-0.5 * ((grid - p) / sig) ** 2)
            prof = prof.masked_fill(prof < _GAUSS_FLOOR, 0.)
        else:
            raise ValueError(f"Unknown DCLS version '{version}', expected one of {DCLS_VERSIONS}.")
        profiles.append(prof)
    return profiles


class _GaussGeometry:
    """The Gaussian profiles of every element along each axis, their sums and (built on first use, by the first
    backward pass) what their derivatives need: depends on the positions and widths only, so the layers sharing them
    (and each layer's backward) can reuse it."""

    def __init__(self, P: torch.Tensor, SIG: torch.Tensor, sizes: Sequence[int]):
        # copies (a few values per element): the derivatives are built later, by the first backward, and a cached
        # geometry also serves other tensors holding the same values (a parameter swapped for an equal one), so
        # views would read the first tensors as they are then, changed in place or not
        self.P, self.SIG, self.sizes = P.detach().clone(), SIG.detach().clone(), tuple(sizes)
        self.profiles = interpolation_profiles(self.P, self.SIG, sizes, 'gauss')  # [O, I, D, K] per axis, floored
        self.sums = [p.sum(-2) for p in self.profiles]  # [O, I, K] per axis
        self._derivatives: Optional[Tuple[List[torch.Tensor], List[torch.Tensor]]] = None

    def derivatives(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Per axis: ``d prof / d p = prof * t / s`` and ``t = (grid - p) / s`` (``d prof / d s = slope * t``)."""
        if self._derivatives is None:
            slopes, ts = [], []
            for axis, (size, prof) in enumerate(zip(self.sizes, self.profiles)):
                grid = torch.arange(size, device=self.P.device, dtype=self.P.dtype).unsqueeze(-1)
                s = self.SIG[axis].unsqueeze(-2).abs() + SIG_OFFSET
                t = (grid - self.P[axis].unsqueeze(-2) - size // 2) / s
                slopes.append(prof * t / s)
                ts.append(t)
            self._derivatives = slopes, ts
        return self._derivatives


def _cached_gauss_geometry(P: torch.Tensor, SIG: torch.Tensor, sizes: Sequence[int],
                           cache: Optional[DerivedCache]) -> _GaussGeometry:
    if cache is None:
        return _GaussGeometry(P, SIG, sizes)
    key = (tuple(sizes), 'gauss')
    geometry = cache.get([P, SIG], key)
    if geometry is None:
        geometry = _GaussGeometry(P, SIG, sizes)
        cache.put([P, SIG], key, geometry)
    return geometry


class _GaussKernel2d(torch.autograd.Function):
    """``kernel[o, i] = sum_k w'_k a_k (x) b_k`` with ``a``/``b`` the row/column Gaussian profiles, as one batched
    matmul; the backward recomputes the profiles instead of saving them (or reuses them from ``cache``, shared by
    the layers of a stage)."""

    @staticmethod
    def forward(ctx, weight, P, SIG, sizes, window, cache):
        geo = _cached_gauss_geometry(P, SIG, sizes, cache)
        (a, b), (sum_a, sum_b) = geo.profiles, geo.sums
        scaled = weight / (sum_a * sum_b + _NORM_EPS)  # normalised over the whole grid
        (r0, r1), (c0, c1) = window
        ctx.save_for_backward(weight, P, SIG)
        ctx.sizes, ctx.window, ctx.cache = sizes, window, cache
        kernel = torch.matmul(a[..., r0:r1, :] * scaled.unsqueeze(-2), b[..., c0:c1, :].transpose(-1, -2))
        # products of two floored tails, relative to each filter's peak (an absolute floor cut small-weight filters
        # down to zero): no denormal floats in the convolution
        peak = kernel.abs().amax((-2, -1), keepdim=True)
        return kernel.masked_fill_(kernel.abs() < _GAUSS_FLOOR * peak, 0.)

    @staticmethod
    def backward(ctx, grad):
        weight, P, SIG = ctx.saved_tensors
        if torch.is_grad_enabled():
            return differentiable_grads(ctx, grad, (weight, P, SIG), lambda: _plain_kernel(
                weight, P, SIG, ctx.sizes, 'gauss', ctx.window)) + (None, None, None)
        grad = grad.to(weight.dtype)  # under autocast the kernel (so its gradient) may be in lower precision
        (r0, r1), (c0, c1) = ctx.window
        geo = _cached_gauss_geometry(P, SIG, ctx.sizes, ctx.cache)
        (a, b), (sum_a, sum_b) = geo.profiles, geo.sums
        inv_mass = 1. / (sum_a * sum_b + _NORM_EPS)
        scaled = weight * inv_mass
        a_w, b_w = a[..., r0:r1, :], b[..., c0:c1, :]
        grad_first = torch.matmul(grad, b_w)  # [O, I, window rows, K]
        grad_second = torch.matmul(grad.transpose(-1, -2), a_w * scaled.unsqueeze(-2))  # [O, I, window cols, K]
        grad_scaled = (grad_first * a_w).sum(-2)
        grad_mass = -grad_scaled * weight * inv_mass * inv_mass
        # every tap enters the normalisation; outside the window the profiles are zero, so is their gradient
        grad_a = (grad_mass * sum_b).unsqueeze(-2).expand_as(a).clone()
        grad_a[..., r0:r1, :] += grad_first * scaled.unsqueeze(-2)
        grad_b = (grad_mass * sum_a).unsqueeze(-2).expand_as(b).clone()
        grad_b[..., c0:c1, :] += grad_second
        grad_P, grad_SIG = [], []
        slopes, ts = geo.derivatives()
        for axis, g in enumerate((grad_a, grad_b)):
            g_t = g * slopes[axis]
            grad_P.append(g_t.sum(-2))
            grad_SIG.append((g_t * ts[axis]).sum(-2) * SIG[axis].sign())
        return grad_scaled * inv_mass, torch.stack(grad_P), torch.stack(grad_SIG), None, None, None


class _TapGeometry(NamedTuple):
    """Where the 4 taps of every element of a 2-D bilinear kernel fall, and their interpolation weights: depends on
    the positions only, so layers sharing positions (and each layer's backward) can reuse it."""
    index: torch.Tensor  # [4, O, I, K] flat indices into the kernel, taps (row, col) = 00, 01, 10, 11
    weights: torch.Tensor  # [4, O, I, K] row weight x column weight of each tap
    rows: List[torch.Tensor]  # the two row weights (zero off the window)
    cols: List[torch.Tensor]
    row_slopes: List[torch.Tensor]  # their derivatives w.r.t. the row position
    col_slopes: List[torch.Tensor]
    shape: Tuple[int, int]  # window size


def _tap_geometry(P: torch.Tensor, sizes: Sequence[int], window: Sequence[Tuple[int, int]],
                  version: str) -> _TapGeometry:
    per_axis = []
    for axis, (size, (start, stop)) in enumerate(zip(sizes, window)):
        p = P[axis] + size // 2
        lower = p.floor()
        frac = p - lower
        index = lower.long() - start
        inside = [((index + j >= 0) & (index + j < stop - start)).to(P.dtype) for j in (0, 1)]
        values = [(1. - frac) * inside[0], frac * inside[1]]
        if version == 'v0':  # (1 - frac, frac): -1 and +1, also at integer positions (as the dcls package)
            slopes = [-inside[0], inside[1]]
        else:  # relu(1 - |i - p|): autograd's subgradient is 0 at integer positions
            moving = (frac > 0).to(P.dtype)
            slopes = [-moving * inside[0], moving * inside[1]]
        # off-window taps are clamped in: their weights are zero
        per_axis.append(([(index + j).clamp(0, stop - start - 1) for j in (0, 1)], values, slopes, stop - start))
    (i0, rows, row_slopes, n0), (i1, cols, col_slopes, n1) = per_axis
    filters = P.shape[1] * P.shape[2]
    base = torch.arange(filters, device=P.device).view(P.shape[1], P.shape[2], 1) * (n0 * n1)
    index = torch.stack([base + i0[r] * n1 + i1[c] for r in (0, 1) for c in (0, 1)])
    weights = torch.stack([rows[r] * cols[c] for r in (0, 1) for c in (0, 1)])
    return _TapGeometry(index, weights, rows, cols, row_slopes, col_slopes, (n0, n1))


def _cached_geometry(P: torch.Tensor, sizes, window, version: str, cache: Optional[DerivedCache]) -> _TapGeometry:
    if cache is None:
        return _tap_geometry(P, sizes, window, version)
    key = (tuple(sizes), tuple(window), version)
    geometry = cache.get([P], key)
    if geometry is None:
        geometry = _tap_geometry(P, sizes, window, version)
        cache.put([P], key, geometry)
    return geometry


class _BilinearKernel2d(torch.autograd.Function):
    """``v0``/``v1`` kernels by scattering each element's 4 weighted taps: ``O(C_out * C_in/g * K)`` work and
    memory whatever the grid size; the backward gathers the kernel gradient at the same taps."""

    @staticmethod
    def forward(ctx, weight, P, sizes, version, window, cache):
        geo = _cached_geometry(P, sizes, window, version, cache)
        scaled = weight if version == 'v0' else weight / (sum(geo.rows) * sum(geo.cols) + _NORM_EPS)
        o, i = weight.shape[:2]
        kernel = weight.new_zeros(o * i * geo.shape[0] * geo.shape[1])
        kernel.scatter_add_(0, geo.index.flatten(), (geo.weights * scaled).flatten())
        ctx.save_for_backward(weight, P)
        ctx.args = sizes, version, window, cache
        return kernel.view(o, i, *geo.shape)

    @staticmethod
    def backward(ctx, grad):
        weight, P = ctx.saved_tensors
        sizes, version, window, cache = ctx.args
        if torch.is_grad_enabled():
            return differentiable_grads(ctx, grad, (weight, P), lambda: _plain_kernel(
                weight, P, None, sizes, version, window)) + (None, None, None, None)
        grad = grad.to(weight.dtype)  # under autocast the kernel (so its gradient) may be in lower precision
        geo = _cached_geometry(P, sizes, window, version, cache)
        a, b = geo.rows, geo.cols
        g = grad.reshape(-1)[geo.index]  # [4, O, I, K], taps 00, 01, 10, 11
        grad_a = [g[0] * b[0] + g[1] * b[1], g[2] * b[0] + g[3] * b[1]]
        grad_b = [g[0] * a[0] + g[2] * a[1], g[1] * a[0] + g[3] * a[1]]
        grad_scaled = grad_a[0] * a[0] + grad_a[1] * a[1]
        if version == 'v0':
            grad_weight = grad_scaled
            grad_a = [weight * ga for ga in grad_a]
            grad_b = [weight * gb for gb in grad_b]
        else:
            sum_a, sum_b = a[0] + a[1], b[0] + b[1]
            inv_mass = 1. / (sum_a * sum_b + _NORM_EPS)
            scaled = weight * inv_mass
            grad_weight = grad_scaled * inv_mass
            grad_mass = -grad_scaled * weight * inv_mass * inv_mass
            grad_a = [scaled * ga + grad_mass * sum_b for ga in grad_a]
            grad_b = [scaled * gb + grad_mass * sum_a for gb in grad_b]
        grad_P = torch.stack([grad_a[0] * geo.row_slopes[0] + grad_a[1] * geo.row_slopes[1],
                              grad_b[0] * geo.col_slopes[0] + grad_b[1] * geo.col_slopes[1]])
        return grad_weight, grad_P, None, None, None, None


def position_window(P: torch.Tensor, dilated_kernel_size: Sequence[int], version: str,
                    SIG: Optional[torch.Tensor] = None) -> Optional[List[Tuple[int, int]]]:
    """The ``(start, stop)`` grid taps per axis outside which the kernel and its gradients are exactly zero: from
    the lowest element's lower tap to the highest element's upper one (``gauss``: each element's position
    +- ``GAUSS_RADIUS`` widths, beyond which its profile is below the floor, so zero). ``None`` where the positions
    are not finite. Reads the positions (and widths) on the host (one synchronisation)."""
    flat = P.detach().flatten(1)
    if version == 'gauss':
        if SIG is None:
            raise ValueError("version='gauss' needs SIG.")
        reach = GAUSS_RADIUS * (SIG.detach().flatten(1).abs() + SIG_OFFSET)
        low, high = (flat - reach).amin(1), (flat + reach).amax(1)
    else:
        low, high = flat.amin(1), flat.amax(1)
    bounds = torch.stack([low, high], 1).floor().tolist()
    if not all(math.isfinite(b) for pair in bounds for b in pair):
        return None  # non-finite positions: the whole grid, and the loss reports the problem
    window = []
    for (low, high), size in zip(bounds, dilated_kernel_size):
        start = min(max(0, int(low) + size // 2), size - 1)
        window.append((start, max(start + 1, min(size, int(high) + size // 2 + 2))))
    return window


def construct_kernel(
        weight: torch.Tensor,
        P: torch.Tensor,
        SIG: Optional[torch.Tensor],
        dilated_kernel_size: Sequence[int],
        version: str,
        window: Optional[Sequence[Tuple[int, int]]] = None,
        cache: Optional[DerivedCache] = None,
) -> torch.Tensor:
    """Build the dense kernel ``[C_out, C_in/g, *dilated_kernel_size]`` of a DCLS layer.

    Args:
        weight: Element weights, ``[C_out, C_in/g, K]``.
        P: Centred positions, ``[ndim, C_out, C_in/g, K]``; ``P[0]`` is the first spatial axis.
        SIG: Gaussian widths for ``version='gauss'``, else ``None``.
        dilated_kernel_size: Dense kernel size per axis (any size, odd or even).
        version: ``'v0'``, ``'v1'`` or ``'gauss'``.
        window: Optional ``(start, stop)`` taps per axis: build only that part of the kernel. ``v0`` and
            ``gauss`` give the whole kernel's restriction (``gauss`` normalises over the whole grid); ``v1``
            normalises over the window, exact when it holds every element's non-zero taps (:func:`position_window`).
        cache: Optional :class:`DerivedCache`, owned by whoever owns ``P``, in which 2-D construction keeps what
            depends on the positions (and widths) only, the tap geometry (``v0``/``v1``) or the Gaussian profiles,
            for the layers sharing them and for the backward pass.

    Returns:
        The dense kernel (or its window), differentiable w.r.t. ``weight``, ``P`` and ``SIG``.
    """
    if version == 'gauss' and SIG is None:
        raise ValueError("version='gauss' needs SIG.")
    if version not in DCLS_VERSIONS:
        raise ValueError(f"Unknown DCLS version '{version}', expected one of {DCLS_VERSIONS}.")
    sizes = tuple(dilated_kernel_size)
    if window is not None:
        window = tuple((int(a), int(b)) for a, b in window)
        if len(window) != len(sizes) or any(not 0 <= a < b <= n for (a, b), n in zip(window, sizes)):
            raise ValueError(f'window must hold one (start, stop) with 0 <= start < stop <= size per axis of '
                             f'{sizes}, got {window}.')
    if len(sizes) == 2 and not autograd_function_unsupported():
        full = window or tuple((0, n) for n in sizes)
        if version == 'gauss':
            return _GaussKernel2d.apply(weight, P, SIG, sizes, full, cache)
        return _BilinearKernel2d.apply(weight, P, sizes, version, full, cache)
    return _plain_kernel(weight, P, SIG, sizes, version, window)


def _plain_kernel(weight: torch.Tensor, P: torch.Tensor, SIG: Optional[torch.Tensor], sizes: Tuple[int, ...],
                  version: str, window: Optional[Sequence[Tuple[int, int]]]) -> torch.Tensor:
    """:func:`construct_kernel` from differentiable tensor ops (any number of dimensions): 1-D and 3-D kernels,
    torch.func transforms and forward-mode AD, and the double backward of the 2-D custom Functions."""
    # gauss: normalised over the whole grid (its window is the restriction of the whole kernel); v1: over the window
    profiles = interpolation_profiles(P, SIG, sizes, version, None if version == 'gauss' else window)
    if version != 'v0':
        # each element's map sums to 1; the sum of an outer product is the product of the 1-D sums
        mass = profiles[0].sum(-2)
        for prof in profiles[1:]:
            mass = mass * prof.sum(-2)
        weight = weight / (mass + _NORM_EPS)
    if version == 'gauss' and window is not None:
        profiles = [prof[..., a:b, :] for prof, (a, b) in zip(profiles, window)]
    first = profiles[0] * weight.unsqueeze(-2)  # [O, I, D0, K]
    if len(profiles) == 1:
        return first.sum(-1)
    rest = profiles[1]  # [O, I, D1 * D2 * ..., K]
    for prof in profiles[2:]:
        rest = (rest.unsqueeze(-2) * prof.unsqueeze(-3)).flatten(-3, -2)
    kernel = torch.matmul(first, rest.transpose(-1, -2))
    return kernel.unflatten(-1, [b - a for a, b in window[1:]] if window else sizes[1:])
