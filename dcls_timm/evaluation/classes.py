"""ImageNet class bookkeeping: the 1000 wnids in index order and the 200-class subsets of ImageNet-A and -R."""
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Tuple

import timm.data

__all__ = ['imagenet_wnids', 'imagenet_wnid_to_index', 'subset_classes', 'SUBSETS']

_INFO = Path(timm.data.__file__).parent / '_info'
SUBSETS = ('imagenet-a', 'imagenet-r')


def _read_lines(name: str) -> List[str]:
    return [line.strip() for line in (_INFO / name).read_text().splitlines() if line.strip()]


@lru_cache(maxsize=None)
def imagenet_wnids() -> Tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in model output order (timm's ``imagenet_synsets.txt``)."""
    wnids = tuple(_read_lines('imagenet_synsets.txt'))
    assert len(wnids) == 1000
    return wnids


def imagenet_wnid_to_index() -> Dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_wnids())}


@lru_cache(maxsize=None)
def subset_classes(name: str) -> Tuple[Tuple[str, ...], Tuple[int, ...]]:
    """wnids and their ascending 1k logit indices for ``'imagenet-a'`` or ``'imagenet-r'`` (timm's shipped lists)."""
    if name not in SUBSETS:
        raise ValueError(f'Unknown subset {name!r}; expected one of {SUBSETS}.')
    key = name.split('-')[1]
    wnids = tuple(_read_lines(f'imagenet_{key}_synsets.txt'))
    indices = tuple(int(i) for i in _read_lines(f'imagenet_{key}_indices.txt'))
    index_of = imagenet_wnid_to_index()
    if len(wnids) != 200 or [index_of[w] for w in wnids] != list(indices):
        raise RuntimeError(f'timm ships inconsistent {name} class lists.')
    return wnids, indices
