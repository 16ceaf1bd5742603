#!/usr/bin/env python
"""Fetch the authors' FlexConv/FlexNet and CCNN code into ``.cache/authors/<name>/`` (git-ignored), for
``scripts/benchmark_authors.py`` only. Nothing of it is imported by the library or its tests.

    python scripts/fetch_authors_code.py                        # git clone both at the pinned commits
    python scripts/fetch_authors_code.py --repo ccnn --commit <sha>
    python scripts/fetch_authors_code.py --repo flexconv --from-dir ~/src/flexconv   # copy an existing checkout
    python scripts/fetch_authors_code.py --check                # verify what is there, write the manifests

Pins. ``flexconv``: commit d64ec9b, the snapshot every file below was read at. ``ccnn``: the default branch;
the files were read from several commits of its history (the index stored each version at the commit that
introduced it), the newest of each file, listed in ``REPOS['ccnn']['files']``; pass ``--commit`` to pin.

Where GitHub cannot be reached the files are placed by hand, unmodified, from a stored index of public
repositories (same paths). That index lacked four modules of flexconv that ``ckconv/nn/__init__.py`` and
``ckconv/utils/__init__.py`` import (``ckconv/nn/{activation_functions,norm,causalconv}.py``,
``ckconv/utils/iterable.py``) and its ``ckconv/__init__.py``; the benchmark stands in for them only while they are
missing (see ``benchmark_authors.py``, "Shims"). A real clone has them.
"""
import argparse
import datetime
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = ROOT / '.cache' / 'authors'

_FLEX = 'd64ec9b9aa379158a3feb82fee4d932f2de9b9cd'
REPOS = {
    'flexconv': {
        'url': 'https://github.com/rjbruin/flexconv.git',
        'commit': _FLEX,
        'paper': 'FlexConv: Continuous Kernel Convolutions with Differentiable Kernel Sizes (arXiv:2110.08059)',
        # path -> commit the file was read at (the benchmark needs these; '-' marks files absent from the index)
        'files': {
            'ckconv/nn/__init__.py': _FLEX, 'ckconv/nn/ck/__init__.py': _FLEX, 'ckconv/nn/ck/magnet.py': _FLEX,
            'ckconv/nn/ck/mfn.py': _FLEX, 'ckconv/nn/ck/mlp.py': _FLEX, 'ckconv/nn/ck/siren.py': _FLEX,
            'ckconv/nn/ckconv.py': _FLEX, 'ckconv/nn/functional/__init__.py': _FLEX,
            'ckconv/nn/functional/conv.py': _FLEX, 'ckconv/nn/functional/causal_conv.py': _FLEX,
            'ckconv/nn/kernelnet.py': _FLEX, 'ckconv/nn/linear.py': _FLEX, 'ckconv/nn/lr_scheduler.py': _FLEX,
            'ckconv/nn/misc.py': _FLEX, 'ckconv/nn/regularizers.py': _FLEX, 'ckconv/utils/__init__.py': _FLEX,
            'ckconv/utils/flatten_configdict.py': _FLEX, 'ckconv/utils/grids.py': _FLEX,
            'ckconv/utils/params.py': _FLEX, 'models/__init__.py': _FLEX, 'models/ckresnet.py': _FLEX,
            'models/residual_block.py': _FLEX, 'cfg/config.yaml': _FLEX,
        },
        'missing_in_index': ['ckconv/__init__.py', 'ckconv/nn/activation_functions.py', 'ckconv/nn/norm.py',
                             'ckconv/nn/causalconv.py', 'ckconv/utils/iterable.py'],
        # the FlexNet-7 CIFAR-10 command of experiments/readme.md (Table 3), Hydra overrides of cfg/config.yaml
        'recipes': {
            'flexnet7_cifar10': (
                'conv.horizon=33 train.augment=resnet train.batch_size=64 '
                '"net.block_width_factors=[1.0, 2, 1.5, 3, 2.0, 2]" net.no_blocks=7 net.no_hidden=24 '
                'conv.type=FlexConv dataset=CIFAR10 device=cuda net.dropout=0.2 net.dropout_in=0 '
                'mask.dynamic_cropping=True train.epochs=350 kernel.input_scale=25.6 kernel.type=MAGNet '
                'kernel.no_hidden=32 kernel.no_layers=3 train.lr=0.01 train.scheduler_params.warmup_epochs=5 '
                'train.mask_params_lr_factor=0.1 mask.init_value=0.075 mask.temperature=15.0 mask.type=gaussian '
                'net.type=ResNet net.norm=BatchNorm train.optimizer=Adam kernel.regularize=False '
                'train.scheduler=cosine train.weight_decay=0 "summary=[64, 3, 32, 32]" seed=0'),
        },
    },
    'ccnn': {
        'url': 'https://github.com/david-knigge/ccnn.git',
        'commit': None,  # default branch (see the module docstring)
        'paper': 'Towards a General Purpose CNN for Long Range Dependencies in ND (arXiv:2206.03398)',
        'files': {
            'ckconv/__init__.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'ckconv/nn/__init__.py': '3516c241886ba71ae54d0523a2c3bd390da83cdc',
            'ckconv/nn/ck/__init__.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'ckconv/nn/ck/magnet.py': '3516c241886ba71ae54d0523a2c3bd390da83cdc',
            'ckconv/nn/ck/mfn.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'ckconv/nn/ck/mlp.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'ckconv/nn/ck/random_fourier_mfn.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'ckconv/nn/ck/rfnet.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'ckconv/nn/ck/siren.py': '3516c241886ba71ae54d0523a2c3bd390da83cdc',
            'ckconv/nn/functional/__init__.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'ckconv/nn/functional/conv.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'ckconv/nn/functional/causal_conv.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'ckconv/nn/ckconv.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'ckconv/nn/flexconv.py': '7418cdab84c05ba3685abf1fc0827351490e2a1e',
            'ckconv/nn/conv.py': '3516c241886ba71ae54d0523a2c3bd390da83cdc',
            'ckconv/nn/linear.py': '1c6a8589c1ce28b281a32d228ec0bdabcf2c9b3d',
            'ckconv/nn/activation.py': '1c6a8589c1ce28b281a32d228ec0bdabcf2c9b3d',
            'ckconv/nn/norm.py': '3516c241886ba71ae54d0523a2c3bd390da83cdc',
            'ckconv/nn/loss.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'ckconv/utils/__init__.py': '3516c241886ba71ae54d0523a2c3bd390da83cdc',
            'ckconv/utils/flatten_configdict.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'ckconv/utils/grids.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'ckconv/utils/iterables.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'ckconv/utils/hooks.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'ckconv/utils/no_params.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'ckconv/utils/visualisation.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'models/__init__.py': '1adc508a8f4ad193a8ac2e42566eba30dd0761fa',
            'models/resnet.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'models/modules/__init__.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'models/modules/residual_block.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'models/modules/s4_block.py': '65aa8a00b023e2c7e2b602a97b784f6ee786f17d',
            'cfg/config.yaml': '1c6a8589c1ce28b281a32d228ec0bdabcf2c9b3d',
        },
        'missing_in_index': [],
        # the CCNN-4,140 commands of experiments/README.md (Table 1), Hydra overrides of cfg/config.yaml
        'recipes': {
            'ccnn_4_140_cifar10': (
                'train.batch_size=64 train.epochs=350 dataset.augment=True dataset.name=CIFAR10 '
                'dataset.data_type=default device=cuda net.dropout=0.1 net.dropout_in=0 net.type=ResNet '
                'net.norm=BatchNorm net.no_blocks=4 net.no_hidden=140 net.block.type=S4 net.block.prenorm=True '
                'net.nonlinearity=GELU kernel.type=MAGNet kernel.omega_0=4231.568793085858 kernel.no_hidden=32 '
                'kernel.no_layers=3 kernel.size=33 kernel.chang_initialize=True mask.dynamic_cropping=true '
                'mask.init_value=0.75 mask.learn_mean=false mask.temperature=0 mask.threshold=0.1 '
                'mask.type=gaussian conv.type=SeparableFlexConv conv.use_fft=False scheduler.name=cosine '
                'scheduler.warmup_epochs=5 optimizer.name=AdamW optimizer.mask_lr_ratio=0.1 '
                'optimizer.weight_decay=0.0001 optimizer.lr=0.02 seed=0'),
            'ccnn_4_140_smnist': (
                'conv.bias=True conv.causal=True conv.type=SeparableFlexConv conv.use_fft=True '
                'dataset.data_type=sequence dataset.name=MNIST dataset.params.permuted=False kernel.bias=True '
                'kernel.chang_initialize=True kernel.no_hidden=32 kernel.no_layers=3 '
                'kernel.omega_0=2976.4910261630357 kernel.type=MAGNet mask.dynamic_cropping=True '
                'mask.init_value=0.075 mask.threshold=0.1 mask.type=gaussian net.block.type=S4 net.dropout=0.1 '
                'net.dropout_in=0 net.dropout_type=Dropout2d net.no_blocks=4 net.no_hidden=140 '
                'net.nonlinearity=GELU net.norm=BatchNorm net.type=ResNet optimizer.lr=0.01 '
                'optimizer.mask_lr_ratio=1 optimizer.name=AdamW optimizer.weight_decay=1e-06 '
                'scheduler.name=cosine scheduler.warmup_epochs=10 test.batch_size_multiplier=1 '
                'test.before_train=False train.batch_size=100 train.epochs=210 train.max_epochs_no_improvement=200'),
        },
    },
}


def _run(cmd, timeout=600):
    print('+', ' '.join(str(c) for c in cmd), flush=True)
    return subprocess.run(cmd, check=True, timeout=timeout)


def _git_head(path: Path):
    if not (path / '.git').exists():
        return None
    try:
        return subprocess.run(['git', '-C', str(path), 'rev-parse', 'HEAD'], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def check(name: str, dest: Path) -> dict:
    """Which of the files the benchmark needs are present; a git checkout's HEAD."""
    root = dest / name
    spec = REPOS[name]
    missing = [p for p in spec['files'] if not (root / p).is_file()]
    stand_ins = [p for p in spec['missing_in_index'] if not (root / p).is_file()]
    return {'name': name, 'path': str(root), 'exists': root.is_dir(), 'git_head': _git_head(root),
            'pinned_commit': spec['commit'], 'url': spec['url'], 'missing_required': missing,
            'absent_modules_stood_in_for': stand_ins}


def write_manifest(name: str, dest: Path, source: str) -> dict:
    info = check(name, dest)
    info.update(source=source, date=datetime.datetime.now().isoformat(timespec='seconds'),
                index_file_commits=REPOS[name]['files'])
    (dest / f'{name}.json').write_text(json.dumps(info, indent=2))
    return info


def fetch(name: str, dest: Path, commit=None, from_dir=None, force: bool = False) -> dict:
    spec = REPOS[name]
    target = dest / name
    if target.exists():
        if not force:
            raise SystemExit(f'{target} exists; pass --force to replace it (or --check to inspect it).')
        shutil.rmtree(target)
    dest.mkdir(parents=True, exist_ok=True)
    if from_dir:
        src = Path(from_dir).expanduser().resolve()
        if not src.is_dir():
            raise SystemExit(f'--from-dir {src} is not a directory.')
        shutil.copytree(src, target, symlinks=True)
        source = f'copied from {src}'
    else:
        commit = commit or spec['commit']
        _run(['git', 'clone', '--quiet', spec['url'], str(target)])
        if commit:
            _run(['git', '-C', str(target), 'checkout', '--quiet', commit])
        source = f"git clone {spec['url']}" + (f' @ {commit}' if commit else ' (default branch)')
    return write_manifest(name, dest, source)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repo', default='all', choices=['all', *REPOS], help='which repository')
    parser.add_argument('--dest', default=str(DEFAULT_DEST), help='parent folder (default .cache/authors)')
    parser.add_argument('--commit', default=None, help='check out this commit instead of the pin (one repo)')
    parser.add_argument('--from-dir', default=None, help='copy this existing checkout instead of cloning (one repo)')
    parser.add_argument('--force', action='store_true', help='replace an existing copy')
    parser.add_argument('--check', action='store_true', help='only verify the copies and write their manifests')
    args = parser.parse_args(argv)
    names = list(REPOS) if args.repo == 'all' else [args.repo]
    if (args.from_dir or args.commit) and len(names) != 1:
        raise SystemExit('--from-dir and --commit need --repo flexconv or --repo ccnn.')
    dest = Path(args.dest)
    status = 0
    for name in names:
        if args.check:
            info = write_manifest(name, dest, 'existing files (--check)') if (dest / name).is_dir() \
                else check(name, dest)
        else:
            try:
                info = fetch(name, dest, args.commit, args.from_dir, args.force)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
                print(f'{name}: fetching failed ({e}). Where GitHub cannot be reached, copy a checkout with '
                      f'--from-dir, or place the files listed in REPOS[{name!r}]["files"] by hand.', file=sys.stderr)
                status = 1
                continue
        ok = info['exists'] and not info['missing_required']
        status |= 0 if ok else 1
        print(f"{name}: {'ok' if ok else 'INCOMPLETE'} at {info['path']}"
              + (f" (git HEAD {info['git_head']})" if info['git_head'] else '')
              + (f"; missing: {', '.join(info['missing_required'])}" if info['missing_required'] else '')
              + (f"; stood in for by the benchmark: {', '.join(info['absent_modules_stood_in_for'])}"
                 if info['absent_modules_stood_in_for'] else ''))
    return status


if __name__ == '__main__':
    sys.exit(main())
