"""What validate.py runs: build the model, load weights, run the suites unit by unit (each saved as it finishes, so
that an interrupted run continues where it stopped), report."""
import argparse
import datetime
import gc
import logging
import os
from contextlib import nullcontext
from functools import partial
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
import torch.distributed as dist
from timm.data import create_transform, resolve_data_config
from timm.data.transforms import MaybePILToTensor
from timm.utils import ParseKwargs, init_distributed_device, setup_default_logging

from dcls_timm.checkpoint import load_weights
from dcls_timm.cpu_memory import keep_freed_memory
from dcls_timm.errors import ConfigError, Interrupted, check_model_name
from dcls_timm.layers import set_kernel_resolution

from .evaluator import Batches, EvaluationStopped, evaluate_dataset
from .progress import StopRequest, UnitProgress, format_duration
from .report import format_table, plot_imagenet_c, write_results
from .store import FORMAT, ResultsStore, file_digest, weights_digest
from .suites import (
    SUITES, SuiteContext, check_suite_args, empty_record, plan_units, suite_info, summarize_suite, unit_record,
    unit_suite,
)

__all__ = ['build_parser', 'main', 'run', 'resolve_eval_data_config', 'DEFAULT_ROOTS', 'default_workers']

_logger = logging.getLogger('validate')

# where each suite's data lives under --data-dir unless its own flag says otherwise
DEFAULT_ROOTS = {
    'imagenet': 'imagenet/val', 'imagenet-c': 'imagenet-c', 'imagenet-a': 'imagenet-a', 'imagenet-r': 'imagenet-r',
    'sketch': 'sketch', 'stylized': 'stylized', 'dataset': '',
}


def default_workers() -> int:
    """DataLoader workers per process: the CPUs this process may use, shared by the processes of this node, at most
    8 (decoding and resizing ImageNet JPEGs is what keeps a GPU busy)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    local = int(os.environ.get('LOCAL_WORLD_SIZE', '1') or 1)
    return max(1, min(8, cpus // max(1, local)))


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
    p.add_argument('-j', '--workers', type=int, default=None,
                   help='DataLoader workers per process (default: the usable CPUs / processes per node, at most 8)')
    p.add_argument('--device', default=None)
    p.add_argument('--keep-cpu-memory', action=argparse.BooleanOptionalAction, default=True,
                   help='on CPU, glibc keeps freed memory for reuse (dcls_timm.cpu_memory)')
    p.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='mixed precision (autocast with --amp-dtype); default: on for CUDA, off otherwise')
    p.add_argument('--amp-dtype', default='float16', choices=['float16', 'bfloat16'])
    p.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                   help='channels-last memory format; default: on for CUDA, off otherwise')
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
    p.add_argument('--subset', type=int, default=0, metavar='N',
                   help="'dataset' suite: N samples drawn by a fixed seed, the same as train.py --val-subset N (0: all)")
    p.add_argument('--c-preprocess', default='resize', choices=['resize', 'as-is'],
                   help="ImageNet-C images through the eval transform ('resize') or as stored ('as-is')")
    p.add_argument('--kernel-resolution', type=int, default=None,
                   help='sample continuous (FlexConv/CKConv) kernels on this grid, e.g. 33 for a model trained '
                        'with grid 17 on half-size images (cross-resolution evaluation)')
    p.add_argument('--skip-unreadable', action='store_true',
                   help='skip unreadable/truncated images instead of stopping: they are counted, listed in the '
                        'results and left out of every denominator')
    p.add_argument('--results-file', default='',
                   help='write the results here; each finished suite / ImageNet-C cell is saved as it completes, and '
                        'rerunning the same command continues where it stopped')
    p.add_argument('--results-format', default='json', choices=['json', 'csv'],
                   help='csv: timm-style rows; the resumable record then goes to <results-file>.progress.json')
    p.add_argument('--overwrite', action='store_true',
                   help='discard an existing results file instead of continuing it')
    p.add_argument('--plot-file', default='', help='ImageNet-C PNG (default: next to the results file)')
    p.add_argument('--log-interval', type=float, default=30.,
                   help='seconds between progress log lines when stderr is not a terminal (a terminal gets a bar)')
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




def _broadcast(obj: Any, distributed: bool) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _json_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list, tuple, dict)) else repr(v))
            for k, v in sorted(kwargs.items())}


def _checkpoint_file(path: str) -> Optional[Dict[str, Any]]:
    if not path or not os.path.isfile(path):
        return None
    st = os.stat(path)
    return {'path': os.path.abspath(path), 'size': st.st_size,
            'mtime': datetime.datetime.fromtimestamp(st.st_mtime).isoformat(timespec='seconds')}


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec='seconds')


class _Session:
    """The suites of one validate.py run, saved unit by unit to the results file (rank 0)."""

    def __init__(self, store: ResultsStore, header: Dict[str, Any], suites: List[str], saved: Dict[str, Any],
                 session: Dict[str, Any], primary: bool):
        self.store, self.header, self.suites, self.primary = store, header, suites, primary
        self.sessions = list(saved.get('sessions') or []) + [session]
        self.session = session

    @property
    def units(self) -> Dict[str, Dict[str, Any]]:
        return self.store.units

    def document(self, status: str, final: bool = False) -> Dict[str, Any]:
        present = [s for s in SUITES if s in self.suites or any(unit_suite(k) == s for k in self.units)]
        suites = {}
        for s in present:
            summary = summarize_suite(s, self.store.suite_info.get(s, {}), self.units, final=final and self.primary)
            if summary is not None:
                suites[s] = summary
        self.session['status'] = status
        self.session['finished_at'] = _now()
        return {'format': FORMAT, 'status': status, **self.header, 'suites': suites,
                'fingerprint': self.store.fingerprint, 'suite_info': self.store.suite_info,
                'units': {k: self.units[k] for k in sorted(self.units, key=_unit_order)},
                'sessions': self.sessions}

    def save(self, status: str) -> None:
        if self.primary:
            self.store.save(self.document(status))


def _unit_order(key: str):
    parts = key.split('/')
    return (SUITES.index(parts[0]) if parts[0] in SUITES else len(SUITES), key)


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Evaluate with parsed arguments (the suites in ``args.suite``); returns the results.

    On CPU (unless ``keep_cpu_memory`` is off) this changes the C library's allocator settings for the whole
    calling process (:func:`dcls_timm.cpu_memory.keep_freed_memory`), not only for the evaluation.
    """
    suites = [s.strip() for s in args.suite.split(',') if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if unknown or not suites:
        raise ConfigError(f'Unknown suite(s) {unknown}; choose from {", ".join(SUITES)}.')
    if args.class_map and not os.path.isfile(args.class_map):
        raise ConfigError(f'Class map not found: {args.class_map}')
    suites = [s for s in SUITES if s in suites]  # clean ImageNet first: its error feeds the relative mCE
    check_model_name(args.model)
    if args.input_size and args.in_chans and args.input_size[0] != args.in_chans:
        raise ConfigError(f'--input-size has {args.input_size[0]} channels but --in-chans is {args.in_chans}.')
    if args.use_ema and not args.checkpoint:
        raise ConfigError('--use-ema needs --checkpoint.')
    roots = {s: getattr(args, f"{s.replace('-', '_')}_dir") or os.path.join(args.data_dir, DEFAULT_ROOTS[s])
             for s in suites}
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = init_distributed_device(args)
    if device.type == 'cpu' and args.keep_cpu_memory:
        keep_freed_memory()
    primary = args.rank == 0
    cuda = device.type == 'cuda'
    amp = cuda if args.amp is None else args.amp
    channels_last = cuda if args.channels_last is None else args.channels_last
    workers = default_workers() if args.workers is None else args.workers
    if cuda:
        torch.backends.cudnn.benchmark = True

    try:
        in_chans = args.in_chans or (args.input_size[0] if args.input_size else None)
        model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes,
                                  in_chans=in_chans, **args.model_kwargs)
    except TypeError as e:
        raise ConfigError(f"Cannot create model '{args.model}' with these arguments: {e}") from None
    data_config = resolve_eval_data_config(args, model, verbose=primary)
    img_mode = 'L' if data_config['input_size'][0] == 1 else 'RGB'
    loaded = load_weights(model, args.checkpoint, args.use_ema) if args.checkpoint else None
    if args.kernel_resolution is not None:
        if not set_kernel_resolution(model, args.kernel_resolution):
            raise ConfigError(f"--kernel-resolution: model '{args.model}' has no continuous-kernel layers.")
    if primary and not args.checkpoint and not args.pretrained:
        _logger.warning('No --checkpoint or --pretrained: evaluating randomly initialised weights (a results file of '
                        'such a run can only be continued by a run with the same random weights).')
    # the suites' flags and folders before anything is read or written
    probe = SuiteContext(transform=None, transform_as_is=None, evaluate=None, class_map=args.class_map)
    for suite in suites:
        try:
            check_suite_args(suite, probe, roots[suite])
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f'{suite}: {e}') from None
    weights = weights_digest(model) if primary else ''
    model.to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    tf_config = {k: v for k, v in data_config.items() if k != 'size_source'}
    # as timm's prefetcher: images stay uint8 until a whole batch is on the device (a quarter of the bytes through
    # pinned memory to a GPU), then are normalised at once; per-image float ops cost more than the model on a busy CPU
    transform = create_transform(**tf_config, is_training=False, use_prefetcher=True)
    as_is = MaybePILToTensor()
    normalize = (tuple(data_config['mean']), tuple(data_config['std']))
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype) if amp else nullcontext
    stop = StopRequest()
    ctx = SuiteContext(
        transform=transform, transform_as_is=as_is, c_preprocess=args.c_preprocess, data_config=data_config,
        dataset=(args.dataset, args.split, args.dataset_download, args.subset), img_mode=img_mode, class_map=args.class_map,
        evaluate=partial(evaluate_dataset, model, device=device, batch_size=args.batch_size, workers=workers,
                         amp_autocast=autocast, channels_last=channels_last, distributed=args.distributed,
                         skip_unreadable=args.skip_unreadable, normalize=normalize, stop=stop))

    precision = args.amp_dtype if amp else 'float32'
    recorded_config = {
        'input_size': list(data_config['input_size']), 'crop_pct': data_config['crop_pct'],
        'crop_mode': data_config['crop_mode'], 'interpolation': data_config['interpolation'],
        'mean': list(data_config['mean']), 'std': list(data_config['std']),
        'size_source': data_config['size_source'], 'use_train_size': args.use_train_size}
    header: Dict[str, Any] = {
        'model': args.model, 'checkpoint': args.checkpoint, 'ema': args.use_ema,
        'param_count': sum(p.numel() for p in model.parameters()),
        'img_size': data_config['input_size'][-1], 'crop_pct': data_config['crop_pct'],
        'kernel_resolution': args.kernel_resolution,
        'interpolation': data_config['interpolation'],
        # everything the eval transform used; size_source: explicit | test | train | default (resolve_eval_data_config)
        'data_config': recorded_config,
        'precision': precision,
        'weights_sha256': weights,
    }
    if loaded is not None and loaded.get('epoch') is not None:
        header['checkpoint_epoch'] = loaded['epoch']
    if args.checkpoint:
        header['checkpoint_file'] = _checkpoint_file(args.checkpoint) if primary else None
    # what the saved numbers depend on: the same values are required to continue a results file
    fingerprint = {
        'model': args.model, 'model_kwargs': _json_kwargs(args.model_kwargs), 'num_classes': args.num_classes,
        'in_chans': data_config['input_size'][0], 'weights_sha256': weights,
        'kernel_resolution': args.kernel_resolution,
        'class_map_sha256': file_digest(args.class_map) if args.class_map else '',
        'data_config': {k: recorded_config[k] for k in ('input_size', 'crop_pct', 'crop_mode', 'interpolation',
                                                        'mean', 'std')},
        'precision': precision,
    }
    json_path = ''
    if args.results_file:
        json_path = args.results_file if args.results_format == 'json' else args.results_file + '.progress.json'
    store = ResultsStore(json_path, fingerprint, overwrite=args.overwrite)
    infos = {s: suite_info(s, ctx, roots[s]) for s in suites}

    # rank 0 reads the results file and decides; every rank continues from the same finished units
    answer: Dict[str, Any] = {}
    if primary:
        try:
            saved = store.load()
            warnings = [w for s in suites for w in [store.check_suite(s, *infos[s])] if w]
            answer = {'units': store.units, 'suite_info': store.suite_info, 'sessions': saved.get('sessions') or [],
                      'warnings': warnings}
        except ConfigError as e:
            answer = {'error': str(e)}
    answer = _broadcast(answer, args.distributed)
    if 'error' in answer:
        raise ConfigError(answer['error'])
    store.units, store.suite_info = answer['units'], answer['suite_info']
    for w in answer['warnings'] if primary else []:
        _logger.warning(w)
    session = {'started_at': _now(), 'device': device.type, 'world_size': args.world_size,
               'batch_size': args.batch_size, 'workers': workers, 'precision': precision,
               'channels_last': channels_last, 'units_evaluated': 0}
    run_state = _Session(store, header, suites, {'sessions': answer['sessions']}, session, primary)

    plans = {}
    for suite in suites:
        try:
            plans[suite] = plan_units(suite, ctx, roots[suite])
        except ConfigError:
            raise
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f'{suite}: {e}') from None
    total = sum(len(p) for p in plans.values())
    todo = sum(1 for p in plans.values() for u in p if u.key not in store.units)
    if primary and json_path:
        if todo < total:
            _logger.info(f'{json_path}: {total - todo} of {total} units already done, {todo} to evaluate')
        run_state.save('running')  # also checks early that the results file can be written

    if todo:  # as timm's validate.py: one forward of a batch first (kernel caches, cuDNN/oneDNN set-up)
        with torch.no_grad(), autocast():
            warm = torch.zeros((args.batch_size, *data_config['input_size']), device=device)
            model(warm.contiguous(memory_format=torch.channels_last) if channels_last else warm)
        del warm
        gc.collect()  # the garbage of the set-up, now rather than in the middle of the first unit

    stop.install()
    current = ''
    queue = [(suite, unit) for suite in suites for unit in plans[suite] if unit.key not in store.units]
    lookahead: Dict[str, Any] = {}  # the next unit's dataset and started batches (DataLoader workers already busy)

    def build(position: int):
        suite, unit = queue[position]
        if lookahead.get('position') == position:
            return lookahead.pop('dataset'), lookahead.pop('batches', None)
        try:
            return unit.build(), None
        except ConfigError:
            raise
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f'{suite}: {e}') from None

    def look_ahead(position: int) -> None:
        """Build unit ``position``'s dataset and start its workers; any problem is left for its turn."""
        lookahead.clear()
        if position >= len(queue) or workers == 0:
            return
        try:
            ds = queue[position][1].build()
            batches = None
            if len(ds):
                batches = Batches(ds, device, args.batch_size, workers, args.distributed, args.skip_unreadable)
        except Exception:  # noqa: BLE001  (raised again, with its message, when the unit is built in turn)
            return
        lookahead.update(position=position, dataset=ds, batches=batches)

    try:
        seconds: Dict[str, List[float]] = {}
        for position, (suite, unit) in enumerate(queue):
            current = unit.key
            if stop.is_set() and not args.distributed:
                raise EvaluationStopped()
            ds, batches = build(position)
            if unit.may_be_empty and len(ds) == 0:
                store.units[unit.key] = empty_record(roots[suite])
                run_state.save('running')
                continue
            look_ahead(position + 1)
            progress = UnitProgress(unit.label, len(ds), enabled=primary, interval=args.log_interval)
            try:
                extra = {'batches': batches} if batches is not None else {}
                result = ctx.evaluate(ds, class_indices=unit.class_indices, progress=progress.update, **extra)
            except ConfigError:  # e.g. an unreadable image: its message names the file
                raise
            except ValueError as e:
                raise ConfigError(f'{suite}: {e}') from None
            finally:
                progress.close()
            record = unit_record(roots[suite], ds, result)
            record['finished_at'] = _now()
            store.units[unit.key] = record
            session['units_evaluated'] += 1
            run_state.save('running')
            seconds.setdefault(suite, []).append(result['seconds'])
            if primary:
                left = sum(1 for s, _ in queue[position + 1:] if s == suite)
                _log_unit(unit.label, suite, record, result, left, seconds[suite])
                if not left:
                    r = summarize_suite(suite, store.suite_info.get(suite, {}), store.units)
                    if r is not None:
                        _logger.info(f"{suite}: {r.get('images')} images, {r.get('classes', '-')} classes from "
                                     f"{roots[suite]}" + (f", {r['skipped']} unreadable skipped"
                                                          if r.get('skipped') else ''))
    except EvaluationStopped:
        name = stop.name or 'a signal on another rank'
        done = sum(1 for p in plans.values() for u in p if u.key in store.units)
        run_state.save('interrupted')
        if args.distributed:
            dist.destroy_process_group()
        where = (f'the {done} of {total} units finished are saved in {json_path}; resume with the same command'
                 if json_path else 'nothing was saved (no --results-file); rerun with --results-file to be able '
                                   'to resume with the same command')
        message = f'interrupted by {name}: dropped the unfinished unit {current}; {where}' if primary else ''
        raise Interrupted(message, exit_status=128 + (stop.signum or 15)) from None
    finally:
        lookahead.clear()
        stop.restore()

    results = run_state.document('complete', final=True)
    if primary:
        print(format_table(results))
        if json_path:
            store.save(results)
        if args.results_file and args.results_format == 'csv':
            write_results(results, args.results_file, 'csv')
        if 'imagenet-c' in results['suites']:
            plot = args.plot_file or (os.path.splitext(args.results_file)[0] + '_imagenet_c.png'
                                      if args.results_file else 'imagenet_c_errors.png')
            plot_imagenet_c(results['suites']['imagenet-c'], plot, args.model)
            results['plot_file'] = plot
    if args.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return results


def _log_unit(label: str, suite: str, record: Dict[str, Any], result: Dict[str, Any], left: int,
              seconds: List[float]) -> None:
    if suite == 'imagenet-c':
        what = (f"top-1 error {100 - result['top1']:.2f} %" if 'top1' in result else 'no readable image')
    else:
        what = f"top-1 {result['top1']:.2f} %" if 'top1' in result else 'no readable image'
    skipped = f", {record['skipped']} unreadable skipped" if record.get('skipped') else ''
    eta = f', {left} to go, ETA {format_duration(left * sum(seconds) / len(seconds))}' if left else ''
    _logger.info(f"{label}: {what} ({record['images']} images{skipped}, {record['images_per_sec']:.1f} img/s, "
                 f"{format_duration(record['seconds'])}{eta})")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    setup_default_logging()
    return run(build_parser().parse_args(argv))
