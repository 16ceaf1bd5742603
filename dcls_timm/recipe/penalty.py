"""The continuous-kernel papers' weight penalty: L2 norms (not squared) in the loss, in place of weight decay.

CCNN (SPEC 8.1) trains with AdamW at weight decay 0 and adds ``lambda * (sum_p ||p||_2 + sum_l ||k_l||_2)``: ``p`` runs
over every parameter outside the kernel networks (convs, norms, mask widths, head) and ``k_l`` over the kernels the
continuous convolutions sampled. The original CKCNN penalises only the sampled kernels and the convolution biases
(``scope='kernels'``). A penalty on a network's output (the sampled kernel) is not a weight decay on its parameters,
so no optimizer setting can stand in for it.
"""
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn as nn

from dcls_timm.layers import kernel_net_convs

__all__ = ['L2PenaltyRecipe', 'l2_penalty']

_SCOPES = ('all', 'kernels')


def l2_penalty(model: nn.Module, scope: str = 'all') -> torch.Tensor:
    """``sum ||p||_2`` over the parameters outside the kernel networks (``scope='all'``; ``'kernels'``: the biases of
    the continuous convolutions only) plus ``sum ||k||_2`` over the sampled kernels (rebuilt from the current
    parameters, at the last forward pass's input length)."""
    if scope not in _SCOPES:
        raise ValueError(f'scope must be one of {_SCOPES}, got {scope!r}.')
    convs = kernel_net_convs(model)
    if scope == 'all':
        in_kernel_nets = {id(p) for m in convs for p in m.kernel_net.parameters()}
        params = [p for p in model.parameters() if id(p) not in in_kernel_nets]
    else:
        params = [m.bias for m in convs if m.bias is not None]
    terms = [torch.linalg.vector_norm(p) for p in params if p.requires_grad]
    terms += [torch.linalg.vector_norm(m.sampled_kernel()) for m in convs]
    if not terms:
        raise ValueError('l2_penalty: the model has no parameters in this scope.')
    return torch.stack(terms).sum()


@dataclass
class L2PenaltyRecipe:
    """Adds ``weight * l2_penalty(model, scope)`` to the loss (use with the optimizer's weight decay at 0).

    Attributes:
        weight: lambda.
        scope: ``'all'`` (CCNN) or ``'kernels'`` (CKCNN).
    """
    weight: float
    scope: str = 'all'
    aux_loss_names: Tuple[str, ...] = ('l2_penalty',)

    def __post_init__(self):
        if self.scope not in _SCOPES:
            raise ValueError(f'scope must be one of {_SCOPES}, got {self.scope!r}.')
        if self.weight <= 0:
            raise ValueError(f'L2 penalty weight must be > 0, got {self.weight}.')

    @staticmethod
    def applies_to(model: nn.Module) -> bool:
        return True

    def param_rules(self, model: nn.Module) -> list:
        return []

    def aux_losses(self, model: nn.Module, epoch: int) -> Dict[str, torch.Tensor]:
        return {'l2_penalty': self.weight * l2_penalty(model, self.scope).float()}

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Nothing to do."""
