"""The timm model interface shared by the constant-resolution classifiers (FlexNet, CCNN)."""
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import get_device_dtype
from timm.models._features import feature_take_indices

__all__ = ['StemBlocksClassifier']


class StemBlocksClassifier(nn.Module):
    """``stem -> blocks -> norm -> head`` with timm's classifier methods; subclasses build the four modules
    (``stem``, ``blocks`` an ``nn.Sequential``, ``norm``, ``head`` a timm ``ClassifierHead``) and set
    ``num_classes``."""

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
        """Features after the stem (index 0) and after each block (1..), as timm's ``forward_intermediates``."""
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        take, max_index = feature_take_indices(len(self.blocks) + 1, indices)
        intermediates = []
        x = self.stem(x)
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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
