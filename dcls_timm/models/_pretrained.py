r"""Published DCLS weights through timm's ``pretrained=True``: pretrained cfgs, and one loading path for every source.

timm's own ``load_pretrained`` reads a url with ``torch.load(weights_only=True)`` (refusing the
``argparse.Namespace`` that timm's ``CheckpointSaver`` stores as ``args``), takes whatever entry it finds first,
cannot build a model whose layout depends on the file (per-block positions) and reports mismatches as a long
``load_state_dict`` error. Models built with :func:`build_dcls_model` load instead through the project's one
checkpoint loader (:mod:`dcls_timm.checkpoint`, also behind validate.py ``--checkpoint`` and train.py
``--initial-checkpoint`` / ``--resume``):

    the source (timm's order: ``pretrained_cfg['state_dict']``, ``file``, ``hf_hub_id``, ``url``; or a local
    folder) -> ``read_checkpoint`` -> ``pick_weights`` (the published file's weights key first) -> the model's
    ``checkpoint_filter_fn`` (layout conversion) -> timm's target adaptation (``in_chans``: first conv adapted
    with timm's ``adapt_input_conv``; ``num_classes`` different from the cfg's, or ``features_only``: the
    classifier keeps its fresh init unless the file's already fits) -> key/shape check (one
    ``CheckpointMismatchError`` line) -> ``load_state_dict``.

Sources (timm 1.0.31 spellings):

* ``url`` of the pretrained cfg: downloaded once with timm's ``download_cached_file`` into the torch hub cache
  (``$TORCH_HOME/hub/checkpoints``, or ``cache_dir=``), then read from there;
* ``pretrained_cfg_overlay=dict(file=PATH)``: a checkpoint file (any layout the model's filter knows, e.g. a
  downloaded published file, a train.py checkpoint, a plain state dict, ``.safetensors``) or a folder;
* a local folder in the Hugging Face hub layout written by timm's ``save_for_hf`` (``config.json`` +
  ``model.safetensors`` / ``pytorch_model.bin``): ``timm.create_model('local-dir:/path', pretrained=True)``
  (architecture and model arguments from its ``config.json``), or ``pretrained_cfg_overlay=dict(source='local-dir',
  file='/path')``, ``dict(file='/path')`` or ``dict(hf_hub_id='local-dir:/path')`` with a named model;
* ``hf_hub_id`` (``hf-hub:`` names): downloaded with ``huggingface_hub`` (``model.safetensors`` first).

Layout decisions that depend on the file are made before the model is built: the published file's model arguments
(D, K, version: :func:`dcls_cfg` ``model_args``) are defaults for arguments not given, and when the file holds
different positions per block (ResNet-50-dcls may, SPEC 1.6) and ``dcls_shared_positions`` is not given, the
model is built with ``dcls_shared_positions=False`` and the file's kernel count, so ``pretrained=True`` works
whichever way the file stores them. ``dcls_shared_positions=True`` given explicitly keeps the model shared and
such a file stops with the error naming the stages and the fix.

Use in a model module (see ``resnet_dcls.py``, ``convnext_dcls.py``)::

    from ._pretrained import build_dcls_model, dcls_cfg

    def _cfg(url='', **kwargs):  # family defaults, overridable per tag
        return dcls_cfg(url=url, **{'first_conv': 'conv1', 'classifier': 'fc', 'pool_size': (7, 7), **kwargs})

    default_cfgs = generate_default_cfgs({
        'resnet50_dcls.dcls_in1k': _cfg(
            url='https://zenodo.org/records/8373830/files/resnet_dcls_kernel_5_model_best.pth.tar',
            weights_key='state_dict_ema',            # the file's entry holding the weights
            top1=None,                               # published ImageNet-1k top-1, None if not published
            model_args=dict(dcls_kernel_size=7, dcls_kernel_count=5, dcls_version='v0')),  # what it was trained with
    })

    _BLOCK_POSITIONS = r'^layer(?P<stage>\d+)\.(?P<block>\d+)\.conv2\.(?P<name>P|SIG)$'  # in the file's naming

    def _create(variant, pretrained=False, **kwargs):
        return build_dcls_model(ResNetDcls, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                block_positions=(_BLOCK_POSITIONS,), **kwargs)  # feature_cfg=... as timm's
"""
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import adapt_input_conv, build_model_with_cfg, resolve_pretrained_cfg
from timm.models import _builder as _timm_builder
from timm.models._hub import download_cached_file, has_hf_hub, hf_split

from dcls_timm.checkpoint import (
    SETTINGS_KEY, CheckpointError, FilterFn, check_layer_settings, differing_block_positions, load_into, model_filter,
    pick_weights, read_checkpoint, weights_file,
)

__all__ = [
    'PAPER_IDS', 'PAPER_NAME', 'PublishedWeights', 'dcls_cfg', 'published_weights', 'pretrained_source',
    'read_pretrained', 'load_pretrained_weights', 'build_dcls_model',
]

_logger = logging.getLogger(__name__)

PAPER_IDS = 'arXiv:2112.03740'
PAPER_NAME = 'Dilated convolution with learnable spacings'
# The authors' repositories (DCLS, ConvNeXt-dcls) are MIT licensed; their Zenodo records hold the weights.
WEIGHTS_LICENSE = 'mit'

_ZENODO_RECORD = re.compile(r'^(https://zenodo\.org/records?/\d+)/files/')


@dataclass(frozen=True)
class PublishedWeights:
    """What the published file needs beyond timm's pretrained cfg fields (looked up by the cfg's ``url``).

    Attributes:
        url: The published file.
        weights_key: The entry holding the weights (``model``, ``state_dict_ema``...); None: timm's order
            (EMA weights when present, else the model weights, else a plain state dict).
        top1: ImageNet-1k top-1 (%) published for these weights, None if not published.
        model_args: Model arguments the file was trained with (D, K, version...): defaults for ``pretrained=True``
            when not given.
    """
    url: str
    weights_key: Optional[str] = None
    top1: Optional[float] = None
    model_args: Dict[str, Any] = field(default_factory=dict)


_PUBLISHED: Dict[str, PublishedWeights] = {}


def dcls_cfg(
        url: str = '',
        *,
        weights_key: Optional[str] = None,
        top1: Optional[float] = None,
        model_args: Optional[Dict[str, Any]] = None,
        notes: Sequence[str] = (),
        **kwargs: Any,
) -> Dict[str, Any]:
    """A timm pretrained cfg (a dict for ``generate_default_cfgs``) for a DCLS model, with published weights or not.

    Defaults: 1000 classes, 224 px, crop 0.875, bicubic, ImageNet mean/std, the DCLS paper (``paper_ids``,
    ``paper_name``). With a ``url``: ``license`` (MIT, the authors' repositories), ``origin_url`` (the Zenodo
    record page of a Zenodo url), ``hf_hub_id`` unset, and ``notes`` recording the weights key and the published
    top-1; ``weights_key``, ``top1`` and ``model_args`` are also registered for the loader
    (:func:`published_weights`). ``kwargs`` are any :class:`timm.models.PretrainedCfg` fields and override the
    defaults (``first_conv``, ``classifier``, ``pool_size``, ``test_input_size``...).

    Args:
        url: The published file (the real download url); empty for a model without published weights.
        weights_key: The file's entry holding the weights.
        top1: Published ImageNet-1k top-1 (%); None when not published (left out).
        model_args: Model arguments the file was trained with, e.g. ``dict(dcls_kernel_size=17,
            dcls_kernel_count=34, dcls_version='v0')``.
        notes: Extra notes (``PretrainedCfg.notes``).
    """
    cfg: Dict[str, Any] = {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'paper_ids': PAPER_IDS, 'paper_name': PAPER_NAME,
    }
    notes = tuple(notes)
    if url:
        record = _ZENODO_RECORD.match(url)
        cfg['license'] = WEIGHTS_LICENSE
        if record:
            cfg['origin_url'] = record.group(1)
        if weights_key:
            notes += (f"weights: the '{weights_key}' entry of the published file",)
        if top1 is not None:
            notes += (f'ImageNet-1k top-1 {top1} (paper)',)
        _PUBLISHED[url] = PublishedWeights(url, weights_key, top1, dict(model_args or {}))
    elif weights_key or top1 is not None or model_args:
        raise ValueError('dcls_cfg: weights_key, top1 and model_args describe published weights: give their url.')
    if notes:
        cfg['notes'] = notes
    cfg.update(kwargs)
    return cfg


def _as_dict(pretrained_cfg: Any) -> Dict[str, Any]:
    if pretrained_cfg is None:
        return {}
    return pretrained_cfg if isinstance(pretrained_cfg, dict) else pretrained_cfg.to_dict()


def published_weights(pretrained_cfg: Any) -> Optional[PublishedWeights]:
    """The published weights a pretrained cfg (dict or ``PretrainedCfg``) points to, by its ``url``; None if none."""
    url = _as_dict(pretrained_cfg).get('url')
    return _PUBLISHED.get(url) if isinstance(url, str) else None


def pretrained_source(pretrained_cfg: Any) -> Tuple[str, Any]:
    """Where a pretrained cfg's weights are: ``(kind, location)``, timm's order.

    ``kind`` is ``'state_dict'`` (``pretrained_cfg['state_dict']``), ``'local-dir'`` (``source='local-dir'`` with
    ``file`` the folder, or ``hf_hub_id='local-dir:/path'``), ``'file'`` (a file or folder), ``'hf-hub'``,
    ``'url'``, or ``''`` when the cfg has no weights.
    """
    cfg = _as_dict(pretrained_cfg)
    source = cfg.get('source') or ''
    hub = cfg.get('hf_hub_id')
    if isinstance(hub, str) and hub.startswith('local-dir:'):
        return 'local-dir', hub[len('local-dir:'):]
    if source == 'hf-hub' and hub:
        return 'hf-hub', hub
    if source == 'local-dir' and cfg.get('file'):
        return 'local-dir', cfg['file']
    if cfg.get('state_dict'):
        return 'state_dict', cfg['state_dict']
    if cfg.get('file'):
        return 'file', cfg['file']
    if hub and has_hf_hub():
        return 'hf-hub', hub
    if cfg.get('url'):
        return 'url', cfg['url']
    return '', None


def _download_from_hf(hub_id: str, filename: Optional[str], cache_dir: Any) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError
    repo_id, revision = hf_split(hub_id)
    names = [filename] if filename else ['model.safetensors', 'pytorch_model.bin']
    for name in names:
        try:
            return hf_hub_download(repo_id, filename=name, revision=revision, cache_dir=cache_dir)
        except EntryNotFoundError:
            continue
    raise CheckpointError(f'hf-hub:{hub_id} has no weights file ({", ".join(names)})')


def read_pretrained(
        pretrained_cfg: Any,
        cache_dir: Any = None,
) -> Tuple[str, Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read the weights a pretrained cfg points to: ``(where, state_dict, record)``, ``where`` naming them in
    messages, ``record`` a train.py checkpoint's layer settings and arguments (empty for other files), for
    :func:`dcls_timm.checkpoint.check_layer_settings`.

    The file is read by :func:`dcls_timm.checkpoint.read_checkpoint` (weights only, ``argparse.Namespace``
    allowed; a folder through its weights file) and its weights entry picked by
    :func:`dcls_timm.checkpoint.pick_weights`: the published weights key first when the file has it, else the EMA
    weights when present, else the model weights, else the file as a plain state dict.

    Raises:
        CheckpointError: no weights in the cfg, an unreadable file, or no weights entry.
        FileNotFoundError: a missing file or folder.
    """
    cfg = _as_dict(pretrained_cfg)
    kind, location = pretrained_source(cfg)
    if kind == 'state_dict':
        where, checkpoint = 'pretrained_cfg state_dict', location
    elif kind in ('file', 'local-dir'):
        where = weights_file(location)
        checkpoint = read_checkpoint(where)
    elif kind == 'url':
        # timm's download (torch.hub's download_url_to_file into the hub cache, once); timm's global switches
        where = download_cached_file(
            location,
            check_hash=getattr(_timm_builder, '_CHECK_HASH', False),
            progress=getattr(_timm_builder, '_DOWNLOAD_PROGRESS', False),
            cache_dir=cache_dir,
        )
        checkpoint = read_checkpoint(where)
    elif kind == 'hf-hub':
        where = _download_from_hf(location, cfg.get('hf_hub_filename'), cache_dir)
        checkpoint = read_checkpoint(where)
    else:
        name = cfg.get('architecture') or 'this model'
        raise CheckpointError(f'No pretrained weights exist for {name}: use pretrained=False, or give a file with '
                              "pretrained_cfg_overlay=dict(file='...') (validate.py/train.py: --checkpoint / "
                              '--initial-checkpoint).')
    published = published_weights(cfg)
    _, state_dict = pick_weights(checkpoint, where, use_ema=None, key=published.weights_key if published else None)
    # a train.py checkpoint's record of the layer settings (and the run's arguments, for the message)
    record = {k: checkpoint[k] for k in (SETTINGS_KEY, 'args') if isinstance(checkpoint, dict) and k in checkpoint}
    return where, state_dict, record


def _names(value: Union[None, str, Iterable[str]]) -> Tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _adapt_to_target(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        pretrained_cfg: Dict[str, Any],
        num_classes: int,
        in_chans: int,
) -> Dict[str, torch.Tensor]:
    """timm's ``load_pretrained`` adaptation of converted weights to the model asked for.

    ``in_chans`` different from the cfg's ``input_size[0]``: the first conv(s) adapted by timm's
    ``adapt_input_conv`` (kept at their init where it cannot). ``num_classes`` different from the cfg's (0 for
    ``features_only``): the classifier keeps its fresh init, as timm's (which drops it from the file), unless the
    file's classifier already has the model's shape (a file fine-tuned to those classes), which timm would discard.
    """
    own = model.state_dict()
    state_dict = dict(state_dict)
    pretrained_in_chans = (pretrained_cfg.get('input_size') or (3,))[0]
    for conv in _names(pretrained_cfg.get('first_conv')):
        key = conv + '.weight'
        if key not in state_dict or key not in own or state_dict[key].shape == own[key].shape:
            continue
        if in_chans != pretrained_in_chans and state_dict[key].ndim == 4:
            try:
                state_dict[key] = adapt_input_conv(in_chans, state_dict[key], base_chans=pretrained_in_chans)
            except NotImplementedError:
                _logger.warning(f'Cannot adapt the pretrained {conv} weights to {in_chans} channels: kept at init.')
                state_dict[key] = own[key]
    if num_classes != pretrained_cfg.get('num_classes', num_classes):
        for classifier in _names(pretrained_cfg.get('classifier')):
            weight = classifier + '.weight'
            if weight in own and weight in state_dict and state_dict[weight].shape == own[weight].shape:
                continue  # the file's classifier already has the classes asked for (e.g. a fine-tuned file): kept
            for key in (weight, classifier + '.bias'):
                state_dict.pop(key, None)
                if key in own:
                    state_dict[key] = own[key]
            if num_classes == 0 and '.' in classifier:
                # no classifier at all: an MLP head's other layers (MetaFormer's head.fc.fc1/norm around its
                # head.fc.fc2) go with it, as timm's reset_classifier(0) removes them
                head = classifier.rsplit('.', 1)[0] + '.'
                for key in [k for k in state_dict if k.startswith(head) and k not in own]:
                    del state_dict[key]
    return state_dict


def load_pretrained_weights(
        model: nn.Module,
        state_dict: Dict[str, torch.Tensor],
        where: str,
        pretrained_cfg: Any,
        num_classes: Optional[int] = None,
        in_chans: Optional[int] = None,
        filter_fn: Optional[FilterFn] = None,
) -> None:
    """Load weights from :func:`read_pretrained` into ``model`` as ``pretrained=True`` does.

    The model's layout filter (``filter_fn``, default its module's ``checkpoint_filter_fn``), then timm's target
    adaptation (``in_chans``, ``num_classes``; defaults: the model's), then the key/shape check and a strict load
    (:func:`dcls_timm.checkpoint.load_into`): a mismatch raises one ``CheckpointMismatchError`` line.
    """
    cfg = _as_dict(pretrained_cfg)
    convert = filter_fn or model_filter(model)
    num_classes = getattr(model, 'num_classes', 1000) if num_classes is None else num_classes
    in_chans = (cfg.get('input_size') or (3,))[0] if in_chans is None else in_chans

    def fit(sd: Dict[str, torch.Tensor], m: nn.Module) -> Dict[str, torch.Tensor]:
        sd = convert(sd, m) if convert is not None else sd
        return _adapt_to_target(sd, m, cfg, num_classes, in_chans)

    load_into(model, state_dict, where, fit)


def _positions_per_block(
        state_dict: Dict[str, torch.Tensor],
        block_positions: Sequence[str],
) -> Optional[int]:
    """The kernel count of a file whose per-block positions disagree somewhere, None when they agree everywhere."""
    for block_key in block_positions:
        if differing_block_positions(state_dict, block_key):
            pattern = re.compile(block_key)
            return next(v.shape[-1] for k, v in state_dict.items() if pattern.match(k))
    return None


# model arguments that act in training only: a bare model name does not take them from its default tag
TRAINING_ONLY_ARGS = frozenset({'dropout', 'dropout_in', 'drop_rate', 'drop_path_rate', 'proj_drop_rate'})


def build_dcls_model(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool = False,
        *,
        pretrained_filter_fn: Optional[FilterFn] = None,
        block_positions: Sequence[str] = (),
        **kwargs: Any,
) -> nn.Module:
    """timm's ``build_model_with_cfg`` with the weights of ``pretrained=True`` loaded by the project's loader.

    Without ``pretrained`` it is ``build_model_with_cfg``, with the ``model_args`` of a tag named explicitly (e.g.
    ``ckcnn_2_30.pmnist``: its permutation, omega_0 and dropouts) as defaults; a bare name takes its default tag's
    but those in :data:`TRAINING_ONLY_ARGS`.
    With it: the pretrained cfg is resolved as timm does (``pretrained_cfg``, tag, ``pretrained_cfg_overlay``), the
    weights are read first (:func:`read_pretrained`), the published file's ``model_args`` become defaults, a file
    with different positions per block (matching one of ``block_positions``, in the file's naming) builds the model
    with ``dcls_shared_positions=False`` unless that argument is given, and the model is then built by
    ``build_model_with_cfg`` (features, pretrained cfg, traits) with the weights loaded right after instantiation
    (:func:`load_pretrained_weights`, after :func:`dcls_timm.checkpoint.check_layer_settings` for a train.py file),
    before any feature wrapper.

    Args:
        model_cls: The model class (or any callable taking the model arguments).
        variant: The registered model name.
        pretrained: Load the pretrained weights.
        pretrained_filter_fn: Layout conversion ``(state_dict, model) -> state_dict`` (the module's
            ``checkpoint_filter_fn``); None: the model module's own.
        block_positions: Regexes of per-block position keys in the layouts the file may use, with named groups
            ``stage``, ``block`` and ``name`` (see :func:`dcls_timm.checkpoint.differing_block_positions`); only
            for models with a ``dcls_shared_positions`` argument.
        **kwargs: ``build_model_with_cfg`` arguments (``pretrained_cfg``, ``pretrained_cfg_overlay``,
            ``feature_cfg``, ``cache_dir``...) and model arguments.
    """
    if not pretrained:
        tag = kwargs.get('pretrained_cfg')
        if tag is None or isinstance(tag, str):
            # a tag named explicitly ('ckcnn_2_30.pmnist') builds what its weights were trained as, recipe
            # dropouts included, weights or not: a checkpoint of it loaded later (validate.py --checkpoint) meets the
            # right architecture. A bare name takes its default tag's arguments that act outside training too
            # (omega_0, which no state dict holds, the permutation), not its dropouts: a config naming the bare
            # model trains with its own
            cfg = resolve_pretrained_cfg(variant, pretrained_cfg=tag or None)
            published = published_weights(cfg.to_dict()) if cfg is not None else None
            for k, v in (published.model_args if published else {}).items():
                if tag or k not in TRAINING_ONLY_ARGS:
                    kwargs.setdefault(k, v)
        return build_model_with_cfg(model_cls, variant, False, pretrained_filter_fn=pretrained_filter_fn, **kwargs)

    pretrained_cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.pop('pretrained_cfg', None),
        pretrained_cfg_overlay=kwargs.pop('pretrained_cfg_overlay', None),
    )
    cfg = pretrained_cfg.to_dict()
    where, state_dict, record = read_pretrained(cfg, kwargs.get('cache_dir'))

    decided: Dict[str, Any] = {}
    published = published_weights(cfg)
    for k, v in (published.model_args if published else {}).items():
        if k not in kwargs:
            decided[k] = kwargs[k] = v
    if block_positions and 'dcls_shared_positions' not in kwargs:
        count = _positions_per_block(state_dict, block_positions)
        if count is not None:
            decided['dcls_shared_positions'] = kwargs['dcls_shared_positions'] = False
            if 'dcls_kernel_count' not in kwargs:
                decided['dcls_kernel_count'] = kwargs['dcls_kernel_count'] = count
            _logger.info(f'{where} holds different positions per block: {variant} built with '
                         'dcls_shared_positions=False to load them.')
    features_only = bool(kwargs.get('features_only', False))

    def create(**model_kwargs: Any) -> nn.Module:
        model = model_cls(**model_kwargs)
        model.pretrained_cfg = cfg
        check_layer_settings(model, record, where)
        num_classes = 0 if features_only else getattr(model, 'num_classes', model_kwargs.get('num_classes', 1000))
        load_pretrained_weights(model, state_dict, where, cfg, num_classes=num_classes,
                                in_chans=model_kwargs.get('in_chans', 3), filter_fn=pretrained_filter_fn)
        return model

    model = build_model_with_cfg(create, variant, False, pretrained_cfg=pretrained_cfg,
                                 pretrained_filter_fn=pretrained_filter_fn, **kwargs)
    if decided:  # reconstruction arguments (timm's save_for_hf config.json) include what the file decided
        model._model_args = dict(getattr(model, '_model_args', {}), **decided)
    return model
