"""Optimizer parameter groups with the DCLS position rules on top of timm's grouping."""
from typing import Any, Collection, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay

from dcls_timm.layers import position_parameters

__all__ = ['ParamRule', 'special_param_groups', 'dcls_param_groups']


ParamRule = Tuple[str, Sequence[nn.Parameter], float, float]  # (group name, params, lr scale, weight decay)


def special_param_groups(
        model: nn.Module,
        weight_decay: float,
        rules: Sequence[ParamRule],
        layer_decay: Optional[float] = None,
        layer_decay_min_scale: float = 0.,
        no_weight_decay_list: Optional[Collection[str]] = None,
) -> List[Dict[str, Any]]:
    """timm's parameter groups (weight decay, optional layer decay), with some parameters moved to groups of their own.

    Each rule's parameters keep the layer-decay scale of the group they come from, multiplied by the rule's lr scale,
    and get the rule's weight decay. timm's schedulers multiply every group's lr by its ``lr_scale``, so warm-up and
    minimum lr are scaled too. Each group carries a ``group_name`` for logging.
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
    rule_of = {id(p): rule for rule in rules for p in rule[1]}
    out = []
    for name, group in zip(names, groups):
        rest = [p for p in group['params'] if id(p) not in rule_of]
        if rest:
            out.append(dict(group, params=rest, group_name=name))
        for rule_name, _, lr_scale, rule_wd in rules:
            moved = [p for p in group['params'] if id(p) in rule_of and rule_of[id(p)][0] == rule_name]
            if moved:
                prefix = name.split('_')[0] + '_' if layer_decay is not None else ''
                out.append(dict(group, params=moved, weight_decay=rule_wd,
                                lr_scale=group.get('lr_scale', 1.) * lr_scale, group_name=f'{prefix}{rule_name}'))
    return out


def dcls_param_groups(
        model: nn.Module,
        weight_decay: float,
        layer_decay: Optional[float] = None,
        layer_decay_min_scale: float = 0.,
        position_lr_scale: float = 5.,
        position_weight_decay: float = 0.,
        no_weight_decay_list: Optional[Collection[str]] = None,
) -> List[Dict[str, Any]]:
    """timm's groups with DCLS positions (and SIG) in groups of their own: lr x ``position_lr_scale`` on top of any
    layer-decay scale, weight decay ``position_weight_decay`` (see :func:`special_param_groups`)."""
    rules = [('positions', position_parameters(model), position_lr_scale, position_weight_decay)]
    return special_param_groups(model, weight_decay, rules, layer_decay, layer_decay_min_scale, no_weight_decay_list)
