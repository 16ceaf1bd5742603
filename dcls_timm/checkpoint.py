"""One way to read weights into a model, shared by train.py (``--initial-checkpoint``, ``--resume``) and validate.py.

Each step is its own function, so callers that need more than the weights (``--resume``) reuse the same reading
and validation:

1. :func:`read_checkpoint`: ``torch.load(weights_only=True)``, allowing only ``argparse.Namespace`` on top of
   tensors and plain values (timm's ``CheckpointSaver`` stores the run's arguments as one); ``.safetensors`` files
   through safetensors; a folder in the Hugging Face hub layout (timm's ``save_for_hf``: ``config.json`` +
   ``model.safetensors`` / ``pytorch_model.bin``) through its weights file (:func:`weights_file`). A missing file
   raises ``FileNotFoundError``; anything that does not unpickle into a dict raises ``CheckpointError``
   ("<path> is not a readable checkpoint (<reason>)").
2. :func:`pick_weights`: the weights entry (a named ``key`` first when the file has it, e.g. a published file's
   ``model`` or ``state_dict_ema``; else ``state_dict_ema``/``model_ema`` for EMA weights, else
   ``state_dict``/``model``, else the file itself when it is a plain state dict), ``module.``/``_orig_mod.``
   prefixes stripped.
3. :func:`fit_weights`: the model's checkpoint filter (layout conversion, see :func:`model_filter`), then keys and
   shapes checked against the model: one ``CheckpointMismatchError`` naming what does not fit.
4. :func:`load_into` (3 + ``load_state_dict``) and :func:`load_weights` (1 to 3 for a file).

What a layer's outputs depend on beyond its state dict (a DCLS grid size D or interpolation, a FlexConv grid, a
SIREN's omega_0: each layer class names them in ``checkpoint_settings``) is recorded in train.py checkpoints
(:data:`SETTINGS_KEY`, :func:`layer_settings`) and checked against the model before loading
(:func:`check_layer_settings`): a file trained with ``dcls_kernel_size=9`` fits a D=5 model's shapes exactly and
would give other outputs without any error. Files without the record (published, plain state dicts) cannot be
checked.

:func:`share_block_positions` is the layout helper the DCLS models' ``checkpoint_filter_fn`` use to move positions
between per-block keys (upstream checkpoints repeat a stage's shared positions in every block) and a stage's shared
``DclsPositions``; :func:`differing_block_positions` tells, before a model is built, whether a file's per-block
positions agree (``pretrained=True`` builds a model without sharing when they do not, see
``dcls_timm.models._pretrained``).

Every error is a ``ConfigError`` (or ``FileNotFoundError``), which train.py and validate.py print as one line.
"""
import argparse
import contextlib
import math
import os
import pickle
import re
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models import clean_state_dict

from dcls_timm.errors import ConfigError

__all__ = [
    'CheckpointError', 'CheckpointMismatchError', 'POSITION_ATOL', 'FilterFn', 'read_checkpoint', 'pick_weights',
    'model_filter', 'fit_weights', 'load_into', 'load_weights', 'share_block_positions', 'differing_block_positions',
    'weights_file', 'WEIGHTS_FILES', 'SETTINGS_KEY', 'layer_settings', 'check_layer_settings',
]

FilterFn = Callable[[Dict[str, torch.Tensor], nn.Module], Dict[str, torch.Tensor]]

EMA_KEYS = ('state_dict_ema', 'model_ema')
MODEL_KEYS = ('state_dict', 'model')

# The weights file of a folder in the Hugging Face hub layout (timm's save_for_hf / push_to_hf_hub), in timm's order:
# these names first, then the first file of each extension in turn.
WEIGHTS_FILES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')
WEIGHTS_EXTENSIONS = ('.safetensors', '.pth', '.pth.tar', '.bin')

# Per-block copies of shared positions must agree to this many grid cells (absolute). Copies written from one
# shared parameter are bit-identical; the tolerance only forgives a few float32 ulps (e.g. a dtype round trip),
# far below anything that moves a kernel element visibly. The first block's copy is the one loaded.
POSITION_ATOL = 1e-5


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: unreadable, not a checkpoint, or without the weights asked for."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint lacks the weights asked for, or they do not fit the model (keys, shapes, or per-block
    positions that a model sharing them per stage cannot hold)."""


def _one_line(text: str, limit: int = 160) -> str:
    text = ' '.join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _unreadable_reason(e: BaseException) -> str:
    """A short reason for a failed ``torch.load`` (torch's own messages span many lines)."""
    msg = str(e)
    if isinstance(e, pickle.UnpicklingError):
        unsafe = re.search(r'Unsupported global: GLOBAL (\S+)', msg)
        if unsafe:
            return (f'it pickles {unsafe.group(1)}, which weights-only loading refuses; save tensors and plain '
                    'values, e.g. model.state_dict()')
        return 'not a torch checkpoint'  # torch's detail ("Unsupported operand 149") says nothing more
    if isinstance(e, RuntimeError) and 'zip archive' in msg:
        detail = re.search(r'zip archive: ([^.]+)', msg)
        return 'truncated or corrupt' + (f': {detail.group(1)}' if detail else '')
    if isinstance(e, EOFError):
        return 'empty or truncated file'
    if isinstance(e, OSError) and e.errno == 22:  # a zip directory that points past the end of the file
        return 'truncated or corrupt'
    if isinstance(e, (KeyError, IndexError, ValueError, UnicodeDecodeError)):  # the unpickler on arbitrary bytes
        return 'not a torch checkpoint'
    return f'{type(e).__name__}: {_one_line(msg, 100)}'


def _allow_namespace():
    """A context allowing ``argparse.Namespace`` in weights-only loading (torch >= 2.5; older torch refuses it)."""
    safe_globals = getattr(torch.serialization, 'safe_globals', None)
    return safe_globals([argparse.Namespace]) if safe_globals is not None else contextlib.nullcontext()


def weights_file(path: str) -> str:
    """``path`` itself, or for a folder (Hugging Face hub layout, timm's ``save_for_hf``) the weights file in it:
    ``model.safetensors``, ``pytorch_model.bin``, ``pytorch_model.pth``, ``model.pth``, else the first
    ``*.safetensors``, ``*.pth``, ``*.pth.tar`` or ``*.bin`` (timm's ``load_state_dict_from_path`` order).

    Raises:
        FileNotFoundError: ``Checkpoint not found: <path>``.
        CheckpointError: a folder without a weights file.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'Checkpoint not found: {path}')
        return path
    for name in WEIGHTS_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    for ext in WEIGHTS_EXTENSIONS:
        found = sorted(f for f in os.listdir(path) if f.endswith(ext) and os.path.isfile(os.path.join(path, f)))
        if found:
            return os.path.join(path, found[0])
    raise CheckpointError(f'{path} is a folder without a weights file ({", ".join(WEIGHTS_FILES)} or '
                          f'*{", *".join(WEIGHTS_EXTENSIONS)})')


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The dict stored in ``path``, read with ``torch.load(weights_only=True)`` onto the CPU.

    ``argparse.Namespace`` is the one type allowed beyond tensors and plain values. ``.safetensors`` files are read
    with safetensors; a folder stands for its weights file (:func:`weights_file`).

    Raises:
        FileNotFoundError: ``Checkpoint not found: <path>``.
        CheckpointError: ``<path> is not a readable checkpoint (<reason>)`` for a truncated or corrupt file, a file
            that is not a torch checkpoint, one that needs unsafe unpickling, or one that holds no dict.
    """
    path = weights_file(path)
    if path.endswith('.safetensors'):
        try:
            import safetensors.torch
            return dict(safetensors.torch.load_file(path, device='cpu'))
        except (MemoryError, ImportError):
            raise
        except Exception as e:  # safetensors' own error type for bad headers, OSError for truncated data
            raise CheckpointError(f'{path} is not a readable checkpoint (safetensors: {_one_line(e, 100)})') from None
    try:
        with _allow_namespace(), warnings.catch_warnings():
            # torch warns before failing on plain pickles (protocol > 2); the failure says all there is to say
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except (MemoryError, FileNotFoundError):
        raise
    except Exception as e:  # torch raises many types for bad files; each becomes one line
        raise CheckpointError(f'{path} is not a readable checkpoint ({_unreadable_reason(e)})') from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{path} is not a readable checkpoint (it holds a {type(checkpoint).__name__}, '
                              'not a dict of weights)')
    return checkpoint


def _is_state_dict(d: Any) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def pick_weights(
        checkpoint: Dict[str, Any],
        path: str,
        use_ema: Optional[bool] = False,
        key: Optional[str] = None,
) -> Tuple[Optional[str], Dict[str, torch.Tensor]]:
    """The weights entry of ``checkpoint`` and its name (None for a plain state dict), wrapper prefixes stripped.

    Args:
        checkpoint: What :func:`read_checkpoint` returned.
        path: The file, for messages.
        use_ema: True: the EMA weights (``state_dict_ema``, ``model_ema``), an error if absent. False: the model
            weights (``state_dict``, ``model``, or the file itself as a plain state dict). None: the EMA weights
            when the file has them, else the model weights (what timm's ``create_model(checkpoint_path=...)`` did).
        key: An entry to take first when the file has it (a published file's weights key, e.g. ``model`` of the
            ConvNeXt-dcls files, which holds their EMA weights); else ``use_ema`` decides.
    """
    if key is not None and _is_state_dict(checkpoint.get(key)):
        return key, clean_state_dict(checkpoint[key])
    keys = {True: EMA_KEYS, False: MODEL_KEYS, None: EMA_KEYS + MODEL_KEYS}[use_ema]
    for key in keys:
        if _is_state_dict(checkpoint.get(key)):
            return key, clean_state_dict(checkpoint[key])
    if use_ema:
        raise CheckpointMismatchError(f'{path} has no EMA weights (state_dict_ema / model_ema); load its model '
                                      'weights instead (without --use-ema).')
    if _is_state_dict(checkpoint):
        return None, clean_state_dict(checkpoint)
    entries = ', '.join(sorted(map(str, checkpoint))[:8]) or 'none'
    raise CheckpointMismatchError(f'{path} holds no weights: no state_dict/model entry and not a plain state '
                                  f'dict (entries: {entries}).')


def model_filter(model: nn.Module) -> Optional[FilterFn]:
    """The layout filter of a dcls_timm model: ``checkpoint_filter_fn`` of the module that defines its class.

    timm's convention (each model module defines ``checkpoint_filter_fn(state_dict, model)``); applied to
    dcls_timm's models only, whose filters leave this project's own layout unchanged.
    """
    module = sys.modules.get(type(model).__module__)
    if module is None or not module.__name__.startswith('dcls_timm.'):
        return None
    return getattr(module, 'checkpoint_filter_fn', None)


def _show(keys: List[str]) -> str:
    return ', '.join(keys[:8]) + (f' ... ({len(keys)} in all)' if len(keys) > 8 else '')


def fit_weights(
        model: nn.Module,
        state_dict: Dict[str, torch.Tensor],
        path: str,
        filter_fn: Optional[FilterFn] = None,
) -> Dict[str, torch.Tensor]:
    """``state_dict`` converted to ``model``'s layout and checked to fit it exactly (keys and shapes).

    Args:
        model: The model to load into.
        state_dict: Weights from :func:`pick_weights`.
        path: The file, for messages.
        filter_fn: Layout conversion ``(state_dict, model) -> state_dict``; None: :func:`model_filter`.

    Raises:
        CheckpointMismatchError: one line naming missing and unexpected keys, shape mismatches, or the stages whose
            per-block positions disagree while the model shares them.
    """
    name = type(model).__name__
    filter_fn = filter_fn or model_filter(model)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except CheckpointError as e:
            raise CheckpointMismatchError(f'{path} does not fit {name}: {e}') from None
        except (KeyError, ValueError, RuntimeError, IndexError) as e:
            raise CheckpointMismatchError(f'{path} does not fit {name}: its layout conversion failed '
                                          f'({type(e).__name__}: {_one_line(e, 100)})') from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or shapes:
        parts = [f'missing keys: {_show(missing)}' if missing else '',
                 f'unexpected keys: {_show(unexpected)}' if unexpected else '',
                 'shape mismatches: ' + _show([f'{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}'
                                               for k in shapes]) if shapes else '']
        classifier = getattr(model, 'pretrained_cfg', {}).get('classifier')
        if classifier and shapes and not missing and not unexpected and \
                all(k.startswith(classifier + '.') for k in shapes):
            parts.append(f'only the classifier differs: create the model with num_classes='
                         f'{state_dict[shapes[0]].shape[0]} (--num-classes)')
        raise CheckpointMismatchError(f'{path} does not fit {name}: ' + '; '.join(p for p in parts if p))
    return state_dict


SETTINGS_KEY = 'layer_settings'


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def layer_settings(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """``{module name: {setting: value}}`` for every module whose class names ``checkpoint_settings``: what its
    outputs depend on beyond the state dict, as plain values (tuples as lists)."""
    return {name: {attr: _plain(getattr(m, attr)) for attr in m.checkpoint_settings}
            for name, m in model.named_modules() if getattr(type(m), 'checkpoint_settings', None)}


def check_layer_settings(model: nn.Module, checkpoint: Dict[str, Any], path: str) -> None:
    """Raise ``CheckpointMismatchError`` where ``checkpoint`` records (:data:`SETTINGS_KEY`) layer settings that
    differ from ``model``'s (modules in both); nothing to check in files without the record."""
    recorded = checkpoint.get(SETTINGS_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(recorded, dict):
        return
    own = layer_settings(model)
    differ = [f'{name}.{attr} {value} vs {own[name][attr]}' for name, settings in recorded.items() if name in own
              for attr, value in settings.items() if attr in own[name] and _plain(value) != own[name][attr]]
    if differ:
        args = checkpoint.get('args')
        kwargs = args.get('model_kwargs') if isinstance(args, dict) else getattr(args, 'model_kwargs', None)
        hint = (' (it was trained with --model-kwargs '
                + ' '.join(f"{k}={str(v).replace(' ', '')}" for k, v in kwargs.items()) + ')') if kwargs else ''
        raise CheckpointMismatchError(
            f'{path} was trained with other layer settings than {type(model).__name__} has (file vs model): '
            f'{_show(differ)}; build the model as it was trained{hint}.')


def load_into(
        model: nn.Module,
        state_dict: Dict[str, torch.Tensor],
        path: str,
        filter_fn: Optional[FilterFn] = None,
) -> None:
    """Load ``state_dict`` into ``model`` strictly, after :func:`fit_weights`."""
    model.load_state_dict(fit_weights(model, state_dict, path, filter_fn))


def load_weights(
        model: nn.Module,
        path: str,
        use_ema: Optional[bool] = False,
        filter_fn: Optional[FilterFn] = None,
) -> Dict[str, Any]:
    """Read ``path`` and load its weights into ``model`` (any layout the model's filter knows).

    Args:
        model: The model to load into.
        path: A train.py/timm checkpoint, a plain state dict, or an upstream layout (e.g. ConvNeXt-dcls' ``model``).
        use_ema: As :func:`pick_weights`: True the EMA weights, False the model weights, None EMA if present.
        filter_fn: Layout conversion; None: the model's own (:func:`model_filter`).

    Returns:
        ``path``, ``entry`` (the key the weights came from, None for a plain state dict), ``ema`` (whether they are
        EMA weights) and ``epoch`` (the checkpoint's, if any).
    """
    checkpoint = read_checkpoint(path)
    entry, state_dict = pick_weights(checkpoint, path, use_ema)
    check_layer_settings(model, checkpoint, path)
    load_into(model, state_dict, path, filter_fn)
    epoch = checkpoint.get('epoch')
    return {'path': os.fspath(path), 'entry': entry, 'ema': entry in EMA_KEYS,
            'epoch': epoch if isinstance(epoch, int) else None}


def _block_position_copies(
        state_dict: Dict[str, torch.Tensor],
        block_key: str,
        target: Optional[Callable[[Any], Optional[str]]] = None,
) -> Tuple[Dict[str, torch.Tensor], Dict[Tuple[str, str], List[Tuple[int, torch.Tensor]]]]:
    """Split ``state_dict`` into the per-block positions matching ``block_key`` (grouped by stage and name, blocks in
    order) and the rest; ``target(match)`` returning None keeps a matching key in the rest."""
    pattern = re.compile(block_key)
    rest: Dict[str, torch.Tensor] = {}
    copies: Dict[Tuple[str, str], List[Tuple[int, torch.Tensor]]] = {}
    for k, v in state_dict.items():
        m = pattern.match(k)
        if m and (target is None or target(m) is not None):
            copies.setdefault((m['stage'], m['name']), []).append((int(m['block']), v))
        else:
            rest[k] = v
    for blocks in copies.values():
        blocks.sort(key=lambda b: b[0])
    return rest, copies


def _disagreeing(blocks: List[Tuple[int, torch.Tensor]]) -> Tuple[List[int], float]:
    """The blocks whose copy differs from the first block's by more than :data:`POSITION_ATOL`, and the worst gap."""
    first = blocks[0][1]
    differ, worst = [], 0.
    for block, v in blocks[1:]:
        gap = math.inf if v.shape != first.shape else (v.float() - first.float()).abs().max().item()
        if not gap <= POSITION_ATOL:
            differ.append(block)
            worst = max(worst, gap) if gap == gap else math.inf
    return differ, worst


def differing_block_positions(
        state_dict: Dict[str, torch.Tensor],
        block_key: str,
) -> Dict[Tuple[str, str], Tuple[List[int], float]]:
    """The stages whose per-block position copies disagree (beyond :data:`POSITION_ATOL`), before any model exists.

    Args:
        state_dict: Weights in any naming.
        block_key: Regex of a per-block position key in that naming, with named groups ``stage``, ``block`` and
            ``name`` (as :func:`share_block_positions`).

    Returns:
        ``{(stage, name): (blocks that differ from the stage's first block, largest difference)}``, empty when
        every stage's copies agree (or the file holds no per-block positions).
    """
    _, copies = _block_position_copies(state_dict, block_key)
    out = {}
    for group, blocks in copies.items():
        differ, worst = _disagreeing(blocks)
        if differ:
            out[group] = (differ, worst)
    return out


def share_block_positions(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        block_key: str,
        shared_key: str,
        stage_label: str = 'stage {stage}',
) -> Dict[str, torch.Tensor]:
    """Move DCLS positions between per-block keys and a stage's shared tensor, as ``model`` holds them.

    * Per-block tensors the model does not have, whose stage's shared key it has, collapse into that key after
      checking every block agrees with the first within :data:`POSITION_ATOL` (the first block's is kept).
      Blocks that disagree raise ``CheckpointMismatchError`` naming the stages and blocks.
    * A shared tensor the model does not have is copied into every per-block key of that stage the model has.
    * Everything else passes unchanged (this project's own layout is left as it is).

    Args:
        state_dict: Weights in the model's naming, positions per block or per stage.
        model: The model to load into.
        block_key: Regex of a per-block position key with named groups ``stage``, ``block`` and ``name``
            (e.g. ``r'^layer(?P<stage>\\d+)\\.(?P<block>\\d+)\\.conv2\\.(?P<name>P|SIG)$'``).
        shared_key: Format of a stage's shared key with ``{stage}`` and ``{name}``.
        stage_label: Format naming a stage in messages, with ``{stage}``.
    """
    pattern = re.compile(block_key)
    model_keys = set(model.state_dict())

    def collapsible(m) -> Optional[str]:
        target = shared_key.format(stage=m['stage'], name=m['name'])
        return target if m.string not in model_keys and target in model_keys else None

    out, copies = _block_position_copies(state_dict, block_key, collapsible)
    problems, count = [], None
    for (stage, name), blocks in copies.items():
        differ, worst = _disagreeing(blocks)
        if differ:
            count = blocks[0][1].shape[-1]
            problems.append(f'{stage_label.format(stage=stage)} {name}: block(s) {", ".join(map(str, differ))} '
                            f'differ from block {blocks[0][0]} by up to {worst:.3g}')
        out.setdefault(shared_key.format(stage=stage, name=name), blocks[0][1])
    if problems:
        raise CheckpointMismatchError(
            'the checkpoint holds different positions per block (' + '; '.join(problems) + '), but this model '
            f'shares them per stage: create it with dcls_shared_positions=False and dcls_kernel_count={count} '
            f'(--model-kwargs dcls_shared_positions=False dcls_kernel_count={count}) to load one per block')

    used = set()
    for k in model_keys - set(out):
        m = pattern.match(k)
        if m:
            source = shared_key.format(stage=m['stage'], name=m['name'])
            if source in out and source not in model_keys:
                out[k] = out[source].clone()
                used.add(source)
    for source in used:
        del out[source]
    return out
