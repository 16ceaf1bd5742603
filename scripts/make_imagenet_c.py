#!/usr/bin/env python
"""Write an ImageNet-C-style set from any ImageNet-style folder: <out>/<corruption>/<severity>/<wnid>/<name>.JPEG.

Each image is resized (shorter side), centre-cropped, corrupted with the imagecorruptions package (adapted to current
NumPy / scikit-image / setuptools by dcls_timm.evaluation.corruptions) and saved as JPEG (quality 85), like the
official ImageNet-C. The randomness of every (image, corruption, severity) is seeded from its name, so the output is
the same whatever the number of workers or the order. Finished files are skipped, so an interrupted run resumes.
Sets made this way are "ImageNet-C-style", not the official ImageNet-C: a marker file says so and validate.py
labels their results accordingly.

    python scripts/make_imagenet_c.py --src /data/imagenet/val --out /data/imagenet-c-style --workers 8
"""
import argparse
import hashlib
import json
import os
import random
import sys
from multiprocessing import Pool
from typing import List, Sequence, Tuple

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dcls_timm.evaluation.corruptions import load_corrupt  # noqa: E402
from dcls_timm.evaluation.datasets import IMG_EXTENSIONS  # noqa: E402
from dcls_timm.evaluation.suites import GENERATED_MARKER  # noqa: E402

_STATE = {}


def _seed(rel: str, corruption: str, severity: int) -> int:
    return int.from_bytes(hashlib.sha256(f'{rel}|{corruption}|{severity}'.encode()).digest()[:4], 'little')


def _prepare(path: str, resize: int, crop: int) -> Image.Image:
    """The official set's geometry, torchvision's ``Resize(resize)`` then ``CenterCrop(crop)``: the longer side
    truncated (``int(resize * long / short)``), the crop offset rounded (rounding both ways shifted or rescaled
    most ImageNet sizes by a pixel, e.g. 500x334)."""
    img = Image.open(path).convert('RGB')
    w, h = img.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    img = img.resize((max(crop, size[0]), max(crop, size[1])), Image.BILINEAR)
    w, h = img.size
    left, top = int(round((w - crop) / 2.)), int(round((h - crop) / 2.))
    return img.crop((left, top, left + crop, top + crop))


def _init_worker():
    _STATE['corrupt'], _ = load_corrupt()


def _process(job: Tuple[str, str, str, Sequence[str], Sequence[int], int, int, int]) -> Tuple[int, int]:
    src_root, out_root, rel, corruptions, severities, resize, crop, quality = job
    corrupt = _STATE['corrupt']
    wnid, name = os.path.split(rel)
    stem = os.path.splitext(name)[0]
    image = None
    written = skipped = 0
    for corruption in corruptions:
        for severity in severities:
            target = os.path.join(out_root, corruption, str(severity), wnid, stem + '.JPEG')
            if os.path.exists(target):
                skipped += 1
                continue
            if image is None:
                image = np.asarray(_prepare(os.path.join(src_root, rel), resize, crop))
            seed = _seed(rel, corruption, severity)
            np.random.seed(seed)
            random.seed(seed)
            out = np.uint8(np.clip(corrupt(image, severity=severity, corruption_name=corruption), 0, 255))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = target + '.partial'
            Image.fromarray(out).save(tmp, format='JPEG', quality=quality)
            os.replace(tmp, target)
            written += 1
    return written, skipped


def _list_images(src: str, limit_per_class: int) -> List[str]:
    images = []
    for wnid in sorted(e.name for e in os.scandir(src) if e.is_dir()):
        files = sorted(f for f in os.listdir(os.path.join(src, wnid)) if f.lower().endswith(IMG_EXTENSIONS))
        stems = [os.path.splitext(f)[0] for f in files]
        twins = sorted({f for f, stem in zip(files, stems) if stems.count(stem) > 1})
        if twins:  # both would be written as <stem>.JPEG: one of them silently lost
            raise ValueError(f'{os.path.join(src, wnid)}: {", ".join(twins[:6])} share a name but for the extension; '
                             'the output is <name>.JPEG, so rename them apart.')
        images += [os.path.join(wnid, f) for f in (files[:limit_per_class] if limit_per_class else files)]
    return images


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--src', required=True, help='ImageNet-style folder: <src>/<wnid>/<image>')
    parser.add_argument('--out', required=True)
    parser.add_argument('--corruptions', nargs='+', default=['all'], help="names, or 'all' (the 19)")
    parser.add_argument('--severities', type=int, nargs='+', default=[1, 2, 3, 4, 5])
    parser.add_argument('--resize', type=int, default=256)
    parser.add_argument('--crop', type=int, default=224)
    parser.add_argument('--quality', type=int, default=85)
    parser.add_argument('--workers', type=int, default=os.cpu_count() or 1)
    parser.add_argument('--limit-per-class', type=int, default=0, help='first N images of each class (0: all)')
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)

    _, names = load_corrupt()
    corruptions = list(names) if args.corruptions == ['all'] else args.corruptions
    unknown = [c for c in corruptions if c not in names]
    if unknown:
        parser.error(f'unknown corruption(s) {unknown}; choose from {", ".join(names)}')
    if any(s not in range(1, 6) for s in args.severities):
        parser.error('severities are 1..5')
    if args.crop < 32:
        parser.error('--crop must be >= 32 (the corruptions need 32 px at least)')
    if not os.path.isdir(args.src):
        parser.error(f'source folder not found: {args.src}')
    try:
        images = _list_images(args.src, args.limit_per_class)
    except ValueError as e:
        parser.error(str(e))
    if not images:
        parser.error(f'no images in {args.src} (expected <src>/<wnid>/<image>)')
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, GENERATED_MARKER), 'w') as f:
        json.dump({'generator': 'dcls_timm scripts/make_imagenet_c.py (imagecorruptions 1.1.2)',
                   'label': 'ImageNet-C-style', 'source': os.path.abspath(args.src), 'resize': args.resize,
                   'crop': args.crop, 'jpeg_quality': args.quality, 'corruptions': corruptions,
                   'severities': args.severities}, f, indent=2)

    jobs = [(args.src, args.out, rel, corruptions, args.severities, args.resize, args.crop, args.quality)
            for rel in images]
    total_written = total_skipped = 0
    progress = None
    if not args.no_progress:
        from tqdm import tqdm
        progress = tqdm(total=len(jobs), unit='img', desc='corrupting')
    if args.workers > 1:
        with Pool(args.workers, initializer=_init_worker) as pool:
            for written, skipped in pool.imap_unordered(_process, jobs, chunksize=4):
                total_written, total_skipped = total_written + written, total_skipped + skipped
                if progress is not None:
                    progress.update(1)
    else:
        _init_worker()
        for job in jobs:
            written, skipped = _process(job)
            total_written, total_skipped = total_written + written, total_skipped + skipped
            if progress is not None:
                progress.update(1)
    if progress is not None:
        progress.close()
    print(f'{len(images)} source images: wrote {total_written} files, skipped {total_skipped} already done; '
          f'output: {args.out} (ImageNet-C-style)')


if __name__ == '__main__':
    main()
