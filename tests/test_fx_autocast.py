"""FX-traced models train like eager ones, and DCLS trains under bf16 autocast on CPU with spread positions."""
import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules, is_model_in_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import dcls_timm  # noqa: F401
from dcls_timm.layers import Dcls2d, position_owners
from dcls_timm.models import plugin_families

# timm's FX feature extraction: its leaf modules (the continuous-kernel convs among them) and wrapped functions
TIMM_TRACER = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())


def _spread_positions_(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for owner in position_owners(model).values():
            for axis, d in enumerate(owner.dilated_kernel_size):
                owner.P[axis].uniform_(-(d // 2), d - 1 - d // 2)


def _grads(model, x, autocast: bool = False):
    torch.manual_seed(1)  # same dropout masks in both runs
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):  # backward outside it, as recommended
        out = model(x)
    out = out if torch.is_tensor(out) else torch.cat([o.flatten(1) for o in out.values()], 1)
    out.float().square().mean().backward()
    grads = {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _fx_model(model, tracer_kwargs):
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


def _assert_fx_trains_like_eager(model, tracer_kwargs, x):
    model.train()
    _spread_positions_(model)
    out, grads = _grads(model, x)
    fx = _fx_model(model, tracer_kwargs).train()
    fx_out, fx_grads = _grads(fx, x)
    torch.testing.assert_close(fx_out, out, rtol=1e-4, atol=1e-5)
    named = dict(model.named_parameters())
    assert {n for n, _ in fx.named_parameters()} <= set(named)
    for name, grad in grads.items():
        assert grad is not None, f'eager: no gradient for {name}'
        fx_grad = fx_grads.get(name)
        assert fx_grad is not None, f'FX: no gradient for {name}'
        err = (fx_grad - grad).norm() / grad.norm().clamp_min(1e-12)
        assert err < 1e-4, f'{name}: FX gradient differs from eager by {err:.2e} (relative)'


# Every distinct architecture: the smallest model of each family and each variant with other layers (gauss
# kernels, dense baselines, plain 3x3 FlexNet); larger sizes of a family repeat the same modules.
FX_MODELS = ['convnext_atto_dcls', 'convnext_tiny_dcls_gauss', 'convnext_tiny_dil2', 'convnext_tiny_k17',
             'resnet26_dcls', 'fastvit_sa24_dcls', 'convformer_s18_dcls', 'caformer_s18_dcls', 'flexnet_3',
             'flexnet_7_conv3', 'ccnn_4_140', 'ckcnn_2_30']
SIZES = {'ckcnn_2_30': 16}  # read as a 256-step sequence
# eager FlexNet draws its CPU dropout masks from integer bits, its FX graph calls the nn.Dropout module (bernoulli
# masks): the same seed gives other masks, so these two compare without dropout
KWARGS = {'flexnet_3': dict(dropout=0.), 'flexnet_7_conv3': dict(dropout=0.)}


def test_fx_models_cover_every_family():
    for family in plugin_families():
        assert any(is_model_in_modules(m, [family]) for m in FX_MODELS), f'no FX test for {family}'


@pytest.mark.parametrize('model_name', FX_MODELS)
def test_fx_traced_model_gets_every_gradient_like_eager(model_name):
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=5, **KWARGS.get(model_name, {}))
    size, chans = SIZES.get(model_name, 32), model.pretrained_cfg['input_size'][0]
    _assert_fx_trains_like_eager(model, TIMM_TRACER, torch.randn(2, chans, size, size))


@pytest.mark.parametrize('model_name', ['convnext_atto_dcls', 'convnext_tiny_dcls_gauss', 'resnet26_dcls'])
def test_plain_torchvision_fx_trains_dcls_models_like_eager(model_name):
    """Without timm's tracer settings too: the DCLS kernel is one wrapped call in any FX graph."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=5)
    _assert_fx_trains_like_eager(model, None, torch.randn(2, 3, 32, 32))


def _autocast_errors(module, x):
    """Relative errors of the output and of each gradient under bf16 autocast, against fp32."""
    out, grads = _grads(module, x)
    low_out, low_grads = _grads(module, x, autocast=True)
    assert low_out.dtype == torch.bfloat16
    errors = {}
    for name, grad in grads.items():
        low = low_grads[name]
        assert low is not None and low.dtype == grad.dtype and torch.isfinite(low).all(), name
        errors[name] = float((low - grad).norm() / grad.norm().clamp_min(1e-12))
    return float((low_out.float() - out).norm() / out.norm()), errors


@pytest.mark.parametrize('version', ['v0', 'v1', 'gauss'])
def test_bf16_autocast_dcls_layer_with_spread_positions(version):
    """Spread positions put the large-kernel fast conv on the path; under autocast it steps aside (its backward
    would get a bf16 gradient and an fp32 weight), and the layer matches fp32 within bf16 precision."""
    torch.manual_seed(0)
    layer = Dcls2d(8, 8, kernel_count=20, dilated_kernel_size=17, padding='same', groups=8, version=version)
    _spread_positions_(layer)
    out_error, errors = _autocast_errors(layer, torch.randn(2, 8, 24, 24, requires_grad=False))
    assert out_error < 0.02 and max(errors.values()) < 0.05, (out_error, errors)


@pytest.mark.parametrize('model_name, kwargs', [
    ('convnext_atto_dcls', dict(depths=(2, 1, 1, 1))),
    ('convnext_atto_dcls', dict(depths=(2, 1, 1, 1), dcls_version='v1')),
    ('convnext_atto_dcls', dict(depths=(2, 1, 1, 1), dcls_version='gauss')),
    ('resnet26_dcls', dict(zero_init_last=False)),
])
def test_bf16_autocast_training_step_with_spread_positions(model_name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=5, **kwargs).train()
    _spread_positions_(model)
    out_error, errors = _autocast_errors(model, torch.randn(2, 3, 64, 64))
    if model_name.startswith('convnext'):
        assert out_error < 0.05 and max(errors.values()) < 0.1, (out_error, errors)
    else:  # bf16 loses most of a deep ResNet's early gradients at batch 2; the dense resnet26 loses as much
        assert out_error < 0.15
