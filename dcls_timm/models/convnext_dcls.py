"""ConvNeXt with DCLS depthwise convolutions (ConvNeXt-dcls), and the paper's dense comparison baselines.

Paper: `Dilated convolution with learnable spacings` - https://arxiv.org/abs/2112.03740

Every 7x7 depthwise conv of timm's ConvNeXt becomes a depthwise DCLS conv with a larger dense grid (17x17 by
default). Positions (and SIG for ``gauss``) are shared by all blocks of a stage and live in ``stages.i.positions``;
weights stay per block. The kernel count K is the largest one that keeps the DCLS parameters at or below the dense
depthwise weights they replace (iso-parameter rule), unless given.
"""
import difflib
import inspect
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import Mlp, to_ntuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model, register_model_deprecations
from timm.models.convnext import ConvNeXt, ConvNeXtBlock
from timm.models.convnext import checkpoint_filter_fn as _fb_checkpoint_filter_fn

from dcls_timm.checkpoint import share_block_positions
from dcls_timm.layers import Dcls2d, share_positions
from dcls_timm.layers.fused import eager_inference, identity_in_eval, mlp_residual, use_fused_mlp
from ._pretrained import build_dcls_model, dcls_cfg

__all__ = ['ConvNeXtDcls', 'ConvNeXtDenseDw', 'ConvNeXtFusedBlock', 'iso_param_kernel_count', 'set_fused_mlp']

_CONVNEXT_ARGS = frozenset(inspect.signature(ConvNeXt.__init__).parameters) - {'self'}


def iso_param_kernel_count(
        depths: Sequence[int],
        dims: Sequence[int],
        kernel_sizes: Union[int, Sequence[int]] = 7,
        version: str = 'v0',
        shared_positions: bool = True,
        ndim: int = 2,
) -> int:
    """Largest kernel count K whose DCLS parameters (weights + positions) do not exceed the dense depthwise weights.

    Args:
        depths: Blocks per stage.
        dims: Channels per stage.
        kernel_sizes: Dense depthwise kernel size(s) being replaced.
        version: DCLS version (``gauss`` also learns SIG, doubling the position parameters).
        shared_positions: Positions shared by all blocks of a stage (one tensor per stage) or per block.
        ndim: Spatial dimensions.
    """
    kernel_sizes = to_ntuple(len(depths))(kernel_sizes)
    tensors = ndim * (2 if version == 'gauss' else 1)
    dense = sum(k ** ndim * d * c for k, d, c in zip(kernel_sizes, depths, dims))
    per_element = sum(c * (d + tensors * (1 if shared_positions else d)) for d, c in zip(depths, dims))
    return dense // per_element


def _check_model_args(kwargs: Dict[str, Any], extra: Sequence[str]) -> None:
    unknown = sorted(set(kwargs) - _CONVNEXT_ARGS)
    if unknown:
        valid = sorted(_CONVNEXT_ARGS | set(extra))
        hints = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
        msg = ', '.join(f"'{k}'" + (f" (did you mean '{h[0]}'?)" if h else '') for k, h in hints.items())
        raise TypeError(f'Unknown model argument(s): {msg}. Valid arguments: {", ".join(valid)}.')


class ConvNeXtFusedBlock(ConvNeXtBlock):
    """timm's ``ConvNeXtBlock`` (same modules and state dict) whose CPU inference runs the MLP, layer scale and
    residual through two fused oneDNN matmuls (:mod:`dcls_timm.layers.fused`), five passes over the
    activations fewer. Training, autograd, FX, compile, autocast, GPUs, hooks on the MLP (or any global module hook)
    and non-default blocks (conv MLP, GRN, other activations) take timm's forward. Set
    ``fast_path = False`` on a block (or :func:`set_fused_mlp` on a model) for timm's forward everywhere.
    """
    fast_path: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward pass."""
        if self.fast_path and not self.training and not self.use_conv_mlp and type(self.mlp) is Mlp \
                and isinstance(self.mlp.norm, nn.Identity) and isinstance(self.shortcut, nn.Identity) \
                and use_fused_mlp(x, self.mlp.fc1, self.mlp.act, self.mlp.fc2) \
                and identity_in_eval(self.mlp.drop1, self.mlp.drop2, self.drop_path) \
                and eager_inference(x, (self.mlp, self.shortcut, self.drop_path)):
            y = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))
            return mlp_residual(y, x.permute(0, 2, 3, 1), self.mlp.fc1, self.mlp.fc2, self.gamma).permute(0, 3, 1, 2)
        return super().forward(x)


def set_fused_mlp(model: nn.Module, enabled: bool) -> int:
    """Switch the fused inference MLP of every :class:`ConvNeXtFusedBlock` in ``model``; returns how many."""
    blocks = [m for m in model.modules() if isinstance(m, ConvNeXtFusedBlock)]
    for block in blocks:
        block.fast_path = enabled
    return len(blocks)


def _use_fused_blocks(model: ConvNeXt) -> None:
    # timm's ConvNeXtStage builds its blocks itself (no block class argument): the subclass only adds a forward
    for stage in model.stages:
        for block in stage.blocks:
            if type(block) is ConvNeXtBlock:
                block.__class__ = ConvNeXtFusedBlock


class ConvNeXtDcls(ConvNeXt):
    """ConvNeXt whose depthwise convolutions are DCLS convolutions.

    Everything else is timm's ``ConvNeXt`` (features, intermediates, grad checkpointing, classifier reset).
    """

    def __init__(
            self,
            dcls_kernel_size: Union[int, Tuple[int, ...]] = 17,
            dcls_kernel_count: Optional[int] = None,
            dcls_version: str = 'v0',
            dcls_shared_positions: bool = True,
            **kwargs,
    ):
        """
        Args:
            dcls_kernel_size: Dense DCLS grid size D, one int or one per stage.
            dcls_kernel_count: Elements K per filter; None applies the iso-parameter rule against ``kernel_sizes``
                (the dense depthwise size being replaced, 7 by default).
            dcls_version: ``'v0'``, ``'v1'`` or ``'gauss'``.
            dcls_shared_positions: Share positions (and SIG) across the blocks of each stage.
            **kwargs: timm ``ConvNeXt`` arguments.
        """
        _check_model_args(kwargs, ('dcls_kernel_size', 'dcls_kernel_count', 'dcls_version', 'dcls_shared_positions'))
        if kwargs.get('output_stride', 32) != 32:
            raise ValueError('ConvNeXt-dcls models support output_stride=32 only (no dilated stages).')
        super().__init__(**kwargs)
        depths = [len(stage.blocks) for stage in self.stages]
        dims = [stage.blocks[0].conv_dw.out_channels for stage in self.stages]
        if dcls_kernel_count is None:
            dcls_kernel_count = iso_param_kernel_count(depths, dims, kwargs.get('kernel_sizes', 7),
                                                      dcls_version, dcls_shared_positions)
        self.dcls_kernel_size = to_ntuple(len(depths))(dcls_kernel_size)
        self.dcls_kernel_count = dcls_kernel_count
        self.dcls_version = dcls_version
        self.dcls_shared_positions = dcls_shared_positions

        for stage, size in zip(self.stages, self.dcls_kernel_size):
            convs = []
            for block in stage.blocks:
                dense = block.conv_dw
                conv = Dcls2d(
                    dense.in_channels,
                    dense.out_channels,
                    kernel_count=dcls_kernel_count,
                    padding='same',
                    dilated_kernel_size=size,
                    groups=dense.groups,
                    bias=dense.bias is not None,
                    version=dcls_version,
                    device=dense.weight.device,
                    dtype=dense.weight.dtype,
                )
                # ConvNeXt's own init for its depthwise conv; positions keep the layer's normal(0, 0.5)
                trunc_normal_(conv.weight, std=.02)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
                block.conv_dw = conv
                convs.append(conv)
            if dcls_shared_positions:
                stage.positions = share_positions(convs)
        _use_fused_blocks(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        """Parameter groups as timm's ConvNeXt; a stage's shared positions join its first group."""
        matcher = super().group_matcher(coarse)
        if not coarse:
            matcher['blocks'].insert(1, (r'^stages\.(\d+)\.positions', (0,)))
        return matcher


class ConvNeXtDenseDw(ConvNeXt):
    """ConvNeXt with dense, optionally dilated, depthwise convolutions: the DCLS paper's comparison baselines."""

    def __init__(self, dw_dilation: int = 1, **kwargs):
        """
        Args:
            dw_dilation: Dilation of every depthwise conv ("same" padding kept).
            **kwargs: timm ``ConvNeXt`` arguments.
        """
        _check_model_args(kwargs, ('dw_dilation',))
        if kwargs.get('output_stride', 32) != 32:
            raise ValueError('Dilated-depthwise ConvNeXt supports output_stride=32 only.')
        super().__init__(**kwargs)
        for stage in self.stages:
            for block in stage.blocks:
                conv = block.conv_dw
                conv.dilation = (dw_dilation, dw_dilation)
                conv.padding = tuple(dw_dilation * (k - 1) // 2 for k in conv.kernel_size)
        self.dw_dilation = dw_dilation
        _use_fused_blocks(self)


_BLOCK_POSITIONS = r'^stages\.(?P<stage>\d+)\.blocks\.(?P<block>\d+)\.conv_dw\.(?P<name>P|SIG)$'


def _fb_rename_only(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's Facebook -> timm renaming, reshaping 2-D weights (linear -> 1x1 conv) only where the sizes agree.

    timm's filter reshapes every non-head 2-D weight to the model's shape and fails on a model of other sizes; here
    the names come from timm's filter (run on empty stand-ins, which it never reshapes) and the mismatching tensors
    keep their shapes, so the key/shape check reports them.
    """
    state_dict = state_dict.get('model', state_dict)
    stand_ins = {k: torch.empty(0) for k in state_dict}
    source = {id(v): k for k, v in stand_ins.items()}
    own = model.state_dict()
    out = {}
    for k, stand_in in _fb_checkpoint_filter_fn(stand_ins, model).items():
        if id(stand_in) not in source:  # a tensor timm's filter reshaped itself (GRN, not in ConvNeXt-dcls)
            continue
        v = state_dict[source[id(stand_in)]]
        if v.ndim == 2 and 'head' not in k and k in own and own[k].numel() == v.numel():
            v = v.reshape(own[k].shape)
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: ConvNeXtDcls) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to ``model``: our own layout, or the upstream (Facebook ConvNeXt) layout.

    Upstream checkpoints repeat the shared positions in every block (``stages.i.j.dwconv.P``): for a model that
    shares positions they are checked to agree and loaded once into ``stages.i.positions`` (blocks that disagree
    raise ``CheckpointMismatchError``); a model built with ``dcls_shared_positions=False`` takes them per block.
    Per-stage positions are expanded for a model without sharing. Upstream 2-D ``v1``/``gauss`` kernels index the
    axes in reverse order, so their P/SIG are flipped.
    """
    upstream = 'model' in state_dict or any(k.startswith('downsample_layers.') for k in state_dict)
    if upstream:
        try:
            state_dict = _fb_checkpoint_filter_fn(state_dict, model)
        except RuntimeError:  # its reshape of 2-D weights into a model of other sizes: let the shape check name them
            state_dict = _fb_rename_only(state_dict, model)
        if getattr(model, 'dcls_version', 'v0') != 'v0':
            block = re.compile(_BLOCK_POSITIONS)
            state_dict = {k: v.flip(0) if block.match(k) else v for k, v in state_dict.items()}
    return share_block_positions(state_dict, model, _BLOCK_POSITIONS, 'stages.{stage}.positions.{name}')


def _create_convnext_dcls(variant: str, pretrained: bool = False, **kwargs) -> ConvNeXtDcls:
    # no block_positions: the ConvNeXt-dcls files come from code sharing positions per stage, so per-block copies
    # that disagree mean a wrong file or model and stop with the error naming the fix (dcls_shared_positions=False)
    return build_dcls_model(
        ConvNeXtDcls, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs)


def _create_dense_baseline(variant: str, pretrained: bool = False, **kwargs) -> ConvNeXtDenseDw:
    return build_dcls_model(
        ConvNeXtDenseDw, variant, pretrained,
        pretrained_filter_fn=_fb_checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs)


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return dcls_cfg(url=url, **{
        'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.875, 'interpolation': 'bicubic',
        'first_conv': 'stem.0', 'classifier': 'head.fc',
        **kwargs
    })


# The DCLS authors' ImageNet-1k weights (EMA; SPEC 6): Facebook ConvNeXt layout under "model", positions repeated
# in every block (v0: P[0] on rows; gauss: P/SIG flipped along dim 0 by the filter). Evaluated at 224 px, crop 0.875.
_ZENODO = 'https://zenodo.org/record/7112021/files/'
_ZENODO_GAUSS = 'https://zenodo.org/record/8029747/files/'

default_cfgs = generate_default_cfgs({
    'convnext_atto_dcls': _cfg(test_input_size=(3, 288, 288), test_crop_pct=0.95),
    'convnext_femto_dcls': _cfg(test_input_size=(3, 288, 288), test_crop_pct=0.95),
    'convnext_pico_dcls': _cfg(test_input_size=(3, 288, 288), test_crop_pct=0.95),
    'convnext_nano_dcls': _cfg(test_input_size=(3, 288, 288), test_crop_pct=0.95),
    'convnext_tiny_dcls.dcls_in1k': _cfg(
        url=_ZENODO + 'convnext_dcls_tiny_1k_224_ema.pth', weights_key='model', top1=82.5,
        model_args=dict(dcls_kernel_size=17, dcls_kernel_count=34, dcls_version='v0')),
    'convnext_small_dcls.dcls_in1k': _cfg(
        url=_ZENODO + 'convnext_dcls_small_1k_224_ema.pth', weights_key='model', top1=83.7,
        model_args=dict(dcls_kernel_size=17, dcls_kernel_count=40, dcls_version='v0')),
    'convnext_base_dcls.dcls_in1k': _cfg(
        url=_ZENODO + 'convnext_dcls_base_1k_224_ema.pth', weights_key='model', top1=84.1,
        model_args=dict(dcls_kernel_size=17, dcls_kernel_count=40, dcls_version='v0')),
    'convnext_tiny_dcls_gauss.dcls_in1k': _cfg(
        url=_ZENODO_GAUSS + 'convnext_dcls_gauss_tiny_1k_224_ema.pth', weights_key='model',
        model_args=dict(dcls_kernel_size=23, dcls_kernel_count=26, dcls_version='gauss')),
    'convnext_tiny_k17': _cfg(paper_name='Dilated convolution with learnable spacings (dense 17x17 baseline)'),
    'convnext_tiny_dil2': _cfg(paper_name='Dilated convolution with learnable spacings (7x7 dilated-by-2 baseline)'),
})


@register_model
def convnext_atto_dcls(pretrained: bool = False, **kwargs) -> ConvNeXtDcls:
    """ConvNeXt-atto with 17x17 DCLS depthwise convs (K=29)."""
    model_args = dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), conv_mlp=True)
    return _create_convnext_dcls('convnext_atto_dcls', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_femto_dcls(pretrained: bool = False, **kwargs) -> ConvNeXtDcls:
    """ConvNeXt-femto with 17x17 DCLS depthwise convs (K=29)."""
    model_args = dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384), conv_mlp=True)
    return _create_convnext_dcls('convnext_femto_dcls', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_pico_dcls(pretrained: bool = False, **kwargs) -> ConvNeXtDcls:
    """ConvNeXt-pico with 17x17 DCLS depthwise convs (K=29)."""
    model_args = dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), conv_mlp=True)
    return _create_convnext_dcls('convnext_pico_dcls', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_nano_dcls(pretrained: bool = False, **kwargs) -> ConvNeXtDcls:
    """ConvNeXt-nano with 17x17 DCLS depthwise convs (K=31)."""
    model_args = dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), conv_mlp=True)
    return _create_convnext_dcls('convnext_nano_dcls', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_tiny_dcls(pretrained: bool = False, **kwargs) -> ConvNeXtDcls:
    """ConvNeXt-T-dcls: 17x17 v0 DCLS depthwise convs, K=34, positions shared per stage (paper, ImageNet 82.5)."""
    model_args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))
    return _create_convnext_dcls('convnext_tiny_dcls', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_small_dcls(pretrained: bool = False, **kwargs) -> ConvNeXtDcls:
    """ConvNeXt-S-dcls: 17x17 v0 DCLS depthwise convs, K=40 (paper, ImageNet 83.7)."""
    model_args = dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768))
    return _create_convnext_dcls('convnext_small_dcls', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_base_dcls(pretrained: bool = False, **kwargs) -> ConvNeXtDcls:
    """ConvNeXt-B-dcls: 17x17 v0 DCLS depthwise convs, K=40 (paper, ImageNet 84.1)."""
    model_args = dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024))
    return _create_convnext_dcls('convnext_base_dcls', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_tiny_dcls_gauss(pretrained: bool = False, **kwargs) -> ConvNeXtDcls:
    """ConvNeXt-T-dcls with 23x23 Gaussian interpolation, K=26, P and SIG shared per stage."""
    model_args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), dcls_kernel_size=23, dcls_version='gauss')
    return _create_convnext_dcls('convnext_tiny_dcls_gauss', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_tiny_k17(pretrained: bool = False, **kwargs) -> ConvNeXtDenseDw:
    """ConvNeXt-T with dense 17x17 depthwise kernels (DCLS paper baseline)."""
    model_args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), kernel_sizes=17)
    return _create_dense_baseline('convnext_tiny_k17', pretrained, **dict(model_args, **kwargs))


@register_model
def convnext_tiny_dil2(pretrained: bool = False, **kwargs) -> ConvNeXtDenseDw:
    """ConvNeXt-T with 7x7 depthwise kernels dilated by 2 (DCLS paper baseline)."""
    model_args = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), dw_dilation=2)
    return _create_dense_baseline('convnext_tiny_dil2', pretrained, **dict(model_args, **kwargs))


register_model_deprecations(__name__, {
    'convnext_dcls_tiny': 'convnext_tiny_dcls',
    'convnext_dcls_small': 'convnext_small_dcls',
    'convnext_dcls_base': 'convnext_base_dcls',
})
