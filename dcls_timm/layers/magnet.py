"""MAGNet: a multiplicative anisotropic Gabor network that maps kernel coordinates to kernel values (FlexConv, CCNN).

Two initialisations (SPEC 2.1, 8.1): ``init='flexconv'`` (the FlexConv paper: filter weights x ``omega_0 / sqrt(L+1)
* gamma``, filter biases U(-pi, pi), envelope centres ``1.667 * mask_init * U(-1, 1)``, PyTorch default linears) and
``init='ccnn'`` (the CCNN code: filter weights x ``2 pi omega_0 gamma``, filter biases 0, hidden linears
kaiming-uniform with bias 1, output kaiming-uniform with bias 0; with ``causal=True`` the envelope centres are
``1 - 0.125 * U(0, 1)``, near the causal end +1). The CCNN output layer is also rescaled once by ``sqrt(1/n)`` at the
first forward pass of its convolution (``_ContinuousConvNd``), where ``n`` is known.
"""
import math
from typing import Sequence

import torch
import torch.nn as nn

__all__ = ['MAGNet', 'coordinate_grid']


def coordinate_grid(sizes: Sequence[int], device=None, dtype=None) -> torch.Tensor:
    """Points of a ``[-1, 1]^dim`` grid with ``sizes[d]`` points per axis, as ``[prod(sizes), dim]``."""
    axes = [torch.linspace(-1., 1., s, device=device, dtype=dtype) if s > 1
            else torch.zeros(1, device=device, dtype=dtype) for s in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing='ij'), dim=-1).reshape(-1, len(sizes))


class _GaborFilter(nn.Module):
    """``exp(-1/2 sum_d (gamma_cd (x_d - mu_cd))^2) * sin(W_c . x + b_c)`` for ``hidden`` channels c."""

    def __init__(self, dim: int, hidden: int, layer: int, num_filters: int, alpha: float, beta: float,
                 omega_0: float, mu_scale: float, init: str = 'flexconv', causal: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.linear = nn.Linear(dim, hidden, device=device, dtype=dtype)
        # no argument validation: it reads values on the host, which meta tensors (timm's cheap init) do not have
        concentration = torch.full((hidden, dim), alpha / (layer + 1), device=device, dtype=dtype)
        gamma = torch.distributions.Gamma(concentration, torch.full_like(concentration, beta), validate_args=False)
        self.gamma = nn.Parameter(gamma.sample())
        if causal:  # centres near the causal end (+1), where the causal mask sits
            self.mu = nn.Parameter(1. - 0.125 * torch.rand(hidden, dim, device=device, dtype=dtype))
        else:
            self.mu = nn.Parameter(mu_scale * torch.empty(hidden, dim, device=device, dtype=dtype).uniform_(-1., 1.))
        with torch.no_grad():
            # frequencies scale with the envelope width, so narrow envelopes carry low frequencies
            if init == 'ccnn':
                self.linear.weight.mul_(2 * math.pi * omega_0 * self.gamma)
                self.linear.bias.zero_()
            else:
                self.linear.weight.mul_(omega_0 / math.sqrt(num_filters) * self.gamma)
                self.linear.bias.uniform_(-math.pi, math.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        envelope = torch.exp(-0.5 * ((self.gamma * (x.unsqueeze(-2) - self.mu)) ** 2).sum(-1))
        return envelope * torch.sin(self.linear(x))

    def max_frequency(self) -> torch.Tensor:
        """Highest frequency (cycles per unit) this filter can express: carrier plus envelope spread."""
        return (self.linear.weight.abs() / (2 * math.pi) + self.gamma.abs() * 2 / (2 * math.pi)).max()


class MAGNet(nn.Module):
    """Multiplicative filter network on coordinates: ``h1 = g1(x)``, ``h_{l+1} = g_{l+1}(x) * (W_l h_l + b_l)``,
    ``out = W_out h_{L+1} + b_out``; ``num_layers`` hidden layers, ``num_layers + 1`` Gabor filters."""

    def __init__(
            self,
            dim: int,
            out_features: int,
            hidden: int = 32,
            num_layers: int = 3,
            alpha: float = 6.,
            beta: float = 1.,
            omega_0: float = 25.6,
            mask_init: float = 0.075,
            init: str = 'flexconv',
            causal: bool = False,
            device=None,
            dtype=None,
    ):
        """
        Args:
            dim: Coordinate dimensions (1, 2 or 3).
            out_features: Values per coordinate (``C_out * C_in`` for a full kernel, ``C_in`` for a depthwise one).
            hidden: Hidden width.
            num_layers: Hidden layers L (L + 1 Gabor filters).
            alpha, beta: Gamma(alpha / (l + 1), beta) init of the envelope widths of filter l.
            omega_0: Frequency scale of the filters' carriers.
            mask_init: Initial Gaussian-mask width; envelope centres start in ``1.667 * mask_init * U(-1, 1)``.
            init: ``'flexconv'`` or ``'ccnn'`` (see the module docstring).
            causal: Envelope centres start at the causal end, ``1 - 0.125 * U(0, 1)`` (1-D causal CCNN).
        """
        super().__init__()
        self.dim = dim
        self.num_layers = num_layers
        dd = {'device': device, 'dtype': dtype}
        if init not in ('flexconv', 'ccnn'):
            raise ValueError(f"init must be 'flexconv' or 'ccnn', got {init!r}.")
        self.init = init
        n = num_layers + 1
        self.filters = nn.ModuleList(
            [_GaborFilter(dim, hidden, l, n, alpha, beta, omega_0, 1.667 * mask_init, init, causal, **dd)
             for l in range(n)])
        self.linears = nn.ModuleList([nn.Linear(hidden, hidden, **dd) for _ in range(num_layers)])
        self.output = nn.Linear(hidden, out_features, **dd)
        if init == 'ccnn':
            with torch.no_grad():
                for linear in self.linears:
                    nn.init.kaiming_uniform_(linear.weight, nonlinearity='linear')
                    linear.bias.fill_(1.)
                nn.init.kaiming_uniform_(self.output.weight, nonlinearity='linear')
                self.output.bias.zero_()

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """``[N, dim]`` coordinates to ``[N, out_features]`` values."""
        h = self.filters[0](coords)
        for linear, gabor in zip(self.linears, self.filters[1:]):
            h = gabor(coords) * linear(h)
        return self.output(h)

    def filter_frequencies(self) -> torch.Tensor:
        """Maximum frequency of each Gabor filter, ``[num_layers + 1]``."""
        return torch.stack([f.max_frequency() for f in self.filters])
