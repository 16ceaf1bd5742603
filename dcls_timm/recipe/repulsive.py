"""Repulsive loss between the elements of each DCLS filter (from KPConv)."""
import torch
import torch.nn as nn

from dcls_timm.layers import position_owners

__all__ = ['repulsive_loss', 'repulsive_term']


def repulsive_term(P: torch.Tensor) -> torch.Tensor:
    """Mean over ordered element pairs of ``max(0, 1 - d_ij)`` for one position tensor ``[ndim, C_out, C_in/g, K]``.

    Equals ``2 * sum_{i<j} max(0, 1 - d_ij) / (K (K - 1) C_out C_in/g)``.
    """
    ndim, k = P.shape[0], P.shape[-1]
    if k < 2:
        return P.new_zeros(())
    points = P.reshape(ndim, -1, k)  # [ndim, C_out * C_in/g, K]
    # all K x K differences by broadcasting, then the i < j half by a mask (i == j is a zero distance): no index
    # gathers, whose backward (an accumulating index_put) cost more than the rest; the clamp keeps the gradient
    # finite where two elements coincide, and square-sum-sqrt is much faster on CPU than norm() over 2 coordinates
    dist = (points.unsqueeze(-1) - points.unsqueeze(-2)).square().sum(0).clamp_min(1e-12).sqrt()
    upper = torch.ones(k, k, dtype=torch.bool, device=P.device).triu_(1)
    return 2. * (torch.relu(1. - dist) * upper).sum() / (k * (k - 1) * points.shape[1])


def repulsive_loss(model: nn.Module) -> torch.Tensor:
    """Mean of :func:`repulsive_term` over the distinct position tensors of ``model`` (shared ones once)."""
    terms = [repulsive_term(owner.P) for owner in position_owners(model).values()]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()
