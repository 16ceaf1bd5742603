"""A cache for values derived from parameters (DCLS kernels, tap geometry) that cannot go stale.

A cached value is returned only while the tensors it was derived from hold exactly the values (and dtype, device
and shape) they had when it was computed, the other inputs (``key``, e.g. an input size) are equal, and autocast
(which decides the dtype of some derivations) is in the same state.
Comparing values catches every way a parameter changes: optimizer steps (fused and foreach kernels bump no version
counter), ``.data`` edits, in-place edits under ``no_grad``, ``load_state_dict``, EMA updates, dtype and device
moves. The comparison reads the tensors, so the cache is used on CPU only, where that read costs a fraction of the
derivation and no device synchronisation; on other devices, under tracing and under ``torch.compile``, values are
derived every time.
"""
from typing import Any, Hashable, Optional, Sequence

import torch

from ._autograd import autograd_function_unsupported

__all__ = ['DerivedCache']


def _full_key(key: Hashable) -> Hashable:
    autocast = torch.get_autocast_dtype('cpu') if torch.is_autocast_enabled('cpu') else None
    return key, autocast


def _cacheable(tensors: Sequence[torch.Tensor]) -> bool:
    # torch.func transforms and forward AD: values may be batched or carry tangents that a kept value would lack
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or autograd_function_unsupported():
        return False
    return all(t.device.type == 'cpu' for t in tensors)


class DerivedCache:
    """One value derived from ``tensors`` (and a hashable ``key``), kept with a copy of the tensors' values."""

    def __init__(self):
        self._entry = None

    def get(self, tensors: Sequence[torch.Tensor], key: Hashable = None) -> Optional[Any]:
        """The cached value if it was derived from tensors equal to ``tensors`` under an equal ``key``, else None."""
        if self._entry is None or not _cacheable(tensors):
            return None
        copies, cached_key, value = self._entry
        if cached_key != _full_key(key) or len(copies) != len(tensors):
            return None
        for c, t in zip(copies, tensors):
            if c.dtype != t.dtype or c.device != t.device or c.shape != t.shape or not torch.equal(c, t.detach()):
                return None
        return value

    def put(self, tensors: Sequence[torch.Tensor], key: Hashable, value: Any) -> None:
        """Keep ``value`` as derived from the current values of ``tensors`` (nothing is kept where not cacheable)."""
        if _cacheable(tensors):
            self._entry = (tuple(t.detach().clone() for t in tensors), _full_key(key), value)

    def clear(self) -> None:
        self._entry = None

    def __getstate__(self):
        return {'_entry': None}  # copies and pickles start empty: derived values need not be saved
