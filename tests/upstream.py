"""Test helpers: every tensor of a model random; our weights in the upstream ConvNeXt-dcls checkpoint layout."""
import torch


def randomize_state_(model, seed: int, scale: float = 0.2):
    """Every floating tensor of ``model`` random (positions spread on a 5x5 grid, BN variances positive, the rest
    N(0, scale)), so that every weight and position shows in the logits (no zero-init residuals, layer scale 1e-6)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if k.endswith('.P'):
                t.copy_(torch.rand(t.shape, generator=g) * 4 - 2)
            elif k.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * scale)
    return model


def upstream_state_dict(model):
    """Our weights in the upstream ConvNeXt-dcls (Facebook) layout: positions repeated in every block."""
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith('stages.') and '.positions.' in k:
            continue
        k = k.replace('stem.', 'downsample_layers.0.')
        k = k.replace('conv_dw', 'dwconv').replace('mlp.fc', 'pwconv')
        if k.startswith('head.norm'):
            k = k.replace('head.norm', 'norm')
        k = k.replace('head.fc', 'head')
        parts = k.split('.')
        if parts[0] == 'stages' and parts[2] == 'downsample':
            k = '.'.join(['downsample_layers', parts[1]] + parts[3:])
        elif parts[0] == 'stages' and parts[2] == 'blocks':
            k = '.'.join(['stages', parts[1]] + parts[3:])
        sd[k] = v
    for i, stage in enumerate(model.stages):
        for j in range(len(stage.blocks)):
            for name, p in stage.positions.named_parameters():
                t = p.detach().clone()
                sd[f'stages.{i}.{j}.dwconv.{name}'] = t.flip(0) if model.dcls_version != 'v0' else t
    return {'model': sd}
