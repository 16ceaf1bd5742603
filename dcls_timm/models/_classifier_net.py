"""The timm model interface shared by the constant-resolution classifiers (FlexNet, CCNN)."""
from typing import Optional

import torch
import torch.nn as nn

__all__ = ['StemBlocksClassifier']


class StemBlocksClassifier(nn.Module):
    """``stem -> blocks -> norm -> head`` with timm's classifier methods; subclasses build the four modules."""

    stem: nn.Module
    blocks: nn.Sequential
    norm: nn.Module
    head: nn.Module
    num_classes: int

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise NotImplementedError(f'{type(self).__name__} has no gradient checkpointing.')

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
