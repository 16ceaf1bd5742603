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

from dcls_timm.checkpoint import load_weights
from dcls_timm.errors import ConfigError, check_model_name
from dcls_timm.layers import set_kernel_resolution

from .evaluator import evaluate_dataset
from .report import format_table, plot_imagenet_c, write_results
from .suites import SUITES, SuiteContext, run_suite

__all__ = ['build_parser', 'main', 'run', 'resolve_eval_data_config', 'DEFAULT_ROOTS']

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
    p.add_argument('--img-size', type=int, default=None,
                   help='input image size (default: the pretrained cfg\'s test size, see --use-train-size)')
    p.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                   help='full input size, overrides --img-size')
    p.add_argument('--use-train-size', action='store_true',
                   help="evaluate at the pretrained cfg's train size and crop_pct instead of its test_input_size / "
                        'test_crop_pct (as timm\'s validate.py)')
    p.add_argument('--crop-pct', type=float, default=None)
    p.add_argument('--crop-mode', default=None, choices=['center', 'squash', 'border'],
                   help='eval crop mode (default: the pretrained cfg\'s, else center)')
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


def resolve_eval_data_config(args: argparse.Namespace, model: torch.nn.Module, verbose: bool = False
                             ) -> Dict[str, Any]:
    """The evaluation preprocessing, as timm's validate.py resolves it, plus where the input size came from.

    The pretrained cfg's ``test_input_size`` / ``test_crop_pct`` are used unless ``--use-train-size`` (then its
    ``input_size`` / ``crop_pct``); ``--input-size``/``--img-size``, ``--crop-pct``, ``--crop-mode``,
    ``--interpolation``, ``--mean``, ``--std`` override either. ``--in-chans`` sets the channels of a size taken from
    the pretrained cfg. The result has timm's keys (input_size, interpolation, mean, std, crop_pct, crop_mode) and
    ``size_source``: 'explicit' (a size flag), 'test' (the cfg's test size), 'train' (the cfg's train size: with
    ``--use-train-size``, or the cfg has no separate test size) or 'default' (no size in the cfg: timm's 224).
    """
    use_test_size = not getattr(args, 'use_train_size', False)
    config = resolve_data_config(vars(args), model=model, use_test_size=use_test_size)
    pretrained = getattr(model, 'pretrained_cfg', None) or {}
    if getattr(args, 'input_size', None) is not None or getattr(args, 'img_size', None) is not None:
        size = 'explicit'
    elif use_test_size and pretrained.get('test_input_size') is not None:
        size = 'test'
    elif pretrained.get('input_size') is not None:
        size = 'train'
    else:
        size = 'default'
    in_chans = getattr(args, 'in_chans', None)
    if getattr(args, 'input_size', None) is None and in_chans is not None:
        config['input_size'] = (in_chans, *config['input_size'][1:])  # timm keeps the cfg's channels
    config['input_size'] = tuple(config['input_size'])
    config['size_source'] = size
    if verbose:
        what = {'explicit': 'set on the command line', 'test': "the pretrained cfg's test size",
                'train': "the pretrained cfg's train size", 'default': "timm's default"}[size]
        if size == 'test' and pretrained.get('input_size') is not None:
            what += f"; --use-train-size for {tuple(pretrained['input_size'])}"
        _logger.info(f"Eval data config: input_size {config['input_size']} ({what}), crop_pct {config['crop_pct']}, "
                     f"crop_mode {config['crop_mode']}, interpolation {config['interpolation']}, "
                     f"mean {tuple(config['mean'])}, std {tuple(config['std'])}")
    return config


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

    if args.input_size and args.in_chans and args.input_size[0] != args.in_chans:
        raise ConfigError(f'--input-size has {args.input_size[0]} channels but --in-chans is {args.in_chans}.')
    if args.use_ema and not args.checkpoint:
        raise ConfigError('--use-ema needs --checkpoint.')
    try:
        in_chans = args.in_chans or (args.input_size[0] if args.input_size else None)
        model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes,
                                  in_chans=in_chans, **args.model_kwargs)
    except TypeError as e:
        raise ConfigError(f"Cannot create model '{args.model}' with these arguments: {e}") from None
    loaded = load_weights(model, args.checkpoint, args.use_ema) if args.checkpoint else None
    if args.kernel_resolution is not None:
        if not set_kernel_resolution(model, args.kernel_resolution):
            raise ConfigError(f"--kernel-resolution: model '{args.model}' has no continuous-kernel layers.")
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    data_config = resolve_eval_data_config(args, model, verbose=primary)
    transform = create_transform(**{k: v for k, v in data_config.items() if k != 'size_source'}, is_training=False)
    as_is = transforms.Compose([MaybeToTensor(), transforms.Normalize(data_config['mean'], data_config['std'])])
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if args.amp else nullcontext
    ctx = SuiteContext(
        transform=transform, transform_as_is=as_is, c_preprocess=args.c_preprocess, data_config=data_config,
        dataset=(args.dataset, args.split, args.dataset_download),
        img_mode='L' if data_config['input_size'][0] == 1 else 'RGB', class_map=args.class_map,
        evaluate=partial(evaluate_dataset, model, device=device, batch_size=args.batch_size, workers=args.workers,
                         amp_autocast=amp, channels_last=args.channels_last, distributed=args.distributed))

    results: Dict[str, Any] = {
        'model': args.model, 'checkpoint': args.checkpoint, 'ema': args.use_ema,
        'param_count': sum(p.numel() for p in model.parameters()),
        'img_size': data_config['input_size'][-1], 'crop_pct': data_config['crop_pct'],
        'kernel_resolution': args.kernel_resolution,
        'interpolation': data_config['interpolation'],
        # everything the eval transform used; size_source: explicit | test | train | default (resolve_eval_data_config)
        'data_config': {
            'input_size': list(data_config['input_size']), 'crop_pct': data_config['crop_pct'],
            'crop_mode': data_config['crop_mode'], 'interpolation': data_config['interpolation'],
            'mean': list(data_config['mean']), 'std': list(data_config['std']),
            'size_source': data_config['size_source'], 'use_train_size': args.use_train_size},
        'suites': {},
    }
    if loaded is not None and loaded.get('epoch') is not None:
        results['checkpoint_epoch'] = loaded['epoch']
    for suite in suites:
        root = getattr(args, f"{suite.replace('-', '_')}_dir") or os.path.join(args.data_dir, DEFAULT_ROOTS[suite])
        try:
            results['suites'][suite] = run_suite(suite, ctx, root)
        except ConfigError:  # e.g. an unreadable image: its message names the file
            raise
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
