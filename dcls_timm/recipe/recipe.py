"""Training recipes as switchable objects: extra parameter groups, auxiliary losses, hooks after each step.

A recipe has ``param_rules(model)`` (parameters that get their own lr scale and weight decay), ``aux_losses(model,
epoch)`` (named terms added to the task loss, already weighted; ``aux_loss_names`` lists them all) and
``after_optimizer_step(model)``. :class:`CompositeRecipe` combines several for the trainer.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from dcls_timm.layers import (
    anti_aliasing_loss, clamp_positions_, continuous_convs, position_owners, position_parameters,
)

from .groups import ParamRule, special_param_groups
from .repulsive import repulsive_loss

__all__ = ['DclsRecipe', 'FlexConvRecipe', 'CompositeRecipe']


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
    aux_loss_names: Tuple[str, ...] = ('rep_loss',)

    @staticmethod
    def applies_to(model: nn.Module) -> bool:
        """True if the model has DCLS positions."""
        return bool(position_owners(model))

    def param_rules(self, model: nn.Module) -> List[ParamRule]:
        return [('positions', position_parameters(model), self.position_lr_scale, self.position_weight_decay)]

    def param_groups(self, model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None,
                     layer_decay_min_scale: float = 0.) -> List[Dict[str, Any]]:
        """Optimizer groups: timm's, with positions in their own groups."""
        return special_param_groups(model, weight_decay, self.param_rules(model), layer_decay, layer_decay_min_scale)

    def repulsive_active(self, epoch: int) -> bool:
        return self.repulsive_weight > 0 and epoch > self.repulsive_after_epoch

    def repulsive(self, model: nn.Module, epoch: int) -> Optional[torch.Tensor]:
        """The repulsive loss ``rep`` (before squaring) when active this epoch, else None."""
        return repulsive_loss(model) if self.repulsive_active(epoch) else None

    def aux_losses(self, model: nn.Module, epoch: int) -> Dict[str, torch.Tensor]:
        rep = self.repulsive(model, epoch)
        return {} if rep is None else {'rep_loss': self.repulsive_weight * rep.float() ** 2}

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Call after each optimizer step (after gradient accumulation completes), before the EMA update."""
        if self.clamp:
            clamp_positions_(model)


@dataclass
class FlexConvRecipe:
    """The FlexConv recipe's parts: mask lr scale, anti-aliasing loss.

    Attributes:
        mask_lr_scale: lr multiplier of the Gaussian-mask parameters.
        mask_weight_decay: Their weight decay.
        antialias_factor: Weight of the anti-aliasing regulariser (0 disables it).
        antialias_target: ``'gabor'`` or ``'gabor+mask'``.
    """
    mask_lr_scale: float = 0.1
    mask_weight_decay: float = 0.
    antialias_factor: float = 0.1
    antialias_target: str = 'gabor+mask'
    aux_loss_names: Tuple[str, ...] = ('antialias_loss',)

    @staticmethod
    def applies_to(model: nn.Module) -> bool:
        return bool(continuous_convs(model))

    def param_rules(self, model: nn.Module) -> List[ParamRule]:
        masks = [p for m in continuous_convs(model) if m.has_mask
                 for p in (m.mask_sigma, m.mask_mean) if isinstance(p, nn.Parameter)]
        return [('mask', masks, self.mask_lr_scale, self.mask_weight_decay)]

    def aux_losses(self, model: nn.Module, epoch: int) -> Dict[str, torch.Tensor]:
        if self.antialias_factor <= 0:
            return {}
        return {'antialias_loss': anti_aliasing_loss(model, self.antialias_factor, self.antialias_target)}

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Nothing to do: FlexConv reads its mask, so its crop size, at every forward pass."""


class CompositeRecipe:
    """Several recipes applied together (the trainer talks to this one)."""

    def __init__(self, recipes: Sequence[Any]):
        self.recipes = list(recipes)
        self.aux_loss_names = tuple(n for r in self.recipes for n in r.aux_loss_names)

    def param_groups(self, model: nn.Module, weight_decay: float, layer_decay: Optional[float] = None,
                     layer_decay_min_scale: float = 0.) -> List[Dict[str, Any]]:
        rules = [rule for r in self.recipes for rule in r.param_rules(model)]
        return special_param_groups(model, weight_decay, rules, layer_decay, layer_decay_min_scale)

    def aux_losses(self, model: nn.Module, epoch: int) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        for r in self.recipes:
            out.update(r.aux_losses(model, epoch))
        return out

    def after_optimizer_step(self, model: nn.Module) -> None:
        for r in self.recipes:
            r.after_optimizer_step(model)

    def __repr__(self) -> str:
        return ' + '.join(repr(r) for r in self.recipes)
