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
    points = P.reshape(ndim, -1, k).permute(1, 2, 0)  # [C_out * C_in/g, K, ndim]
    i, j = torch.triu_indices(k, k, offset=1, device=P.device)
    # only i < j pairs (i == j is a zero distance); the clamp keeps the gradient finite where two elements
    # coincide, and square-sum-sqrt is ~100x faster on CPU than norm() over a 2-long last axis
    dist = (points[:, i] - points[:, j]).square().sum(-1).clamp_min(1e-12).sqrt()
    return 2. * torch.relu(1. - dist).sum() / (k * (k - 1) * points.shape[0])


def repulsive_loss(model: nn.Module) -> torch.Tensor:
    """Mean of :func:`repulsive_term` over the distinct position tensors of ``model`` (shared ones once)."""
    terms = [repulsive_term(owner.P) for owner in position_owners(model).values()]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()
