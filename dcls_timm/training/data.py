"""Datasets and loaders through timm, with clear errors and the offline Fashion-MNIST files."""
import gzip
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from timm.data import create_dataset, create_loader
from torchvision import transforms

from dcls_timm.errors import ConfigError
from dcls_timm.evaluation.datasets import checked_dataset, fixed_subset

__all__ = ['FASHION_MNIST_DEBIAN_DIR', 'prepare_fashion_mnist', 'build_dataset', 'build_loader']

_logger = logging.getLogger(__name__)

FASHION_MNIST_DEBIAN_DIR = Path('/usr/share/datasets/fashion-mnist')  # Debian package dataset-fashion-mnist
_FASHION_MNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
                        't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')


def prepare_fashion_mnist(root: str, source: Optional[Path] = None) -> bool:
    """Put Fashion-MNIST where torchvision looks (``<root>/FashionMNIST/raw``), from the Debian package's files.

    Args:
        root: the data directory (made when missing and the source exists).
        source: a directory holding the four gzipped IDX files; default ``FASHION_MNIST_DEBIAN_DIR``.

    Returns:
        True if the files are in place (already, or unpacked now), False if neither they nor the source exist.
    """
    source = Path(FASHION_MNIST_DEBIAN_DIR if source is None else source)
    raw = Path(root) / 'FashionMNIST' / 'raw'
    if all((raw / n).is_file() for n in _FASHION_MNIST_FILES):
        return True
    if not all((source / f'{n}.gz').is_file() for n in _FASHION_MNIST_FILES):
        return False
    raw.mkdir(parents=True, exist_ok=True)
    for name in _FASHION_MNIST_FILES:
        tmp = raw / f'{name}.partial'
        with gzip.open(source / f'{name}.gz', 'rb') as src, open(tmp, 'wb') as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, raw / name)
    _logger.info(f'Unpacked Fashion-MNIST from {source} into {raw}')
    return True


def build_dataset(args: Any, split: str, is_training: bool, subset: int = 0):
    """``timm.data.create_dataset`` with the run's arguments; missing or empty data become a ConfigError.

    Image files are loaded so that an unreadable one stops the run with an UnreadableImageError naming the file
    (timm would skip it with a warning and use the next sample in its place); with ``--skip-unreadable`` the next
    image is used in its place, each time with a warning naming the file and the running count.
    """
    is_torch = args.dataset.lower().startswith('torch/')
    fashion = args.dataset.lower() == 'torch/fashion_mnist'
    if args.data_dir is None:
        raise ConfigError('No --data-dir given.')
    # Fashion-MNIST: the Debian package's files are unpacked first (this makes the data directory when missing)
    if fashion and not args.dataset_download and not prepare_fashion_mnist(args.data_dir) \
            and not os.path.isdir(args.data_dir):
        raise ConfigError(f'Data directory not found: {args.data_dir}, and no Fashion-MNIST files in '
                          f'{FASHION_MNIST_DEBIAN_DIR} to unpack there: install them with '
                          f'`apt-get install dataset-fashion-mnist`, or add --dataset-download to let torchvision '
                          f'download them.')
    if not is_torch or not args.dataset_download:
        if not os.path.isdir(args.data_dir):
            raise ConfigError(f'Data directory not found: {args.data_dir}')
    try:
        dataset = create_dataset(
            args.dataset, root=args.data_dir, split=split, is_training=is_training, class_map=args.class_map,
            download=args.dataset_download, batch_size=args.batch_size, seed=args.seed,
            input_img_mode=args.input_img_mode)
    except RuntimeError as e:
        if fashion:
            hint = ' (install it with `apt-get install dataset-fashion-mnist`, or add --dataset-download to fetch it)'
        else:
            hint = ' (add --dataset-download to fetch it)' if is_torch else ''
        raise ConfigError(f"Could not load split '{split}' of dataset '{args.dataset or 'image folder'}' from "
                          f'{args.data_dir}{hint}: {e}') from None
    if len(dataset) == 0:
        raise ConfigError(f"Split '{split}' of {args.data_dir} holds no images.")
    dataset = checked_dataset(dataset, skip_unreadable=getattr(args, 'skip_unreadable', False))
    if subset:
        try:
            dataset = fixed_subset(dataset, subset)
        except ValueError as e:
            raise ConfigError(f"Split '{split}': {e}") from None
    return dataset


def build_loader(
        dataset,
        args: Any,
        data_config: Dict[str, Any],
        is_training: bool,
        device,
        collate_fn=None,
):
    """``timm.data.create_loader`` with the run's arguments, through timm's prefetcher unless ``--no-prefetcher``
    (workers hand over uint8 batches, normalised and randomly erased on ``device``).

    Workers are not persistent: each epoch's workers are seeded from the main RNG, so a resumed run sees the same
    augmentations as an uninterrupted one.
    """
    use_prefetcher = not getattr(args, 'no_prefetcher', False)
    common = dict(
        input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, distributed=args.distributed, pin_memory=args.pin_mem, device=device,
        use_prefetcher=use_prefetcher, persistent_workers=False, collate_fn=collate_fn)
    if is_training:
        pad_crop = args.train_crop_mode == 'pad'
        loader = create_loader(
            dataset, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug, re_prob=args.reprob,
            re_mode=args.remode, re_count=args.recount, train_crop_mode=None if pad_crop else args.train_crop_mode,
            scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip,
            color_jitter=args.color_jitter, auto_augment=args.aa, interpolation=args.train_interpolation,
            worker_seeding='all', **common)
        if pad_crop and not args.no_aug:
            # CIFAR-style augmentation: zero-pad, then a random crop of the input size (in place of timm's RRC)
            steps = dataset.transform.transforms
            size = data_config['input_size'][1:]
            steps[0] = transforms.RandomCrop(size, padding=args.crop_padding)
        return loader
    return create_loader(
        dataset, batch_size=args.validation_batch_size or args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'], **common)
