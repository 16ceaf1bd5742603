"""The timm model interface shared by the constant-resolution classifiers (FlexNet, CCNN, CKCNN), and the input and
head modules of the sequence models.

Sequence models read ``[B, C, L]`` sequences and ``[B, C, H, W]`` images (timm's loaders), the latter flattened row
major (``view(B, C, H * W)``), optionally through a fixed pixel permutation (pMNIST), in :class:`SequenceInput`.
"""
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from timm.layers import ClassifierHead, SelectAdaptivePool2d, get_device_dtype, register_notrace_module
from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool
from timm.models._features import feature_take_indices

from dcls_timm.layers import SeparableFlexConv
from dcls_timm.layers.fused import (
    batch_norm_affine, conv2d_args, conv_channels_last, eager_inference, eval_batch_norm, fused_conv2d, use_fused_conv)

__all__ = ['StemBlocksClassifier', 'ConvNormActStem', 'SequenceInput', 'SequenceHead', 'seeded_permutation']


def seeded_permutation(length: int, seed: int = 0) -> torch.Tensor:
    """``numpy.random.seed(seed); numpy.random.permutation(length)`` (the pMNIST permutation for seed 0, length 784:
    693, 85, 647, 392, ...) without touching numpy's global state."""
    return torch.from_numpy(np.random.RandomState(seed).permutation(length)).long()


class ConvNormActStem(nn.Sequential):
    """``conv -> BatchNorm -> activation`` (an ``nn.Sequential``: the same names and state dict). Eager no-grad 2-D
    evaluation on CPU runs the convolution (a separable FlexConv's pointwise one) with the BatchNorm folded in and
    the ReLU or GELU inside, one oneDNN call (:func:`dcls_timm.layers.fused.fused_conv2d`, float32 rounding);
    otherwise, or with hooks, the modules in turn (``fast_path = False``: always)."""
    fast_path: bool = True

    @torch.jit.unused
    def _fused_inference(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.fast_path or len(self) != 3 or not eager_inference(x, tuple(self)) \
                or not use_fused_conv(x, self[2], self[1]):
            return None
        separable = type(self[0]) is SeparableFlexConv
        module = self[0].pointwise if separable else self[0]
        conv = conv2d_args(module)
        if conv is None:
            return None
        h = self[0].depthwise(x) if separable else x
        return fused_conv2d(h, *conv, self[2], self[1], channels_last=conv_channels_last(module, h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            fused = self._fused_inference(x)
            if fused is not None:
                return fused
        for module in self:
            x = module(x)
        return x


@register_notrace_module  # branches on the input's rank: a leaf for FX
class SequenceInput(nn.Module):
    """Images ``[B, C, H, W]`` to sequences ``[B, C, H * W]`` (row major); sequences ``[B, C, L]`` pass through.

    With ``permute=True`` the steps are reordered by a fixed permutation, ``x[..., permutation]``, kept as a persistent
    buffer (``permutation``) so checkpoints carry it.
    """

    def __init__(self, permute: bool = False, permutation_seed: int = 0, permutation_length: int = 784,
                 device=None):
        super().__init__()
        if permute:
            self.register_buffer('permutation', seeded_permutation(permutation_length, permutation_seed).to(device))
        else:
            self.permutation = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])
        elif x.dim() != 3:
            raise ValueError(f'A sequence model takes [B, C, L] sequences or [B, C, H, W] images, got {list(x.shape)}.')
        if self.permutation is not None:
            if x.shape[-1] != self.permutation.numel():
                raise ValueError(f'The permutation has {self.permutation.numel()} steps, the input {x.shape[-1]}.')
            x = x[..., self.permutation]
        return x

    def extra_repr(self) -> str:
        return '' if self.permutation is None else f'permutation={self.permutation.numel()} steps'


class SequenceHead(nn.Module):
    """Classifier of ``[B, C, L]`` features: the last step (``pool_type='last'``) or the mean over time
    (``'avg'``), dropout, linear. The interface of timm's ``ClassifierHead`` (``reset``, ``pre_logits``)."""

    def __init__(self, in_features: int, num_classes: int, pool_type: str = 'last', drop_rate: float = 0.,
                 device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.pool_type = self._check(pool_type)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes, device=device, dtype=dtype) if num_classes > 0 \
            else nn.Identity()

    @staticmethod
    def _check(pool_type: str) -> str:
        if pool_type not in ('last', 'avg'):
            raise ValueError(f"A sequence head pools with 'last' or 'avg', got {pool_type!r}.")
        return pool_type

    def reset(self, num_classes: int, pool_type: Optional[str] = None, device=None, dtype=None) -> None:
        if pool_type:
            self.pool_type = self._check(pool_type)
        self.fc = nn.Linear(self.in_features, num_classes, device=device, dtype=dtype) if num_classes > 0 \
            else nn.Identity()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., -1] if self.pool_type == 'last' else x.mean(-1)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.pool(x))
        return x if pre_logits else self.fc(x)


class StemBlocksClassifier(nn.Module):
    """``stem -> blocks -> norm -> head`` with timm's classifier methods; subclasses build the four modules
    (``stem``, ``blocks`` an ``nn.Sequential``, ``norm``, ``head`` a timm ``ClassifierHead``) and set
    ``num_classes``; sequence models also set ``seq_input`` (a :class:`SequenceInput`, registered before the stem so
    timm's feature wrappers run it) and ``drop_in`` (input dropout); feature maps are then ``[B, C, L]``."""

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        seq = getattr(self, 'seq_input', None)
        x = seq(x) if seq is not None else x
        drop = getattr(self, 'drop_in', None)
        return drop(x) if drop is not None else x

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise NotImplementedError(f'{type(self).__name__} has no gradient checkpointing.')

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, **get_device_dtype(self))  # a new head where the model is

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features after the stem (index 0) and after each block (1..), as timm's ``forward_intermediates``
        (sequence models: ``[B, C, L]``, ``output_fmt`` 'NCHW' or 'NCL', both channels first)."""
        assert output_fmt in ('NCHW', 'NCL'), 'Output shape must be NCHW (NCL for sequence models).'
        take, max_index = feature_take_indices(len(self.blocks) + 1, indices)
        intermediates = []
        x = self.stem(self._input(x))
        if 0 in take:
            intermediates.append(x)
        last = len(self.blocks)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index]
        for i, block in enumerate(blocks, start=1):
            x = block(x)
            if i in take:
                intermediates.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(self._input(x)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self._trunk(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    @torch.jit.unused
    def _pooled_norm_head(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Logits of the un-normalised features ``x`` with the final eval BatchNorm applied after the head's average
        (or last-step) pooling, which a per-channel affine map commutes with: ``[B, C]`` values instead of a
        feature-sized pass (float32 rounding). None where that does not hold or a module call could be missed."""
        head = self.head
        if not eager_inference(x, (self.norm, head)) or not eval_batch_norm(self.norm, x.dim() - 2):
            return None
        if type(head) is SequenceHead:
            pool, finish = head.pool, (lambda y: head.fc(head.drop(y)))
        elif type(head) is ClassifierHead and type(head.global_pool) is SelectAdaptivePool2d \
                and type(head.global_pool.pool) in (nn.AdaptiveAvgPool2d, FastAdaptiveAvgPool):
            pool, finish = head.global_pool, (lambda y: head.flatten(head.fc(head.drop(y))))
        else:
            return None
        pooled = pool(x)
        scale, shift = batch_norm_affine(self.norm)
        view = [-1] + [1] * (pooled.dim() - 2)
        return finish(torch.addcmul(shift.to(pooled.dtype).view(view), pooled, scale.to(pooled.dtype).view(view)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            features = self._trunk(x)
            logits = self._pooled_norm_head(features)
            return logits if logits is not None else self.forward_head(self.norm(features))
        return self.forward_head(self.forward_features(x))
