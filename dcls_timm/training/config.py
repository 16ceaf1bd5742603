"""Command line and YAML configuration of train.py, with timm's flag names."""
import argparse
import difflib
from typing import Any, Dict, Optional, Sequence

import yaml
from timm.utils import ParseKwargs

from dcls_timm.errors import ConfigError

__all__ = ['ConfigError', 'build_parser', 'parse_args']


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description='Train timm models, with the DCLS recipe for models that have DCLS layers.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML file of defaults (keys: flag names with _)')

    g = p.add_argument_group('Dataset')
    g.add_argument('--data-dir', default=None, metavar='DIR', help='dataset root')
    g.add_argument('--dataset', default='', help="timm dataset name: '' (image folders), 'torch/fashion_mnist', ...")
    g.add_argument('--train-split', default='train')
    g.add_argument('--val-split', default='validation', help="'' to skip evaluation")
    g.add_argument('--dataset-download', action='store_true', help='let torchvision datasets download')
    g.add_argument('--train-subset', type=int, default=0, metavar='N',
                   help='train on N samples drawn by a fixed seed (the same for every run; 0: all)')
    g.add_argument('--val-subset', type=int, default=0, metavar='N',
                   help="evaluate on N samples drawn by a fixed seed (validate.py --subset N: the same ones; 0: all)")
    g.add_argument('--class-map', default='', help='class map file for image folders')
    g.add_argument('--input-img-mode', default=None, help="image mode of the loader, e.g. 'L' for grey")
    g.add_argument('--skip-unreadable', action='store_true',
                   help='replace an unreadable/truncated image by the next one (as timm does silently) instead of '
                        'stopping, with a warning naming the file and the running count')

    g = p.add_argument_group('Model')
    g.add_argument('--model', default='convnext_tiny_dcls')
    g.add_argument('--pretrained', action='store_true')
    g.add_argument('--initial-checkpoint', default='', help='weights to start from')
    g.add_argument('--resume', default='', help='training checkpoint to resume (model, EMA, optimizer, epoch, RNG)')
    g.add_argument('--no-resume-opt', action='store_true', help='do not restore the optimizer when resuming')
    g.add_argument('--num-classes', type=int, default=None)
    g.add_argument('--in-chans', type=int, default=None)
    g.add_argument('--gp', default=None, help='global pool type')
    g.add_argument('--img-size', type=int, default=None)
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar='N')
    g.add_argument('--crop-pct', type=float, default=None)
    g.add_argument('--mean', type=float, nargs='+', default=None)
    g.add_argument('--std', type=float, nargs='+', default=None)
    g.add_argument('--interpolation', default='')
    g.add_argument('-b', '--batch-size', type=int, default=128, help='per-process batch size')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None)
    g.add_argument('--channels-last', action='store_true')
    g.add_argument('--grad-accum-steps', type=int, default=1)
    g.add_argument('--grad-checkpointing', action='store_true')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='extra model args: key=value')
    g.add_argument('--torchcompile', nargs='?', const='inductor', default=None, help='torch.compile backend')
    g.add_argument('--sync-bn', action='store_true')
    g.add_argument('--dist-bn', default='reduce', choices=['reduce', 'broadcast', ''],
                   help="distributed: each epoch, make the BatchNorm statistics of the model and its EMA the same on "
                        "every rank before evaluating and saving: 'reduce' (their mean, timm's default), 'broadcast' "
                        "(rank 0's) or '' (leave them: each rank's EMA would then differ)")

    g = p.add_argument_group('Device and precision')
    g.add_argument('--device', default=None, help="'cuda', 'cpu', ... (default: cuda when available)")
    g.add_argument('--dist-backend', default=None, help='default: nccl on CUDA, gloo on CPU')
    g.add_argument('--dist-url', default=None)
    g.add_argument('--amp', action='store_true', help='mixed precision (autocast)')
    g.add_argument('--amp-dtype', default='float16', choices=['float16', 'bfloat16'])
    g.add_argument('--keep-cpu-memory', action=argparse.BooleanOptionalAction, default=True,
                   help='on CPU, glibc keeps freed memory for reuse instead of faulting fresh pages in every step '
                        '(dcls_timm.cpu_memory; up to 1.9x faster CPU steps on a small VM)')

    g = p.add_argument_group('Optimizer')
    g.add_argument('--opt', default='adamw')
    g.add_argument('--opt-eps', type=float, default=None)
    g.add_argument('--opt-betas', type=float, nargs='+', default=None)
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=0.05)
    g.add_argument('--clip-grad', type=float, default=None)
    g.add_argument('--clip-mode', default='norm')
    g.add_argument('--layer-decay', type=float, default=None)
    g.add_argument('--opt-kwargs', dest='opt_args', nargs='*', default={}, action=ParseKwargs)

    g = p.add_argument_group('Learning rate schedule')
    g.add_argument('--sched', default='cosine')
    g.add_argument('--sched-on-updates', action='store_true')
    g.add_argument('--lr', type=float, default=None, help='lr; default: lr-base scaled by global batch')
    g.add_argument('--lr-base', type=float, default=4e-3)
    g.add_argument('--lr-base-size', type=int, default=4096, help='global batch size lr-base is given for')
    g.add_argument('--lr-base-scale', default='linear', choices=['linear', 'sqrt'])
    g.add_argument('--min-lr', type=float, default=1e-6)
    g.add_argument('--warmup-lr', type=float, default=1e-6)
    g.add_argument('--warmup-epochs', type=int, default=20)
    g.add_argument('--warmup-prefix', action='store_true',
                   help='warm up before the --epochs of the schedule instead of inside them (total: their sum)')
    g.add_argument('--epochs', type=int, default=300)
    g.add_argument('--cooldown-epochs', type=int, default=0)
    g.add_argument('--decay-epochs', type=float, default=90)
    g.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270])
    g.add_argument('--decay-rate', type=float, default=0.1)
    g.add_argument('--patience-epochs', type=int, default=10)

    g = p.add_argument_group('Augmentation and regularisation')
    g.add_argument('--no-aug', action='store_true')
    g.add_argument('--train-crop-mode', default=None,
                   help="timm's ('rrc', 'rkrc', 'rkrr'), or 'pad': zero-pad by --crop-padding and random-crop")
    g.add_argument('--crop-padding', type=int, default=4)
    g.add_argument('--scale', type=float, nargs=2, default=[0.08, 1.0])
    g.add_argument('--ratio', type=float, nargs=2, default=[3. / 4., 4. / 3.])
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.)
    g.add_argument('--color-jitter', type=float, default=0.4)
    g.add_argument('--aa', default=None, help="auto-augment policy, e.g. 'rand-m9-mstd0.5-inc1'")
    g.add_argument('--reprob', type=float, default=0.)
    g.add_argument('--remode', default='pixel')
    g.add_argument('--recount', type=int, default=1)
    g.add_argument('--mixup', type=float, default=0.)
    g.add_argument('--cutmix', type=float, default=0.)
    g.add_argument('--cutmix-minmax', type=float, nargs=2, default=None)
    g.add_argument('--mixup-prob', type=float, default=1.)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', default='batch')
    g.add_argument('--mixup-off-epoch', type=int, default=0)
    g.add_argument('--smoothing', type=float, default=0.1)
    g.add_argument('--bce-loss', action='store_true')
    g.add_argument('--bce-target-thresh', type=float, default=None)
    g.add_argument('--train-interpolation', default='random')
    g.add_argument('--drop', type=float, default=0.)
    g.add_argument('--drop-path', type=float, default=None)

    g = p.add_argument_group('EMA')
    g.add_argument('--model-ema', action='store_true')
    g.add_argument('--model-ema-decay', type=float, default=0.9999)
    g.add_argument('--model-ema-warmup', action='store_true')

    g = p.add_argument_group('DCLS recipe (on by default for models with DCLS layers)')
    g.add_argument('--dcls-recipe', default='auto', choices=['auto', 'on', 'off'])
    g.add_argument('--position-lr-scale', type=float, default=5.)
    g.add_argument('--position-weight-decay', type=float, default=0.)
    g.add_argument('--no-clamp-positions', action='store_true')
    g.add_argument('--repulsive-weight', type=float, default=1., help='weight of rep^2 (0: off)')
    g.add_argument('--repulsive-after-epoch', type=int, default=20, help='active once epoch > this (0-based)')

    g = p.add_argument_group('FlexConv recipe (on by default for models with FlexConv/CKConv layers)')
    g.add_argument('--flexconv-recipe', default='auto', choices=['auto', 'on', 'off'])
    g.add_argument('--mask-lr-scale', type=float, default=None,
                   help='lr multiplier of the Gaussian masks (default: 0.1, the FlexConv recipe; 1 for CCNN, as its '
                        "authors' code)")
    g.add_argument('--antialias-factor', type=float, default=None,
                   help="anti-aliasing loss weight (0: off; default: 0.1 for FlexConv's kernel networks, 0 for CCNN's, "
                        'for which its budget does not hold)')
    g.add_argument('--antialias-target', default='gabor+mask', choices=['gabor', 'gabor+mask'])
    g.add_argument('--l2-penalty', type=float, default=0., metavar='LAMBDA',
                   help='add LAMBDA * (sum of L2 norms, not squared) to the loss, as CCNN/CKCNN train (use with '
                        '--weight-decay 0); 0: off')
    g.add_argument('--l2-penalty-scope', default='all', choices=['all', 'kernels'],
                   help="all: parameters outside the kernel networks + sampled kernels (CCNN); kernels: sampled "
                        "kernels + conv biases (CKCNN)")

    g = p.add_argument_group('Misc')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--log-interval', type=int, default=50)
    g.add_argument('--checkpoint-hist', type=int, default=3)
    g.add_argument('-j', '--workers', type=int, default=4)
    g.add_argument('--pin-mem', action='store_true')
    g.add_argument('--no-prefetcher', action='store_true',
                   help="per-image float conversion and normalisation in the workers instead of timm's prefetcher "
                        "(uint8 batches normalised on the device; on CPU too: a third of the workers' time)")
    g.add_argument('--output', default='output/train', help='folder of the experiment folders')
    g.add_argument('--experiment', default='', help='experiment folder name (default: model and time)')
    g.add_argument('--eval-metric', default='top1')
    g.add_argument('--no-tensorboard', action='store_true')
    return p


def _check_config_keys(config: Dict[str, Any], parser: argparse.ArgumentParser, source: str) -> None:
    valid = {a.dest for a in parser._actions if a.dest != 'help'}
    unknown = [k for k in config if k not in valid]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(valid), n=1)
            hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ''))
        raise ConfigError(f'Unknown key(s) in {source}: {", ".join(hints)}.')


_TRUE, _FALSE = ('true', 'yes', 'on', '1'), ('false', 'no', 'off', '0')


def _coerce_switches(config: Dict[str, Any], parser: argparse.ArgumentParser, source: str) -> Dict[str, Any]:
    """On/off flags given as YAML strings or 0/1 as booleans: a quoted ``"false"`` is a non-empty string, which
    argparse would take as on. ``null`` is left as it is; anything else that is not a boolean is an error."""
    switches = {a.dest for a in parser._actions
                if isinstance(a, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                  argparse.BooleanOptionalAction))}
    out = dict(config)
    for key, value in config.items():
        if key not in switches or value is None or isinstance(value, bool):
            continue
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if text in _TRUE or text in _FALSE:
            out[key] = text in _TRUE
        else:
            raise ConfigError(f"'{key}' in {source} is an on/off flag: give true or false, got {value!r}.")
    return out


def parse_args(argv: Optional[Sequence[str]] = None, defaults: Optional[Dict[str, Any]] = None) -> argparse.Namespace:
    """Parse ``argv``: built-in defaults < ``defaults`` < YAML config (``-c``) < command line."""
    parser = build_parser()
    if defaults:
        _check_config_keys(defaults, parser, 'defaults')
        parser.set_defaults(**_coerce_switches(defaults, parser, 'defaults'))
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        try:
            with open(pre.config) as f:
                config = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f'Config file not found: {pre.config}') from None
        if not isinstance(config, dict):
            raise ConfigError(f'Config {pre.config} must be a mapping of flag names to values.')
        config = {k.replace('-', '_'): v for k, v in config.items()}
        _check_config_keys(config, parser, pre.config)
        parser.set_defaults(**_coerce_switches(config, parser, pre.config))
    args = parser.parse_args(argv)
    # key=value dicts given on the command line update the config's key by key (timm's ParseKwargs would replace
    # the whole dict: `--model-kwargs dropout=0.2` on a sequence config silently lost its data_dim=1)
    for action in parser._actions:
        layered = parser.get_default(action.dest)
        if isinstance(action, ParseKwargs) and isinstance(layered, dict) and getattr(args, action.dest) is not layered:
            setattr(args, action.dest, {**layered, **getattr(args, action.dest)})
    return args
