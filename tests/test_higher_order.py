"""Second derivatives, torch.func transforms and forward-mode AD through the custom autograd Functions (DCLS kernel
construction, the large-kernel depthwise conv): exact, not silently zero (float64). The causal FFT conv of the
sequence models is covered in tests/test_sequences.py."""
import pytest
import torch
from torch.func import functional_call, grad, jvp, vmap

from dcls_timm.layers import Dcls2d, construct_kernel
from dcls_timm.layers.fast_conv import depthwise_conv2d

D = torch.float64


def _kernel_inputs(version):
    torch.manual_seed(0)
    w = torch.randn(2, 1, 3, dtype=D)
    P = torch.rand(2, 2, 1, 3, dtype=D) * 4 - 2  # off the tap grid almost surely: smooth there
    SIG = torch.rand(2, 2, 1, 3, dtype=D) * 0.5 + 0.3 if version == 'gauss' else None
    return w, P, SIG, torch.randn(2, 1, 7, 7, dtype=D)


@pytest.mark.parametrize('version', ['v0', 'v1', 'gauss'])
def test_kernel_construction_hessian_vector_products_match_finite_differences(version):
    w, P, SIG, c = _kernel_inputs(version)

    def loss(w, P):
        return (construct_kernel(w, P, SIG, (7, 7), version) * c).sum().square()

    def gradient(w, P):
        w, P = w.clone().requires_grad_(), P.clone().requires_grad_()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss(w, P), (w, P))])

    vw, vP = torch.randn_like(w), torch.randn_like(P)
    hvp = torch.cat([h.flatten() for h in torch.autograd.functional.hvp(loss, (w, P), (vw, vP))[1]])
    eps = 1e-6
    fd = (gradient(w + eps * vw, P + eps * vP) - gradient(w - eps * vw, P - eps * vP)) / (2 * eps)
    assert hvp.norm() > 1e-3
    torch.testing.assert_close(hvp, fd, rtol=1e-5, atol=1e-6)
    # a gradient penalty on the parameters trains them as the plain-op construction would
    w_, P_ = w.clone().requires_grad_(), P.clone().requires_grad_()
    g = torch.autograd.grad(loss(w_, P_), P_, create_graph=True)[0]
    assert torch.autograd.grad(g.square().sum(), w_)[0].abs().max() > 0


@pytest.mark.parametrize('version', ['v0', 'v1', 'gauss'])
def test_dcls_layer_under_torch_func_equals_autograd(version):
    torch.manual_seed(0)
    layer = Dcls2d(4, 4, kernel_count=5, dilated_kernel_size=9, padding='same', groups=4, version=version).double()
    x = torch.randn(2, 4, 12, 12, dtype=D)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    grads = grad(lambda p: functional_call(layer, p, (x,)).square().mean())(params)
    layer(x).square().mean().backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(vmap(lambda xi: layer(xi.unsqueeze(0)))(x).squeeze(1), layer(x),
                               rtol=1e-9, atol=1e-12)
    # forward mode: the directional derivative along the weights is the layer at the tangent (linear in them)
    tangent = torch.randn_like(layer.weight)
    _, directional = jvp(lambda w: functional_call(layer, {**params, 'weight': w}, (x,)), (params['weight'],),
                         (tangent,))
    expected = functional_call(layer, {**params, 'weight': tangent, 'bias': torch.zeros_like(params['bias'])}, (x,))
    torch.testing.assert_close(directional, expected, rtol=1e-9, atol=1e-12)


def test_large_kernel_depthwise_conv_second_derivatives():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 9, 9, dtype=D, requires_grad=True)
    k = torch.randn(2, 1, 7, 7, dtype=D, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, k: depthwise_conv2d(x, k, None, (3, 3)), (x, k))


def test_forward_ad_and_ensembles_bypass_the_eval_kernel_cache():
    # a kept kernel has no tangent and one value: forward AD and vmapped parameters must rebuild it
    import copy

    import torch.autograd.forward_ad as fwAD
    from torch.func import stack_module_state
    torch.manual_seed(0)
    layer = Dcls2d(4, 4, kernel_count=5, dilated_kernel_size=9, padding='same', groups=4, version='v1').eval()
    x = torch.randn(2, 4, 12, 12)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    tangent = torch.randn_like(layer.weight)
    with torch.no_grad():
        layer(x)  # fills the cache
        with fwAD.dual_level():
            out = functional_call(layer, {**params, 'weight': fwAD.make_dual(params['weight'], tangent)}, (x,))
            directional = fwAD.unpack_dual(out).tangent
        expected = functional_call(layer, {**params, 'weight': tangent, 'bias': torch.zeros_like(params['bias'])},
                                   (x,))
        assert directional is not None
        torch.testing.assert_close(directional, expected, rtol=1e-5, atol=1e-5)
        models = [Dcls2d(4, 4, kernel_count=5, dilated_kernel_size=9, padding='same', groups=4,
                         version='gauss').eval() for _ in range(3)]
        stacked, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to('meta')
        ensemble = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(stacked, buffers)
        torch.testing.assert_close(ensemble, torch.stack([m(x) for m in models]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name, kwargs, shape', [('flexnet_3', {}, (2, 3, 12, 12)), ('ccnn_4_140', {}, (2, 3, 12, 12)),
                                                 ('ccnn_4_140', dict(data_dim=1, in_chans=1), (2, 1, 50)),
                                                 ('convnext_atto_dcls', {}, (2, 3, 32, 32))])
def test_fused_inference_steps_aside_for_forward_ad_and_vmap(name, kwargs, shape):
    # oneDNN's fused ops drop tangents silently and have no batching rule: evaluation under jvp/vmap takes the modules
    import timm

    import dcls_timm  # noqa: F401
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **kwargs).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        plain = model(x)  # CCNN's one-time kernel rescale happens at the first forward, outside the transforms
        _, tangent = jvp(model, (x,), (torch.ones_like(x),))
        batched = vmap(model)(x.unsqueeze(1)).squeeze(1)
        for m in model.modules():
            if hasattr(m, 'fast_path'):
                m.fast_path = False
        _, reference = jvp(model, (x,), (torch.ones_like(x),))
    assert reference.abs().max() > 0
    torch.testing.assert_close(tangent, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched, plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('version', ['v1', 'gauss'])
def test_every_mode_builds_the_same_kernel_on_a_narrow_window(version):
    # the custom Function, its create_graph backward and the plain ops (forward AD, torch.func) agree even where
    # the window cuts through the elements' taps (gauss: the whole kernel's restriction; v1: normalised on the window)
    import torch.autograd.forward_ad as fwAD
    from dcls_timm.layers.kernel import _plain_kernel
    torch.manual_seed(0)
    w = torch.randn(1, 1, 2, dtype=D, requires_grad=True)
    P = torch.tensor([[[[0.31, -1.7]]], [[[0.62, 1.4]]]], dtype=D, requires_grad=True)
    SIG = torch.full((2, 1, 1, 2), 0.3, dtype=D, requires_grad=True) if version == 'gauss' else None
    window, g = [(3, 6), (3, 6)], torch.randn(1, 1, 3, 3, dtype=D)
    kernel = construct_kernel(w, P, SIG, (9, 9), version, window=window)
    torch.testing.assert_close(kernel, _plain_kernel(w, P, SIG, (9, 9), version, window), rtol=1e-10, atol=1e-12)
    first, second = (torch.autograd.grad(construct_kernel(w, P, SIG, (9, 9), version, window=window), (w, P), g,
                                         create_graph=cg) for cg in (False, True))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)
    with fwAD.dual_level():
        dual = construct_kernel(fwAD.make_dual(w.detach(), torch.ones_like(w)), P.detach(),
                                None if SIG is None else SIG.detach(), (9, 9), version, window=window)
        torch.testing.assert_close(fwAD.unpack_dual(dual).primal, kernel.detach(), rtol=1e-10, atol=1e-12)
