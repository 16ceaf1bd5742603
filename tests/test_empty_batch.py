"""An empty batch passes every model (trained-like positions and masks, so the FFT paths are taken) in training
and evaluation: MKL's FFTs refuse empty batches, so each FFT path must hand them on."""
import pytest
import timm
import torch
from timm.models import is_model_in_modules

import dcls_timm  # noqa: F401
from dcls_timm.layers import continuous_convs, position_owners
from dcls_timm.models import plugin_families

# one model of every family and of each variant with other layers (gauss kernels, dense baselines, 1-D sequences);
# not CAFormer: timm's own attention stages cannot reshape an empty batch (caformer_s18 fails alike)
MODELS = [('convnext_atto_dcls', {}), ('convnext_tiny_dcls_gauss', {}), ('convnext_tiny_k17', {}),
          ('resnet26_dcls', {}), ('fastvit_sa24_dcls', {}), ('convformer_s18_dcls', {}),
          ('flexnet_3', {}), ('ccnn_4_140', {}), ('ccnn_4_140', dict(data_dim=1, in_chans=1)), ('ckcnn_2_30', {})]


def test_every_family_is_covered():
    for family in plugin_families():
        assert any(is_model_in_modules(name, [family]) for name, _ in MODELS), family


def _trained_like_(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for owner in position_owners(model).values():
            for axis, d in enumerate(owner.dilated_kernel_size):
                owner.P[axis].uniform_(-(d // 2), d - 1 - d // 2)
        for conv in continuous_convs(model):
            if conv.has_mask:
                conv.mask_sigma.fill_(1.0)


@pytest.mark.parametrize('name, kwargs', MODELS, ids=lambda v: str(v) if isinstance(v, str) else '')
def test_empty_batch_trains_and_evaluates(name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs)
    chans = kwargs.get('in_chans', model.pretrained_cfg['input_size'][0])
    x = torch.randn(2, chans, 784) if kwargs.get('data_dim') == 1 else torch.randn(2, chans, 32, 32)
    model.eval()
    with torch.no_grad():
        model(x)  # lazy state (CCNN's one-time rescale) from a real batch
    _trained_like_(model)
    model.train()
    out = model(x[:0])
    assert out.shape == (0, 5)
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(x[:0]).shape == (0, 5)
