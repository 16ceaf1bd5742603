"""Progress of a long evaluation (a bar or periodic log lines) and stopping it cleanly on SIGTERM/SIGINT."""
import logging
import signal
import sys
import time
from typing import Optional

__all__ = ['StopRequest', 'UnitProgress', 'format_duration']

_logger = logging.getLogger('validate')


def format_duration(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f'{h}:{m:02d}:{s:02d}'


class StopRequest:
    """Records SIGTERM (Slurm pre-emption, ``kill``) and SIGINT (Ctrl-C) instead of dying at once.

    The evaluation polls :meth:`is_set` between batches, drops the unit it is in and stops; everything finished is
    already saved. A second signal stops at once (KeyboardInterrupt). ``install`` only works in the main thread
    (elsewhere it does nothing); ``restore`` puts the previous handlers back.
    """
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def is_set(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ''

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> 'StopRequest':
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class UnitProgress:
    """Progress of one unit (a suite or an ImageNet-C cell): a tqdm bar on an interactive terminal, otherwise a log
    line every ``interval`` seconds, with images/s and ETA. Disabled (``enabled=False``) on ranks other than 0.

    ``update(n)`` takes the number of images done since the last call, counted over all ranks (the caller scales
    its own count by the world size).
    """

    def __init__(self, label: str, total: int, enabled: bool = True, interval: float = 30.0,
                 interactive: Optional[bool] = None):
        self.label, self.total, self.enabled, self.interval = label, total, enabled, interval
        self.done = 0
        self.start = self._last_log = time.perf_counter()
        self._bar = None
        if not enabled:
            return
        if interactive is None:
            interactive = sys.stderr.isatty()
        if interactive:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=label, unit='img', unit_scale=False, leave=False,
                                 dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int) -> None:
        if not self.enabled:
            return
        n = min(n, self.total - self.done)
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if self.interval > 0 and now - self._last_log >= self.interval and self.done < self.total:
            self._last_log = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            _logger.info(f'{self.label}: {self.done}/{self.total} images, {rate:.1f} img/s, '
                         f'ETA {format_duration(eta)}')

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
