"""Separable construction of dense DCLS kernels.

Every DCLS interpolation is a product of 1-D profiles, one per spatial axis, so the dense kernel of each filter is
``sum_k w_k * prof_0[:, k] (x) prof_1[:, k] (x) ...``. Building it as a batched matmul of the 1-D profiles needs
``O(C_out * C_in/g * K * sum(D))`` memory instead of the ``prod(D) * K`` per filter that a direct construction
materialises, and autograd through it is just as cheap.
"""
from typing import List, Optional, Sequence

import torch

__all__ = ['DCLS_VERSIONS', 'SIG_OFFSET', 'SIG_INIT', 'construct_kernel', 'interpolation_profiles']

DCLS_VERSIONS = ('v0', 'v1', 'gauss')
SIG_OFFSET = 0.27  # sigma = |SIG| + SIG_OFFSET keeps the Gaussian at least ~one tap wide
SIG_INIT = 0.23  # sigma = 0.5 at init
_NORM_EPS = 1e-7


def interpolation_profiles(
        P: torch.Tensor,
        SIG: Optional[torch.Tensor],
        dilated_kernel_size: Sequence[int],
        version: str,
) -> List[torch.Tensor]:
    """1-D interpolation profiles of every kernel element along every axis.

    Args:
        P: Centred positions, ``[ndim, C_out, C_in/g, K]``.
        SIG: Gaussian widths (same shape as ``P``), only for ``version='gauss'``.
        dilated_kernel_size: Grid size per axis.
        version: ``'v0'`` (bilinear, unnormalised), ``'v1'`` (triangle) or ``'gauss'``.

    Returns:
        One tensor ``[C_out, C_in/g, D_a, K]`` per axis ``a`` (not normalised).
    """
    profiles = []
    for axis, size in enumerate(dilated_kernel_size):
        # grid coordinates: position 0 sits on tap size // 2, also for even sizes
        p = P[axis].unsqueeze(-2) + (size // 2)
        grid = torch.arange(size, device=P.device, dtype=P.dtype).unsqueeze(-1)
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


def construct_kernel(
        weight: torch.Tensor,
        P: torch.Tensor,
        SIG: Optional[torch.Tensor],
        dilated_kernel_size: Sequence[int],
        version: str,
) -> torch.Tensor:
    """Build the dense kernel ``[C_out, C_in/g, *dilated_kernel_size]`` of a DCLS layer.

    Args:
        weight: Element weights, ``[C_out, C_in/g, K]``.
        P: Centred positions, ``[ndim, C_out, C_in/g, K]``; ``P[0]`` is the first spatial axis.
        SIG: Gaussian widths for ``version='gauss'``, else ``None``.
        dilated_kernel_size: Dense kernel size per axis (any size, odd or even).
        version: ``'v0'``, ``'v1'`` or ``'gauss'``.

    Returns:
        The dense kernel, differentiable w.r.t. ``weight``, ``P`` and ``SIG``.
    """
    if version == 'gauss' and SIG is None:
        raise ValueError("version='gauss' needs SIG.")
    sizes = tuple(dilated_kernel_size)
    profiles = interpolation_profiles(P, SIG, sizes, version)
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
    return kernel.unflatten(-1, sizes[1:])
