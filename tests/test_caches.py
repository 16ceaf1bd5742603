"""Derived state never goes stale: after every way a parameter can change, outputs and gradients equal those of a
copy that starts with empty caches (DCLS kernels and tap geometry in all versions and dimensionalities, FlexConv
and CKConv crops)."""
import copy
import io

import pytest
import timm
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

import dcls_timm  # noqa: F401
from dcls_timm.layers import CKConv, Dcls1d, Dcls3d, FlexConv, position_owners, share_positions
from dcls_timm.layers.derived_cache import DerivedCache


def _spread_positions_(model: nn.Module) -> None:
    """Positions over the whole grid, as after training: the window crop and the fast depthwise conv both run."""
    with torch.no_grad():
        for owner in position_owners(model).values():
            for axis, d in enumerate(owner.dilated_kernel_size):
                owner.P[axis].uniform_(-(d // 2), d - 1 - d // 2)


def _convnext(version: str):
    def build():
        # a small ConvNeXt-dcls: two blocks share stage 0's positions
        model = timm.create_model('convnext_atto_dcls', num_classes=5, dcls_version=version, depths=(2, 1, 1, 1),
                                  dims=(16, 24, 32, 40))
        _spread_positions_(model)
        return model, torch.randn(2, 3, 32, 32)
    return build


class _Stack(nn.Module):
    """DCLS layers in a row: the first owns its positions, the others share a holder."""

    def __init__(self, cls, version: str):
        super().__init__()
        self.convs = nn.Sequential(*[cls(3, 3, kernel_count=4, dilated_kernel_size=7, padding='same', groups=3,
                                         version=version) for _ in range(3)])
        self.positions = share_positions(list(self.convs)[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


def _dcls_nd(cls, version, shape):
    def build():
        model = _Stack(cls, version)
        _spread_positions_(model)
        return model, torch.randn(2, 3, *shape)
    return build


def _continuous():
    model = nn.Sequential(FlexConv(2, 3, 17), nn.ReLU(), CKConv(3, 2, 9))
    with torch.no_grad():
        model[0].mask_sigma.fill_(0.2)
    return model, torch.randn(2, 2, 12, 12)


MODELS = {
    'dcls2d_v0': _convnext('v0'), 'dcls2d_v1': _convnext('v1'), 'dcls2d_gauss': _convnext('gauss'),
    'dcls1d_v1': _dcls_nd(Dcls1d, 'v1', (24,)), 'dcls3d_v0': _dcls_nd(Dcls3d, 'v0', (6, 6, 6)),
    'dcls3d_gauss': _dcls_nd(Dcls3d, 'gauss', (6, 6, 6)), 'flexconv_ckconv': _continuous,
}


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.float().square().mean()


def _fill_caches(model: nn.Module, x: torch.Tensor) -> None:
    model.eval()
    with torch.no_grad():
        model(x)
    model.train()
    _loss(model(x)).backward()
    model.zero_grad(set_to_none=True)


def _outputs_and_grads(model: nn.Module, x: torch.Tensor):
    model.eval()
    with torch.no_grad():
        inference = model(x)
    model.train()
    out = model(x)
    _loss(out).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return inference, out.detach(), grads


def _assert_like_fresh(model: nn.Module, x: torch.Tensor) -> None:
    fresh = copy.deepcopy(model)  # copies start with empty caches
    assert all(c._entry is None for m in fresh.modules() for c in vars(m).values() if isinstance(c, DerivedCache))
    got, want = _outputs_and_grads(model, x), _outputs_and_grads(fresh, x)
    tol = dict(rtol=1e-6, atol=1e-7) if x.dtype != torch.bfloat16 else dict(rtol=0, atol=0)
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    assert got[2].keys() == want[2].keys() == {n for n, p in model.named_parameters()}
    for name in got[2]:
        torch.testing.assert_close(got[2][name], want[2][name], **tol, msg=lambda m: f'{name}: {m}')


def _optimizer_steps(factory):
    def mutate(model, x):
        opt = factory(model.parameters())
        for _ in range(3):
            _loss(model(x)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model, x
    return mutate


def _perturb(params, through_data: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    for p in params:
        delta = 0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if through_data:
            p.data.add_(delta)  # .data has its own version counter: nothing tracks this edit
        else:
            with torch.no_grad():
                p.add_(delta)


def _edit_data(model, x):
    _perturb(model.parameters(), through_data=True)
    return model, x


def _edit_no_grad(model, x):
    _perturb(model.parameters(), through_data=False)
    return model, x


def _to(dtype):
    def mutate(model, x):
        return model.to(dtype), x.to(dtype)
    return mutate


def _autocast_before(model, x):
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _fill_caches(model, x)
    return model, x


def _load_state_dict(model, x):
    other = copy.deepcopy(model)
    _perturb(other.parameters(), through_data=False)
    model.load_state_dict(other.state_dict())
    return model, x


def _ema(model, x):
    ema = ModelEmaV3(model, decay=0.5)
    _fill_caches(ema.module, x)
    _optimizer_steps(lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True))(model, x)
    ema.update(model)
    return ema.module, x


def _pickle(model, x):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)
    _perturb(loaded.parameters(), through_data=True)
    return loaded, x


MUTATIONS = {
    'adamw': _optimizer_steps(lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False)),
    'adamw_foreach': _optimizer_steps(lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True)),
    'adamw_fused': _optimizer_steps(lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True)),
    'sgd': _optimizer_steps(lambda p: torch.optim.SGD(p, lr=1e-1, momentum=0.9, foreach=False)),
    'sgd_foreach': _optimizer_steps(lambda p: torch.optim.SGD(p, lr=1e-1, momentum=0.9, foreach=True)),
    'sgd_fused': _optimizer_steps(lambda p: torch.optim.SGD(p, lr=1e-1, momentum=0.9, fused=True)),
    'data_edit': _edit_data,
    'no_grad_edit': _edit_no_grad,
    'to_float64': _to(torch.float64),
    'to_bfloat16': _to(torch.bfloat16),
    'autocast_then_fp32': _autocast_before,
    'load_state_dict': _load_state_dict,
    'ema_copy': _ema,
    'pickle': _pickle,
}


@pytest.mark.parametrize('mutation', MUTATIONS)
@pytest.mark.parametrize('model_name', MODELS)
def test_outputs_and_gradients_equal_a_cache_free_copy(model_name, mutation):
    torch.manual_seed(0)
    model, x = MODELS[model_name]()
    _fill_caches(model, x)
    model, x = MUTATIONS[mutation](model, x)
    _assert_like_fresh(model, x)


@pytest.mark.parametrize('model_name', MODELS)
def test_autocast_state_is_part_of_the_kernel_key(model_name):
    """A kernel built under autocast is not reused outside it, nor the other way round."""
    torch.manual_seed(0)
    model, x = MODELS[model_name]()
    _fill_caches(model, x)
    model.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        low = model(x)
        low_fresh = copy.deepcopy(model)(x)
    torch.testing.assert_close(low, low_fresh, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), copy.deepcopy(model)(x), rtol=0, atol=0)


@pytest.mark.parametrize('version', ['v0', 'gauss'])
def test_caches_are_used(version):
    """The caches do their job: the geometry (tap geometry, Gaussian profiles) is built once per shared position
    tensor and step, the eval kernel once while the parameters stay the same."""
    model, x = _convnext(version)()
    _fill_caches(model, x)
    holder = model.stages[0].positions
    geometry = holder.construction_cache._entry[2]
    model.eval()
    layer = model.stages[0].blocks[0].conv_dw
    with torch.no_grad():
        model(x)
        kernel = layer._kernel_cache._entry[2]
        model(x)
    assert layer._kernel_cache._entry[2] is kernel
    assert holder.construction_cache._entry[2] is geometry
    layer.weight.data.mul_(2.)
    with torch.no_grad():
        model(x)
    assert layer._kernel_cache._entry[2] is not kernel


def test_cache_holds_nothing_off_cpu_and_keys_dtype_shape():
    cache = DerivedCache()
    t = torch.ones(3)
    cache.put([t], 'k', 'value')
    assert cache.get([t], 'k') == 'value'
    assert cache.get([t], 'other') is None
    assert cache.get([t.double()], 'k') is None
    assert cache.get([torch.ones(4)], 'k') is None
    assert cache.get([torch.full((3,), float('nan'))], 'k') is None
    meta = torch.ones(3, device='meta')
    cache.put([meta], 'k', 'meta value')  # values cannot be compared off the CPU without a device sync
    assert cache.get([meta], 'k') is None and cache.get([t], 'k') == 'value'
    with torch.inference_mode():
        inference = torch.ones(3)
        assert cache.get([inference], 'k') == 'value'


@pytest.mark.parametrize('swapped', ['P', 'SIG'])
def test_gauss_geometry_reused_for_a_swapped_parameter_keeps_its_own_values(swapped):
    # the Gaussian geometry builds its derivatives at the first backward: it once read them from views of the
    # tensors it was built from, which a parameter swapped for an equal one (then the old one changed) made stale
    from dcls_timm.layers import Dcls2d
    torch.manual_seed(0)
    x = torch.randn(2, 4, 12, 12)
    layer = Dcls2d(4, 4, 5, padding='same', dilated_kernel_size=9, groups=4, version='gauss')
    fresh = copy.deepcopy(layer)
    old = getattr(layer, swapped)
    with torch.no_grad():
        layer(x)  # builds (and caches) the geometry from `old`
    setattr(layer, swapped, nn.Parameter(old.detach().clone()))
    with torch.no_grad():
        old.add_(1.)
    grad = torch.randn(2, 4, 12, 12)
    got = torch.autograd.grad(layer(x), [layer.weight, layer.P, layer.SIG], grad)
    expected = torch.autograd.grad(fresh(x), [fresh.weight, fresh.P, fresh.SIG], grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
