"""FLOP counting as the papers do, and baking DCLS / continuous kernels into plain convolutions for export."""
import io

import pytest
import timm
import torch
import torch.nn as nn

import dcls_timm  # noqa: F401
from dcls_timm.export import bake_kernels
from dcls_timm.info import main as info_main
from dcls_timm.info import model_info
from dcls_timm.layers import Dcls1d, Dcls2d, Dcls3d, DclsPositions, FlexConv
from dcls_timm.layers.dcls import _DclsNd
from dcls_timm.layers.flexconv import _ContinuousConvNd


@pytest.mark.parametrize('name, gflops', [('convnext_tiny_dcls', 5.0), ('convnext_small_dcls', 9.5),
                                          ('convnext_base_dcls', 16.5)])
def test_flops_as_the_paper_counts(name, gflops):
    info = model_info(timm.create_model(name))
    assert info['gflops'] == pytest.approx(gflops, rel=0.02)
    assert 0 < info['gflops_kernel_construction'] < 0.05 * info['gflops']
    assert info['gflops_total'] == pytest.approx(info['gflops'] + info['gflops_kernel_construction'])


def test_flops_dense_baseline_and_cli(capsys):
    dense = model_info(timm.create_model('convnext_tiny'))
    k17 = model_info(timm.create_model('convnext_tiny_k17'))
    dcls = model_info(timm.create_model('convnext_tiny_dcls'))
    assert dense['gflops'] == pytest.approx(4.47, rel=0.01) and dense['gflops_kernel_construction'] == 0
    assert dcls['gflops'] == pytest.approx(k17['gflops'], rel=1e-6)  # a DCLS conv counts as its dense kernel
    info = info_main(['flexnet_3'])
    assert info['params'] == 277_090 and info['input_size'] == [3, 32, 32]
    assert info['gflops_kernel_construction'] > 0  # the MAGNets, reported apart
    assert 'flexnet_3: 277,090 parameters' in capsys.readouterr().out


def test_flops_count_fused_attention():
    # fvcore has no handle for timm's fused attention: its matmuls once counted as nothing (CAFormer 4.330 instead
    # of 4.559 GFLOPs), whatever TIMM_FUSED_ATTN says
    kwargs = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 32), dcls_kernel_size=5, dcls_kernel_count=4, num_classes=4)
    model = timm.create_model('caformer_s18_dcls', **kwargs)
    attention = [m for m in model.modules() if isinstance(getattr(m, 'fused_attn', None), bool)]
    assert attention
    counts = []
    for fused in (True, False):
        for m in attention:
            m.fused_attn = fused
        counts.append(model_info(model, (3, 32, 32)))
        assert all(m.fused_attn is fused for m in attention)  # left as it was
    assert counts[0]['gflops'] == counts[1]['gflops']
    # stage 3 (2x2 tokens of 32 channels) and stage 4 (1x1): q k^T and attn v, 2 * tokens^2 * channels each
    assert counts[0]['gflops_by_operator']['matmul'] * 1e9 >= 2 * 4 ** 2 * 32 + 2 * 1 * 32


def _layers():
    return [
        Dcls2d(4, 6, 5, dilated_kernel_size=7, padding=3, groups=2, version='v1'),
        Dcls2d(4, 4, 5, dilated_kernel_size=(6, 5), padding='same', groups=4, version='gauss'),
        Dcls2d(4, 4, 5, dilated_kernel_size=5, padding=2, padding_mode='reflect', stride=2, version='v0'),
        Dcls1d(3, 3, 4, dilated_kernel_size=9, padding='same', groups=3, version='v0'),
        Dcls3d(2, 2, 3, dilated_kernel_size=5, padding=2, version='v1'),
        FlexConv(4, 6, 17),
        FlexConv(4, 4, 17, depthwise=True),
    ]


@pytest.mark.parametrize('index', range(7))
def test_baked_layer_equals_original(index):
    layer = _layers()[index]
    if isinstance(layer, FlexConv):
        with torch.no_grad():
            layer.mask_sigma.fill_(0.3)
    shape = {1: (2, layer.in_channels, 20), 2: (2, layer.in_channels, 13, 12),
             3: (2, layer.in_channels, 8, 8, 8)}[getattr(layer, 'ndim', None) or layer.dim]
    x = torch.randn(shape)
    model = nn.Sequential(layer)
    baked = bake_kernels(model)
    assert not any(isinstance(m, (_DclsNd, _ContinuousConvNd)) for m in baked.modules())
    torch.testing.assert_close(baked(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name, size', [('convnext_atto_dcls', 64), ('resnet26_dcls', 64), ('flexnet_3', 32),
                                        ('ccnn_4_140', 32)])
def test_baked_model_scripts_and_exports(name, size, tmp_path):
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, size, size)
    baked = bake_kernels(model)
    assert not any(isinstance(m, (_DclsNd, _ContinuousConvNd, DclsPositions)) for m in baked.modules())
    ref = model(x)
    torch.testing.assert_close(baked(x), ref, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # the fused / in-place inference paths, with the baked convs
        torch.testing.assert_close(baked(x), ref, rtol=1e-5, atol=1e-5)
    scripted = torch.jit.script(baked)
    torch.testing.assert_close(scripted(x), ref, rtol=1e-5, atol=1e-5)
    onnx = pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    buffer = io.BytesIO()
    torch.onnx.export(baked, x, buffer, dynamo=False, input_names=['x'], output_names=['y'])
    onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()))
    out = ort.InferenceSession(buffer.getvalue()).run(None, {'x': x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), ref.detach(), rtol=1e-4, atol=1e-4 * ref.abs().max().item())
