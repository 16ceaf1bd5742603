"""Freed CPU memory kept for reuse (glibc): no page faults for each new activation-sized tensor.

glibc's ``malloc`` serves blocks above its mmap threshold (at most 32 MB, 128 KB to start with) with fresh ``mmap``
pages and returns them to the kernel on ``free``: every training step then faults in, page by page, the memory of
every large activation and gradient again. On a small VM that can be a large share of a CPU step.
:func:`keep_freed_memory` makes glibc serve large blocks from its heap and never trim it, so the next step reuses
what the last one freed: the process keeps its peak memory instead of returning it between steps. ``train.py`` and ``validate.py`` do this on CPU unless told ``--no-keep-cpu-memory``; for other
programs, ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647`` is the same setting.

Measured with ``python scripts/benchmark_cpu_memory.py`` (README, docs/benchmarks.md): CCNN-4,140 sMNIST training
steps 1.9x and ConvNeXt-T-dcls ones 1.24x faster on the 2-core VM in an hour when page faults were slow; as fast as
without in an hour when they were not.
"""
import ctypes
import ctypes.util
from typing import Optional

__all__ = ['keep_freed_memory', 'freed_memory_kept', 'TUNABLES']

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt takes an int: trim only a free top of the heap above 2 GB
TUNABLES = f'glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={_TRIM_THRESHOLD}'

_STATE: Optional[bool] = None


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt is absent or does nothing
        libc.mallopt
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every block from its heap (no ``mmap``) and keep what is freed for reuse (no
    trimming), for the rest of the process and the processes it forks (data-loader workers). Idempotent.

    Returns:
        True where glibc accepted the settings; False elsewhere (macOS, Windows, musl), where nothing changes.
    """
    global _STATE
    if _STATE is None:
        libc = _glibc()
        _STATE = libc is not None and libc.mallopt(_M_MMAP_MAX, 0) == 1 \
            and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    return _STATE


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` took effect in this process."""
    return bool(_STATE)
