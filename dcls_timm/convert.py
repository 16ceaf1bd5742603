"""DCLS for any model: replace the convolutions of an ``nn.Module`` (timm, torchvision or your own) by DCLS layers.

:func:`convert_to_dcls` swaps the convolutions a rule selects (depthwise only or all, kernel sizes, name patterns)
for :class:`~dcls_timm.layers.Dcls1d`/``Dcls2d``/``Dcls3d`` layers in place, optionally sharing positions between
the layers of one width, and returns a :class:`DclsConversion` summary. The converted model works with everything
that finds DCLS layers through :func:`~dcls_timm.layers.position_owners`: the DCLS recipe (position groups with
lr x 5, clamping, repulsive loss) in train.py, EMA, checkpoints.

:func:`share_layer_positions` is the checkpoint side: it collapses per-layer copies of shared positions (the layout
of the DCLS authors' files, which repeat a shared tensor under every layer) into the model's shared holders.
"""
import fnmatch
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from dcls_timm.checkpoint import POSITION_ATOL, CheckpointMismatchError
from dcls_timm.errors import ConfigError
from dcls_timm.layers import Dcls1d, Dcls2d, Dcls3d, DclsPositions, share_positions
from dcls_timm.layers.kernel import DCLS_VERSIONS

__all__ = ['convert_to_dcls', 'DclsConversion', 'ConversionError', 'share_layer_positions', 'HOLDER_NAME']

# name under which a shared DclsPositions is registered (``dcls_positions``, ``dcls_positions_1``, ...)
HOLDER_NAME = 'dcls_positions'

_DCLS_CLASSES = {1: Dcls1d, 2: Dcls2d, 3: Dcls3d}
_CONV_CLASSES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# modules whose forward runs (or whose iteration yields) every child: no place for a positions holder
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)

Pattern = Union[str, 're.Pattern']
GridSize = Union[int, Sequence[int], Callable[[Tuple[int, ...]], Union[int, Sequence[int]]]]


class ConversionError(ConfigError):
    """The conversion cannot be done as asked: nothing matched, or a selected convolution is not supported."""


@dataclass
class DclsConversion:
    """What :func:`convert_to_dcls` did.

    Attributes:
        layers: Names of the replaced convolutions (now DCLS layers), in model order.
        kernel_count: Elements K per filter (given, or from the iso-parameter rule).
        kernel_count_rule: ``'given'`` or ``'iso-parameter'``.
        version: DCLS interpolation.
        grid_sizes: Dense grid D per replaced layer.
        position_holders: Each distinct position tensor: holder module name -> names of the layers using it (a
            layer that owns its positions is its own holder).
        params_before: Parameters of the model before (distinct tensors, as ``model.parameters()``).
        params_after: Parameters after.
        dense_weights: Weights of the replaced convolutions (their biases are kept either way).
        dcls_params: DCLS weights + distinct positions (and SIG) that replace them.
    """
    layers: List[str]
    kernel_count: int
    kernel_count_rule: str
    version: str
    grid_sizes: Dict[str, Tuple[int, ...]]
    position_holders: Dict[str, List[str]]
    params_before: int
    params_after: int
    dense_weights: int
    dcls_params: int
    _kinds: Dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def num_replaced(self) -> int:
        return len(self.layers)

    @property
    def param_change(self) -> int:
        """``params_after - params_before`` (negative: fewer parameters)."""
        return self.params_after - self.params_before

    @property
    def num_position_tensors(self) -> int:
        return len(self.position_holders)

    def __str__(self) -> str:
        kinds = ', '.join(f'{n} {k}' for k, n in self._kinds.items())
        grids = sorted({'x'.join(map(str, g)) for g in self.grid_sizes.values()})
        return (f'replaced {self.num_replaced} convolution(s) ({kinds}) by DCLS layers: K={self.kernel_count} '
                f'({self.kernel_count_rule}), version {self.version}, grid {", ".join(grids)}; '
                f'{self.num_position_tensors} position tensor(s); parameters {self.params_before:,} -> '
                f'{self.params_after:,} ({self.param_change:+,})')


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _as_patterns(patterns: Optional[Union[Pattern, Iterable[Pattern]]]) -> Optional[List[Pattern]]:
    if patterns is None:
        return None
    if isinstance(patterns, (str, re.Pattern)):
        return [patterns]
    return list(patterns)


def _name_matches(name: str, patterns: List[Pattern]) -> bool:
    for p in patterns:
        if isinstance(p, re.Pattern):
            if p.search(name):
                return True
        elif fnmatch.fnmatchcase(name, p):
            return True
    return False


def _is_depthwise(conv: nn.Module) -> bool:
    return conv.groups == conv.in_channels > 1


def _kernel_size_set(kernel_sizes, ndim: int) -> Optional[set]:
    if kernel_sizes is None:
        return None
    if isinstance(kernel_sizes, int):
        kernel_sizes = [kernel_sizes]
    out = set()
    for k in kernel_sizes:
        out.add((k,) * ndim if isinstance(k, int) else tuple(k))
    return out


def _grid_size(dilated_kernel_size: GridSize, conv: nn.Module, name: str) -> Tuple[int, ...]:
    ndim = conv.weight.dim() - 2
    size = dilated_kernel_size(tuple(conv.kernel_size)) if callable(dilated_kernel_size) else dilated_kernel_size
    size = (size,) * ndim if isinstance(size, int) else tuple(size)
    if len(size) != ndim or not all(isinstance(s, int) and s >= 1 for s in size):
        raise ConversionError(f'dilated_kernel_size for {name} (kernel {tuple(conv.kernel_size)}) must be a '
                              f'positive int or {ndim} of them, got {size!r}.')
    return size


def _unsupported(name: str, conv: nn.Module) -> Optional[str]:
    """Why ``conv`` cannot become a DCLS layer with the same output size, or None."""
    if any(d != 1 for d in conv.dilation):
        return f'{name} has dilation {tuple(conv.dilation)} (DCLS learns the spacing itself; only dilation 1)'
    if getattr(conv, 'transposed', False):
        return f'{name} is a transposed convolution'
    if all(s == 1 for s in conv.stride):
        # a stride-1 conv is replaced with "same" padding: it must keep the size itself
        if isinstance(conv.padding, str):
            if conv.padding == 'valid' and any(k != 1 for k in conv.kernel_size):
                return f"{name} has padding='valid', which shrinks its output; the DCLS layer pads 'same'"
        elif any(2 * p != k - 1 for p, k in zip(conv.padding, conv.kernel_size)):
            return (f'{name} has padding {tuple(conv.padding)} with kernel {tuple(conv.kernel_size)}, which does '
                    "not keep the size; the DCLS layer pads 'same'")
    return None


def _strided_padding(name: str, conv: nn.Module, grid: Tuple[int, ...]) -> Tuple[Tuple[int, ...], Optional[str]]:
    """The padding of a strided conv's DCLS layer that keeps the conv's output size for every input size, and why
    none does (or None): ``p + (D - k) / 2`` per axis, so ``2p - D == 2p0 - k``, which needs ``D - k`` even.
    Stride-1 convs pad 'same' instead (any D): ``((), None)``."""
    if all(s == 1 for s in conv.stride):
        return (), None
    before = (0,) * len(grid) if isinstance(conv.padding, str) else tuple(conv.padding)  # strided: only 'valid'
    pads = []
    for p, k, d in zip(before, conv.kernel_size, grid):
        if (d - k) % 2 or p + (d - k) // 2 < 0:
            return (), (f'{name} (kernel {tuple(conv.kernel_size)}, stride {tuple(conv.stride)}, padding {before}) '
                        f'cannot keep its output size with a grid of {tuple(grid)}')
        pads.append(p + (d - k) // 2)
    return tuple(pads), None


def _refuse(reasons: Sequence[Optional[str]], advice: str) -> None:
    """One ``ConversionError`` naming the layers that cannot be converted (their reasons), if any."""
    problems = [r for r in reasons if r]
    if problems:
        raise ConversionError('cannot convert: ' + '; '.join(problems[:4]) +
                              (f' ... ({len(problems)} in all)' if len(problems) > 4 else '') + f'. {advice}')


def _holder_parent(name: str, modules: Dict[str, nn.Module]) -> str:
    """Where the positions of a group whose first layer is ``name`` live: the nearest ancestor that is not a
    container (``nn.Sequential`` runs every child, ``ModuleList``/``ModuleDict`` iterate them), else the layer."""
    parts = name.split('.')
    for i in range(len(parts) - 1, -1, -1):
        parent = '.'.join(parts[:i])
        if not isinstance(modules[parent], _CONTAINERS):
            return parent
    return name


def _free_name(module: nn.Module) -> str:
    taken = set(dict(module.named_children())) | set(module._parameters) | set(module._buffers)
    taken |= set(vars(module))
    name, i = HOLDER_NAME, 0
    while name in taken or hasattr(type(module), name):
        i += 1
        name = f'{HOLDER_NAME}_{i}'
    return name


def _join(prefix: str, name: str) -> str:
    return f'{prefix}.{name}' if prefix else name


def convert_to_dcls(
        model: nn.Module,
        dilated_kernel_size: GridSize,
        kernel_count: Optional[int] = None,
        *,
        layers: Union[str, Callable[[str, nn.Module], bool]] = 'depthwise',
        kernel_sizes: Optional[Iterable[Union[int, Sequence[int]]]] = None,
        include: Optional[Union[Pattern, Iterable[Pattern]]] = None,
        exclude: Optional[Union[Pattern, Iterable[Pattern]]] = None,
        version: str = 'v1',
        position_sharing: Union[str, Callable[[str, nn.Module], Optional[Hashable]]] = 'width',
        keep_bias: bool = False,
        weight_std: float = 0.02,
) -> DclsConversion:
    """Replace the convolutions of ``model`` that a rule selects by DCLS layers, in place.

    Each selected ``nn.Conv1d``/``Conv2d``/``Conv3d`` becomes a ``Dcls1d``/``Dcls2d``/``Dcls3d`` with the same
    channels, groups, stride, bias (present or not) and padding mode, a dense grid of ``dilated_kernel_size`` and
    ``kernel_count`` learnable-position elements per filter. Padding: stride-1 convolutions (which must keep their
    input size) get "same" padding (``D // 2`` before, ``D - 1 - D // 2`` after); strided ones ``D // 2`` on each
    side, which gives the output size of a "same"-padded odd kernel.

    Initialisation, as the DCLS authors' models (not the replaced weights: a dense kernel has no K-element
    equivalent): weight normal(0, ``weight_std``), bias 0 (or the convolution's bias with ``keep_bias``),
    positions normal(0, 0.5) clamped to the grid, SIG 0.23 for ``gauss``.

    Args:
        model: Any module; modified in place (its convolutions are swapped, shared-position holders added).
        dilated_kernel_size: Grid size D: an int (every axis), one int per axis, or a function of the replaced
            conv's kernel size (a tuple, e.g. ``lambda k: 2 * k[0] + 3``) returning either.
        kernel_count: Elements K per filter. None: the iso-parameter rule, the largest K whose DCLS weights and
            positions (shared tensors counted once; SIG too for ``gauss``) do not exceed the dense weights replaced.
        layers: ``'depthwise'`` (groups == in_channels > 1, the default), ``'all'``, or a function
            ``(name, conv) -> bool``.
        kernel_sizes: Only convs with these kernel sizes (ints for square/cubic kernels, or tuples); default every
            kernel larger than 1 along some axis.
        include: Only convs whose module name matches one of these patterns: fnmatch strings
            (``'stages.[01].*'``), or compiled regexes (``re.compile(r'^layer[34]\\.')``, searched).
        exclude: Skip convs whose name matches one of these patterns.
        version: ``'v0'`` (bilinear), ``'v1'`` (normalised triangle) or ``'gauss'``.
        position_sharing: ``'width'``: the first selected conv of each width (same channels, grid and version)
            owns P (and SIG) and every later conv of that width reuses it, as the DCLS authors' models;
            ``'layer'``: every layer owns its positions; or a function ``(name, conv) -> key`` (layers with the
            same key share, None owns its own). A shared tensor lives in a ``DclsPositions`` module registered as
            ``dcls_positions`` on the nearest ancestor of the group's first layer that is not an
            ``nn.Sequential``/``ModuleList``/``ModuleDict`` (or on that layer, if there is none), so optimizers,
            EMA and state dicts see it once.
        keep_bias: Copy the convolution's bias instead of zeroing it.
        weight_std: Std of the normal init of the DCLS weights.

    Returns:
        A :class:`DclsConversion` (replaced layers, K, position holders, parameter counts; ``print`` it).

    Raises:
        ConversionError: nothing matched (with what was found), a selected conv is unsupported (dilation > 1, a
            stride-1 padding that does not keep the size), the iso-parameter rule gives K < 1, or bad arguments.

    Example::

        summary = convert_to_dcls(model, dilated_kernel_size=17, kernel_count=34, kernel_sizes=[7])
        print(summary)  # replaced 18 convolution(s) (18 Conv2d) by DCLS layers: K=34 ...
    """
    if version not in DCLS_VERSIONS:
        raise ConversionError(f"version must be one of {', '.join(DCLS_VERSIONS)}, got '{version}'.")
    if isinstance(layers, str) and layers not in ('depthwise', 'all'):
        raise ConversionError(f"layers must be 'depthwise', 'all' or a function (name, conv) -> bool, got "
                              f"'{layers}'.")
    if isinstance(position_sharing, str) and position_sharing not in ('width', 'layer'):
        raise ConversionError(f"position_sharing must be 'width', 'layer' or a function (name, conv) -> key, got "
                              f"'{position_sharing}'.")
    if kernel_count is not None and (not isinstance(kernel_count, int) or kernel_count < 1):
        raise ConversionError(f'kernel_count must be a positive int or None (iso-parameter rule), got '
                              f'{kernel_count!r}.')
    if isinstance(model, _CONV_CLASSES):
        raise ConversionError('the model itself is a convolution: wrap it in a module (it is replaced in place).')
    include_p, exclude_p = _as_patterns(include), _as_patterns(exclude)

    modules = dict(model.named_modules())
    convs = [(n, m) for n, m in modules.items() if isinstance(m, _CONV_CLASSES)]
    selected = []
    for name, conv in convs:
        ndim = conv.weight.dim() - 2
        if callable(layers) and not isinstance(layers, str):
            if not layers(name, conv):
                continue
        elif layers == 'depthwise' and not _is_depthwise(conv):
            continue
        sizes = _kernel_size_set(kernel_sizes, ndim)
        if sizes is None:
            if all(k == 1 for k in conv.kernel_size):
                continue
        elif tuple(conv.kernel_size) not in sizes:
            continue
        if include_p is not None and not _name_matches(name, include_p):
            continue
        if exclude_p is not None and _name_matches(name, exclude_p):
            continue
        selected.append((name, conv))

    if not selected:
        found = ', '.join(f'{n} ({type(c).__name__} {"x".join(map(str, c.kernel_size))}, groups {c.groups})'
                          for n, c in convs[:6]) + (f' ... ({len(convs)} in all)' if len(convs) > 6 else '')
        rule = (f"layers={layers if isinstance(layers, str) else 'function'}, kernel_sizes={kernel_sizes}, "
                f'include={include}, exclude={exclude}')
        raise ConversionError(f'no convolution of {type(model).__name__} matches ({rule}); '
                              f"its convolutions: {found or 'none'}.")
    _refuse([_unsupported(n, c) for n, c in selected],
            'Leave such layers out with exclude=[...] or a narrower include/layers rule.')

    # grids and sharing groups (the group key fixes the position shape whatever K is)
    grids = {name: _grid_size(dilated_kernel_size, conv, name) for name, conv in selected}
    _refuse([_strided_padding(n, c, grids[n])[1] for n, c in selected],
            "Give those layers a grid of their kernel's parity, or leave them out with exclude=[...].")
    groups: 'OrderedDict[Hashable, List[str]]' = OrderedDict()
    for name, conv in selected:
        if position_sharing == 'layer':
            key = None
        elif position_sharing == 'width':
            key = (conv.weight.dim() - 2, conv.out_channels, conv.in_channels // conv.groups, grids[name])
        else:
            key = position_sharing(name, conv)
        groups.setdefault(('own', name) if key is None else ('shared', key), []).append(name)

    by_name = dict(selected)

    def shape(n):
        c = by_name[n]
        return c.weight.dim() - 2, c.out_channels, c.in_channels // c.groups, grids[n]

    for members in groups.values():
        odd = [m for m in members if shape(m) != shape(members[0])]
        if odd:
            raise ConversionError(
                f'position_sharing puts {members[0]} and {odd[0]} in one group, but their positions differ in shape '
                f'(ndim, C_out, C_in/groups, grid: {shape(members[0])} vs {shape(odd[0])}).')
    tensors = 2 if version == 'gauss' else 1
    dense_weights = sum(conv.weight.numel() for _, conv in selected)
    per_element = sum(conv.out_channels * conv.in_channels // conv.groups for _, conv in selected)
    for members in groups.values():
        first = by_name[members[0]]
        per_element += tensors * (first.weight.dim() - 2) * first.out_channels * first.in_channels // first.groups
    rule = 'given'
    if kernel_count is None:
        rule = 'iso-parameter'
        kernel_count = dense_weights // per_element
        if kernel_count < 1:
            raise ConversionError(
                f'the iso-parameter rule gives K = 0: the {dense_weights:,} dense weights replaced are fewer than '
                f'the {per_element:,} DCLS parameters of one element per filter; give kernel_count.')

    params_before = _count_params(model)
    new: Dict[int, nn.Module] = {}
    new_by_name: Dict[str, nn.Module] = {}
    kinds: Dict[str, int] = {}
    for name, conv in selected:
        ndim = conv.weight.dim() - 2
        grid = grids[name]
        stride = tuple(conv.stride)
        padding = 'same' if all(s == 1 for s in stride) else _strided_padding(name, conv, grid)[0]
        cls = _DCLS_CLASSES[ndim]
        layer = cls(
            conv.in_channels, conv.out_channels, kernel_count, stride=stride, padding=padding,
            dilated_kernel_size=grid, groups=conv.groups, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, version=version, device=conv.weight.device, dtype=conv.weight.dtype)
        layer.train(conv.training)
        with torch.no_grad():
            nn.init.normal_(layer.weight, 0., weight_std)
            if layer.bias is not None:
                if keep_bias:
                    layer.bias.copy_(conv.bias)
                else:
                    nn.init.zeros_(layer.bias)
        layer.weight.requires_grad_(conv.weight.requires_grad)
        new[id(conv)] = layer
        new_by_name[name] = layer
        kinds[type(conv).__name__] = kinds.get(type(conv).__name__, 0) + 1

    # swap every reference held by a parent (a conv registered twice is replaced in both places)
    for module in list(model.modules()):
        for child_name, child in list(module._modules.items()):
            if child is not None and id(child) in new:
                module._modules[child_name] = new[id(child)]

    modules = dict(model.named_modules())
    holders: Dict[str, List[str]] = {}
    for (kind, _), members in groups.items():
        if kind == 'own' or len(members) == 1:
            for m in members:
                holders[m] = [m]
            continue
        holder = share_positions([new_by_name[m] for m in members])
        parent_name = _holder_parent(members[0], modules)
        parent = modules[parent_name]
        attr = _free_name(parent)
        parent.add_module(attr, holder)
        holders[_join(parent_name, attr)] = list(members)

    return DclsConversion(
        layers=[n for n, _ in selected], kernel_count=kernel_count, kernel_count_rule=rule, version=version,
        grid_sizes=grids, position_holders=holders, params_before=params_before,
        params_after=_count_params(model), dense_weights=dense_weights, dcls_params=kernel_count * per_element,
        _kinds=kinds)


def _holders_of(model: nn.Module) -> Dict[str, List[str]]:
    """Registered shared holders of ``model`` -> names of the DCLS layers using them, in model order."""
    names = {id(m): n for n, m in model.named_modules()}
    out: Dict[str, List[str]] = {}
    for name, m in model.named_modules():
        shared = getattr(m, '_shared_positions', None) if not isinstance(m, DclsPositions) else None
        if shared is not None and id(shared[0]) in names:
            out.setdefault(names[id(shared[0])], []).append(name)
    return out


def share_layer_positions(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        hint: str = 'build the model with per-layer positions',
) -> Dict[str, torch.Tensor]:
    """Collapse per-layer copies of shared positions (``<layer>.P``/``.SIG``) into the model's shared holders.

    The DCLS authors' files repeat a shared tensor under every layer that uses it. For each shared holder of
    ``model`` (a registered ``DclsPositions``), the copies of its layers that the model does not hold are checked
    to agree within :data:`~dcls_timm.checkpoint.POSITION_ATOL` (with the holder's own key, if present) and the
    first is loaded into ``<holder>.P``/``.SIG``; copies that disagree raise ``CheckpointMismatchError``. Everything
    else passes unchanged (this project's own layout is left as it is).

    Args:
        state_dict: Weights in the model's naming.
        model: The model to load into.
        hint: The fix to name when copies disagree (e.g. the model argument for per-layer positions).
    """
    model_keys = set(model.state_dict())
    out = dict(state_dict)
    problems = []
    for holder, members in _holders_of(model).items():
        for attr in ('P', 'SIG'):
            target = _join(holder, attr)
            if target not in model_keys:
                continue
            copies = [(target, out[target])] if target in out else []
            for m in members:
                key = _join(m, attr)
                if key in out and key not in model_keys:
                    copies.append((key, out.pop(key)))
            if not copies:
                continue
            first_key, first = copies[0]
            differ, worst = [], 0.
            for key, v in copies[1:]:
                gap = math.inf if v.shape != first.shape else (v.float() - first.float()).abs().max().item()
                if not gap <= POSITION_ATOL:
                    differ.append(key.rsplit('.', 1)[0])
                    worst = max(worst, gap) if gap == gap else math.inf
            if differ:
                shown = ', '.join(differ[:4]) + (f' ... ({len(differ)} in all)' if len(differ) > 4 else '')
                problems.append(f'{shown} differ from {first_key.rsplit(".", 1)[0]} by up to {worst:.3g}')
            out[target] = first
    if problems:
        raise CheckpointMismatchError(
            'the checkpoint holds different positions for layers this model shares them between ('
            + '; '.join(problems) + f'): {hint}')
    return out
