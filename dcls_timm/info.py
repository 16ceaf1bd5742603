"""Parameters and FLOPs of a model, counted as the DCLS papers do.

    python -m dcls_timm.info convnext_tiny_dcls            # 28.59 M params, 4.98 GFLOPs (+0.07 G kernel construction)

FLOPs are fvcore's (one per multiply-accumulate). A DCLS or continuous-kernel convolution counts as the dense
convolution with its constructed kernel (the papers' convention), an FFT convolution as the direct one it equals (a
causal kernel of n taps: n multiply-accumulates per output step); building the kernels (the DCLS interpolation
matmuls, the MAGNet and SIREN kernel networks) is reported apart.
"""
import argparse
import json
import logging
import math
from typing import Any, Dict, Sequence, Tuple

import timm
import torch
import torch.nn as nn

__all__ = ['model_info', 'main']


def _dcls_construction_flops(model: nn.Module) -> int:
    from dcls_timm.layers.dcls import _DclsNd
    total = 0
    for m in model.modules():
        if isinstance(m, _DclsNd):
            # 3-D: first = prof_0 [O, I, D0, K] @ rest [O, I, K, D1 * D2]; 2-D: counted by the handles below
            o, i, k = m.weight.shape
            total += o * i * k * math.prod(m.dilated_kernel_size) if m.ndim > 2 else 0
    return total


def _depthwise_flops(inputs, outputs) -> int:
    """fvcore handle for the fast depthwise conv (a custom autograd function): output elements x kernel taps."""
    from fvcore.nn.jit_handles import get_shape
    out, weight = get_shape(outputs[0]), get_shape(inputs[1])
    return math.prod(out) * weight[-2] * weight[-1]


def _gauss_kernel_flops(inputs, outputs) -> int:
    """fvcore handle for the 2-D Gaussian kernel construction (a custom autograd function): its matmul."""
    from fvcore.nn.jit_handles import get_shape
    return math.prod(get_shape(outputs[0])) * get_shape(inputs[0])[-1]


def _bilinear_kernel_flops(inputs, outputs) -> int:
    """fvcore handle for the 2-D bilinear kernel construction: 4 weighted taps per element."""
    from fvcore.nn.jit_handles import get_shape
    return 4 * math.prod(get_shape(inputs[0]))


def model_info(model: nn.Module, input_size: Tuple[int, ...] = (3, 224, 224)) -> Dict[str, Any]:
    """Parameter count and fvcore FLOPs of ``model`` on one ``input_size`` image.

    Returns:
        ``params``, ``gflops`` (paper convention: kernel construction excluded), ``gflops_kernel_construction``,
        ``gflops_total`` (fvcore's whole count), ``gflops_by_operator`` and the operators fvcore skipped.
    """
    from fvcore.nn import FlopCountAnalysis
    from dcls_timm.layers import dcls_layers, kernel_net_convs
    model = model.eval()
    x = torch.randn(1, *input_size)
    layers = list(dcls_layers(model))
    saved = [layer.fast_path for layer in layers]
    for layer in layers:  # count the dense convolution with the whole kernel, as the papers do
        layer.fast_path = False
    continuous = kernel_net_convs(model)
    saved_fft = [layer.fft for layer in continuous]
    for layer in continuous:  # an FFT convolution counts as the direct one it computes (fvcore has no FFT handles)
        layer.fft = 'never'
    # timm's fused attention (scaled_dot_product_attention) has no fvcore handle: its matmuls would count as
    # nothing; the explicit path computes the same products
    attention = [m for m in model.modules() if isinstance(getattr(m, 'fused_attn', None), bool)]
    saved_attn = [m.fused_attn for m in attention]
    for m in attention:
        m.fused_attn = False
    try:
        analysis = FlopCountAnalysis(model, x)
        analysis.set_op_handle('prim::PythonOp._DepthwiseConv2d', _depthwise_flops,
                               'prim::PythonOp._GaussKernel2d', _gauss_kernel_flops,
                               'prim::PythonOp._BilinearKernel2d', _bilinear_kernel_flops)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        logging.getLogger('fvcore').setLevel(logging.ERROR)
        total = analysis.total()
    finally:
        for layer, fast in zip(layers, saved):
            layer.fast_path = fast
        for layer, fft in zip(continuous, saved_fft):
            layer.fft = fft
        for m, fused in zip(attention, saved_attn):
            m.fused_attn = fused
    by_module = analysis.by_module()
    names = {m: n for n, m in model.named_modules()}
    by_operator = analysis.by_operator()
    construction = _dcls_construction_flops(model) + sum(
        by_operator.get(f'PythonOp.{fn}', 0) for fn in ('_BilinearKernel2d', '_GaussKernel2d'))
    construction += sum(by_module.get(f'{names[m]}.kernel_net', 0) for m in continuous)
    return {
        'params': sum(p.numel() for p in model.parameters()),
        'input_size': list(input_size),
        'gflops': (total - construction) / 1e9,
        'gflops_kernel_construction': construction / 1e9,
        'gflops_total': total / 1e9,
        'gflops_by_operator': {k: v / 1e9 for k, v in by_operator.items()},
        'skipped_operators': sorted(analysis.unsupported_ops()),
    }


def main(argv: Sequence[str] = None) -> Dict[str, Any]:
    from timm.utils import ParseKwargs
    import dcls_timm  # noqa: F401  (registers the models)
    parser = argparse.ArgumentParser(prog='python -m dcls_timm.info', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model')
    parser.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'),
                        help="default: the model's pretrained_cfg input size")
    parser.add_argument('--num-classes', type=int, default=None)
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    parser.add_argument('--json', action='store_true', help='print JSON')
    args = parser.parse_args(argv)
    from dcls_timm.errors import check_model_name
    check_model_name(args.model)
    kwargs = dict(args.model_kwargs)
    if args.input_size is not None:
        kwargs.setdefault('in_chans', args.input_size[0])
    model = timm.create_model(args.model, num_classes=args.num_classes, **kwargs)
    input_size = tuple(args.input_size or model.pretrained_cfg['input_size'])
    info = dict(model=args.model, **model_info(model, input_size))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{args.model}: {info['params']:,} parameters, {info['gflops']:.3f} GFLOPs at "
              f"{'x'.join(map(str, input_size))} (+{info['gflops_kernel_construction']:.3f} G kernel construction)")
        for op, g in sorted(info['gflops_by_operator'].items(), key=lambda kv: -kv[1]):
            print(f'  {op:<24}{g:9.3f} G')
        if info['skipped_operators']:
            print('  not counted (fvcore has no handle for them): ' + ', '.join(info['skipped_operators']))
    return info


if __name__ == '__main__':
    from dcls_timm.errors import run_cli
    run_cli(main, 'python -m dcls_timm.info')
