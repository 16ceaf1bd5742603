"""Evaluation suites: ImageNet (and its A/R class subsets), ImageNet-C, -A, -R, Sketch, Stylized-ImageNet.

Each suite is planned as *units* (what is evaluated and saved at once: the suite, a companion subset, or one ImageNet-C
cell) and summarised from the units' saved counts, so that the numbers of a resumed run are exactly those of an
uninterrupted one (see :mod:`dcls_timm.evaluation.store`).
"""
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .classes import imagenet_wnid_to_index, subset_classes
from .datasets import WnidImageFolder, checked_dataset, fixed_subset, restrict
from .evaluator import counts_to_metrics
from .metrics import ALL_CORRUPTIONS, CORRUPTIONS, corruption_summary

__all__ = ['SUITES', 'SuiteContext', 'Unit', 'plan_units', 'suite_info', 'summarize_suite', 'clean_error',
           'check_suite_args', 'run_suite', 'GENERATED_MARKER', 'unit_suite']

_logger = logging.getLogger(__name__)
GENERATED_MARKER = 'GENERATED_BY_DCLS_TIMM.json'  # written by scripts/make_imagenet_c.py
SUITES = ('imagenet', 'imagenet-c', 'imagenet-a', 'imagenet-r', 'sketch', 'stylized', 'dataset')
COMPANIONS = ('imagenet-a', 'imagenet-r')  # clean ImageNet restricted to their 200 classes


@dataclass
class SuiteContext:
    """What every suite needs: the transforms and how to evaluate (the model is bound into ``evaluate``)."""
    transform: Callable
    transform_as_is: Callable  # only the conversion to a tensor: no resize or crop
    evaluate: Callable[..., Dict[str, Any]]  # evaluate_dataset with device, batch, amp, distributed bound
    c_preprocess: str = 'resize'
    dataset: tuple = ('', 'validation', False, 0)  # (timm dataset name, split, download, subset) for 'dataset'
    img_mode: str = 'RGB'  # PIL mode the 'dataset' suite loads ('L' for one-channel models)
    class_map: str = ''  # a timm class-map file (folder name -> index) replacing the ImageNet wnid order
    data_config: Optional[Dict[str, Any]] = None  # what ``transform`` was built from (input_size, crop_pct, ...)
    _cache: Dict[str, Any] = field(default_factory=dict, repr=False)

    def wnid_to_index(self) -> Dict[str, int]:
        if not self.class_map:
            return imagenet_wnid_to_index()
        from timm.data.readers.class_map import load_class_map
        return load_class_map(self.class_map)


@dataclass
class Unit:
    """One thing to evaluate and save: ``key`` names it in the results file's ``units``."""
    key: str
    label: str
    build: Callable[[], Any]  # the dataset, built only when the unit is evaluated
    class_indices: Optional[Sequence[int]] = None
    may_be_empty: bool = False  # an empty dataset is saved as such (no images of those classes), not an error


def unit_suite(key: str) -> str:
    return key.split('/', 1)[0]


def check_suite_args(name: str, ctx: SuiteContext, root: str) -> None:
    """What can be checked before the model is built: the data folder exists, the flags fit the suite."""
    if name not in SUITES:
        raise ValueError(f'Unknown suite {name!r}; choose from {", ".join(SUITES)}.')
    if name in COMPANIONS and ctx.class_map:
        raise ValueError(f'{name} masks are defined on the standard ImageNet-1k order: drop --class-map.')
    if name != 'dataset' and not os.path.isdir(root):
        raise FileNotFoundError(f'Dataset folder not found: {root}')


def _imagenet_c_cells(root: str) -> List[Tuple[str, int]]:
    cells = [(c, s) for c in ALL_CORRUPTIONS for s in range(1, 6) if os.path.isdir(os.path.join(root, c, str(s)))]
    if not cells:
        raise FileNotFoundError(f'No <corruption>/<severity>/ folders under {root}.')
    return cells


def plan_units(name: str, ctx: SuiteContext, root: str) -> List[Unit]:
    """The units of suite ``name`` on the data at ``root``, in evaluation order."""
    if name == 'imagenet':
        def base():
            if 'imagenet' not in ctx._cache:
                ctx._cache['imagenet'] = WnidImageFolder(root, ctx.wnid_to_index(), ctx.transform)
            return ctx._cache['imagenet']
        units = [Unit('imagenet', 'imagenet', base)]
        if not ctx.class_map:  # the A/R masks are defined on the standard 1k order
            for sub in COMPANIONS:
                indices = subset_classes(sub)[1]
                units.append(Unit(f'imagenet/{sub}-classes', f'imagenet ({sub} classes)',
                                  lambda indices=indices: restrict(base(), indices), indices, may_be_empty=True))
        return units
    if name == 'imagenet-c':
        transform = ctx.transform if ctx.c_preprocess == 'resize' else ctx.transform_as_is
        return [Unit(f'imagenet-c/{c}/{s}', f'imagenet-c {c} {s}',
                     lambda path=os.path.join(root, c, str(s)): WnidImageFolder(path, ctx.wnid_to_index(), transform))
                for c, s in _imagenet_c_cells(root)]
    if name in COMPANIONS:
        wnids, indices = subset_classes(name)
        index_of = imagenet_wnid_to_index()
        return [Unit(name, name, lambda: WnidImageFolder(root, {w: index_of[w] for w in wnids}, ctx.transform),
                     indices)]
    if name in ('sketch', 'stylized'):
        return [Unit(name, name, lambda: WnidImageFolder(root, ctx.wnid_to_index(), ctx.transform))]
    if name == 'dataset':
        def build():
            """Any timm dataset with its own labels (e.g. torch/cifar10, image folders), for non-ImageNet models."""
            from timm.data import create_dataset
            dataset, split, download, subset = ctx.dataset
            if dataset.lower() == 'torch/fashion_mnist' and not download:
                from dcls_timm.training.data import prepare_fashion_mnist  # here: training imports evaluation
                prepare_fashion_mnist(root)
            ds = checked_dataset(create_dataset(dataset, root=root, split=split, download=download,
                                                input_img_mode=ctx.img_mode, class_map=ctx.class_map))
            ds.transform = ctx.transform
            return fixed_subset(ds, subset) if subset else ds
        return [Unit('dataset', f'dataset {ctx.dataset[0] or "image folder"}', build)]
    raise ValueError(f'Unknown suite {name!r}; choose from {", ".join(SUITES)}.')


def _eval_transform_label(config: Optional[Dict[str, Any]]) -> str:
    if not config:
        return 'timm eval transform (resize + centre crop to the model input)'
    h, w = config['input_size'][1:]
    return (f"timm eval transform (resize + {config['crop_mode']} crop to {h}x{w}, crop_pct {config['crop_pct']}, "
            f"{config['interpolation']}"
            f"{', ' + config['size_source'] + ' size' if config.get('size_source') in ('test', 'train') else ''})")


def suite_info(name: str, ctx: SuiteContext, root: str) -> Tuple[Dict[str, Any], Tuple[str, ...]]:
    """What the results of suite ``name`` depend on besides the model and preprocessing, and which of those keys
    must match for saved units to be continued (the others, e.g. a moved data folder, only warn)."""
    info: Dict[str, Any] = {'root': os.path.abspath(root) if root else root}
    must: Tuple[str, ...] = ()
    if name == 'imagenet-c':
        marker = os.path.join(root, GENERATED_MARKER)
        generated = None
        if os.path.isfile(marker):
            with open(marker) as f:
                generated = json.load(f)
        info.update(label='ImageNet-C-style (generated)' if generated else 'ImageNet-C', generated=generated,
                    c_preprocess=ctx.c_preprocess,
                    preprocessing=(_eval_transform_label(ctx.data_config) if ctx.c_preprocess == 'resize'
                                   else 'as stored (no resize or crop)'))
        must = ('label', 'c_preprocess')
    elif name == 'dataset':
        info.update(dataset=ctx.dataset[0], split=ctx.dataset[1])
        if ctx.dataset[3]:  # recorded only when set: files from before the option stay continuable
            info['subset'] = ctx.dataset[3]
        must = ('dataset', 'split', 'subset')
    return info, must


def _unit_summary(rec: Mapping[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k in ('root', 'classes', 'ignored_folders'):
        if k in rec:
            out[k] = rec[k]
    out.update(counts_to_metrics(rec['correct1'], rec['correct5'], rec['loss_sum'], rec['images']))
    out['images'] = rec['images']
    out['skipped'] = rec.get('skipped', 0)
    if rec.get('skipped_files'):
        out['skipped_files'] = list(rec['skipped_files'])
    if 'images_per_sec' in rec:
        out['images_per_sec'] = rec['images_per_sec']
    return out


def clean_error(units: Mapping[str, Mapping[str, Any]]) -> Optional[float]:
    """Top-1 error (fraction) on clean ImageNet from its saved unit, for the relative mCE."""
    rec = units.get('imagenet')
    if not rec or not rec.get('images'):
        return None
    return (rec['images'] - rec['correct1']) / rec['images']


def summarize_suite(name: str, info: Mapping[str, Any], units: Mapping[str, Mapping[str, Any]],
                    final: bool = False) -> Optional[Dict[str, Any]]:
    """The suite's results from its saved units (None if it has none yet); ``final`` logs what is incomplete."""
    own = {k: v for k, v in units.items() if unit_suite(k) == name}
    if not own:
        return None
    if name == 'imagenet-c':
        return _summarize_imagenet_c(info, own, clean_error(units), final)
    if name not in own:
        return None
    out = _unit_summary(own[name])
    if name == 'dataset':
        out.update(dataset=info.get('dataset'), split=info.get('split'))
    if name == 'imagenet':
        for sub in COMPANIONS:
            rec = own.get(f'imagenet/{sub}-classes')
            if rec and (rec.get('images') or rec.get('skipped')):
                out[f'{sub}-classes'] = _unit_summary(rec)
    return out


def _summarize_imagenet_c(info: Mapping[str, Any], cells: Mapping[str, Mapping[str, Any]],
                          clean: Optional[float], final: bool) -> Dict[str, Any]:
    errors: Dict[str, Dict[int, float]] = {}
    images = skipped = 0
    seconds = 0.0
    skipped_cells: Dict[str, int] = {}
    for corruption in ALL_CORRUPTIONS:
        for severity in range(1, 6):
            key = f'imagenet-c/{corruption}/{severity}'
            rec = cells.get(key)
            if rec is None:
                continue
            images += rec['images']
            skipped += rec.get('skipped', 0)
            seconds += rec.get('seconds', 0.0)
            if rec.get('skipped'):
                skipped_cells[f'{corruption}/{severity}'] = rec['skipped']
            if rec['images']:
                errors.setdefault(corruption, {})[severity] = (rec['images'] - rec['correct1']) / rec['images']
    out: Dict[str, Any] = {
        'root': info.get('root'), 'images': images, 'skipped': skipped,
        'label': info.get('label', 'ImageNet-C'),
        'preprocessing': info.get('preprocessing', ''),
        'cells': len(cells),
        'errors': errors,
        **corruption_summary(errors, clean),
    }
    if skipped_cells:
        out['skipped_cells'] = skipped_cells
    if seconds > 0:
        out['images_per_sec'] = (images + skipped) / seconds
    if info.get('generated'):
        out['generated'] = info['generated']
    if final and not out['complete']:
        missing = [c for c in CORRUPTIONS if c not in out['ce']]
        _logger.warning(f'ImageNet-C incomplete (no mCE): missing or partial {", ".join(missing)}')
    return out


def run_suite(name: str, ctx: SuiteContext, root: str) -> Dict[str, Any]:
    """Evaluate suite ``name`` at once, without saving (the runner's resumable loop does the same unit by unit)."""
    check_suite_args(name, ctx, root)
    units: Dict[str, Dict[str, Any]] = {}
    for unit in plan_units(name, ctx, root):
        ds = unit.build()
        if unit.may_be_empty and len(ds) == 0:
            units[unit.key] = empty_record(root)
            continue
        units[unit.key] = unit_record(root, ds, ctx.evaluate(ds, class_indices=unit.class_indices))
    return summarize_suite(name, suite_info(name, ctx, root)[0], units, final=True)


def empty_record(root: str) -> Dict[str, Any]:
    return {'root': root, 'images': 0, 'correct1': 0, 'correct5': 0, 'loss_sum': 0.0, 'skipped': 0,
            'skipped_files': []}


def unit_record(root: str, dataset: Any, result: Mapping[str, Any]) -> Dict[str, Any]:
    """What is saved of an evaluated unit: its counts (the numbers are recomputed from them), the images skipped,
    and its timing."""
    rec: Dict[str, Any] = {'root': root}
    describe = getattr(dataset, 'describe', None)
    if callable(describe):
        d = describe()
        rec.update(classes=d['classes'], ignored_folders=d['ignored_folders'])
    for k in ('images', 'correct1', 'correct5', 'loss_sum', 'skipped', 'skipped_files', 'seconds',
              'images_per_sec'):
        rec[k] = result[k]
    return rec
