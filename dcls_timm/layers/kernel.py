"""Separable construction of dense DCLS kernels.

Every DCLS interpolation is a product of 1-D profiles, one per spatial axis, so the dense kernel of each filter is
``sum_k w_k * prof_0[:, k] (x) prof_1[:, k] (x) ...``. Building it as a batched matmul of the 1-D profiles needs
``O(C_out * C_in/g * K * sum(D))`` memory instead of the ``prod(D) * K`` per filter that a direct construction
materialises. In 2-D (every model here) the backward pass is written out by hand and recomputes the profiles from
the parameters, so nothing larger than the parameters is kept for it.

A ``window`` restricts the construction to a sub-grid: with ``v0``/``v1`` an element only touches (and only gets
gradient from) the two taps around it per axis, so every tap outside the window spanned by the positions is exactly
zero and the kernel can be built, and convolved, at that size.
"""
import math
from typing import List, Optional, Sequence, Tuple

from torch.autograd.function import once_differentiable

import torch

__all__ = ['DCLS_VERSIONS', 'SIG_OFFSET', 'SIG_INIT', 'construct_kernel', 'interpolation_profiles', 'position_window']

DCLS_VERSIONS = ('v0', 'v1', 'gauss')
SIG_OFFSET = 0.27  # sigma = |SIG| + SIG_OFFSET keeps the Gaussian at least ~one tap wide
SIG_INIT = 0.23  # sigma = 0.5 at init
_NORM_EPS = 1e-7


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
        else:
            raise ValueError(f"Unknown DCLS version '{version}', expected one of {DCLS_VERSIONS}.")
        profiles.append(prof)
    return profiles


def _profile_grads(P: torch.Tensor, SIG: Optional[torch.Tensor], size: int, start: int, stop: int, version: str,
                   prof: torch.Tensor, grad_prof: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Gradient of one axis' profiles ``[O, I, D, K]`` w.r.t. that axis' positions (and widths), what autograd
    gives for :func:`interpolation_profiles`."""
    p = P.unsqueeze(-2) + (size // 2)
    grid = torch.arange(start, stop, device=P.device, dtype=P.dtype).unsqueeze(-1)
    if version == 'v0':
        offset = grid - p.floor()
        dprof_dp = (offset == 1).to(P.dtype) - (offset == 0).to(P.dtype)
        return (grad_prof * dprof_dp).sum(-2), None
    if version == 'v1':
        return (grad_prof * ((grid - p).sign() * (prof > 0))).sum(-2), None
    sig = SIG.unsqueeze(-2)
    s = sig.abs() + SIG_OFFSET
    t = (grid - p) / s
    g_t = grad_prof * prof * t / s  # d prof / d p = prof * t / s
    return g_t.sum(-2), ((g_t * t).sum(-2, keepdim=True) * sig.sign()).squeeze(-2)


class _SeparableKernel2d(torch.autograd.Function):
    """``kernel[o, i] = sum_k w'_k a_k (x) b_k`` with ``a``/``b`` the row/column profiles; the backward recomputes
    the profiles instead of saving them."""

    @staticmethod
    def forward(ctx, weight, P, SIG, sizes, version, window):
        a, b = interpolation_profiles(P, SIG, sizes, version, window)
        scaled = weight if version == 'v0' else weight / (a.sum(-2) * b.sum(-2) + _NORM_EPS)
        ctx.save_for_backward(weight, P, SIG)
        ctx.sizes, ctx.version, ctx.window = sizes, version, window
        return torch.matmul(a * scaled.unsqueeze(-2), b.transpose(-1, -2))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weight, P, SIG = ctx.saved_tensors
        sizes, version, window = ctx.sizes, ctx.version, ctx.window
        grad = grad.to(weight.dtype)  # under autocast the kernel (so its gradient) may be in lower precision
        a, b = interpolation_profiles(P, SIG, sizes, version, window)
        if version == 'v0':
            scaled = weight
        else:
            sum_a, sum_b = a.sum(-2), b.sum(-2)
            inv_mass = 1. / (sum_a * sum_b + _NORM_EPS)
            scaled = weight * inv_mass
        grad_first = torch.matmul(grad, b)  # [O, I, D0, K]
        grad_b = torch.matmul(grad.transpose(-1, -2), a * scaled.unsqueeze(-2))  # [O, I, D1, K]
        grad_scaled = (grad_first * a).sum(-2)
        grad_a = grad_first * scaled.unsqueeze(-2)
        if version == 'v0':
            grad_weight = grad_scaled
        else:
            grad_weight = grad_scaled * inv_mass
            grad_mass = -grad_scaled * weight * inv_mass * inv_mass
            grad_a = grad_a + (grad_mass * sum_b).unsqueeze(-2)
            grad_b = grad_b + (grad_mass * sum_a).unsqueeze(-2)
        grad_P = grad_SIG = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grads = []
            for axis, (prof, grad_prof) in enumerate(((a, grad_a), (b, grad_b))):
                start, stop = (0, sizes[axis]) if window is None else window[axis]
                grads.append(_profile_grads(P[axis], None if SIG is None else SIG[axis], sizes[axis], start, stop,
                                            version, prof, grad_prof))
            grad_P = torch.stack([g[0] for g in grads])
            if SIG is not None:
                grad_SIG = torch.stack([g[1] for g in grads])
        return grad_weight if ctx.needs_input_grad[0] else None, grad_P, grad_SIG, None, None, None


def position_window(P: torch.Tensor, dilated_kernel_size: Sequence[int], version: str) -> Optional[List[Tuple[int, int]]]:
    """The ``(start, stop)`` grid taps per axis outside which a ``v0``/``v1`` kernel and its gradients are exactly
    zero: from the lowest element's lower tap to the highest element's upper one. ``None`` for ``gauss`` (whose
    profiles never vanish). Reads the positions on the host (one synchronisation)."""
    if version == 'gauss':
        return None
    flat = P.detach().flatten(1)
    bounds = torch.stack([flat.amin(1), flat.amax(1)], 1).floor().tolist()
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
) -> torch.Tensor:
    """Build the dense kernel ``[C_out, C_in/g, *dilated_kernel_size]`` of a DCLS layer.

    Args:
        weight: Element weights, ``[C_out, C_in/g, K]``.
        P: Centred positions, ``[ndim, C_out, C_in/g, K]``; ``P[0]`` is the first spatial axis.
        SIG: Gaussian widths for ``version='gauss'``, else ``None``.
        dilated_kernel_size: Dense kernel size per axis (any size, odd or even).
        version: ``'v0'``, ``'v1'`` or ``'gauss'``.
        window: Optional ``(start, stop)`` taps per axis: build only that part of the kernel. Exact for ``v0``
            (the kernel's restriction) and for ``v1`` when it holds every element's taps (:func:`position_window`;
            ``v1`` normalises over the window); not for ``gauss``.

    Returns:
        The dense kernel (or its window), differentiable w.r.t. ``weight``, ``P`` and ``SIG``.
    """
    if version == 'gauss' and SIG is None:
        raise ValueError("version='gauss' needs SIG.")
    if version not in DCLS_VERSIONS:
        raise ValueError(f"Unknown DCLS version '{version}', expected one of {DCLS_VERSIONS}.")
    sizes = tuple(dilated_kernel_size)
    if window is not None:
        if version == 'gauss':
            raise ValueError("A window is not exact for version='gauss' (its profiles never vanish).")
        window = tuple((int(a), int(b)) for a, b in window)
        if len(window) != len(sizes) or any(not 0 <= a < b <= n for (a, b), n in zip(window, sizes)):
            raise ValueError(f'window must hold one (start, stop) with 0 <= start < stop <= size per axis of '
                             f'{sizes}, got {window}.')
    if len(sizes) == 2:
        return _SeparableKernel2d.apply(weight, P, SIG, sizes, version, window)
    profiles = interpolation_profiles(P, SIG, sizes, version, window)
    if version != 'v0':
        # each element's map sums to 1; the sum of an outer product is the product of the 1-D sums
        mass = profiles[0].sum(-2)
        for prof in profiles[1:]:
            mass = mass * prof.sum(-2)
        weight = weight / (mass + _NORM_EPS)
    first = profiles[0] * weight.unsqueeze(-2)  # [O, I, D0, K]
    if len(profiles) == 1:
        return first.sum(-1)
    rest = profiles[1]  # [O, I, D1 * D2 * ..., K]
    for prof in profiles[2:]:
        rest = (rest.unsqueeze(-2) * prof.unsqueeze(-3)).flatten(-3, -2)
    kernel = torch.matmul(first, rest.transpose(-1, -2))
    return kernel.unflatten(-1, [b - a for a, b in window[1:]] if window else sizes[1:])
