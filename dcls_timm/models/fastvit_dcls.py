"""FastViT with DCLS depthwise convolutions (FastViT-SA24/SA36-dcls), the DCLS authors' models on timm's FastViT.

Paper: `Dilated convolution with learnable spacings` - https://arxiv.org/abs/2112.03740
(architecture: `FastViT: A Fast Hybrid Vision Transformer using Structural Reparameterization` -
https://arxiv.org/abs/2303.14189)

timm's ``FastVit`` with its 7x7 depthwise convolutions replaced by :func:`dcls_timm.convert_to_dcls`: the conv of
every ConvFFN (``stages.i.blocks.j.mlp.conv.conv``, no bias: BN follows) and the stage-4 conditional positional
encoding (``stages.3.pos_emb.pos_enc``, with its bias); nothing else (the stem, the patch-embedding large-kernel
convs and the RepMixers stay dense and re-parameterisable). 17x17 grid, 34 elements, ``v1``. Positions are shared
per width: the first DCLS conv of each width owns them (``stages.i.blocks.0.mlp.conv.dcls_positions`` for stages
1-3, ``stages.3.pos_emb.dcls_positions`` for stage 4, where the positional encoding comes before the blocks and
shares with their ConvFFNs). These choices reproduce the authors' parameter totals exactly.

``timm.utils.reparameterize_model`` works as for timm's FastViT: the positional encoding (identity + DCLS conv)
folds into one dense DxD depthwise conv, equal in output; the ConvFFN DCLS convs are not re-parameterised.
"""
import re
from functools import partial
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models.fastvit import FastVit, RepConditionalPosEnc
from timm.models.fastvit import checkpoint_filter_fn as _apple_checkpoint_filter_fn

from dcls_timm.checkpoint import pick_weights
from dcls_timm.convert import convert_to_dcls, share_layer_positions
from dcls_timm.layers import Dcls2d
from ._pretrained import build_dcls_model, dcls_cfg

__all__ = ['FastVitDcls', 'DclsRepConditionalPosEnc']

# the DCLS convs, by module name in timm's FastViT
DCLS_LAYERS = ('stages.*.mlp.conv.conv', 'stages.*.pos_emb.pos_enc')


class DclsRepConditionalPosEnc(RepConditionalPosEnc):
    """timm's conditional positional encoding (``pos_enc(x) + x``) whose ``pos_enc`` may be a DCLS conv.

    :meth:`reparameterize` folds the identity and the DCLS conv's dense kernel into one depthwise conv (an even grid
    is padded to the next odd size, so the 'same' alignment is kept), as timm's does for its 7x7 conv.
    """

    def reparameterize(self) -> None:
        conv = getattr(self, 'pos_enc', None)
        if not isinstance(conv, Dcls2d):
            return super().reparameterize()
        with torch.no_grad():
            kernel = conv.construct_kernel()  # [C_out, C_in/g, *D]
            grid = tuple(conv.dilated_kernel_size)
            odd = tuple(d + 1 - d % 2 for d in grid)
            kernel = nn.functional.pad(kernel, (0, odd[1] - grid[1], 0, odd[0] - grid[0]))  # zeros after: centre kept
            per_group = conv.in_channels // conv.groups
            for i in range(conv.out_channels):
                kernel[i, i % per_group, odd[0] // 2, odd[1] // 2] += 1.
            bias = conv.bias.detach().clone() if conv.bias is not None else kernel.new_zeros(conv.out_channels)
        self.reparam_conv = nn.Conv2d(
            conv.in_channels, conv.out_channels, kernel_size=odd, stride=1, padding=(odd[0] // 2, odd[1] // 2),
            groups=conv.groups, bias=True, device=kernel.device, dtype=kernel.dtype)
        self.reparam_conv.weight.data = kernel
        self.reparam_conv.bias.data = bias
        self.spatial_shape = odd
        # the positions stay where they are: the stage's ConvFFN DCLS convs still use them
        del self.pos_enc


class FastVitDcls(FastVit):
    """timm's FastViT whose ConvFFN and positional-encoding 7x7 depthwise convs are DCLS convs.

    Everything else is timm's ``FastVit`` (features, intermediates, grad checkpointing, classifier reset,
    re-parameterisation).
    """

    def __init__(
            self,
            dcls_kernel_size: int = 17,
            dcls_kernel_count: Optional[int] = 34,
            dcls_version: str = 'v1',
            dcls_shared_positions: bool = True,
            **kwargs: Any,
    ):
        """
        Args:
            dcls_kernel_size: Dense DCLS grid size D.
            dcls_kernel_count: Elements K per filter (the authors' 34); None: the iso-parameter rule against the 7x7
                weights replaced.
            dcls_version: ``'v0'``, ``'v1'`` or ``'gauss'``.
            dcls_shared_positions: Share positions (and SIG) between the DCLS convs of one width (one tensor per
                stage); False: every conv owns its own.
            **kwargs: timm ``FastVit`` arguments.
        """
        if kwargs.get('inference_mode', False):
            raise ValueError('FastViT-dcls is built in training mode; re-parameterise it afterwards with '
                             'timm.utils.reparameterize_model(model).')
        super().__init__(**kwargs)
        for m in self.modules():
            if type(m) is RepConditionalPosEnc:  # e.g. from pos_embs given by the caller: DCLS-aware reparameterize
                m.__class__ = DclsRepConditionalPosEnc
        conversion = convert_to_dcls(
            self, dcls_kernel_size, dcls_kernel_count, layers='depthwise', kernel_sizes=None, include=DCLS_LAYERS,
            version=dcls_version, position_sharing='width' if dcls_shared_positions else 'layer')
        self.dcls_kernel_size = dcls_kernel_size
        self.dcls_kernel_count = conversion.kernel_count
        self.dcls_version = dcls_version
        self.dcls_shared_positions = dcls_shared_positions


_POSITION_KEY = re.compile(r'\.(P|SIG)$')


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: FastVitDcls) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to ``model``: this project's layout, or the DCLS authors' (Apple ml-fastvit) layout.

    The authors' files (``network.*``, ``patch_embed.*``; weights under ``state_dict_ema``) are renamed by timm's
    FastViT filter (``convffn.conv.conv`` -> ``mlp.conv.conv``, ``network.6.pe`` -> ``stages.3.pos_emb.pos_enc``...);
    their positions index the axes in reverse order for ``v1``/``gauss`` (dcls <= 0.1.1), so P and SIG are flipped
    along dim 0 (not for a ``v0`` model). They repeat each shared position tensor under every conv using it: the
    copies are checked to agree and loaded once into the width's holder
    (:func:`dcls_timm.convert.share_layer_positions`); a model built with ``dcls_shared_positions=False`` takes
    them per conv.
    """
    state_dict = pick_weights(state_dict, 'the checkpoint', use_ema=None)[1]  # EMA weights first, as published
    if any(k.startswith(('network.', 'patch_embed.')) for k in state_dict):
        state_dict = _apple_checkpoint_filter_fn(state_dict, model)
        if getattr(model, 'dcls_version', 'v1') != 'v0':
            state_dict = {k: v.flip(0) if _POSITION_KEY.search(k) else v for k, v in state_dict.items()}
    return share_layer_positions(
        state_dict, model, 'create it with dcls_shared_positions=False (--model-kwargs dcls_shared_positions=False) '
                           'to load one per conv')


# per-block positions in the authors' naming (``network.<i>.<block>.convffn.conv.conv.P``) and in timm's
_BLOCK_POSITIONS = (
    r'^network\.(?P<stage>\d+)\.(?P<block>\d+)\.convffn\.conv\.conv\.(?P<name>P|SIG)$',
    r'^stages\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\.mlp\.conv\.conv\.(?P<name>P|SIG)$',
)


def _create_fastvit_dcls(variant: str, pretrained: bool = False, **kwargs) -> FastVitDcls:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    return build_dcls_model(
        FastVitDcls, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        block_positions=_BLOCK_POSITIONS,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return dcls_cfg(url=url, **{
        'input_size': (3, 256, 256), 'pool_size': (8, 8), 'crop_pct': 0.9, 'interpolation': 'bicubic',
        'first_conv': ('stem.0.conv_kxk.0.conv', 'stem.0.conv_scale.conv'), 'classifier': 'head.fc',
        **kwargs
    })


# The DCLS authors' ImageNet-1k weights (SPEC 6): Apple ml-fastvit layout under "state_dict_ema" of a timm
# CheckpointSaver file, positions repeated under every conv sharing them, v1 with P[0] on columns (flipped by the
# filter). Evaluated at 256 px, bicubic, crop 0.9 (SA24) / 0.95 (SA36); no top-1 published in text.
_ZENODO = 'https://zenodo.org/records/8370737/files/'
_PUBLISHED_ARGS = dict(dcls_kernel_size=17, dcls_kernel_count=34, dcls_version='v1')

default_cfgs = generate_default_cfgs({
    'fastvit_sa24_dcls.dcls_in1k': _cfg(
        url=_ZENODO + 'fastvit_sa24_v1_17lim_34el_seed0.pth.tar', weights_key='state_dict_ema',
        model_args=_PUBLISHED_ARGS, crop_pct=0.9),
    'fastvit_sa36_dcls.dcls_in1k': _cfg(
        url=_ZENODO + 'fastvit_sa36_v1_17lim_34el_seed0.pth.tar', weights_key='state_dict_ema',
        model_args=_PUBLISHED_ARGS, crop_pct=0.95),
})


@register_model
def fastvit_sa24_dcls(pretrained: bool = False, **kwargs) -> FastVitDcls:
    """FastViT-SA24-dcls: ConvFFN and stage-4 CPE 7x7 depthwise convs as 17x17 v1 DCLS, K=34; 21,523,496 params."""
    model_args = dict(
        layers=(4, 4, 12, 4),
        embed_dims=(64, 128, 256, 512),
        mlp_ratios=(4, 4, 4, 4),
        pos_embs=(None, None, None, partial(DclsRepConditionalPosEnc, spatial_shape=(7, 7))),
        token_mixers=('repmixer', 'repmixer', 'repmixer', 'attention'),
    )
    return _create_fastvit_dcls('fastvit_sa24_dcls', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def fastvit_sa36_dcls(pretrained: bool = False, **kwargs) -> FastVitDcls:
    """FastViT-SA36-dcls: ConvFFN and stage-4 CPE 7x7 depthwise convs as 17x17 v1 DCLS, K=34; 31,452,584 params."""
    model_args = dict(
        layers=(6, 6, 18, 6),
        embed_dims=(64, 128, 256, 512),
        mlp_ratios=(4, 4, 4, 4),
        pos_embs=(None, None, None, partial(DclsRepConditionalPosEnc, spatial_shape=(7, 7))),
        token_mixers=('repmixer', 'repmixer', 'repmixer', 'attention'),
    )
    return _create_fastvit_dcls('fastvit_sa36_dcls', pretrained=pretrained, **dict(model_args, **kwargs))
