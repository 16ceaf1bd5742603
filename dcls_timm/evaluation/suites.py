"""Evaluation suites: ImageNet (and its A/R class subsets), ImageNet-C, -A, -R, Sketch, Stylized-ImageNet."""
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from .classes import imagenet_wnid_to_index, subset_classes
from .datasets import WnidImageFolder, checked_dataset, restrict
from .metrics import ALL_CORRUPTIONS, corruption_summary

__all__ = ['SUITES', 'SuiteContext', 'run_suite', 'GENERATED_MARKER']

_logger = logging.getLogger(__name__)
GENERATED_MARKER = 'GENERATED_BY_DCLS_TIMM.json'  # written by scripts/make_imagenet_c.py


@dataclass
class SuiteContext:
    """What every suite needs: the transforms and how to evaluate (the model is bound into ``evaluate``)."""
    transform: Callable
    transform_as_is: Callable  # only tensor conversion and normalisation (no resize or crop)
    evaluate: Callable[..., Dict[str, float]]  # evaluate_dataset with device, batch, amp, distributed bound
    c_preprocess: str = 'resize'
    clean_error: Optional[float] = None  # top-1 error (fraction) on clean ImageNet, for relative mCE
    dataset: tuple = ('', 'validation', False)  # (timm dataset name, split, download) for the 'dataset' suite
    img_mode: str = 'RGB'  # PIL mode the 'dataset' suite loads ('L' for one-channel models)
    class_map: str = ''  # a timm class-map file (folder name -> index) replacing the ImageNet wnid order
    data_config: Optional[Dict[str, Any]] = None  # what ``transform`` was built from (input_size, crop_pct, ...)

    def wnid_to_index(self) -> Dict[str, int]:
        if not self.class_map:
            return imagenet_wnid_to_index()
        from timm.data.readers.class_map import load_class_map
        return load_class_map(self.class_map)


def _folder(ctx: SuiteContext, root: str, transform) -> WnidImageFolder:
    return WnidImageFolder(root, ctx.wnid_to_index(), transform)


def _imagenet(ctx: SuiteContext, root: str) -> Dict[str, Any]:
    ds = _folder(ctx, root, ctx.transform)
    out = {**ds.describe(), **ctx.evaluate(ds)}
    ctx.clean_error = 1 - out['top1'] / 100
    if ctx.class_map:  # the A/R masks are defined on the standard 1k order
        return out
    # the companion numbers: clean images of the 200 classes of A and R, with the same logit masking
    for name in ('imagenet-a', 'imagenet-r'):
        _, indices = subset_classes(name)
        sub = restrict(ds, indices)
        if len(sub):
            out[f'{name}-classes'] = ctx.evaluate(sub, class_indices=indices)
    return out


def _masked(name: str) -> Callable[[SuiteContext, str], Dict[str, Any]]:
    def suite(ctx: SuiteContext, root: str) -> Dict[str, Any]:
        if ctx.class_map:
            raise ValueError(f'{name} masks are defined on the standard ImageNet-1k order: drop --class-map.')
        wnids, indices = subset_classes(name)
        index_of = imagenet_wnid_to_index()
        ds = WnidImageFolder(root, {w: index_of[w] for w in wnids}, ctx.transform)
        return {**ds.describe(), **ctx.evaluate(ds, class_indices=indices)}
    return suite


def _thousand_way(ctx: SuiteContext, root: str) -> Dict[str, Any]:
    ds = _folder(ctx, root, ctx.transform)
    return {**ds.describe(), **ctx.evaluate(ds)}


def _eval_transform_label(config: Optional[Dict[str, Any]]) -> str:
    if not config:
        return 'timm eval transform (resize + centre crop to the model input)'
    h, w = config['input_size'][1:]
    return (f"timm eval transform (resize + {config['crop_mode']} crop to {h}x{w}, crop_pct {config['crop_pct']}, "
            f"{config['interpolation']}"
            f"{', ' + config['size_source'] + ' size' if config.get('size_source') in ('test', 'train') else ''})")


def _imagenet_c(ctx: SuiteContext, root: str) -> Dict[str, Any]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f'Dataset folder not found: {root}')
    transform = ctx.transform if ctx.c_preprocess == 'resize' else ctx.transform_as_is
    errors: Dict[str, Dict[int, float]] = {}
    images = 0
    for corruption in ALL_CORRUPTIONS:
        for severity in range(1, 6):
            path = os.path.join(root, corruption, str(severity))
            if not os.path.isdir(path):
                continue
            ds = _folder(ctx, path, transform)
            result = ctx.evaluate(ds)
            errors.setdefault(corruption, {})[severity] = 1 - result['top1'] / 100
            images += result['images']
            _logger.info(f'{corruption} {severity}: top-1 error {100 * errors[corruption][severity]:.2f} %')
    if not errors:
        raise FileNotFoundError(f'No <corruption>/<severity>/ folders under {root}.')
    marker = os.path.join(root, GENERATED_MARKER)
    generated = None
    if os.path.isfile(marker):
        with open(marker) as f:
            generated = json.load(f)
    out = {
        'root': root, 'images': images,
        'label': 'ImageNet-C-style (generated)' if generated else 'ImageNet-C',
        'preprocessing': (_eval_transform_label(ctx.data_config)
                          if ctx.c_preprocess == 'resize' else 'as stored (no resize or crop)'),
        'errors': errors,
        **corruption_summary(errors, ctx.clean_error),
    }
    if generated:
        out['generated'] = generated
    if not out['complete']:
        missing = [c for c in ALL_CORRUPTIONS[:15] if c not in out['ce']]
        _logger.warning(f'ImageNet-C incomplete (no mCE): missing or partial {", ".join(missing)}')
    return out


def _timm_dataset(ctx: SuiteContext, root: str) -> Dict[str, Any]:
    """Any timm dataset with its own labels (e.g. torch/cifar10, image folders), for non-ImageNet models."""
    from timm.data import create_dataset
    name, split, download = ctx.dataset
    ds = checked_dataset(create_dataset(name, root=root, split=split, download=download,
                                        input_img_mode=ctx.img_mode, class_map=ctx.class_map))
    ds.transform = ctx.transform
    return {'root': root, 'dataset': name, 'split': split, **ctx.evaluate(ds)}


SUITES: Dict[str, Callable[[SuiteContext, str], Dict[str, Any]]] = {
    'imagenet': _imagenet,
    'imagenet-c': _imagenet_c,
    'imagenet-a': _masked('imagenet-a'),
    'imagenet-r': _masked('imagenet-r'),
    'sketch': _thousand_way,
    'stylized': _thousand_way,
    'dataset': _timm_dataset,
}


def run_suite(name: str, ctx: SuiteContext, root: str) -> Dict[str, Any]:
    if name not in SUITES:
        raise ValueError(f'Unknown suite {name!r}; choose from {", ".join(SUITES)}.')
    return SUITES[name](ctx, root)
