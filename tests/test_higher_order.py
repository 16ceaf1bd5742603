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
