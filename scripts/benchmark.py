#!/usr/bin/env python
"""Speed and memory of the DCLS models against their timm baselines, as ratios measured in one process.

For every pair ``model:baseline`` it times training steps (forward, backward, AdamW step, position clamping) and
inference (``inference_mode`` forward), alternating the two models repeat by repeat so that machine drift hits both
alike, eagerly and optionally under ``torch.compile``; it measures peak training memory (each model in a fresh
process), and the kernel construction against the ``dcls`` package. The ``dcls`` package's own route is a row too:
timm's ConvNeXt with ``DCLS.construct.modules.Dcls2d`` dropped in.

Positions: ``init`` measures models as created (positions drawn near the kernel centre, so the kernels are cropped
to a few taps); ``spread`` draws every position uniformly over its grid, as after training, so every tap is used.

    python scripts/benchmark.py                                    # the default table, on CUDA if present
    python scripts/benchmark.py --pairs convnext_tiny_dcls:convnext_tiny --modes train --repeats 11
    python scripts/benchmark.py --compile-pairs convnext_tiny_dcls:convnext_tiny --json b.json --markdown b.md
"""
import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dcls_timm  # noqa: E402  (registers the models)
from dcls_timm.cpu_memory import freed_memory_kept, keep_freed_memory  # noqa: E402
from dcls_timm.layers import clamp_positions_, position_owners  # noqa: E402
from dcls_timm.models.convnext_dcls import set_fused_mlp  # noqa: E402

DCLS_ROUTE = 'dcls-package:'  # prefix: a timm ConvNeXt with the dcls package's Dcls2d in every block
DEFAULT_PAIRS = (
    'convnext_tiny_dcls:convnext_tiny', 'convnext_small_dcls:convnext_small', 'convnext_base_dcls:convnext_base',
    'convnext_atto_dcls:convnext_atto', 'convnext_tiny_dcls_gauss:convnext_tiny', 'resnet50_dcls:resnet50',
    'dcls-package:convnext_tiny:convnext_tiny', 'fastvit_sa24_dcls:fastvit_sa24', 'fastvit_sa36_dcls:fastvit_sa36',
    'convformer_s18_dcls:convformer_s18', 'caformer_s18_dcls:caformer_s18',
)
# the goals of the performance issue: (pair, mode or measure, device type) -> (bound, 'min' or 'max')
TARGETS = {
    ('convnext_tiny_dcls:convnext_tiny', 'train', 'cpu'): (0.90, 'min'),
    ('convnext_tiny_dcls:convnext_tiny', 'infer', 'cpu'): (0.97, 'min'),
    ('convnext_tiny_dcls:convnext_tiny', 'memory', 'cpu'): (1.10, 'max'),
    ('convnext_tiny_dcls:convnext_tiny', 'train', 'cuda'): (0.95, 'min'),
    ('convnext_tiny_dcls:convnext_tiny', 'memory', 'cuda'): (1.10, 'max'),
    ('kernel construction', 'time', 'cpu'): (0.05, 'max'),
    ('kernel construction', 'memory', 'cpu'): (0.05, 'max'),
}


def split_pair(pair: str) -> Sequence[str]:
    """``'model:baseline'`` (the model may carry the ``dcls-package:`` prefix) -> ``(model, baseline)``."""
    model, sep, baseline = pair.rpartition(':')
    if not sep or not model or not baseline:
        raise SystemExit(f"--pairs entries are 'model:baseline', got '{pair}'.")
    return model, baseline


def _dcls_package_convnext(name: str, **kwargs) -> nn.Module:
    """timm's ConvNeXt with every depthwise conv replaced by the dcls package's Dcls2d (K by the iso-parameter rule,
    17x17 grid, the same K as ours; positions per layer, as the package's layers own them)."""
    from DCLS.construct.modules import Dcls2d as PackageDcls2d
    logging.getLogger().setLevel(logging.ERROR)  # the package logs its conv choice at WARNING for every layer
    from dcls_timm.models.convnext_dcls import iso_param_kernel_count
    model = timm.create_model(name, **kwargs)
    depths = [len(s.blocks) for s in model.stages]
    dims = [s.blocks[0].conv_dw.in_channels for s in model.stages]
    count = iso_param_kernel_count(depths, dims, 7, 'v0')  # the K of convnext_*_dcls (34 for T)
    for stage in model.stages:
        for block in stage.blocks:
            c = block.conv_dw.in_channels
            block.conv_dw = PackageDcls2d(c, c, kernel_count=count, dilated_kernel_size=17, padding=8, groups=c,
                                          version='v0')
    return model


def create(name: str, positions: str, device: torch.device, fused_mlp: bool = True) -> nn.Module:
    """Build ``name`` (timm name, or ``dcls-package:<convnext>``) on ``device`` with ``positions`` init/spread;
    ``fused_mlp=False`` gives ConvNeXt blocks timm's MLP forward (like-for-like with timm's ConvNeXt)."""
    model = _dcls_package_convnext(name[len(DCLS_ROUTE):]) if name.startswith(DCLS_ROUTE) else timm.create_model(name)
    set_fused_mlp(model, fused_mlp)
    if positions == 'spread':
        with torch.no_grad():
            for m in model.modules():
                P, size = getattr(m, 'P', None), getattr(m, 'dilated_kernel_size', None)
                if isinstance(P, nn.Parameter) and size is not None:  # ours and the dcls package's layers
                    size = (size,) * P.shape[0] if isinstance(size, int) else size
                    for axis, d in enumerate(size):
                        P[axis].uniform_(-(d // 2), d - 1 - d // 2)
    return model.to(device)


def _clamp(model: nn.Module) -> Callable[[], None]:
    if position_owners(model):
        return lambda: clamp_positions_(model)
    layers = [m for m in model.modules() if hasattr(m, 'clamp_parameters')]  # the dcls package's layers
    return lambda: [m.clamp_parameters() for m in layers]


def inference_step(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    """One ``inference_mode`` forward of ``fn`` on ``x`` (the model already in eval mode)."""
    def step():
        with torch.inference_mode():
            fn(x)
    return step


def make_step(model: nn.Module, mode: str, batch_size: int, img_size: int, device: torch.device,
              compiled: bool) -> Callable[[], None]:
    """One training step (forward, backward, AdamW, clamping) or one inference forward, on fixed random data."""
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    y = torch.randint(0, model.num_classes, (batch_size,), device=device)
    fn = torch.compile(model) if compiled else model
    if mode == 'infer':
        model.eval()
        return inference_step(fn, x)
    model.train()
    # as train.py: PyTorch's fused AdamW kernel on CPU (its default there is the per-tensor loop)
    fused = {'fused': True} if device.type == 'cpu' else {}
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-4, weight_decay=0.05, **fused)
    clamp = _clamp(model)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(fn(x), y).backward()
        optimizer.step()
        clamp()
    return step


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_interleaved(steps: Dict[str, Callable[[], None]], repeats: int, warmup: int,
                     device: torch.device) -> Tuple[Dict[str, List[float]], Dict[str, float]]:
    """Seconds per call of every step, alternating the steps within each repeat."""
    warm = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        for _ in range(max(warmup, 1)):  # at least one: compilation, allocator, lazy state
            step()
        _sync(device)
        warm[name] = time.perf_counter() - t0
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times, warm


def _stats(times: Sequence[float]) -> dict:
    return {'median_s': statistics.median(times), 'min_s': min(times), 'max_s': max(times), 'n': len(times)}


def _rss_bytes(field: str) -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ':'))


def memory_probe(args) -> None:
    """Child process: peak memory of two training steps of one model (CPU: growth of the resident set's high-water
    mark from just before the model is built, which includes weights, gradients, optimizer state and activations;
    CUDA: peak allocated). Prints one JSON line."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == 'cpu':
        try:  # Linux: reset the high-water mark, which importing torch has set far above what follows
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            before = _rss_bytes('VmRSS')
        except OSError as e:
            raise SystemExit(f'peak CPU memory needs Linux /proc/self/clear_refs ({e}); use --no-memory.')
    model = create(args.memory_probe, args.positions[0], device)
    step = make_step(model, 'train', args.batch_size, args.img_size, device, compiled=False)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        step()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else _rss_bytes('VmHWM') - before
    print(json.dumps({'model': args.memory_probe, 'peak_bytes': peak}))


def measure_memory(name: str, args, positions: str) -> int:
    cmd = [sys.executable, __file__, '--memory-probe', name, '--device', args.device, '--positions', positions,
           '--batch-size', str(args.batch_size), '--img-size', str(args.img_size)]
    if args.threads:
        cmd += ['--threads', str(args.threads)]
    if args.keep_cpu_memory:
        cmd += ['--keep-cpu-memory']
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f'memory probe for {name} failed:\n{proc.stderr[-2000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])['peak_bytes']


def kernel_construction(model_name: str, repeats: int) -> dict:
    """Kernel construction forward + backward of every DCLS layer: ours vs the dcls package (CPU)."""
    from benchmark_kernels import _layer_params, _make_dcls_runner, _measure, _run_ours, _saved_bytes
    params = _layer_params(timm.create_model(model_name))
    rows = {'ours': lambda: _run_ours(params), 'dcls': _make_dcls_runner(params)}
    out = {'model': model_name, 'layers': len(params)}
    for name, fn in rows.items():
        out[name] = dict(_stats(_measure(fn, repeats)), saved_bytes=_saved_bytes(fn))
    out['time_ratio'] = out['ours']['median_s'] / out['dcls']['median_s']
    out['memory_ratio'] = out['ours']['saved_bytes'] / out['dcls']['saved_bytes']
    return out


def multiply_accumulates(pairs: Sequence[str], img_size: int) -> List[dict]:
    """GMACs of both models of each pair, as the papers count them (a DCLS conv as the dense conv with its whole
    kernel: what a trained model computes); ``bound`` = baseline / model, the throughput ratio a compute-bound
    step would reach."""
    from dcls_timm.info import model_info
    out = []
    for pair in pairs:
        model_name, base_name = split_pair(pair)
        if model_name.startswith(DCLS_ROUTE):  # the package's route computes the same convs as ours
            model_name = model_name[len(DCLS_ROUTE):] + '_dcls'
        gmacs = [model_info(timm.create_model(n), (3, img_size, img_size))['gflops'] for n in (model_name, base_name)]
        out.append({'pair': pair, 'model_gmacs': gmacs[0], 'baseline_gmacs': gmacs[1], 'ratio': gmacs[0] / gmacs[1],
                    'bound': gmacs[1] / gmacs[0]})
    return out


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    info = {'cpu': cpu, 'cpu_count': os.cpu_count(), 'torch_threads': torch.get_num_threads(),
            'python': platform.python_version(), 'torch': torch.__version__, 'timm': timm.__version__,
            'dcls_timm': dcls_timm.__version__, 'platform': platform.platform(), 'device': str(device),
            'date': datetime.datetime.now().isoformat(timespec='seconds')}
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    # the CPU allocator changes both models' step times (page faults on every large tensor with glibc's)
    info['allocator'] = ' '.join([f'{k}={os.environ[k]}' for k in ('LD_PRELOAD', 'MALLOC_CONF', 'GLIBC_TUNABLES')
                                  if os.environ.get(k)]
                                 + (['glibc keeps freed memory (--keep-cpu-memory)'] if freed_memory_kept() else []))
    return info


def _target(pair: str, measure: str, device: torch.device):
    return TARGETS.get((pair, measure, device.type))


def _verdict(value: float, target) -> str:
    if target is None:
        return ''
    bound, kind = target
    ok = value >= bound if kind == 'min' else value <= bound
    return f"{'≥' if kind == 'min' else '≤'} {bound:g}: {'yes' if ok else 'no'}"


def ms_range(stats: dict) -> str:
    """``median (min–max)`` in whole milliseconds, from :func:`_stats`."""
    return f"{1e3 * stats['median_s']:.0f} ({1e3 * stats['min_s']:.0f}–{1e3 * stats['max_s']:.0f})"


def to_markdown(results: dict) -> str:
    m = results['machine']
    lines = [f"Measured {m['date']} on {m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads)"
             + (f", {m['gpu']}" if 'gpu' in m else '') + f"; torch {m['torch']}, timm {m['timm']}, "
             f"dcls_timm {m['dcls_timm']}; allocator: {m['allocator'] or 'default'}; "
             f"batch {results['batch_size']}, {results['img_size']} px, "
             f"median of {results['repeats']} interleaved repeats (min–max in brackets).", '',
             f"Command: `{results['command']}`", '',
             '| model | baseline | mode | run | positions | model ms | baseline ms | throughput ratio | target |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in results['speed']:
        a, b = r['model_stats'], r['baseline_stats']
        lines.append(
            f"| {r['model']} | {r['baseline']} | {r['mode']} | {r['run']} | {r['positions']} | "
            f"{ms_range(a)} | {ms_range(b)} | **{r['ratio']:.3f}** | {r['verdict']} |")
    if results['memory']:
        lines += ['', '| model | baseline | positions | model peak train MiB | baseline MiB | memory ratio | target |',
                  '|---|---|---|---|---|---|---|']
        for r in results['memory']:
            lines.append(f"| {r['model']} | {r['baseline']} | {r['positions']} | {r['model_bytes'] / 2 ** 20:.0f} | "
                         f"{r['baseline_bytes'] / 2 ** 20:.0f} | **{r['ratio']:.3f}** | {r['verdict']} |")
    if results.get('macs'):
        lines += ['', 'Multiply-accumulates per image (fvcore, a DCLS conv counted as the dense conv with its whole kernel: '
                      'what a trained model computes); compute bound = baseline / model GMACs, the throughput ratio '
                      'a compute-bound step would reach:', '',
                  '| pair | model GMACs | baseline GMACs | ratio | compute bound |', '|---|---|---|---|---|']
        for r in results['macs']:
            lines.append(f"| {r['pair']} | {r['model_gmacs']:.3f} | {r['baseline_gmacs']:.3f} | {r['ratio']:.3f} | "
                         f"{r['bound']:.3f} |")
    k = results.get('kernel_construction')
    if k:
        lines += ['', f"Kernel construction, forward + backward, all {k['layers']} DCLS layers of {k['model']} "
                      '(memory: what autograd keeps for backward):', '',
                  '| route | median ms | min–max ms | saved MiB |', '|---|---|---|---|']
        for name, label in (('ours', 'dcls_timm'),
                            ('dcls', 'dcls 0.1.1 ConstructKernel2d')):
            r = k[name]
            lines.append(f"| {label} | {1e3 * r['median_s']:.1f} | {1e3 * r['min_s']:.1f}–{1e3 * r['max_s']:.1f} | "
                         f"{r['saved_bytes'] / 2 ** 20:.2f} |")
        lines.append(f"| **ratio** | **{k['time_ratio']:.3f}** ({k['time_verdict']}) | | "
                     f"**{k['memory_ratio']:.4f}** ({k['memory_verdict']}) |")
    return '\n'.join(lines) + '\n'


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--pairs', default=','.join(DEFAULT_PAIRS), help='comma-separated model:baseline pairs')
    parser.add_argument('--modes', default='train,infer', help='train, infer or both')
    parser.add_argument('--positions', default='init,spread', help='init, spread or both')
    parser.add_argument('--compile-pairs', default='', help='pairs also timed under torch.compile')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: leave the default)')
    parser.add_argument('--keep-cpu-memory', action='store_true',
                        help="glibc keeps freed memory for reuse, as train.py does on CPU (dcls_timm.cpu_memory)")
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    parser.add_argument('--no-fused-mlp', action='store_true',
                        help="ConvNeXt blocks with timm's MLP forward at inference (no fused oneDNN matmuls)")
    parser.add_argument('--no-macs', action='store_true', help='skip the multiply-accumulate counts')
    parser.add_argument('--kernel-model', default='convnext_tiny_dcls',
                        help="kernel construction vs the dcls package for this model ('' to skip)")
    parser.add_argument('--json', default='', help='write the results here')
    parser.add_argument('--markdown', default='', help='write the markdown tables here')
    parser.add_argument('--memory-probe', default='', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.positions = [p for p in args.positions.split(',') if p]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_cpu_memory:
        keep_freed_memory()
    if args.memory_probe:
        return memory_probe(args)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda, but CUDA is not available here.')
    modes = [m for m in args.modes.split(',') if m]
    bad = [m for m in modes if m not in ('train', 'infer')] + [p for p in args.positions if p not in ('init', 'spread')]
    if bad:
        raise SystemExit(f'unknown mode or positions: {bad}')
    pairs = [p for p in args.pairs.split(',') if p]
    compile_pairs = [p for p in args.compile_pairs.split(',') if p]
    for pair in pairs + compile_pairs:
        for name in split_pair(pair):
            if not name.startswith(DCLS_ROUTE) and not timm.is_model(name):
                raise SystemExit(f"unknown model '{name}' in '{pair}'.")
    results = {'machine': machine(device), 'batch_size': args.batch_size, 'img_size': args.img_size,
               'repeats': args.repeats, 'command': 'python scripts/benchmark.py ' + shlex.join(
                   sys.argv[1:] if argv is None else argv), 'speed': [], 'memory': []}
    runs = [(pair, 'eager') for pair in pairs] + [(pair, 'compile') for pair in compile_pairs]
    for positions in args.positions:
        for pair, run in runs:
            model_name, base_name = split_pair(pair)
            if positions == 'spread' and model_name == base_name:
                continue
            for mode in modes:
                torch.manual_seed(0)
                models = {model_name: create(model_name, positions, device, not args.no_fused_mlp),
                          base_name: create(base_name, 'init', device, not args.no_fused_mlp)}
                steps = {n: make_step(m, mode, args.batch_size, args.img_size, device, run == 'compile')
                         for n, m in models.items()}
                times, warm = time_interleaved(steps, args.repeats, args.warmup, device)
                a, b = _stats(times[model_name]), _stats(times[base_name])
                ratio = b['median_s'] / a['median_s']
                row = {'model': model_name, 'baseline': base_name, 'mode': mode, 'run': run, 'positions': positions,
                       'model_stats': a, 'baseline_stats': b, 'ratio': ratio,
                       'warmup_s': warm, 'verdict': _verdict(ratio, _target(pair, mode, device))}
                results['speed'].append(row)
                print(f"{model_name} vs {base_name} {mode} {run} {positions}: {1e3 * a['median_s']:.0f} ms vs "
                      f"{1e3 * b['median_s']:.0f} ms, ratio {ratio:.3f} {row['verdict']}", flush=True)
                del models, steps
        if not args.no_memory:
            for pair in pairs:
                model_name, base_name = split_pair(pair)
                if positions == 'spread' and model_name == base_name:
                    continue
                mb, bb = measure_memory(model_name, args, positions), measure_memory(base_name, args, 'init')
                ratio = mb / bb
                results['memory'].append({'model': model_name, 'baseline': base_name, 'positions': positions,
                                          'model_bytes': mb, 'baseline_bytes': bb, 'ratio': ratio,
                                          'verdict': _verdict(ratio, _target(pair, 'memory', device))})
                print(f'{model_name} vs {base_name} peak train memory {positions}: {mb / 2 ** 20:.0f} MiB vs '
                      f'{bb / 2 ** 20:.0f} MiB, ratio {ratio:.3f}', flush=True)
    if not args.no_macs:
        results['macs'] = multiply_accumulates(pairs, args.img_size)
    if args.kernel_model:
        k = kernel_construction(args.kernel_model, args.repeats)
        k['time_verdict'] = _verdict(k['time_ratio'], _target('kernel construction', 'time', torch.device('cpu')))
        k['memory_verdict'] = _verdict(k['memory_ratio'], _target('kernel construction', 'memory',
                                                                  torch.device('cpu')))
        results['kernel_construction'] = k
        print(f"kernel construction {args.kernel_model}: time ratio {k['time_ratio']:.3f}, "
              f"memory ratio {k['memory_ratio']:.4f}", flush=True)
    return write_results(results, to_markdown(results), args.json, args.markdown)


def write_results(results: dict, markdown: str, json_path: str = '', markdown_path: str = '') -> dict:
    """Print the markdown, write the JSON and markdown files where asked; returns ``results``."""
    print(markdown)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    if markdown_path:
        Path(markdown_path).write_text(markdown)
    return results


if __name__ == '__main__':
    main()
