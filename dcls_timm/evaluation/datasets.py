"""Image folders whose class folders are wnids, labelled through an explicit wnid -> index map; image loading that
names an unreadable file (here and in timm's ImageDataset, for train.py and the 'dataset' suite)."""
import logging
import multiprocessing
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from timm.data import ImageDataset

from dcls_timm.errors import UnreadableImageError

__all__ = ['WnidImageFolder', 'IMG_EXTENSIONS', 'restrict', 'read_image', 'CheckedImageDataset', 'checked_dataset',
           'SubsetDataset', 'fixed_subset']

_logger = logging.getLogger(__name__)
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')


def _decode(file, name: str, mode: Optional[str]) -> Image.Image:
    """Open and fully decode ``file`` (a path or a binary file object) as ``mode`` (None: as stored).

    Any failure (PIL cannot identify the format, truncated or corrupt data, an OS error) is an UnreadableImageError
    naming ``name``. Decoding happens here, not lazily in the transform, so that the error points at the file.
    """
    try:
        img = Image.open(file)
        if mode:
            return img.convert(mode)
        img.load()
        return img
    except Exception as e:  # noqa: BLE001  (PIL raises OSError, ValueError, SyntaxError, EOFError, ... on bad data)
        raise UnreadableImageError.from_exception(name, e) from None


def read_image(path: str, mode: Optional[str] = 'RGB') -> Image.Image:
    """The decoded image at ``path``; an unreadable or missing file is an UnreadableImageError naming it."""
    try:
        f = open(path, 'rb')
    except OSError as e:
        raise UnreadableImageError.from_exception(path, e) from None
    with f:
        return _decode(f, path, mode)


class CheckedImageDataset(ImageDataset):
    """timm's ImageDataset, but an unreadable image stops with an UnreadableImageError naming the file.

    timm's own dataset logs a warning and returns the next sample instead (up to ``TIMM_DATASET_MAX_RETRIES`` in a
    row), which silently duplicates that sample in training and changes evaluation numbers.

    With ``skip_unreadable`` (train.py's ``--skip-unreadable``) an unreadable image is replaced by the next readable
    one, as timm does, but visibly: each one is logged as a warning naming the file, with the running count of
    unreadable images over all DataLoader workers (``skipped_count``); more than timm's retry limit in a row is
    still an error.
    """
    skip_unreadable = False
    _skipped = None

    @classmethod
    def wrap(cls, dataset: ImageDataset, skip_unreadable: bool = False) -> 'CheckedImageDataset':
        """The same dataset (same reader, transforms and state), loading images through :func:`_decode`."""
        checked = cls.__new__(cls)
        checked.__dict__.update(dataset.__dict__)
        checked.skip_unreadable = skip_unreadable
        checked._skipped = multiprocessing.Value('l', 0) if skip_unreadable else None  # shared with the workers
        return checked

    @property
    def skipped_count(self) -> int:
        """Unreadable images replaced so far (every worker's, as long as they share this dataset's memory)."""
        return self._skipped.value if self._skipped is not None else 0

    def __getitem__(self, index: int):
        if not self.skip_unreadable:
            return self._load(index)
        retries = getattr(self, '_max_retries', 10)
        for attempt in range(retries):
            try:
                return self._load((index + attempt) % len(self))
            except UnreadableImageError as e:
                with self._skipped.get_lock():
                    self._skipped.value += 1
                    count = self._skipped.value
                _logger.warning(f'{e}: skipped (--skip-unreadable), the next image is used in its place '
                                f'({count} unreadable image{"s" if count > 1 else ""} skipped so far)')
        raise UnreadableImageError(f'{UnreadableImageError.PREFIX}{self._name(index)} and the {retries - 1} after it '
                                   f'(no readable image among {retries} in a row)')

    def _name(self, index: int) -> str:
        try:
            return self.reader.filename(index, absolute=True)
        except Exception:  # noqa: BLE001  (a reader without file names)
            return f'sample {index}'

    def _load(self, index: int):
        name = self._name(index)
        try:
            file, target, *features = self.reader[index]
        except OSError as e:  # the reader opens the file: missing, no permission, ...
            raise UnreadableImageError.from_exception(name, e) from None
        try:
            if self.load_bytes:
                img = file.read()
            else:
                img = _decode(file, name, self.input_img_mode)
        finally:
            if hasattr(file, 'close'):
                file.close()
        if self.transform is not None:
            img = self.transform(img)
        if target is None:
            target = -1
        elif self.target_transform is not None:
            target = self.target_transform(target)
        return (img, target) if self.additional_features is None else (img, target, *features)


def checked_dataset(dataset, skip_unreadable: bool = False):
    """``dataset`` loading its images through :class:`CheckedImageDataset` if it is a timm ImageDataset (image
    folders, tar files); anything else (torchvision's in-memory sets, iterable datasets) as it is."""
    if type(dataset) is ImageDataset:
        return CheckedImageDataset.wrap(dataset, skip_unreadable=skip_unreadable)
    return dataset


class WnidImageFolder(torch.utils.data.Dataset):
    """``<root>/<wnid>/*.<image>`` labelled by ``wnid_to_index``, never by folder order.

    A missing class folder cannot shift the labels of the others. Folders whose name is not in the map are listed in
    ``ignored_folders`` (and logged); no folder of the map at all is an error.
    """

    def __init__(self, root: str, wnid_to_index: Dict[str, int], transform: Optional[Callable] = None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f'Dataset folder not found: {root}')
        self.root = root
        self.transform = transform
        folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.ignored_folders = [f for f in folders if f not in wnid_to_index]
        self.classes = [f for f in folders if f in wnid_to_index]
        self.samples: List[Tuple[str, int]] = []
        for wnid in self.classes:
            directory = os.path.join(root, wnid)
            for dirpath, _, files in sorted(os.walk(directory)):
                for name in sorted(files):
                    if name.lower().endswith(IMG_EXTENSIONS):
                        self.samples.append((os.path.join(dirpath, name), wnid_to_index[wnid]))
        if self.ignored_folders:
            _logger.warning(f'{root}: {len(self.ignored_folders)} folder(s) are not known classes and are ignored: '
                            f'{", ".join(self.ignored_folders[:5])}{" ..." if len(self.ignored_folders) > 5 else ""}')
        if not self.samples:
            raise FileNotFoundError(
                f'No images of known classes under {root} (expected <root>/<wnid>/<image> folders).')

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = read_image(path, 'RGB')
        if self.transform is not None:
            img = self.transform(img)
        return img, target

    def describe(self) -> Dict[str, object]:
        return {'root': self.root, 'images': len(self.samples), 'classes': len(self.classes),
                'ignored_folders': len(self.ignored_folders)}


def restrict(dataset: WnidImageFolder, class_indices: Sequence[int]) -> torch.utils.data.Subset:
    """The samples of ``dataset`` whose label is one of ``class_indices``."""
    keep = set(class_indices)
    return torch.utils.data.Subset(dataset, [i for i, (_, t) in enumerate(dataset.samples) if t in keep])


class SubsetDataset(torch.utils.data.Dataset):
    """The samples ``indices`` of ``dataset``; ``transform`` reads and sets the underlying dataset's (timm's loaders
    set it after the dataset is built), other attributes (``classes``, ``reader``) are the dataset's."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value) -> None:
        self.dataset.transform = value

    def __getattr__(self, name: str):
        if name in ('dataset', 'indices') or name.startswith('__'):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)  # classes, reader, ...

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def fixed_subset(dataset, size: int, seed: int = 0) -> SubsetDataset:
    """``size`` samples of ``dataset`` drawn without replacement by a fixed seed (a property of the data, not of the
    run: every run and ``validate.py`` with the same size see the same samples), in dataset order."""
    if size < 1 or size > len(dataset):
        raise ValueError(f'A subset of {size} samples of a dataset of {len(dataset)}: choose 1..{len(dataset)}.')
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return SubsetDataset(dataset, sorted(order.tolist()))
