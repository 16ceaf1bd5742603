#!/usr/bin/env python
"""Evaluation throughput of validate.py against a plain timm-style evaluation loop, on the same model and images.

The reference is what timm's validate.py does: ``create_dataset`` + ``create_loader`` (timm's prefetcher
convention, normalisation by its PrefetchLoader) and a loop of model forward, loss and top-1/top-5. validate.py's
number is the throughput it records for the unit (``units.imagenet.images_per_sec``: images over the wall time from
the DataLoader's creation until its workers are stopped after the last batch, its progress reporting and stop checks
included); the reference is timed over the same span. Both run in this process, back to back in alternating order,
``--repeats`` times; the best passes (the least disturbed by other load) and the pairs' median ratio are reported.

    python scripts/benchmark_eval.py                  # 256 generated 160 px JPEGs, convnext_atto_dcls at 128 px, CPU
    python scripts/benchmark_eval.py --data-dir /data/imagenet/val --model convnext_tiny_dcls --img-size 224 \\
        --device cuda --batch-size 128 --workers 8 --limit 10000
"""
import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dcls_timm  # noqa: F401,E402  (registers the models)
import timm  # noqa: E402
from timm.data import create_dataset, create_loader, resolve_data_config  # noqa: E402
from timm.utils import accuracy  # noqa: E402

from dcls_timm.evaluation import build_parser, run  # noqa: E402
from dcls_timm.evaluation.classes import imagenet_wnids, subset_classes  # noqa: E402


def make_images(root: Path, n: int, size: int, classes: int = 8) -> Path:
    """``n`` random JPEGs in ``classes`` wnid folders outside the ImageNet-A/-R classes (so that validate.py's
    'imagenet' suite evaluates them once, without the companion subsets)."""
    excluded = set(subset_classes('imagenet-a')[0]) | set(subset_classes('imagenet-r')[0])
    wnids = [w for w in imagenet_wnids() if w not in excluded][:classes]
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / wnids[i % classes]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f'{i}.JPEG', quality=90)
    return root


def timm_loop(model, data_dir: str, args, device) -> float:
    """timm's validate.py loop; images per second from the loader's creation until its workers are stopped."""
    data_config = resolve_data_config({'input_size': (3, args.img_size, args.img_size), 'crop_pct': args.crop_pct},
                                      model=model)
    dataset = create_dataset(root=data_dir, name='', split='')
    criterion = torch.nn.CrossEntropyLoss().to(device)
    amp = (lambda: torch.autocast(device_type=device.type, dtype=torch.float16)) if args.amp else nullcontext
    start = time.perf_counter()
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, use_prefetcher=True,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, crop_pct=data_config['crop_pct'], crop_mode=data_config['crop_mode'],
        pin_memory=device.type == 'cuda', device=device)
    n = 0
    top1 = 0.0
    with torch.no_grad():
        for images, target in loader:
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with amp():
                output = model(images)
            loss = criterion(output, target)
            acc1, acc5 = accuracy(output.detach(), target, topk=(1, 5))
            loss.item(), acc5.item()
            top1 += acc1.item() * images.size(0)
            n += images.size(0)
    if device.type == 'cuda':
        torch.cuda.synchronize()
    del loader  # its (persistent) workers stop here; validate.py's stop at the end of each unit, inside its timing
    return n / (time.perf_counter() - start)


def validate_py(data_dir: str, checkpoint: str, args) -> float:
    argv = ['--model', args.model, '--checkpoint', checkpoint, '--suite', 'imagenet', '--imagenet-dir', data_dir,
            '--img-size', str(args.img_size), '--crop-pct', str(args.crop_pct), '-b', str(args.batch_size),
            '--workers', str(args.workers), '--device', args.device,
            '--amp' if args.amp else '--no-amp', '--channels-last' if args.channels_last else '--no-channels-last']
    with contextlib.redirect_stdout(io.StringIO()):  # validate.py's table
        results = run(build_parser().parse_args(argv))
    return results['units']['imagenet']['images_per_sec']


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='convnext_atto_dcls')
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('--crop-pct', type=float, default=0.875)
    p.add_argument('--data-dir', default='', help='an ImageNet-style <wnid>/<image> folder (default: generated)')
    p.add_argument('--images', type=int, default=256, help='generated images')
    p.add_argument('--image-size', type=int, default=160, help='side of the generated JPEGs')
    p.add_argument('-b', '--batch-size', type=int, default=32)
    p.add_argument('-j', '--workers', type=int, default=2)
    p.add_argument('--device', default='cpu')
    p.add_argument('--amp', action='store_true')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--json', default='', help='also write the numbers here')
    args = p.parse_args(argv)

    logging.getLogger('validate').setLevel(logging.ERROR)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or str(make_images(Path(tmp) / 'val', args.images, args.image_size))
        checkpoint = os.path.join(tmp, 'weights.pth')
        torch.save(model.state_dict(), checkpoint)
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        with torch.no_grad():  # warm-up, as timm's validate.py
            model(torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device))
        ours, reference = [], []
        for i in range(args.repeats):
            first, second = (timm_loop, validate_py) if i % 2 == 0 else (validate_py, timm_loop)
            for fn in (first, second):
                if fn is timm_loop:
                    reference.append(timm_loop(model, data_dir, args, device))
                else:
                    ours.append(validate_py(data_dir, checkpoint, args))
    # other load on the machine only ever slows a pass down: the best pass of each is the least disturbed estimate;
    # the pairs (measured back to back) give the spread
    best = max(ours) / max(reference)
    pairs = [a / b for a, b in zip(ours, reference)]
    out = {'model': args.model, 'img_size': args.img_size, 'device': args.device, 'batch_size': args.batch_size,
           'workers': args.workers, 'torch_threads': torch.get_num_threads(), 'images': args.images,
           'validate_py_img_per_sec': [round(x, 1) for x in ours],
           'timm_loop_img_per_sec': [round(x, 1) for x in reference],
           'ratio_of_best': round(best, 3), 'ratio_of_medians': round(statistics.median(ours) /
                                                                      statistics.median(reference), 3),
           'median_pair_ratio': round(statistics.median(pairs), 3)}
    print(json.dumps(out, indent=2))
    print(f'validate.py / timm-style loop: {best:.3f}x best pass against best pass, '
          f'{statistics.median(pairs):.3f}x median of {args.repeats} back-to-back pairs')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == '__main__':
    main()
