#!/usr/bin/env python
"""Time and memory of building all depthwise DCLS kernels of a ConvNeXt-dcls model, forward + backward; and with
--conv, the large-kernel depthwise convolution itself on ConvNeXt-T's stage shapes.

Compares the separable construction of dcls_timm with the dcls package's ConstructKernel2d on the same
parameters (one training step's worth of kernel construction, no convolution), and the CPU fast depthwise path
(channels-last forward and input gradient, weight gradient through FFTs or, on small maps, DFT matrix products,
kernels cropped to the map) with F.conv2d.

    python scripts/benchmark_kernels.py --model convnext_tiny_dcls --repeats 5
    python scripts/benchmark_kernels.py --conv --repeats 5
    python scripts/benchmark_kernels.py --conv --kernel 23 --repeats 5   # the gauss models' 23x23 grid
    python scripts/benchmark_kernels.py --widths --repeats 7      # oneDNN depthwise speed by kernel width
    python scripts/benchmark_kernels.py --pointwise --repeats 7   # 1x1 convs over sequences (CCNN 1-D)
    python scripts/benchmark_kernels.py --ceilings --repeats 7    # the ops both sides of benchmark_authors share
    python scripts/benchmark_kernels.py --ceilings --repeats 7 --keep-cpu-memory   # ... without page faults
"""
import argparse
import json
import logging
import platform
import statistics
import sys
import time

import timm
import torch

import dcls_timm  # noqa: F401  (registers the models)
from dcls_timm.cpu_memory import keep_freed_memory
from dcls_timm.layers import construct_kernel, dcls_layers


def _layer_params(model):
    out = []
    for layer in dcls_layers(model):
        owner = layer.positions_owner()
        out.append((layer.weight, owner.P, owner.SIG, layer.dilated_kernel_size, layer.version, layer))
    return out


def _run_ours(params):
    total = 0.
    for w, P, SIG, size, version, _ in params:
        total = total + construct_kernel(w, P, SIG, size, version).square().sum()
    total.backward()


def _make_dcls_runner(params):
    from DCLS.construct.modules import ConstructKernel2d
    logging.getLogger().setLevel(logging.ERROR)
    builders = []
    for w, P, SIG, size, version, layer in params:
        ck = ConstructKernel2d(layer.out_channels, layer.in_channels, layer.groups, layer.kernel_count, size, version)
        order = [0, 1] if version == 'v0' else [1, 0]  # their 2-D v1/gauss index axes in reverse (SPEC 1.3)
        builders.append((ck, w, P, SIG, order))

    def run():
        total = 0.
        for ck, w, P, SIG, order in builders:
            total = total + ck(w, P[order], None if SIG is None else SIG[order]).square().sum()
        total.backward()
    return run


def _measure(fn, repeats):
    fn()  # warm-up (index tensors, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _saved_bytes(fn):
    """Bytes the autograd graph keeps for backward (distinct storages): the memory that grows with construction."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _conv_table(repeats: int, batch: int = 8, kernel: int = 17) -> dict:
    """Forward + backward of one depthwise conv per ConvNeXt-T stage shape, summed over the 18 blocks; ConvNeXt-T's
    own 7x7 conv (contiguous tensors, as timm runs it) for reference."""
    import torch.nn.functional as F
    from dcls_timm.layers import fast_conv
    from dcls_timm.layers.fast_conv import depthwise_conv2d
    rows, totals = [], {'F.conv2d': 0., 'fast path': 0., 'fast path, FFT weight gradient': 0., 'F.conv2d 7x7': 0.}
    dft_max_pixels = fast_conv.DFT_MAX_PIXELS
    for channels, size, blocks in [(96, 56, 3), (192, 28, 3), (384, 14, 9), (768, 7, 3)]:
        x = torch.randn(batch, channels, size, size, requires_grad=True)
        w = torch.randn(channels, 1, kernel, kernel, requires_grad=True)
        w7 = torch.randn(channels, 1, 7, 7, requires_grad=True)
        g = torch.randn(batch, channels, size, size)

        def native():
            F.conv2d(x, w, None, 1, kernel // 2, 1, channels).backward(g)

        def fast():
            r = min(kernel // 2, size - 1)  # taps beyond size - 1 from the centre only ever see padding
            k = w[..., kernel // 2 - r:kernel // 2 + r + 1, kernel // 2 - r:kernel // 2 + r + 1]
            depthwise_conv2d(x, k, None, (r, r)).backward(g)

        def fft_only():  # the weight gradient through FFTs on every map (no DFT matrix products on small ones)
            fast_conv.DFT_MAX_PIXELS = 0
            try:
                fast()
            finally:
                fast_conv.DFT_MAX_PIXELS = dft_max_pixels

        def seven():
            F.conv2d(x, w7, None, 1, 3, 1, channels).backward(g)
        row = {'channels': channels, 'size': size}
        for name, fn in [('F.conv2d', native), ('fast path', fast), ('fast path, FFT weight gradient', fft_only),
                         ('F.conv2d 7x7', seven)]:
            row[name] = statistics.median(_measure(fn, repeats))
            totals[name] += blocks * row[name]
        rows.append(row)
    return {'rows': rows, 'total_18_blocks': totals, 'batch': batch, 'kernel': kernel}


def _width_table(repeats: int, batch: int = 8, channels: int = 96, size: int = 56) -> dict:
    """Inference forward of channels-last depthwise convs at one ConvNeXt-T stage shape, by kernel shape: plain
    ``F.conv2d`` (oneDNN) and the fast path's (which widens kernels 11-13 taps wide to 14-15)."""
    import torch.nn.functional as F
    from dcls_timm.layers.fast_conv import depthwise_conv2d
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    rows = []
    with torch.inference_mode():
        for kh, kw in [(9, 9), (11, 11), (13, 13), (15, 15), (17, 17), (17, 13), (13, 17)]:
            w = torch.randn(channels, 1, kh, kw)
            pad = (kh // 2, kw // 2)
            row = {'kernel': f'{kh}x{kw}'}
            for name, fn in [('F.conv2d', lambda: F.conv2d(x, w, None, 1, pad, 1, channels)),
                             ('fast path', lambda: depthwise_conv2d(x, w, None, pad))]:
                row[name] = statistics.median(_measure(fn, repeats))
            rows.append(row)
    return {'rows': rows, 'batch': batch, 'channels': channels, 'size': size}


def _pointwise_table(repeats: int, batch: int = 100, channels: int = 140, length: int = 784) -> dict:
    """A 1x1 convolution over sequences at CCNN's sMNIST shape, inference and forward + backward: ``F.conv1d``
    (oneDNN) and :class:`PointwiseConv1d` (batched matmuls)."""
    import torch.nn.functional as F
    from dcls_timm.layers import PointwiseConv1d
    layer = PointwiseConv1d(channels, channels)
    x = torch.randn(batch, channels, length, requires_grad=True)
    grad = torch.randn(batch, channels, length)
    rows = []
    for name, fn in [('F.conv1d', lambda t: F.conv1d(t, layer.weight, layer.bias)), ('PointwiseConv1d', layer)]:
        with torch.inference_mode():
            infer = statistics.median(_measure(lambda: fn(x), repeats))
        train = statistics.median(_measure(
            lambda: torch.autograd.grad(fn(x), (x, layer.weight, layer.bias), grad), repeats))
        rows.append({'route': name, 'inference': infer, 'forward + backward': train})
    return {'rows': rows, 'batch': batch, 'channels': channels, 'length': length}


def _ceilings_table(repeats: int, scale: float = 1.0) -> dict:
    """What this CPU gives the operations both sides of ``benchmark_authors.py`` share (GMAC/s, or ms for FFTs):
    a large matmul for reference, FlexNet's 5x5 convolutions (channels-last, forward, input and weight gradient),
    CCNN's 1x1 convolutions at width 140 in every formulation at hand, and the FFTs of CCNN's 1-D causal
    convolutions. ``scale`` shrinks the batches (tests)."""
    import torch.nn.functional as F
    from dcls_timm.layers.pointwise import pointwise_matmul
    mkldnn = torch.ops.mkldnn
    back = torch.ops.aten.convolution_backward

    rows = []

    def add(group, op, shape, macs, fn):
        t = statistics.median(_measure(fn, repeats))
        rows.append({'group': group, 'op': op, 'shape': shape, 'ms': 1e3 * t,
                     'gmac_s': macs / t / 1e9 if macs else None})
    n = max(64, int(2048 * scale) // 64 * 64)
    a, b = torch.randn(n, n), torch.randn(n, n)
    add('reference', 'matmul (MKL sgemm)', f'{n}x{n}x{n}', n ** 3, lambda: a @ b)
    batch = max(1, int(64 * scale))
    for c in (24, 36, 48):  # FlexNet-7's widths, 32x32 maps, 5x5 kernels at init
        x = torch.randn(batch, c, 32, 32).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c, c, 5, 5)
        g = F.conv2d(x, w, padding=2)
        macs, shape = batch * c * c * 25 * 1024, f'[{batch}, {c}, 32, 32], 5x5'
        add('FlexNet 5x5 conv', 'forward', shape, macs, lambda: F.conv2d(x, w, padding=2))
        for name, mask in (('input gradient', [True, False, False]), ('weight gradient', [False, True, False])):
            add('FlexNet 5x5 conv', name, shape, macs,
                lambda: back(g, x, w, None, [1, 1], [2, 2], [1, 1], False, [0, 0], 1, mask))
    c = 140
    x2 = torch.randn(batch, c, 32, 32).contiguous(memory_format=torch.channels_last)
    x2_nchw = x2.contiguous()
    w2, b2 = torch.randn(c, c, 1, 1) * 0.05, torch.randn(c)
    add('CCNN 1x1 conv, 2-D', 'oneDNN conv + GELU (ours)', f'[{batch}, {c}, 32, 32]', batch * 1024 * c * c,
        lambda: mkldnn._convolution_pointwise(x2, w2, b2, [0, 0], [1, 1], [1, 1], 1, 'gelu', [], 'none'))
    add('CCNN 1x1 conv, 2-D', 'F.conv2d NCHW (theirs)', f'[{batch}, {c}, 32, 32]', batch * 1024 * c * c,
        lambda: F.conv2d(x2_nchw, w2, b2))
    seq, length = max(1, int(100 * scale)), 784
    x1 = torch.randn(seq, c, length)
    x1t = x1.transpose(1, 2).contiguous()
    w1 = w2.view(c, c)
    macs, shape = seq * length * c * c, f'[{seq}, {c}, {length}]'
    add('CCNN 1x1 conv, 1-D', 'batched matmul (ours)', shape, macs, lambda: pointwise_matmul(x1, w1, b2))
    add('CCNN 1x1 conv, 1-D', 'oneDNN linear, [B*L, C] layout', shape, macs,
        lambda: mkldnn._linear_pointwise(x1t, w1, b2, 'none', [], ''))
    add('CCNN 1x1 conv, 1-D', 'F.conv1d (theirs)', shape, macs, lambda: F.conv1d(x1, w2.view(c, c, 1), b2))
    for size in (864, 1600):  # 784 steps with 65 taps (init) and with 784 taps (spread), 2-3-5-smooth lengths
        signal = torch.randn(seq * c, size)
        spectrum = torch.fft.rfft(signal)
        add('CCNN 1-D causal conv FFTs', 'rfft', f'[{seq * c}, {size}]', 0, lambda: torch.fft.rfft(signal))
        add('CCNN 1-D causal conv FFTs', 'irfft', f'[{seq * c}, {size}]', 0,
            lambda: torch.fft.irfft(spectrum, n=size))
    return {'rows': rows}


def _print_table(title: str, columns, rows, cells) -> None:
    """A markdown table: ``cells(row)`` gives each row's column strings."""
    print(title)
    print('| ' + ' | '.join(columns) + ' |\n' + '|---' * len(columns) + '|')
    for r in rows:
        print('| ' + ' | '.join(cells(r)) + ' |')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='convnext_tiny_dcls')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: leave the default)')
    parser.add_argument('--no-dcls', action='store_true', help='skip the dcls-package comparison')
    parser.add_argument('--json', default='', help='write the results to this JSON file')
    parser.add_argument('--conv', action='store_true', help='benchmark the depthwise conv instead (ConvNeXt-T shapes)')
    parser.add_argument('--kernel', type=int, default=17, help='kernel size of --conv (23: the gauss models)')
    parser.add_argument('--widths', action='store_true',
                        help='depthwise conv inference by kernel shape (oneDNN is slow at widths 11-13)')
    parser.add_argument('--pointwise', action='store_true',
                        help='1x1 conv over sequences (CCNN sMNIST shape): F.conv1d vs PointwiseConv1d')
    parser.add_argument('--ceilings', action='store_true',
                        help="this CPU's throughput on the operations both sides of benchmark_authors.py share")
    parser.add_argument('--keep-cpu-memory', action='store_true',
                        help="glibc keeps freed memory for reuse, as train.py does on CPU (dcls_timm.cpu_memory)")
    parser.add_argument('--scale', type=float, default=1.0, help=argparse.SUPPRESS)  # smaller batches (tests)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_cpu_memory:
        keep_freed_memory()
    threads = f'{torch.get_num_threads()} threads, median of {args.repeats}'
    if args.ceilings:
        from benchmark import machine
        table = dict(_ceilings_table(args.repeats, args.scale), machine=machine(torch.device('cpu')),
                     command='python ' + ' '.join(sys.argv))
        allocator = table['machine']['allocator'] or 'default allocator'
        _print_table(f"shared operations, {table['machine']['cpu']}, {threads}, {allocator}",
                     ['group', 'op', 'shape', 'ms', 'GMAC/s'], table['rows'],
                     lambda r: [r['group'], r['op'], r['shape'], f"{r['ms']:.1f}",
                                '' if r['gmac_s'] is None else f"{r['gmac_s']:.0f}"])
    elif args.pointwise:
        table = _pointwise_table(args.repeats)
        _print_table(f"1x1 conv over sequences [{table['batch']}, {table['channels']}, {table['length']}], {threads}",
                     ['route', 'inference ms', 'forward + backward ms'], table['rows'],
                     lambda r: [r['route'], f"{1e3 * r['inference']:.1f}", f"{1e3 * r['forward + backward']:.1f}"])
    elif args.widths:
        table = _width_table(args.repeats)
        _print_table(f"depthwise conv inference, channels-last [{table['batch']}, {table['channels']}, "
                     f"{table['size']}, {table['size']}], {threads}", ['kernel', 'F.conv2d ms', 'fast path ms'],
                     table['rows'],
                     lambda r: [r['kernel'], f"{1e3 * r['F.conv2d']:.1f}", f"{1e3 * r['fast path']:.1f}"])
    elif args.conv:
        table = _conv_table(args.repeats, kernel=args.kernel)
        total = dict(table['total_18_blocks'], label='sum over the 18 blocks')
        rows = [dict(r, label=f"{r['channels']}, {r['size']}") for r in table['rows']] + [total]
        columns = ('F.conv2d', 'fast path', 'fast path, FFT weight gradient', 'F.conv2d 7x7')
        title = f"{args.kernel}x{args.kernel} depthwise conv, forward + backward, batch {table['batch']}, {threads}"
        _print_table(title,
                     ['stage shape (C, H=W)', 'F.conv2d ms', 'fast path ms', 'fast path, FFT weight gradient ms',
                      'ConvNeXt-T 7x7 F.conv2d ms'], rows,
                     lambda r: [r['label']] + [f'{1e3 * r[k]:.0f}' for k in columns])
    if args.widths or args.conv or args.pointwise or args.ceilings:
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(table, f, indent=2)
        return
    model = timm.create_model(args.model)
    params = _layer_params(model)
    rows = {'dcls_timm': lambda: _run_ours(params)}
    if not args.no_dcls:
        rows['dcls 0.1.1 ConstructKernel2d'] = _make_dcls_runner(params)
    results = {'model': args.model, 'layers': len(params), 'torch': torch.__version__,
               'threads': torch.get_num_threads(), 'machine': platform.processor() or platform.machine(),
               'rows': {}}
    for name, fn in rows.items():
        times = _measure(fn, args.repeats)
        results['rows'][name] = {
            'median_s': statistics.median(times), 'min_s': min(times), 'max_s': max(times),
            'saved_mb': _saved_bytes(fn) / 2 ** 20,
        }
    print(f"{args.model}: {len(params)} DCLS layers, kernel construction forward + backward, "
          f"{results['threads']} threads, {args.repeats} repeats")
    print('| route | median s | min–max s | saved for backward MiB |\n|---|---|---|---|')
    for name, r in results['rows'].items():
        print(f"| {name} | {r['median_s']:.3f} | {r['min_s']:.3f}–{r['max_s']:.3f} | {r['saved_mb']:.1f} |")
    if len(results['rows']) == 2:
        ours, theirs = results['rows'].values()
        print(f"ratio (ours / dcls): time {ours['median_s'] / theirs['median_s']:.3f}, "
              f"memory {ours['saved_mb'] / theirs['saved_mb']:.3f}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)


if __name__ == '__main__':
    main()
