#!/usr/bin/env python
"""Speed of dcls_timm's FlexNet-7 and CCNN-4,140 (2-D CIFAR-10, 1-D sMNIST) against the authors' own code.

The authors' code is run as it is in their repositories (FlexConv/FlexNet: rjbruin/flexconv; CCNN:
david-knigge/ccnn), from ``.cache/authors/<name>/`` (git-ignored; ``scripts/fetch_authors_code.py`` puts it
there). Their models are built the way their ``model_constructor.py`` builds them, from their ``cfg/config.yaml``
with the Hydra overrides of the commands in their experiments READMEs (``REPOS[...]['recipes']`` in
``fetch_authors_code.py``), so both sides have the same architecture and the same parameter count (checked).

For every case it times training steps (forward, cross-entropy, backward, Adam step) and inference
(``inference_mode`` forward in eval mode) of both implementations, alternating them repeat by repeat so that
machine drift hits both alike (median of ``--repeats`` after warm-up), with the masks as created (``init``: sigma
0.075, kernels cropped to a few taps) and optionally widened (``spread``: every mask's sigma set to ``--spread``,
1.0 by default, so no kernel is cropped: 33x33 taps in 2-D, all 784 in 1-D, as after training). The Adam step
gives the mask parameters a learning rate of 0 on both sides, so the crop sizes stay those being measured.
``ratio`` is theirs / ours (> 1: ours is faster). The spread rows run at ``--spread-batch-size`` (by default 16 in
2-D, where the authors' uncropped 33x33 convolutions take minutes per step at 64 on a small CPU, and the recipe's
100 in 1-D, where their step takes seconds); a layer check times the last
FlexConv layer of each side alone, spread, inference, at the recipe batch, so that effects of the batch size on
the convolution paths still show. ``--profile`` adds one profiled step of each side (``torch.profiler``, CPU): the
share of self CPU time in convolution and FFT ops, and the top ops.

    python scripts/fetch_authors_code.py            # once (or --from-dir with a checkout)
    python scripts/benchmark_authors.py --repeats 3 --batch-size 8 --masks init --modes train
    python scripts/benchmark_authors.py --profile --json docs/benchmarks/cpu_authors.json \\
        --markdown docs/benchmarks/cpu_authors.md

Shims (section "Shims" below): third-party packages the authors' modules import at import time but that play no
part in the forward/backward pass (``omegaconf``, only where it is not installed: an attribute dict stands in for
its configs; ``wandb``, ``plotly``, ``pandas``: logging, plotting, config flattening; ``srf``: the N-Jet layer of
another paper) are replaced by stubs when they are not installed. flexconv modules that the stored copy lacks
(only while their files are absent) are stood in for as described in ``_flexconv_stand_ins``. Their
``models/__init__.py`` is not run (it imports every other architecture of the repositories); their
``model_constructor.py`` (wandb, pytorch_lightning) is not run either: the few lines that matter are repeated in
``build_theirs``.
"""
import argparse
import contextlib
import importlib
import importlib.machinery
import importlib.util
import io
import json
import os
import shlex
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dcls_timm  # noqa: E402,F401  (registers the models)
from dcls_timm.cpu_memory import keep_freed_memory  # noqa: E402
from benchmark import _stats, inference_step, machine, ms_range, time_interleaved, write_results  # noqa: E402
from fetch_authors_code import DEFAULT_DEST, REPOS, check as check_copy  # noqa: E402

CASES = {
    'flexnet7': dict(
        title='FlexNet-7, CIFAR-10 (3x32x32)', repo='flexconv', recipe='flexnet7_cifar10',
        ours=('flexnet_7', {}), input=(3, 32, 32), batch=64, spread_batch=16, spec_params=671_650,
        builder='flexnet', in_channels=3, out_channels=10, data_dim=2),
    'ccnn2d': dict(
        # their CIFAR-10 CCNN-4,140 command says mask.init_value=0.75 (every other CCNN command, and ours: 0.075,
        # the value of the paper); 0.075 here so that both sides crop alike. The 'spread' rows cover wide masks.
        title='CCNN-4,140, CIFAR-10 (3x32x32)', repo='ccnn', recipe='ccnn_4_140_cifar10',
        extra_overrides=['mask.init_value=0.075'],
        ours=('ccnn_4_140', {}), input=(3, 32, 32), batch=64, spread_batch=16, spec_params=201_042,
        builder='ccnn', in_channels=3, out_channels=10, data_dim=2, data_type='image'),
    'ccnn1d': dict(
        title='CCNN-4,140, sMNIST (1x784)', repo='ccnn', recipe='ccnn_4_140_smnist',
        # spread rows at the recipe batch: the authors' 1-D step takes seconds there, not minutes
        ours=('ccnn_4_140', dict(data_dim=1, in_chans=1)), input=(1, 784), batch=100, spread_batch=None,
        spec_params=198_769,
        builder='ccnn', in_channels=1, out_channels=10, data_dim=1, data_type='sequence'),
}


# ---------------------------------------------------------------------------------------------------------------
# Shims: stand-ins for what the authors' modules import but the forward/backward pass never uses
# ---------------------------------------------------------------------------------------------------------------
class _AttrDict(dict):
    """The part of OmegaConf's DictConfig their code uses: attribute reads and writes."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self[key] = value


def _to_attr(obj):
    if isinstance(obj, dict):
        return _AttrDict({k: _to_attr(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return [_to_attr(v) for v in obj]
    return obj


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__benchmark_shim__ = True
    return mod


def _unused(what: str):
    def fail(*args, **kwargs):
        raise NotImplementedError(f'{what} is a benchmark stub (not needed for the forward/backward pass).')
    return fail


def _third_party_shims() -> Dict[str, types.ModuleType]:
    class OmegaConf:
        create = staticmethod(_to_attr)
        to_container = staticmethod(lambda cfg, **kw: json.loads(json.dumps(cfg)))

    class _Placeholder:
        def __init__(self, *args, **kwargs):
            _unused(type(self).__name__)()

    class Figure(_Placeholder):
        pass

    class Heatmap(_Placeholder):
        pass

    class Srf_layer_shared(_Placeholder):
        pass

    graph_objects = _module('plotly.graph_objects', Figure=Figure, Heatmap=Heatmap)
    srf_nn = _module('srf.nn', Srf_layer_shared=Srf_layer_shared)
    return {
        'omegaconf': _module('omegaconf', OmegaConf=OmegaConf, DictConfig=_AttrDict),
        'wandb': _module('wandb', run=None, log=lambda *a, **k: None, Histogram=_unused('wandb.Histogram')),
        'plotly': _module('plotly', graph_objects=graph_objects),
        'plotly.graph_objects': graph_objects,
        'pandas': _module('pandas', json_normalize=_unused('pandas.json_normalize')),
        'srf': _module('srf', nn=srf_nn),
        'srf.nn': srf_nn,
    }


def install_third_party_shims() -> List[str]:
    """Stub the third-party packages that are not installed; returns the stubbed names."""
    installed = []
    for name, mod in _third_party_shims().items():
        top = name.split('.')[0]
        if name in sys.modules:
            continue
        if getattr(sys.modules.get(top), '__benchmark_shim__', False) or importlib.util.find_spec(top) is None:
            sys.modules[name] = mod
            installed.append(name)
    return installed


def _flexconv_stand_ins(root: Path) -> Dict[str, types.ModuleType]:
    """Modules that rjbruin/flexconv's ``ckconv/nn/__init__.py`` and ``ckconv/utils/__init__.py`` import but the
    stored copy lacks (a git clone has them; then nothing is stood in for). None is used by FlexNet-7 except
    ``pairwise`` (its block widths), which groups in pairs like the same lineage's
    ``ccnn/ckconv/utils/iterables.pairwise``. ``ckconv/__init__.py`` is also missing: ``ckconv`` then imports as a
    namespace package, which is enough (their modules import ``ckconv.nn`` / ``ckconv.utils`` explicitly)."""

    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    class Sine(nn.Module):
        def forward(self, x):
            return torch.sin(x)

    class LayerNorm(nn.Module):  # channels-first layer norm (used only with net.norm=LayerNorm)
        def __init__(self, num_channels, eps=1e-12):
            super().__init__()
            self.ln = nn.LayerNorm(num_channels, eps=eps)

        def forward(self, x):
            return self.ln(x.transpose(1, -1)).transpose(-1, 1)

    class CausalConv1d(nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()
            _unused('ckconv.nn.CausalConv1d')()

    def pairwise(iterable):
        it = iter(iterable)
        return zip(it, it)

    stand_ins = {
        'ckconv/nn/activation_functions.py': _module('ckconv.nn.activation_functions', Swish=Swish, Sine=Sine),
        'ckconv/nn/norm.py': _module('ckconv.nn.norm', LayerNorm=LayerNorm),
        'ckconv/nn/causalconv.py': _module('ckconv.nn.causalconv', CausalConv1d=CausalConv1d),
        'ckconv/utils/iterable.py': _module('ckconv.utils.iterable', pairwise=pairwise),
    }
    return {mod.__name__: mod for path, mod in stand_ins.items() if not (root / path).is_file()}


_TOP_LEVEL = ('ckconv', 'models')  # both repositories have these top-level packages: one at a time


def _purge() -> None:
    for key in list(sys.modules):
        if key.split('.')[0] in _TOP_LEVEL:
            del sys.modules[key]


@contextlib.contextmanager
def authors_code(name: str, authors_dir: Path):
    """Make one repository's ``ckconv`` and ``models`` importable (the other's are unloaded). Models built inside
    keep working afterwards: their functions hold their own modules."""
    root = (authors_dir / name).resolve()
    info = check_copy(name, authors_dir)
    if not info['exists'] or info['missing_required']:
        raise SystemExit(f"The authors' {name} code is incomplete at {root} (missing: "
                         f"{', '.join(info['missing_required']) or 'everything'}); run "
                         f"scripts/fetch_authors_code.py --repo {name}.")
    _purge()
    sys.path.insert(0, str(root))
    stand_ins = _flexconv_stand_ins(root) if name == 'flexconv' else {}
    sys.modules.update(stand_ins)
    # a bare `models` package: their models/__init__.py imports all their other architectures
    spec = importlib.machinery.ModuleSpec('models', None, is_package=True)
    spec.submodule_search_locations = [str(root / 'models')]
    sys.modules['models'] = importlib.util.module_from_spec(spec)
    try:
        yield sorted(stand_ins)
    finally:
        sys.path.remove(str(root))
        _purge()


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
def _parse_value(text: str):
    value = yaml.safe_load(text)
    if isinstance(value, str):  # Hydra reads 1e-06 as a float, YAML 1.1 does not
        try:
            return float(text)
        except ValueError:
            pass
    return value


def recipe_config(repo: str, recipe: str, authors_dir: Path, extra: Sequence[str] = ()):
    """Their ``cfg/config.yaml`` with the command's ``key=value`` overrides, as their config object type."""
    from omegaconf import OmegaConf  # theirs, or the shim
    cfg = yaml.safe_load((authors_dir / repo / 'cfg' / 'config.yaml').read_text())
    for token in shlex.split(REPOS[repo]['recipes'][recipe]) + list(extra):
        key, sep, value = token.partition('=')
        if not sep:
            raise ValueError(f'bad override {token!r}')
        *path, leaf = key.split('.')
        parent = cfg
        for part in path:
            parent = parent.setdefault(part, {})
        parent[leaf] = _parse_value(value)
    return OmegaConf.create(cfg)


def build_theirs(case: dict, authors_dir: Path) -> nn.Module:
    """What their ``model_constructor.construct_model`` does, less its logging and wrappers (flexconv: wandb
    summary and ``torch.nn.DataParallel``, a pass-through without GPUs; ccnn: the Lightning wrapper)."""
    cfg = recipe_config(case['repo'], case['recipe'], authors_dir, case.get('extra_overrides', ()))
    quiet = io.StringIO()  # their constructors print every block
    with contextlib.redirect_stdout(quiet):
        if case['builder'] == 'flexnet':
            cfg.kernel.dim_linear = case['data_dim']  # model_constructor: 2 for image datasets
            module = importlib.import_module('models.ckresnet')
            model_type = 'Img' if case['data_dim'] == 2 else 'SeqData'
            cls = getattr(module, f'{model_type}_{cfg.net.type}')
            return cls(in_channels=case['in_channels'], out_channels=case['out_channels'], net_config=cfg.net,
                       kernel_config=cfg.kernel, conv_config=cfg.conv, mask_config=cfg.mask)
        cfg.net.data_dim = case['data_dim']  # datamodule: 'default' -> image, 2-D; 'sequence' -> 1-D
        module = importlib.import_module('models.resnet')
        cls = getattr(module, f"{cfg.net.type}_{case['data_type']}")
        return cls(in_channels=case['in_channels'], out_channels=case['out_channels'], net_cfg=cfg.net,
                   kernel_cfg=cfg.kernel, conv_cfg=cfg.conv, mask_cfg=cfg.mask)


def build_ours(case: dict) -> nn.Module:
    name, kwargs = case['ours']
    return timm.create_model(name, **kwargs)


def mask_width_params(model: nn.Module) -> List[nn.Parameter]:
    """The Gaussian mask parameters (ours: mask_sigma, mask_mean; flexconv: mask_params; ccnn: mask_width_param,
    mask_mean_param where learnt)."""
    names = ('mask_sigma', 'mask_mean', 'mask_params', 'mask_width_param', 'mask_mean_param')
    found = {}
    for m in model.modules():
        for n in names:
            p = getattr(m, n, None)
            if isinstance(p, nn.Parameter):
                found[id(p)] = p
    return list(found.values())


def spread_masks(model: nn.Module, sigma: float) -> int:
    """Set every mask's sigma (both axes) to ``sigma``; returns the count of layers changed."""
    count = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, 'mask_sigma', None), nn.Parameter):  # ours
                m.mask_sigma.fill_(sigma)
            elif isinstance(getattr(m, 'mask_params', None), nn.Parameter):  # flexconv: rows [mean, sigma]
                m.mask_params[:, 1].fill_(sigma)
            elif isinstance(getattr(m, 'mask_width_param', None), nn.Parameter):  # ccnn
                m.mask_width_param.fill_(sigma)
            else:
                continue
            count += 1
    return count


def kernel_sizes(model: nn.Module) -> List[List[int]]:
    """Spatial sizes of the kernels the last forward pass convolved with, layer by layer."""
    sizes = []
    for m in model.modules():
        if hasattr(m, 'mask_sigma') and hasattr(m, 'kernel_sizes'):  # ours
            sizes.append(list(m.kernel_sizes()))
        elif hasattr(m, 'mask_params') or hasattr(m, 'mask_width_param'):  # theirs
            sizes.append(list(m.conv_kernel.shape[2:]))
    return sizes


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def last_flex_layer(model: nn.Module, side: str) -> nn.Module:
    """The last FlexConv of a model (separable ones with their pointwise conv, as both sides define them)."""
    if side == 'ours':
        from dcls_timm.layers import SeparableFlexConv
        found = [m for m in model.modules() if isinstance(m, SeparableFlexConv)] or \
            [m for m in model.modules() if isinstance(getattr(m, 'mask_sigma', None), nn.Parameter)]
    else:
        found = [m for m in model.modules() if isinstance(getattr(m, 'mask_params', None), nn.Parameter)
                 or isinstance(getattr(m, 'mask_width_param', None), nn.Parameter)]
    return found[-1]


def make_step(model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, lr: float = 1e-3) -> Callable[[], None]:
    """One training step (forward, cross-entropy, backward, Adam; masks at lr 0) or one inference forward."""
    if mode == 'infer':
        model.eval()
        return inference_step(model, x)
    model.train()
    frozen = mask_width_params(model)
    frozen_ids = {id(p) for p in frozen}
    groups = [{'params': [p for p in model.parameters() if id(p) not in frozen_ids]}]
    if frozen:
        groups.append({'params': frozen, 'lr': 0.0})
    optimizer = torch.optim.Adam(groups, lr=lr)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


def _prime(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One plain no-grad forward: lazy state (kernel grids, CCNN's one-time output rescale) is created outside
    inference mode, as in training."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x[:2])
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Profile
# ---------------------------------------------------------------------------------------------------------------
def _category(name: str) -> Optional[str]:
    low = name.lower()
    if 'fft' in low:
        return 'fft'
    if 'conv' in low:
        return 'conv'
    return None


def profile_step(step: Callable[[], None], top: int = 10) -> dict:
    """Self CPU time of one step by op: the share in convolution and FFT ops, and the top ops."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    rows = [e for e in prof.key_averages() if not getattr(e, 'is_user_annotation', False)]
    total = sum(e.self_cpu_time_total for e in rows)
    by_cat = {'conv': 0.0, 'fft': 0.0}
    for e in rows:
        cat = _category(e.key)
        if cat:
            by_cat[cat] += e.self_cpu_time_total
    ordered = sorted(rows, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        'wall_ms': wall * 1e3, 'self_cpu_ms': total / 1e3, 'conv_ms': by_cat['conv'] / 1e3,
        'fft_ms': by_cat['fft'] / 1e3, 'conv_fft_share': (by_cat['conv'] + by_cat['fft']) / max(total, 1e-9),
        'top': [{'op': e.key, 'self_ms': e.self_cpu_time_total / 1e3, 'share': e.self_cpu_time_total / max(total, 1e-9),
                 'calls': e.count} for e in ordered],
    }


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------
def _ks(sizes: List[List[int]]) -> str:
    if not sizes:
        return '-'
    uniq = sorted({'x'.join(map(str, s)) for s in sizes})
    return '/'.join(uniq)


def _spread_batch_text(spread_batch_size) -> str:
    if spread_batch_size is None or spread_batch_size < 0:
        return ('batch 16 in 2-D (the authors\' uncropped 33x33 convolutions take minutes per step at the recipe '
                'batch on a small CPU) and at the recipe batch in 1-D')
    if spread_batch_size == 0:
        return 'the batch of the init rows'
    return (f"batch {spread_batch_size} (the authors' uncropped convolutions take minutes per step at the recipe "
            'batch on a small CPU)')


def to_markdown(results: dict) -> str:
    m = results['machine']
    lines = [
        f"Measured {m['date']} on {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads"
        + (f"; 1-min load average {results['load_average']['start']:.1f} at the start, "
           f"{results['load_average']['end']:.1f} at the end" if results.get('load_average') else '') + '); '
        f"torch {m['torch']}, timm {m['timm']}, dcls_timm {m['dcls_timm']}; allocator: "
        f"{m.get('allocator') or 'default'}; median of {results['repeats']} "
        f"repeats after {results['warmup']} warm-up step(s), ours and theirs alternating repeat by repeat "
        '(min–max in brackets).', '',
        f"Command: `{results['command']}`", '',
        'The machine is shared with other jobs, so absolute times drift; the two implementations alternate within '
        'every repeat, which keeps their ratio fairly robust to that drift. **ratio = theirs / ours** (> 1: ours is '
        'faster). Train step: forward, cross-entropy, backward, Adam (mask parameters at lr 0 on both sides, so the '
        'crop sizes stay fixed); infer: `torch.inference_mode` forward in eval mode. `init`: masks as created '
        f"(sigma 0.075); `spread`: every mask sigma set to {results['spread_sigma']:g} (no cropping: the whole "
        f"grid), as after training; these rows run at {_spread_batch_text(results.get('spread_batch_size'))}, "
        'and the layer check below repeats the last layer at the recipe batch. Kernel: the spatial sizes the '
        'layers convolved with (ours | theirs).', '',
        '| case | batch | mode | masks | kernel (ours \\| theirs) | ours ms | theirs ms | ratio |',
        '|---|---|---|---|---|---|---|---|']
    for r in results['speed']:
        a, b = r['ours'], r['theirs']
        lines.append(
            f"| {r['title']} | {r['batch']} | {r['mode']} | {r['masks']} | {_ks(r['kernel_sizes_ours'])} \\| "
            f"{_ks(r['kernel_sizes_theirs'])} | {ms_range(a)} | {ms_range(b)} | **{r['ratio']:.2f}** |")
    if results.get('layers'):
        lines += ['', f"Layer check: the last FlexConv layer of each side alone (separable ones with their pointwise "
                      f"conv), masks spread, `inference_mode` forward at the recipe batch (median of "
                      f"{results['layer_repeats']}):", '',
                  '| case | input | ours ms | theirs ms | ratio |', '|---|---|---|---|---|']
        for r in results['layers']:
            lines.append(f"| {r['title']} | {'x'.join(map(str, r['input']))} | {1e3 * r['ours']['median_s']:.0f} | "
                         f"{1e3 * r['theirs']['median_s']:.0f} | **{r['ratio']:.2f}** |")
    lines += ['', 'Parameters (trainable):', '', '| case | ours | theirs | SPEC | equal |', '|---|---|---|---|---|']
    for c in results['cases']:
        lines.append(f"| {c['title']} | {c['params_ours']:,} | {c['params_theirs']:,} | {c['spec_params']:,} | "
                     f"{'yes' if c['params_ours'] == c['params_theirs'] == c['spec_params'] else 'no'} |")
    if results.get('profile'):
        lines += ['', 'Profile (`torch.profiler`, CPU, one step after the timing): share of self CPU time in '
                      'convolution ops (names with "conv": aten::convolution, mkldnn_convolution, '
                      'convolution_backward, ...) and FFT ops (aten::_fft_r2c, _fft_c2r, ...). The spectrum '
                      'products of the FFT paths (aten::mul, einsum/bmm) are not counted.', '',
                  '| case | mode | masks | side | step ms | conv ms | fft ms | conv+fft share | top ops (self ms) |',
                  '|---|---|---|---|---|---|---|---|---|']
        for p in results['profile']:
            for side in ('ours', 'theirs'):
                s = p[side]
                top = ', '.join(f"{t['op']} {t['self_ms']:.0f}" for t in s['top'][:5])
                lines.append(f"| {p['title']} | {p['mode']} | {p['masks']} | {side} | {s['wall_ms']:.0f} | "
                             f"{s['conv_ms']:.0f} | {s['fft_ms']:.0f} | {100 * s['conv_fft_share']:.0f} % | {top} |")
    overrides = [f"{c['title']}: {', '.join(c['extra_overrides'])}" for c in results['cases']
                 if c.get('extra_overrides')]
    src = results['authors']
    lines += ['', "Authors' code (run from `.cache/authors/`, git-ignored), built from their `cfg/config.yaml` with "
                  "the overrides of their experiment commands (listed in the JSON, `cases[].recipe`)"
                  + (f"; changed from those commands: {'; '.join(overrides)} (their CIFAR-10 CCNN-4,140 command "
                     'has mask.init_value=0.75: kernels uncropped from the start, as in the spread rows; all their '
                     'other CCNN commands, the paper and ours: 0.075)' if overrides else '') + ':', '']
    for name, info in src.items():
        head = info.get('git_head')
        lines.append(f"- {name}: {info['url']} " + (f'(git HEAD {head})' if head else
                     f"(files placed from a stored index of public repositories; pinned commit "
                     f"{info['pinned_commit'] or 'default branch'}, per-file commits in fetch_authors_code.py)")
                     + (f"; stood in for (absent): {', '.join(info['absent_modules_stood_in_for'])}"
                        if info['absent_modules_stood_in_for'] else ''))
    lines.append(f"- third-party stubs (not installed here, unused by forward/backward): "
                 f"{', '.join(results['third_party_stubs']) or 'none'}")
    if results.get('notes'):
        lines += ['', 'Notes:', ''] + [f'- {n}' for n in results['notes']]
    return '\n'.join(lines) + '\n'


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--cases', default=','.join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument('--modes', default='train,infer', help='train, infer or both')
    parser.add_argument('--masks', default='init,spread', help='init, spread or both')
    parser.add_argument('--spread', type=float, default=1.0, help='mask sigma of the spread rows (1.0: no crop)')
    parser.add_argument('--batch-size', type=int, default=0, help="0: each recipe's (64, 64, 100)")
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--spread-repeats', type=int, default=3, help='repeats of the (slow) spread rows')
    parser.add_argument('--spread-batch-size', type=int, default=-1,
                        help="batch of the spread rows (-1: each case's, 16 in 2-D, the recipe's in 1-D; "
                             '0: that of the init rows)')
    parser.add_argument('--layer-repeats', type=int, default=2,
                        help='repeats of the one-layer check at the recipe batch (0: skip it)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: leave the default)')
    parser.add_argument('--keep-cpu-memory', action='store_true',
                        help='glibc keeps freed memory for reuse, for both sides (dcls_timm.cpu_memory)')
    parser.add_argument('--profile', action='store_true', help='also profile one step of each side')
    parser.add_argument('--authors-dir', default=str(DEFAULT_DEST))
    parser.add_argument('--json', default='')
    parser.add_argument('--markdown', default='')
    parser.add_argument('--render', default='', help='only rewrite --markdown from this saved --json file')
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        return write_results(results, to_markdown(results), '', args.markdown)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_cpu_memory:
        keep_freed_memory()
    cases = [c for c in args.cases.split(',') if c]
    modes = [m for m in args.modes.split(',') if m]
    masks = [m for m in args.masks.split(',') if m]
    bad = [c for c in cases if c not in CASES] + [m for m in modes if m not in ('train', 'infer')] + \
        [m for m in masks if m not in ('init', 'spread')]
    if bad:
        raise SystemExit(f'unknown case, mode or masks: {bad}')
    warnings.filterwarnings('ignore', message='.*torch.meshgrid.*')
    warnings.filterwarnings('ignore', message='.*dropout2d.*')
    warnings.filterwarnings('ignore', message='.*weight_norm.*')
    warnings.filterwarnings('ignore', message='.*non-tuple sequence for multidimensional indexing.*')
    authors_dir = Path(args.authors_dir)
    stubs = install_third_party_shims()
    device = torch.device('cpu')
    results = {'machine': machine(device), 'load_average': {'start': os.getloadavg()[0]},
               'repeats': args.repeats, 'spread_repeats': args.spread_repeats,
               'warmup': args.warmup, 'spread_sigma': args.spread, 'spread_batch_size': args.spread_batch_size,
               'layer_repeats': args.layer_repeats, 'layers': [],
               'command': 'python scripts/benchmark_authors.py ' + shlex.join(sys.argv[1:] if argv is None else argv),
               'authors': {n: check_copy(n, authors_dir) for n in sorted({CASES[c]['repo'] for c in cases})},
               'third_party_stubs': stubs, 'cases': [], 'speed': [], 'profile': []}
    for name in results['authors']:
        results['authors'][name]['index_file_commits'] = REPOS[name]['files']
        results['authors'][name]['recipes'] = REPOS[name]['recipes']

    for case_name in cases:
        case = CASES[case_name]
        batch = args.batch_size or case['batch']
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, *case['input'], generator=gen)
        y = torch.randint(0, case['out_channels'], (batch,), generator=gen)
        spread_batch = min(batch, (case['spread_batch'] if args.spread_batch_size < 0 else args.spread_batch_size)
                           or batch)

        def build(side: str, spread: bool) -> nn.Module:
            torch.manual_seed(0)
            if side == 'ours':
                model = build_ours(case)
            else:
                with authors_code(case['repo'], authors_dir):
                    model = build_theirs(case, authors_dir)
            if spread:
                spread_masks(model, args.spread)
            _prime(model, x)
            return model

        ours, theirs = build('ours', False), build('theirs', False)
        info = {'case': case_name, 'title': case['title'], 'batch': batch, 'input': list(case['input']),
                'params_ours': num_params(ours), 'params_theirs': num_params(theirs),
                'spec_params': case['spec_params'], 'recipe': REPOS[case['repo']]['recipes'][case['recipe']],
                'extra_overrides': case.get('extra_overrides', [])}
        with torch.no_grad():
            out_o, out_t = ours.eval()(x[:2]), theirs.eval()(x[:2])
        info['output_shapes'] = [list(out_o.shape), list(out_t.shape)]
        results['cases'].append(info)
        print(f"{case['title']}: params ours {info['params_ours']:,}, theirs {info['params_theirs']:,} "
              f"(SPEC {case['spec_params']:,})", flush=True)
        del ours, theirs

        for mask_state in masks:
            repeats = args.spread_repeats if mask_state == 'spread' else args.repeats
            nb = spread_batch if mask_state == 'spread' else batch
            for mode in modes:
                models = {side: build(side, mask_state == 'spread') for side in ('ours', 'theirs')}
                steps = {side: make_step(m, mode, x[:nb], y[:nb]) for side, m in models.items()}
                times, warm = time_interleaved(steps, repeats, args.warmup, device)
                a, b = _stats(times['ours']), _stats(times['theirs'])
                row = {'case': case_name, 'title': case['title'], 'batch': nb, 'mode': mode, 'masks': mask_state,
                       'ours': a, 'theirs': b, 'ratio': b['median_s'] / a['median_s'], 'warmup_s': warm,
                       'kernel_sizes_ours': kernel_sizes(models['ours']),
                       'kernel_sizes_theirs': kernel_sizes(models['theirs'])}
                results['speed'].append(row)
                print(f"  {mode} {mask_state}: ours {1e3 * a['median_s']:.0f} ms, theirs {1e3 * b['median_s']:.0f} ms, "
                      f"ratio {row['ratio']:.2f} (kernels ours {_ks(row['kernel_sizes_ours'])}, theirs "
                      f"{_ks(row['kernel_sizes_theirs'])})", flush=True)
                if args.profile:
                    prof = {'case': case_name, 'title': case['title'], 'mode': mode, 'masks': mask_state}
                    for side, step in steps.items():
                        prof[side] = profile_step(step)
                    results['profile'].append(prof)
                    print(f"  profile {mode} {mask_state}: conv+fft share ours "
                          f"{100 * prof['ours']['conv_fft_share']:.0f} %, theirs "
                          f"{100 * prof['theirs']['conv_fft_share']:.0f} %", flush=True)
                del models, steps

        if 'spread' in masks and args.layer_repeats > 0:
            models = {side: build(side, True) for side in ('ours', 'theirs')}
            layers = {side: last_flex_layer(m, side).eval() for side, m in models.items()}
            ours_layer = layers['ours']
            in_ch = getattr(ours_layer, 'in_channels', None) or ours_layer.depthwise.in_channels
            h = torch.randn(batch, in_ch, *case['input'][1:], generator=gen)

            def infer(layer):
                def step():
                    with torch.inference_mode():
                        layer(h)
                return step
            times, _ = time_interleaved({s: infer(l) for s, l in layers.items()}, args.layer_repeats, 1, device)
            a, b = _stats(times['ours']), _stats(times['theirs'])
            row = {'case': case_name, 'title': case['title'], 'batch': batch, 'input': list(h.shape),
                   'layer_ours': type(layers['ours']).__name__, 'layer_theirs': type(layers['theirs']).__name__,
                   'ours': a, 'theirs': b, 'ratio': b['median_s'] / a['median_s']}
            results['layers'].append(row)
            print(f"  layer check (last FlexConv, spread, inference, input {list(h.shape)}): ours "
                  f"{1e3 * a['median_s']:.0f} ms, theirs {1e3 * b['median_s']:.0f} ms, ratio {row['ratio']:.2f}",
                  flush=True)
            del models, layers

    results['load_average']['end'] = os.getloadavg()[0]
    return write_results(results, to_markdown(results), args.json, args.markdown)


if __name__ == '__main__':
    main()
