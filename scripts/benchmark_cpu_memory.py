#!/usr/bin/env python
"""CPU training steps (or inference forwards) with glibc's default allocator against freed memory kept for reuse
(``dcls_timm.cpu_memory.keep_freed_memory``, what train.py and validate.py do on CPU).

The setting is process-wide, so each measurement is a fresh process: ``--rounds`` pairs of processes, default and
kept alternating, each timing ``--steps`` training steps (forward, cross-entropy, backward, Adam; ``--mode infer``:
``inference_mode`` forwards in eval mode) after two warm-up steps and printing their median and the page faults per
step (minor faults: fresh pages the kernel maps and zeroes). The ratio is default / kept per pair (> 1: keeping is
faster). ``--thp`` adds a third process per round: glibc's default allocator with PyTorch's own
``THP_MEM_ALLOC_ENABLE=1`` (read once when torch loads: every CPU tensor of 2 MiB or more is advised to
transparent huge pages, so a fresh tensor faults in 2 MiB at a time; needs Linux with
``/sys/kernel/mm/transparent_hugepage/enabled`` at ``madvise`` or ``always``), for programs that cannot change the
allocator's settings; its ratio is default / THP.

    python scripts/benchmark_cpu_memory.py                                      # CCNN-4,140 sMNIST, batch 100
    python scripts/benchmark_cpu_memory.py --model convnext_tiny_dcls --input-size 3 224 224 --batch-size 8
    python scripts/benchmark_cpu_memory.py --mode infer --model-kwargs --input-size 3 32 32 --batch-size 64
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.utils import ParseKwargs

import dcls_timm  # noqa: F401  (registers the models)
from dcls_timm.cpu_memory import keep_freed_memory

THP_ENV = 'THP_MEM_ALLOC_ENABLE'  # PyTorch's switch (c10's CPU allocator), read once when torch loads
THP_SETTING = Path('/sys/kernel/mm/transparent_hugepage/enabled')


def thp_setting() -> str:
    """The kernel's transparent huge page mode (the bracketed word: always, madvise or never); '' where unknown."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return ''
    start, end = text.find('['), text.find(']')
    return text[start + 1:end] if 0 <= start < end else ''


def child(args) -> None:
    kept = keep_freed_memory() if args.child == 'kept' else False
    torch.manual_seed(0)
    model = timm.create_model(args.model, **args.model_kwargs).train(args.mode == 'train')
    x = torch.randn(args.batch_size, *args.input_size)
    y = torch.randint(0, model.num_classes, (args.batch_size,))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)

    def step():
        if args.mode == 'infer':
            with torch.inference_mode():
                model(x)
            return
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    for _ in range(2):
        step()
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps
    print(json.dumps({'mode': args.child, 'kept': kept, 'thp': os.environ.get(THP_ENV, ''),
                      'ms': statistics.median(times) * 1e3, 'faults': faults}))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='ccnn_4_140')
    parser.add_argument('--model-kwargs', nargs='*', default={'data_dim': 1, 'in_chans': 1}, action=ParseKwargs)
    parser.add_argument('--input-size', type=int, nargs='+', default=[1, 784])
    parser.add_argument('--batch-size', type=int, default=100)
    parser.add_argument('--steps', type=int, default=7)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--mode', choices=['train', 'infer'], default='train')
    parser.add_argument('--thp', action='store_true',
                        help=f'also time glibc\'s default allocator with {THP_ENV}=1 (transparent huge pages)')
    parser.add_argument('--json', default='', help='write the results to this JSON file')
    parser.add_argument('--child', choices=['default', 'kept', 'thp'], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return {}
    base = [sys.executable, __file__, '--model', args.model, '--input-size', *map(str, args.input_size),
            '--batch-size', str(args.batch_size), '--steps', str(args.steps), '--mode', args.mode, '--model-kwargs',
            *[f'{k}={v}' for k, v in args.model_kwargs.items()]]
    modes = ('default', 'kept', 'thp') if args.thp else ('default', 'kept')
    if args.thp and thp_setting() not in ('always', 'madvise'):
        print(f'warning: transparent huge pages are {thp_setting() or "unknown"} here ({THP_SETTING}): '
              f'{THP_ENV}=1 cannot give huge pages', file=sys.stderr)
    # only the 'thp' children get PyTorch's switch, whatever this process's environment holds
    env = {k: v for k, v in os.environ.items() if k != THP_ENV}
    rows = []
    for _ in range(args.rounds):
        runs = {}
        for mode in modes:
            out = subprocess.run(base + ['--child', mode], capture_output=True, text=True, check=True,
                                 env={**env, THP_ENV: '1'} if mode == 'thp' else env)
            runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        if not runs['kept']['kept']:
            raise SystemExit('glibc did not accept the settings here (not glibc?): nothing to compare.')
        if any(bool(runs[mode]['thp']) != (mode == 'thp') for mode in modes):
            raise SystemExit(f'{THP_ENV} did not reach (only) the THP processes: {runs}')
        row = {f'{mode}_{key}': runs[mode][key] for mode in modes for key in ('ms', 'faults')}
        row['ratio'] = row['default_ms'] / row['kept_ms']
        text = (f"default {row['default_ms']:.0f} ms ({row['default_faults']:.0f} page faults a step), "
                f"kept {row['kept_ms']:.0f} ms ({row['kept_faults']:.0f}), ratio {row['ratio']:.2f}")
        if args.thp:
            row['thp_ratio'] = row['default_ms'] / row['thp_ms']
            text += f"; THP {row['thp_ms']:.0f} ms ({row['thp_faults']:.0f}), ratio {row['thp_ratio']:.2f}"
        rows.append(row)
        print(text, flush=True)
    result = {'model': args.model, 'model_kwargs': args.model_kwargs, 'batch_size': args.batch_size,
              'input_size': args.input_size, 'mode': args.mode, 'command': 'python ' + ' '.join(sys.argv),
              'date': time.strftime('%Y-%m-%dT%H:%M:%S'), 'rounds': rows,
              'median_ratio': statistics.median(r['ratio'] for r in rows)}
    summary = f"{args.model} {args.mode}: median ratio default / kept {result['median_ratio']:.2f}"
    if args.thp:
        result['thp_setting'] = thp_setting()
        result['median_thp_ratio'] = statistics.median(r['thp_ratio'] for r in rows)
        summary += f", default / THP {result['median_thp_ratio']:.2f}"
    print(f"{summary} over {args.rounds} rounds")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    main()
