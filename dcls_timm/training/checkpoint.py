"""Atomic training checkpoints that load with ``torch.load(weights_only=True)``, and exact resume."""
import argparse
import os
import random
import shutil
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from timm.utils import CheckpointSaver, get_state_dict

from dcls_timm.checkpoint import SETTINGS_KEY, CheckpointError, layer_settings, read_checkpoint

__all__ = ['AtomicCheckpointSaver', 'rng_state', 'set_rng_state', 'load_training_checkpoint', 'plain_args']


def plain_args(args: argparse.Namespace) -> Dict[str, Any]:
    """The run's arguments as plain Python values (a Namespace would need unsafe unpickling)."""
    def plain(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return str(v)
    return {k: plain(v) for k, v in vars(args).items()}


def rng_state() -> Dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        'python': random.getstate(),
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    npst = state['numpy']
    np.random.set_state(('MT19937', npst['keys'].numpy().astype(np.uint32), npst['pos'], npst['has_gauss'],
                         npst['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


class AtomicCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver whose files appear whole or not at all, with plain-value contents.

    Every file is written under a temporary name, flushed to disk and renamed over its target, so a crash never
    leaves a truncated ``last``/``model_best``/history checkpoint. ``extra_state`` adds entries (scheduler, RNG).
    """

    def __init__(self, *args, extra_state: Optional[Callable[[], Dict[str, Any]]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_state = extra_state

    def _replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)  # atomic on POSIX and Windows; no unlink window

    def _duplicate(self, src: str, dst: str) -> None:
        tmp = dst + '.partial'
        if os.path.exists(tmp):
            os.unlink(tmp)
        try:
            os.link(src, tmp)
        except (OSError, NotImplementedError):
            shutil.copy2(src, tmp)
            _fsync(tmp)
        os.replace(tmp, dst)

    def _save(self, save_path: str, epoch: int, metric: Optional[float] = None) -> None:
        state = {
            'epoch': epoch,
            'version': 2,  # epoch is the completed one; resume starts at epoch + 1
            'arch': self.args.model if self.args is not None else type(self.model).__name__.lower(),
            'state_dict': get_state_dict(self.model, self.unwrap_fn),
            'optimizer': self.optimizer.state_dict(),
            SETTINGS_KEY: layer_settings(self.unwrap_fn(self.model)),  # D, grids, omega_0: in no state dict
        }
        if self.args is not None:
            state['args'] = plain_args(self.args)
        if self.model_ema is not None:
            state['state_dict_ema'] = get_state_dict(self.model_ema, self.unwrap_fn)
        if self.amp_scaler is not None:
            state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if metric is not None:
            state['metric'] = metric
        state['saver'] = self.state_dict(epoch, metric)
        if self.extra_state is not None:
            state.update(self.extra_state())
        with open(save_path, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())


def _fsync(path: str) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint written by :class:`AtomicCheckpointSaver` (or timm's CheckpointSaver) for an exact resume.

    Read by :func:`dcls_timm.checkpoint.read_checkpoint` (``weights_only``); its weights go into the model through
    :func:`dcls_timm.checkpoint.load_into`, the same checks as ``--initial-checkpoint`` and validate.py.

    Raises:
        FileNotFoundError: the file is missing.
        CheckpointError: the file is unreadable, or holds weights but no training state (``state_dict``, ``epoch``).
    """
    checkpoint = read_checkpoint(path)
    if 'state_dict' not in checkpoint or 'epoch' not in checkpoint:
        raise CheckpointError(f'{path} is not a training checkpoint (no state_dict/epoch), so --resume cannot '
                              'continue it: use --initial-checkpoint to start from its weights.')
    return checkpoint
