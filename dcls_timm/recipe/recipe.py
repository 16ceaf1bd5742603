"""The DCLS training recipe as one switchable object: groups, clamping, repulsive loss."""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from dcls_timm.layers import clamp_positions_, position_owners

from .groups import dcls_param_groups
from .repulsive import repulsive_loss

__all__ = ['DclsRecipe']


@dataclass
class DclsRecipe:
    """Parts of the DCLS paper's recipe; each can be switched off.

    Attributes:
        position_lr_scale: lr multiplier of positions (and SIG), on top of any layer-decay scale.
        position_weight_decay: Weight decay of positions (and SIG).
        clamp: Clamp positions onto their grid after every optimizer step.
        repulsive_weight: Weight of ``rep**2`` in the loss (0 disables it).
        repulsive_after_epoch: The repulsive loss is active once ``epoch > repulsive_after_epoch`` (0-based).
    """
    position_lr_scale: float = 5.
    position_weight_decay: float = 0.
    clamp: bool = True
    repulsive_weight: float = 1.
    repulsive_after_epoch: int = 20

    @staticmethod
    def applies_to(model: nn.Module) -> bool:
        """True if the model has DCLS positions."""
        return bool(position_owners(model))

    def param_groups(
            self,
            model: nn.Module,
            weight_decay: float,
            layer_decay: Optional[float] = None,
            layer_decay_min_scale: float = 0.,
    ) -> List[Dict[str, Any]]:
        """Optimizer groups: timm's, with positions in their own groups (see :func:`dcls_param_groups`)."""
        return dcls_param_groups(
            model, weight_decay, layer_decay=layer_decay, layer_decay_min_scale=layer_decay_min_scale,
            position_lr_scale=self.position_lr_scale, position_weight_decay=self.position_weight_decay)

    def repulsive_active(self, epoch: int) -> bool:
        return self.repulsive_weight > 0 and epoch > self.repulsive_after_epoch

    def repulsive(self, model: nn.Module, epoch: int) -> Optional[torch.Tensor]:
        """The repulsive loss ``rep`` (before squaring) when active this epoch, else None."""
        return repulsive_loss(model) if self.repulsive_active(epoch) else None

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Call after each optimizer step (after gradient accumulation completes), before the EMA update."""
        if self.clamp:
            clamp_positions_(model)
