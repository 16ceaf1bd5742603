"""Live view of the positions: per-holder histograms and mean speed per epoch (the paper's appendix figures)."""
from typing import Dict

import torch
import torch.nn as nn

from dcls_timm.layers import position_owners

__all__ = ['PositionMonitor']


class PositionMonitor:
    """Tracks how far the DCLS positions move between two calls of :meth:`epoch_speed`."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._last = self._snapshot()

    def _snapshot(self) -> Dict[str, torch.Tensor]:
        return {name: owner.P.detach().float().cpu().clone() for name, owner in position_owners(self.model).items()}

    def epoch_speed(self) -> Dict[str, float]:
        """Mean absolute position change per holder since the last call (grid taps per epoch)."""
        now = self._snapshot()
        speed = {name: (now[name] - self._last[name]).abs().mean().item() for name in now if name in self._last}
        self._last = now
        return speed

    def positions(self) -> Dict[str, torch.Tensor]:
        """Current positions per holder (CPU copies), for histograms."""
        return self._snapshot()
