"""ConvFormer and CAFormer with DCLS depthwise convolutions, the DCLS authors' models on timm's MetaFormer.

Paper: `Dilated convolution with learnable spacings` - https://arxiv.org/abs/2112.03740
(architecture: `MetaFormer Baselines for Vision` - https://arxiv.org/abs/2210.13452)

timm's ``MetaFormer`` with the 7x7 depthwise conv of every SepConv token mixer (``stages.i.blocks.j.token_mixer
.dwconv``, no bias) replaced by :func:`dcls_timm.convert_to_dcls`: all four stages of ConvFormer (inner widths
128/256/640/1024 for S18), stages 1-2 of CAFormer (128/256; stages 3-4 are attention). 17x17 grid, ``v1``, K = 40
(ConvFormer-S18) or 34 (CAFormer-S18). Positions are shared per width, i.e. per stage, held by the stage's first
SepConv (``stages.i.blocks.0.token_mixer.dcls_positions``). These choices reproduce the authors' parameter totals
exactly.
"""
import re
from typing import Any, Dict, Optional

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv
from timm.models.metaformer import checkpoint_filter_fn as _sail_checkpoint_filter_fn

from dcls_timm.checkpoint import pick_weights
from dcls_timm.convert import convert_to_dcls, share_layer_positions
from ._pretrained import build_dcls_model, dcls_cfg

__all__ = ['MetaFormerDcls']

# the DCLS convs, by module name in timm's MetaFormer
DCLS_LAYERS = ('stages.*.token_mixer.dwconv',)


class MetaFormerDcls(MetaFormer):
    """timm's MetaFormer whose SepConv depthwise convs are DCLS convs.

    Everything else is timm's ``MetaFormer`` (features, intermediates, grad checkpointing, classifier reset).
    """

    def __init__(
            self,
            dcls_kernel_size: int = 17,
            dcls_kernel_count: Optional[int] = 40,
            dcls_version: str = 'v1',
            dcls_shared_positions: bool = True,
            **kwargs: Any,
    ):
        """
        Args:
            dcls_kernel_size: Dense DCLS grid size D.
            dcls_kernel_count: Elements K per filter; None: the iso-parameter rule against the 7x7 weights replaced.
            dcls_version: ``'v0'``, ``'v1'`` or ``'gauss'``.
            dcls_shared_positions: Share positions (and SIG) between the SepConvs of one width (one tensor per
                stage); False: every conv owns its own.
            **kwargs: timm ``MetaFormer`` arguments.
        """
        super().__init__(**kwargs)
        conversion = convert_to_dcls(
            self, dcls_kernel_size, dcls_kernel_count, layers='depthwise', include=DCLS_LAYERS,
            version=dcls_version, position_sharing='width' if dcls_shared_positions else 'layer')
        self.dcls_kernel_size = dcls_kernel_size
        self.dcls_kernel_count = conversion.kernel_count
        self.dcls_version = dcls_version
        self.dcls_shared_positions = dcls_shared_positions


# the authors' (sail-sg metaformer) per-block position keys
_SAIL_POSITIONS = re.compile(r'^stages\.(?P<stage>\d+)\.(?P<block>\d+)\.(?P<rest>.+)\.(?P<name>P|SIG)$')


class _NoTarget:
    """Stands for a weight the model does not have: no size to reshape to."""

    @staticmethod
    def numel() -> int:
        return -1


class _LenientState(dict):
    """The model's state dict as timm's MetaFormer filter reads it (``model.state_dict()[new_key]`` for every renamed
    key, to reshape): a key the model lacks (the classifier of ``num_classes=0``) raised a KeyError; here it keeps its
    new name, and the strict key check after the filter decides (the classifier is dropped for a new head, anything
    else is reported as unexpected)."""

    def __missing__(self, key):
        return _NoTarget


class _LenientTarget:
    def __init__(self, model: torch.nn.Module):
        self._state = _LenientState(model.state_dict())

    def state_dict(self) -> Dict[str, Any]:
        return self._state


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: MetaFormerDcls) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to ``model``: this project's layout, or the DCLS authors' (sail-sg metaformer) layout.

    The authors' files (``downsample_layers.*``, ``stages.i.j.*``; weights under ``state_dict_ema``) are renamed by
    timm's MetaFormer filter, except their positions (``stages.i.j.token_mixer.dwconv.P``), which that filter would
    look up in the model's state dict, where a shared tensor has one key per stage: they are renamed here
    (``stages.i.blocks.j...``) and flipped along dim 0 (dcls <= 0.1.1 ``v1``/``gauss`` index the axes in reverse
    order; not for a ``v0`` model). The copies of a shared tensor are checked to agree and loaded once into the
    stage's holder (:func:`dcls_timm.convert.share_layer_positions`); a model built with
    ``dcls_shared_positions=False`` takes them per conv.
    """
    state_dict = pick_weights(state_dict, 'the checkpoint', use_ema=None)[1]  # EMA weights first, as published
    if 'stem.conv.weight' not in state_dict and any(k.startswith('downsample_layers.') for k in state_dict):
        flip = getattr(model, 'dcls_version', 'v1') != 'v0'
        positions, rest = {}, {}
        for k, v in state_dict.items():
            m = _SAIL_POSITIONS.match(k)
            if m:
                key = f"stages.{m['stage']}.blocks.{m['block']}.{m['rest']}.{m['name']}"
                positions[key] = v.flip(0) if flip else v
            else:
                rest[k] = v
        state_dict = dict(_sail_checkpoint_filter_fn(rest, _LenientTarget(model)), **positions)
    return share_layer_positions(
        state_dict, model, 'create it with dcls_shared_positions=False (--model-kwargs dcls_shared_positions=False) '
                           'to load one per conv')


# per-block positions in the authors' naming and in timm's
_BLOCK_POSITIONS = (
    r'^stages\.(?P<stage>\d+)\.(?P<block>\d+)\.token_mixer\.dwconv\.(?P<name>P|SIG)$',
    r'^stages\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\.token_mixer\.dwconv\.(?P<name>P|SIG)$',
)


def _create_metaformer_dcls(variant: str, pretrained: bool = False, **kwargs) -> MetaFormerDcls:
    default_out_indices = tuple(range(len(kwargs.get('depths', (2, 2, 6, 2)))))
    out_indices = kwargs.pop('out_indices', default_out_indices)
    return build_dcls_model(
        MetaFormerDcls, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        block_positions=_BLOCK_POSITIONS,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return dcls_cfg(url=url, **{
        'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 1.0, 'interpolation': 'bicubic',
        'first_conv': 'stem.conv', 'classifier': 'head.fc.fc2',
        **kwargs
    })


# The DCLS authors' ImageNet-1k weights (SPEC 6): sail-sg metaformer layout under "state_dict_ema" of a timm
# CheckpointSaver file, positions repeated in every block, v1 with P[0] on columns (flipped by the filter).
# Evaluated at 224 px, crop 1.0, bicubic; no top-1 published in text.
_ZENODO = 'https://zenodo.org/records/8370737/files/'

default_cfgs = generate_default_cfgs({
    'convformer_s18_dcls.dcls_in1k': _cfg(
        url=_ZENODO + 'convformer_s18_v1_17lim_40el_seed0.pth.tar', weights_key='state_dict_ema',
        model_args=dict(dcls_kernel_size=17, dcls_kernel_count=40, dcls_version='v1')),
    'caformer_s18_dcls.dcls_in1k': _cfg(
        url=_ZENODO + 'caformer_s18_v1_17lim_34el_seed0.pth.tar', weights_key='state_dict_ema',
        model_args=dict(dcls_kernel_size=17, dcls_kernel_count=34, dcls_version='v1')),
})


@register_model
def convformer_s18_dcls(pretrained: bool = False, **kwargs) -> MetaFormerDcls:
    """ConvFormer-S18-dcls: every SepConv 7x7 depthwise conv as 17x17 v1 DCLS, K=40; 26,848,432 params."""
    model_args = dict(
        depths=(3, 3, 9, 3),
        dims=(64, 128, 320, 512),
        token_mixers=SepConv,
        norm_layers=LayerNorm2dNoBias,
        dcls_kernel_count=40,
    )
    return _create_metaformer_dcls('convformer_s18_dcls', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def caformer_s18_dcls(pretrained: bool = False, **kwargs) -> MetaFormerDcls:
    """CAFormer-S18-dcls: the SepConv 7x7 depthwise convs of stages 1-2 as 17x17 v1 DCLS, K=34; 26,350,488 params."""
    model_args = dict(
        depths=(3, 3, 9, 3),
        dims=(64, 128, 320, 512),
        token_mixers=(SepConv, SepConv, Attention, Attention),
        norm_layers=(LayerNorm2dNoBias,) * 2 + (LayerNormNoBias,) * 2,
        dcls_kernel_count=34,
    )
    return _create_metaformer_dcls('caformer_s18_dcls', pretrained=pretrained, **dict(model_args, **kwargs))
