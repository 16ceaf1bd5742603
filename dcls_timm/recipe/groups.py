"""Optimizer parameter groups with the DCLS position rules on top of timm's grouping."""
from typing import Any, Collection, Dict, List, Optional

import torch.nn as nn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay

from dcls_timm.layers import position_parameters

__all__ = ['dcls_param_groups']


def dcls_param_groups(
        model: nn.Module,
        weight_decay: float,
        layer_decay: Optional[float] = None,
        layer_decay_min_scale: float = 0.,
        position_lr_scale: float = 5.,
        position_weight_decay: float = 0.,
        no_weight_decay_list: Optional[Collection[str]] = None,
) -> List[Dict[str, Any]]:
    """timm's parameter groups (weight decay, optional layer decay), with DCLS positions moved to their own groups.

    Position groups keep the layer-decay scale of the group they come from, multiplied by ``position_lr_scale``, and
    get ``position_weight_decay``. timm's schedulers multiply every group's lr by its ``lr_scale``, so warm-up and
    minimum lr are scaled too. Each group carries a ``group_name`` for logging.

    Args:
        model: The (unwrapped) model.
        weight_decay: Weight decay of decayed parameters.
        layer_decay: timm layer-wise lr decay, or None.
        layer_decay_min_scale: Lower bound of the layer-decay scale.
        position_lr_scale: Learning-rate multiplier of positions (and SIG).
        position_weight_decay: Weight decay of positions (and SIG).
        no_weight_decay_list: Parameter names without weight decay (default: the model's ``no_weight_decay()``).
    """
    if no_weight_decay_list is None:
        no_weight_decay_list = getattr(model, 'no_weight_decay', lambda: set())()
    if layer_decay is not None:
        groups = param_groups_layer_decay(
            model, weight_decay=weight_decay, layer_decay=layer_decay, min_scale=layer_decay_min_scale,
            no_weight_decay_list=no_weight_decay_list)
        # name groups by depth: scales grow with depth (several layers share a name where min_scale clamps them)
        depth = {scale: i for i, scale in enumerate(sorted({g['lr_scale'] for g in groups}))}
        names = [f'layer{depth[g["lr_scale"]]}_{"decay" if g["weight_decay"] else "no_decay"}' for g in groups]
    else:
        groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_weight_decay_list)
        names = ['decay' if g['weight_decay'] else 'no_decay' for g in groups]
    positions = {id(p) for p in position_parameters(model)}
    out = []
    for name, group in zip(names, groups):
        rest = [p for p in group['params'] if id(p) not in positions]
        moved = [p for p in group['params'] if id(p) in positions]
        if rest:
            out.append(dict(group, params=rest, group_name=name))
        if moved:
            scale = group.get('lr_scale', 1.) * position_lr_scale
            prefix = name.split('_')[0] + '_' if layer_decay is not None else ''
            out.append(dict(group, params=moved, weight_decay=position_weight_decay, lr_scale=scale,
                            group_name=f'{prefix}positions'))
    return out
