"""Dilated convolution with learnable spacings (DCLS) layers.

``Dcls1d``/``Dcls2d``/``Dcls3d`` take the constructor arguments and keep the parameter names and shapes of the
``dcls`` package's classes (``weight``, ``P``, ``SIG``, ``bias``), so dcls code and checkpoints keep working. The
dense kernel is built separably (see :mod:`dcls_timm.layers.kernel`), and positions follow one axis convention for
every version and kernel shape: ``P[0]`` is the first spatial axis.

Several layers can share one position tensor through :func:`share_positions`, which moves ``P`` (and ``SIG``) into a
:class:`DclsPositions` module; register that module once in the model so the shared tensors are one parameter each
to optimizers, EMA and state dicts.
"""
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _ntuple

from ._autograd import functorch_transforms_active
from .fast_conv import depthwise_conv2d, use_fast_depthwise
from .kernel import DCLS_VERSIONS, SIG_INIT, construct_kernel, position_window
from .derived_cache import DerivedCache

# Under FX symbolic tracing the kernel is one call: traced op by op, its in-place scatter would be dropped as dead
# code, leaving a zero kernel and no gradient for the weights.
torch.fx.wrap('construct_kernel')

__all__ = [
    'Dcls1d', 'Dcls2d', 'Dcls3d', 'DclsPositions', 'share_positions', 'clamp_positions_', 'dcls_layers',
    'position_owners', 'position_parameters',
]

_PADDING_MODES = ('zeros', 'reflect', 'replicate', 'circular')
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _init_positions_(P: torch.Tensor, dilated_kernel_size: Sequence[int]) -> None:
    """Normal(0, 0.5) init, clamped to the grid, as the dcls package and the papers do."""
    with torch.no_grad():
        nn.init.normal_(P, 0., 0.5)
        _clamp_(P, dilated_kernel_size)


def _clamp_(P: torch.Tensor, dilated_kernel_size: Sequence[int]) -> None:
    # Odd sizes: +-(D // 2), as the dcls package. Even sizes: the grid spans -(D // 2) .. D // 2 - 1; the dcls
    # package's +(D // 2) would let an element slide off the grid, where v0 loses it and its gradient for good.
    with torch.no_grad():
        for axis, size in enumerate(dilated_kernel_size):
            P[axis].clamp_(-(size // 2), (size - 1) - size // 2)


class DclsPositions(nn.Module):
    """Positions ``P`` (and widths ``SIG`` for ``gauss``) shared by several DCLS layers.

    Created by :func:`share_positions`; it must be registered in the model (e.g. as an attribute of the stage that
    holds the layers) so its parameters appear once in ``named_parameters()`` and the state dict.
    """
    checkpoint_settings = ('dilated_kernel_size',)

    def __init__(self, P: nn.Parameter, SIG: Optional[nn.Parameter], dilated_kernel_size: Tuple[int, ...]):
        super().__init__()
        self.dilated_kernel_size = tuple(dilated_kernel_size)
        self.construction_cache = DerivedCache()  # tap geometry of the positions, shared by the layers using them
        self.P = P
        if SIG is None:
            self.register_parameter('SIG', None)
        else:
            self.SIG = SIG

    @torch.jit.ignore
    def clamp_parameters(self) -> None:
        """Clamp positions in place onto the grid: ``±(D // 2)`` per axis for odd D."""
        _clamp_(self.P, self.dilated_kernel_size)

    def extra_repr(self) -> str:
        return f'shape={tuple(self.P.shape)}, dilated_kernel_size={self.dilated_kernel_size}'


class _DclsNd(nn.Module):
    """Base class of the N-d DCLS convolutions (dense kernel built from K learnable-position elements)."""

    ndim: int = 0
    # what the outputs depend on beyond the state dict: recorded in train.py checkpoints, checked when loading
    checkpoint_settings = ('dilated_kernel_size', 'version')

    def __init__(
            self,
            in_channels: int,
            out_channels: int,
            kernel_count: int,
            stride: Union[int, Sequence[int]] = 1,
            padding: Union[int, Sequence[int], str] = 0,
            dilated_kernel_size: Union[int, Sequence[int]] = 1,
            groups: int = 1,
            bias: bool = True,
            padding_mode: str = 'zeros',
            version: str = 'gauss',
            use_implicit_gemm: bool = True,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_channels: Input channels.
            out_channels: Output channels.
            kernel_count: Number of kernel elements K per filter.
            stride: Convolution stride.
            padding: Int/tuple padding per axis, ``'valid'`` or ``'same'`` (stride 1 only; pads ``D // 2`` before
                and ``D - 1 - D // 2`` after, so position 0 is the output pixel itself also for even sizes).
            dilated_kernel_size: Size D of the dense kernel grid per axis (any size, odd or even).
            groups: Convolution groups.
            bias: Learnable bias.
            padding_mode: ``'zeros'``, ``'reflect'``, ``'replicate'`` or ``'circular'``.
            version: Interpolation: ``'v0'`` (bilinear), ``'v1'`` (normalised triangle) or ``'gauss'``.
            use_implicit_gemm: Accepted for compatibility with the dcls package; has no effect.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        to_tuple = _ntuple(self.ndim)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f'in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups}).')
        if kernel_count < 1:
            raise ValueError(f'kernel_count must be >= 1, got {kernel_count}.')
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got '{padding_mode}'.")
        if version not in DCLS_VERSIONS:
            hint = " (the dcls package's 'max' version is not supported)" if version == 'max' else ''
            raise ValueError(f"version must be one of {DCLS_VERSIONS}, got '{version}'{hint}.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_count = kernel_count
        self.stride = to_tuple(stride)
        self.dilated_kernel_size = to_tuple(dilated_kernel_size)
        if min(self.dilated_kernel_size) < 1:
            raise ValueError(f'dilated_kernel_size must be >= 1, got {self.dilated_kernel_size}.')
        self.groups = groups
        self.padding_mode = padding_mode
        self.version = version
        self.padding = padding if isinstance(padding, str) else _ntuple(self.ndim)(padding)
        self._conv_padding, self._pad = self._resolve_padding(padding)
        self._shared_positions: Optional[Tuple[DclsPositions]] = None
        # Kernels cropped to the taps the positions reach and the input can see, the CPU fast depthwise conv where
        # it applies (channels-last, FFT weight gradient), kernels reused while no parameter changes and no
        # gradient is needed. False: the plain dense convolution (e.g. for FLOP counting).
        self.fast_path = True
        self._kernel_cache = DerivedCache()
        self.construction_cache = DerivedCache()  # see DclsPositions; used while this layer owns its positions

        shape = (out_channels, in_channels // groups, kernel_count)
        self.weight = nn.Parameter(torch.empty(shape, **dd))
        self.P = nn.Parameter(torch.empty((self.ndim, *shape), **dd))
        if version == 'gauss':
            self.SIG = nn.Parameter(torch.empty((self.ndim, *shape), **dd))
        else:
            self.register_parameter('SIG', None)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **dd))
        else:
            self.register_parameter('bias', None)
        self.reset_parameters()

    def _resolve_padding(self, padding) -> Tuple[Tuple[int, ...], Optional[Tuple[int, ...]]]:
        """The padding the convolution applies itself (explicit ints, which FLOP counters and exporters read) and
        the ``F.pad`` amounts applied before it (asymmetric 'same' padding, or non-zero padding modes), or None."""
        zeros = (0,) * self.ndim
        if isinstance(padding, str):
            if padding == 'valid':
                return zeros, None
            if padding != 'same':
                raise ValueError(f"padding must be an int, a tuple, 'valid' or 'same', got '{padding}'.")
            if any(s != 1 for s in self.stride):
                raise ValueError("padding='same' is only supported with stride 1.")
            before = [d // 2 for d in self.dilated_kernel_size]
            after = [d - 1 - d // 2 for d in self.dilated_kernel_size]
        else:
            before = after = list(_ntuple(self.ndim)(padding))
            if min(before) < 0:
                raise ValueError(f'padding must be >= 0, got {padding}.')
        if before == after and self.padding_mode == 'zeros':
            return tuple(before), None
        pad = []
        for b, a in zip(reversed(before), reversed(after)):  # F.pad wants the last axis first
            pad += [b, a]
        return zeros, tuple(pad)

    def reset_parameters(self) -> None:
        """nn.Conv-style init of weight and bias (as the dcls package), normal(0, 0.5) positions, sigma 0.5."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        if self._shared_positions is None:
            _init_positions_(self.P, self.dilated_kernel_size)
            if self.SIG is not None:
                nn.init.constant_(self.SIG, SIG_INIT)

    def __getattr__(self, name: str):
        # P/SIG of a layer that shares its positions live in the DclsPositions module
        try:
            return super().__getattr__(name)
        except AttributeError:
            shared = self.__dict__.get('_shared_positions')
            if shared is not None and name in ('P', 'SIG'):
                return getattr(shared[0], name)
            raise

    @torch.jit.ignore
    def positions_owner(self) -> nn.Module:
        """The module that holds this layer's ``P``/``SIG``: a shared :class:`DclsPositions` or the layer."""
        return self._shared_positions[0] if self._shared_positions is not None else self

    @torch.jit.ignore
    def clamp_parameters(self) -> None:
        """Clamp positions in place onto the grid (``±(D // 2)`` for odd D); shared ones once for all sharers."""
        _clamp_(self.positions_owner().P, self.dilated_kernel_size)

    def construct_kernel(self) -> torch.Tensor:
        """The dense kernel ``[C_out, C_in/groups, *dilated_kernel_size]`` this layer convolves with."""
        owner = self.positions_owner()
        return construct_kernel(self.weight, owner.P, owner.SIG, self.dilated_kernel_size, self.version)

    def _cropped_kernel(self, size: Sequence[int]) -> Tuple[torch.Tensor, Tuple[int, ...]]:
        """The kernel and the (centred) padding to convolve with, every axis with centred padding cropped to the
        taps that are non-zero (on CPU: the window the positions span, Gaussians widened by their radius) and
        that can reach an ``n``-long input (``2n - 1`` taps). Exact for values and gradients."""
        owner = self.positions_owner()
        tensors = [t for t in (self.weight, owner.P, owner.SIG) if t is not None]
        # host reads and Python state: not while tracing or compiling, nor under torch.func transforms (batched
        # positions have no single window)
        dynamic = not (torch.jit.is_tracing() or torch.compiler.is_compiling()
                       or functorch_transforms_active())
        reuse = dynamic and not torch.is_grad_enabled()
        key = tuple(size)
        if reuse:
            result = self._kernel_cache.get(tensors, key)
            if result is not None:
                return result
        # the window the positions span is read on the host: free on CPU, a stall of the stream per layer on GPUs
        support = None
        if dynamic and owner.P.device.type == 'cpu':
            support = position_window(owner.P, self.dilated_kernel_size, self.version, owner.SIG)
        window, reach, padding = [], [], []
        for axis, (d, p, n) in enumerate(zip(self.dilated_kernel_size, self._conv_padding, size)):
            if d != 2 * p + 1:  # not centred: nothing to crop
                window.append((0, d))
                reach.append(None)
                padding.append(p)
                continue
            r = p if support is None else min(p, max(p - support[axis][0], support[axis][1] - 1 - p))
            if self.version == 'v0':  # no normalisation: build only what the input reaches
                r = min(r, n - 1)
            window.append((p - r, p + r + 1))
            reach.append(min(r, n - 1))
            padding.append(reach[-1])
        full = all(w == (0, d) for w, d in zip(window, self.dilated_kernel_size))
        kernel = construct_kernel(self.weight, owner.P, owner.SIG, self.dilated_kernel_size, self.version,
                                  None if full else window, owner.construction_cache)
        for axis, ((start, stop), r) in enumerate(zip(window, reach)):
            if r is not None and 2 * r + 1 < stop - start:  # v1/gauss normalise over the window: crop after
                kernel = kernel.narrow(2 + axis, (stop - start) // 2 - r, 2 * r + 1)
        result = kernel, tuple(padding)
        if reuse:
            self._kernel_cache.put(tensors, key, result)
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self._conv_padding
        if self._pad is not None:
            x = F.pad(x, self._pad, mode='constant' if self.padding_mode == 'zeros' else self.padding_mode)
            kernel = self.construct_kernel()
        elif self.fast_path and not isinstance(x, torch.fx.Proxy):  # symbolic shapes under FX: the plain path
            kernel, padding = self._cropped_kernel(x.shape[2:])
            if self.ndim == 2 and use_fast_depthwise(x, kernel, self.stride, self.groups, padding):
                return depthwise_conv2d(x, kernel, self.bias, padding)
        else:
            kernel = self.construct_kernel()
        return _CONV_FNS[self.ndim](x, kernel, self.bias, self.stride, padding, 1, self.groups)

    def extra_repr(self) -> str:
        s = (f'{self.in_channels}, {self.out_channels}, kernel_count={self.kernel_count}, '
             f'dilated_kernel_size={self.dilated_kernel_size}, version={self.version}')
        if any(s_ != 1 for s_ in self.stride):
            s += f', stride={self.stride}'
        s += f', padding={self.padding!r}' if isinstance(self.padding, str) else f', padding={self.padding}'
        if self.groups != 1:
            s += f', groups={self.groups}'
        if self.bias is None:
            s += ', bias=False'
        if self.padding_mode != 'zeros':
            s += f', padding_mode={self.padding_mode}'
        if self._shared_positions is not None:
            s += ', shared_positions=True'
        return s


class Dcls1d(_DclsNd):
    """1-D DCLS convolution; drop-in for ``DCLS.construct.modules.Dcls1d``."""
    ndim = 1


class Dcls2d(_DclsNd):
    """2-D DCLS convolution; drop-in for ``DCLS.construct.modules.Dcls2d``. ``P[0]`` is rows, ``P[1]`` columns."""
    ndim = 2


class Dcls3d(_DclsNd):
    """3-D DCLS convolution; drop-in for ``DCLS.construct.modules.Dcls3d``."""
    ndim = 3


def share_positions(layers: Sequence[_DclsNd]) -> DclsPositions:
    """Make ``layers`` use one position tensor (and one ``SIG``): the first layer's current values.

    The layers' own ``P``/``SIG`` parameters are removed; the returned :class:`DclsPositions` holds the shared ones
    and must be registered in the model (for example ``stage.positions = share_positions(convs)``), so that the
    optimizer, EMA and state dict see each shared tensor exactly once.

    Args:
        layers: DCLS layers with identical position shapes, versions and dilated kernel sizes.

    Returns:
        The module owning the shared parameters.
    """
    layers = list(layers)
    if not layers:
        raise ValueError('share_positions needs at least one layer.')
    first = layers[0]
    for layer in layers:
        if not isinstance(layer, _DclsNd):
            raise TypeError(f'share_positions takes DCLS layers, got {type(layer).__name__}.')
        if layer._shared_positions is not None:
            raise ValueError('A layer passed to share_positions already shares its positions.')
        if (layer.ndim, layer.version, layer.dilated_kernel_size, tuple(layer.P.shape)) != (
                first.ndim, first.version, first.dilated_kernel_size, tuple(first.P.shape)):
            raise ValueError(
                'Layers sharing positions need the same dimensionality, version, dilated_kernel_size and '
                f'position shape; got {tuple(first.P.shape)} ({first.version}, {first.dilated_kernel_size}) and '
                f'{tuple(layer.P.shape)} ({layer.version}, {layer.dilated_kernel_size}).')
    holder = DclsPositions(first.P, first.SIG, first.dilated_kernel_size)
    for layer in layers:
        del layer.P
        if 'SIG' in layer._parameters:
            del layer.SIG
        layer._shared_positions = (holder,)  # a tuple keeps the holder out of the layer's submodules
    return holder


def dcls_layers(model: nn.Module) -> Iterable[_DclsNd]:
    """All DCLS layers of a model."""
    return (m for m in model.modules() if isinstance(m, _DclsNd))


def position_owners(model: nn.Module) -> Dict[str, nn.Module]:
    """Each distinct holder of DCLS positions in ``model``, by module name, in model order.

    A holder is a :class:`DclsPositions` module (shared positions) or a DCLS layer that owns its own ``P``; a
    holder shared by several layers appears once. Every holder has ``P``, ``SIG`` (or None),
    ``dilated_kernel_size`` and ``clamp_parameters()``.
    """
    owners: Dict[str, nn.Module] = {}
    seen = set()
    for name, m in model.named_modules():
        if isinstance(m, DclsPositions) or (isinstance(m, _DclsNd) and m._shared_positions is None):
            owners[name] = m
            seen.add(id(m))
    for name, m in model.named_modules():  # holders not registered in the model: named after a sharing layer
        if isinstance(m, _DclsNd) and id(m.positions_owner()) not in seen:
            owners[name] = m.positions_owner()
            seen.add(id(owners[name]))
    return owners


def position_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Distinct DCLS position parameters (``P`` and ``SIG``) of ``model``."""
    return [t for o in position_owners(model).values() for t in (o.P, o.SIG) if t is not None]


def clamp_positions_(model: nn.Module) -> int:
    """Clamp every DCLS position tensor of ``model`` once (shared ones included) onto its grid.

    Returns:
        The number of distinct position tensors clamped.
    """
    owners = position_owners(model)
    for owner in owners.values():
        owner.clamp_parameters()
    return len(owners)
