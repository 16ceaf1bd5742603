"""Image folders whose class folders are wnids, labelled through an explicit wnid -> index map."""
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image

__all__ = ['WnidImageFolder', 'IMG_EXTENSIONS', 'restrict']

_logger = logging.getLogger(__name__)
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')


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
        with open(path, 'rb') as f:
            img = Image.open(f).convert('RGB')
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
