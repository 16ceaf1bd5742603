"""What validate.py runs: build the model, load weights, run the suites, report."""
import argparse
import logging
import os
from contextlib import nullcontext
from functools import partial
from typing import Any, Dict, Optional, Sequence

import timm
import torch
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import MaybeToTensor
from torchvision import transforms
from timm.utils import ParseKwargs, init_distributed_device, setup_default_logging

from dcls_timm.errors import ConfigError, check_model_name
from dcls_timm.layers import set_kernel_resolution

from .evaluator import evaluate_dataset
from .loading import load_weights
from .report import format_table, plot_imagenet_c, write_results
from .suites import SUITES, SuiteContext, run_suite

__all__ = ['build_parser', 'main', 'run', 'DEFAULT_ROOTS']

_logger = logging.getLogger('validate')

# where each suite's data lives under --data-dir unless its own flag says otherwise
DEFAULT_ROOTS = {
    'imagenet': 'imagenet/val', 'imagenet-c': 'imagenet-c', 'imagenet-a': 'imagenet-a', 'imagenet-r': 'imagenet-r',
    'sketch': 'sketch', 'stylized': 'stylized', 'dataset': '',
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Evaluate on ImageNet and its robustness sets.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', default='convnext_tiny_dcls')
    p.add_argument('--checkpoint', default='', help='train.py checkpoint, plain state dict or upstream checkpoint')
    p.add_argument('--use-ema', action='store_true', help='evaluate the EMA weights of a train.py checkpoint')
    p.add_argument('--pretrained', action='store_true')
    p.add_argument('--num-classes', type=int, default=1000)
    p.add_argument('--in-chans', type=int, default=None)
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    p.add_argument('--img-size', type=int, default=None)
    p.add_argument('--crop-pct', type=float, default=None)
    p.add_argument('--interpolation', default='')
    p.add_argument('--mean', type=float, nargs='+', default=None)
    p.add_argument('--std', type=float, nargs='+', default=None)
    p.add_argument('-b', '--batch-size', type=int, default=128)
    p.add_argument('-j', '--workers', type=int, default=4)
    p.add_argument('--device', default=None)
    p.add_argument('--amp', action='store_true')
    p.add_argument('--amp-dtype', default='float16', choices=['float16', 'bfloat16'])
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--class-map', default='',
                   help='timm class-map file (folder name -> index) instead of the ImageNet wnid order '
                        '(not with imagenet-a/-r, whose masks assume the standard order)')
    p.add_argument('--suite', default='imagenet', help=f'comma-separated: {",".join(SUITES)}')
    p.add_argument('--data-dir', default='data', help='parent of the datasets (see the per-suite flags)')
    for name, sub in DEFAULT_ROOTS.items():
        p.add_argument(f'--{name}-dir', default=None, help=f'default: <data-dir>/{sub}')
    p.add_argument('--dataset', default='', help="timm dataset for the 'dataset' suite, e.g. torch/cifar10 ('': image folders)")
    p.add_argument('--split', default='validation', help="split for the 'dataset' suite")
    p.add_argument('--dataset-download', action='store_true')
    p.add_argument('--c-preprocess', default='resize', choices=['resize', 'as-is'],
                   help="ImageNet-C images through the eval transform ('resize') or as stored ('as-is')")
    p.add_argument('--kernel-resolution', type=int, default=None,
                   help='sample continuous (FlexConv/CKConv) kernels on this grid, e.g. 33 for a model trained '
                        'with grid 17 on half-size images (cross-resolution evaluation)')
    p.add_argument('--results-file', default='', help='write the results here')
    p.add_argument('--results-format', default='json', choices=['json', 'csv'])
    p.add_argument('--plot-file', default='', help='ImageNet-C PNG (default: next to the results file)')
    return p


def run(args: argparse.Namespace) -> Dict[str, Any]:
    suites = [s.strip() for s in args.suite.split(',') if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if unknown or not suites:
        raise ConfigError(f'Unknown suite(s) {unknown}; choose from {", ".join(SUITES)}.')
    if args.class_map and not os.path.isfile(args.class_map):
        raise ConfigError(f'Class map not found: {args.class_map}')
    suites = [s for s in SUITES if s in suites]  # clean ImageNet first: its error feeds the relative mCE
    check_model_name(args.model)
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = init_distributed_device(args)
    primary = args.rank == 0

    if args.use_ema and not args.checkpoint:
        raise ConfigError('--use-ema needs --checkpoint.')
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes,
                                  in_chans=args.in_chans, **args.model_kwargs)
    except TypeError as e:
        raise ConfigError(f"Cannot create model '{args.model}' with these arguments: {e}") from None
    loaded = load_weights(model, args.checkpoint, args.use_ema) if args.checkpoint else None
    if args.kernel_resolution is not None:
        if not set_kernel_resolution(model, args.kernel_resolution):
            raise ConfigError(f"--kernel-resolution: model '{args.model}' has no continuous-kernel layers.")
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    data_config = resolve_data_config(vars(args), model=model, verbose=primary)
    transform = create_transform(**data_config, is_training=False)
    as_is = transforms.Compose([MaybeToTensor(), transforms.Normalize(data_config['mean'], data_config['std'])])
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else nullcontext
    ctx = SuiteContext(
        transform=transform, transform_as_is=as_is, c_preprocess=args.c_preprocess,
        dataset=(args.dataset, args.split, args.dataset_download),
        img_mode='L' if data_config['input_size'][0] == 1 else 'RGB', class_map=args.class_map,
        evaluate=partial(evaluate_dataset, model, device=device, batch_size=args.batch_size, workers=args.workers,
                         amp_autocast=amp, channels_last=args.channels_last, distributed=args.distributed))

    results: Dict[str, Any] = {
        'model': args.model, 'checkpoint': args.checkpoint, 'ema': args.use_ema,
        'param_count': sum(p.numel() for p in model.parameters()),
        'img_size': data_config['input_size'][-1], 'crop_pct': data_config['crop_pct'],
        'kernel_resolution': args.kernel_resolution,
        'interpolation': data_config['interpolation'], 'suites': {},
    }
    if loaded is not None and loaded.get('epoch') is not None:
        results['checkpoint_epoch'] = loaded['epoch']
    for suite in suites:
        root = getattr(args, f"{suite.replace('-', '_')}_dir") or os.path.join(args.data_dir, DEFAULT_ROOTS[suite])
        try:
            results['suites'][suite] = run_suite(suite, ctx, root)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f'{suite}: {e}') from None
        if primary:
            r = results['suites'][suite]
            _logger.info(f"{suite}: {r.get('images')} images, {r.get('classes', '-')} classes from {root}")

    if primary:
        print(format_table(results))
        if args.results_file:
            write_results(results, args.results_file, args.results_format)
        if 'imagenet-c' in results['suites']:
            plot = args.plot_file or (os.path.splitext(args.results_file)[0] + '_imagenet_c.png'
                                      if args.results_file else 'imagenet_c_errors.png')
            plot_imagenet_c(results['suites']['imagenet-c'], plot, args.model)
            results['plot_file'] = plot
    if args.distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return results


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    setup_default_logging()
    return run(build_parser().parse_args(argv))
