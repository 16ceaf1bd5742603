"""The ``imagecorruptions`` package (1.1.2, its last release) made to run on current NumPy, scikit-image and
setuptools, without changing its files.

Three things broke since its release: it imports ``pkg_resources`` (gone from setuptools >= 81) for the frost
textures, calls ``skimage.filters.gaussian(multichannel=True)`` (removed in scikit-image 0.19/0.21) in
``gaussian_blur`` and ``glass_blur``, and uses ``np.float_`` (removed in NumPy 2) in ``fog``. The adapters below
live in that package's module namespace only; NumPy, scikit-image and setuptools themselves are left as they are.
"""
import importlib
import inspect
import os
import sys
import types
from typing import Callable, Tuple

import numpy as np

__all__ = ['load_corrupt', 'INSTALL_HINT']

INSTALL_HINT = ('pip install --no-deps imagecorruptions==1.1.2 && '
                'pip install opencv-python-headless scikit-image scipy')


class _NumpyCompat(types.ModuleType):
    """NumPy with the aliases the package still uses."""

    def __init__(self):
        super().__init__('numpy')
        self.float_ = np.float64

    def __getattr__(self, name):
        return getattr(np, name)


def _gaussian_compat(gaussian: Callable) -> Callable:
    def wrapped(image, *args, multichannel=None, **kwargs):
        if multichannel is not None and 'channel_axis' not in kwargs:
            kwargs['channel_axis'] = -1 if multichannel else None
        return gaussian(image, *args, **kwargs)
    return wrapped


class _SeededUtil:
    """``skimage.util`` whose ``random_noise`` draws from NumPy's global state when given no generator: scikit-image
    >= 0.19 takes a fresh unseeded generator instead, which made ``impulse_noise`` differ on every run whatever the
    caller seeded (the other corruptions use ``np.random``)."""

    def __init__(self, util):
        self._util = util
        self._takes_rng = 'rng' in inspect.signature(util.random_noise).parameters

    def __getattr__(self, name):
        return getattr(self._util, name)

    def random_noise(self, image, *args, **kwargs):
        if self._takes_rng and kwargs.get('rng') is None:
            kwargs['rng'] = np.random.randint(2 ** 31)
        return self._util.random_noise(image, *args, **kwargs)


class _SeededSkimage:
    def __init__(self, sk):
        self._sk = sk
        self.util = _SeededUtil(sk.util)

    def __getattr__(self, name):
        return getattr(self._sk, name)


def _import_with_shims():
    injected = []
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        fake = types.ModuleType('pkg_resources')

        def resource_filename(package: str, path: str) -> str:
            return os.path.join(os.path.dirname(sys.modules[package].__file__), path)
        fake.resource_filename = resource_filename
        sys.modules['pkg_resources'] = fake
        injected.append('pkg_resources')
    import scipy.ndimage
    try:
        importlib.import_module('scipy.ndimage.interpolation')
    except ImportError:
        sys.modules['scipy.ndimage.interpolation'] = scipy.ndimage
        injected.append('scipy.ndimage.interpolation')
    try:
        package = importlib.import_module('imagecorruptions')
        module = importlib.import_module('imagecorruptions.corruptions')
    finally:
        for name in injected:  # the package keeps the functions it bound; nobody else sees the stand-ins
            sys.modules.pop(name, None)
    return package, module


def load_corrupt() -> Tuple[Callable, Tuple[str, ...]]:
    """``imagecorruptions.corrupt`` adapted to this environment, and the 19 corruption names.

    Raises:
        ImportError: with the install command when the package or its dependencies are missing.
    """
    try:
        package, module = _import_with_shims()
    except ImportError as e:
        raise ImportError(f'The corruption generator needs imagecorruptions and its dependencies ({e}). '
                          f'Install them with: {INSTALL_HINT}') from None
    if not getattr(module.gaussian, '_dcls_timm_compat', False):
        module.gaussian = _gaussian_compat(module.gaussian)
        module.gaussian._dcls_timm_compat = True
    if not hasattr(np, 'float_'):
        module.np = _NumpyCompat()
    if not isinstance(module.sk, _SeededSkimage):
        module.sk = _SeededSkimage(module.sk)
    names = tuple(f.__name__ for f in package.corruption_tuple)
    return package.corrupt, names
