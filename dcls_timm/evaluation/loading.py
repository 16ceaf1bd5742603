"""Loading weights for evaluation: train.py checkpoints (EMA or not), plain state dicts, upstream ConvNeXt-dcls."""
import os
from typing import Dict

import torch
import torch.nn as nn
from timm.models import clean_state_dict

__all__ = ['CheckpointMismatchError', 'load_weights']


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes do not fit the model."""


def _pick_state_dict(checkpoint, path: str, use_ema: bool) -> Dict[str, torch.Tensor]:
    if not isinstance(checkpoint, dict):
        raise CheckpointMismatchError(f'{path} holds a {type(checkpoint).__name__}, not a state dict.')
    keys = ('state_dict_ema', 'model_ema') if use_ema else ('state_dict', 'model')
    for key in keys:
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    if use_ema:
        raise CheckpointMismatchError(f'--use-ema: {path} has no EMA weights (state_dict_ema / model_ema).')
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint  # a plain state dict
    raise CheckpointMismatchError(f'{path}: no state_dict/model entry and not a plain state dict.')


def load_weights(model: nn.Module, path: str, use_ema: bool = False) -> Dict[str, object]:
    """Load ``path`` into ``model`` (``weights_only=True``), adapting upstream layouts through the model's filter.

    Raises:
        CheckpointMismatchError: with the missing and unexpected keys (or shape mismatches) when they do not fit.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Checkpoint not found: {path}')
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    state_dict = clean_state_dict(_pick_state_dict(checkpoint, path, use_ema))
    filter_fn = getattr(model, 'pretrained_filter_fn', None)
    if filter_fn is None:
        from dcls_timm.models.convnext_dcls import ConvNeXtDcls, checkpoint_filter_fn
        if isinstance(model, ConvNeXtDcls):
            filter_fn = checkpoint_filter_fn
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shapes:
        def show(keys):
            return ', '.join(keys[:8]) + (f' ... ({len(keys)} in all)' if len(keys) > 8 else '')
        parts = [f'missing keys: {show(missing)}' if missing else '',
                 f'unexpected keys: {show(unexpected)}' if unexpected else '',
                 'shape mismatches: ' + show([f'{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}'
                                              for k in shapes]) if shapes else '']
        raise CheckpointMismatchError(f'{path} does not fit {type(model).__name__}: '
                                      + '; '.join(p for p in parts if p))
    model.load_state_dict(state_dict)
    return {'path': path, 'ema': use_ema, 'epoch': checkpoint.get('epoch') if isinstance(checkpoint, dict) else None}
