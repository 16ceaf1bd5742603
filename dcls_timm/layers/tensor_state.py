"""A cache key for values derived from tensors (kernels, crops, tap geometry)."""
import weakref
from typing import Sequence

import torch

__all__ = ['TensorState']


class TensorState:
    """Identity, storage and version of tensors: it matches them as long as none was replaced or changed in place
    (optimizer steps, clamping, ``load_state_dict`` and EMA updates all bump the version). Pickled, or made of
    inference tensors, it matches nothing, so caches keyed on it are rebuilt."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        # tensors made under torch.inference_mode have no version counter: such a state matches nothing
        trackable = not any(t.is_inference() for t in tensors)
        self._state = [(weakref.ref(t), t._version, t.data_ptr()) for t in tensors] if trackable else []

    def matches(self, tensors: Sequence[torch.Tensor]) -> bool:
        return bool(self._state) and len(tensors) == len(self._state) and all(
            ref() is t and not t.is_inference() and version == t._version and ptr == t.data_ptr()
            for (ref, version, ptr), t in zip(self._state, tensors))

    def __getstate__(self):
        return {'_state': []}  # weak references do not pickle, and the tensors will be others
