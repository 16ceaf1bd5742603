"""The resumable results file of validate.py: finished units saved atomically, and refused when it belongs to another
evaluation (other weights, model, preprocessing, precision or image size).

A *unit* is what is saved at once: a suite (``imagenet``, ``sketch``, ...), a companion subset of clean ImageNet
(``imagenet/imagenet-a-classes``) or one ImageNet-C cell (``imagenet-c/<corruption>/<severity>``). Its record keeps
the summed counts (top-1/top-5 hits, loss sum, images, skipped images), from which every number of the results (top-1,
CE, mCE, ...) is recomputed, so a resumed run gives exactly the numbers of an uninterrupted one.
"""
import hashlib
import json
import os
import tempfile
from typing import Any, Dict, Iterable, List, Optional

import torch

from dcls_timm.errors import ConfigError

__all__ = ['FORMAT', 'ResultsStore', 'atomic_write_text', 'weights_digest', 'file_digest', 'describe_differences',
           'OVERWRITE_HINT']

FORMAT = 'dcls_timm.validate/2'
OVERWRITE_HINT = 'use another --results-file, or --overwrite to discard it and start afresh'


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash at any point leaves either the old or the new file, never a mix:
    a temporary file in the same folder, flushed and fsync'ed, then ``os.replace`` and an fsync of the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.partial')
    try:
        with os.fdopen(fd, 'w', newline='') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes and bytes): the identity of the evaluated weights,
    whatever file (or EMA slot, or pretrained tag) they came from."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to('cpu').contiguous()
        h.update(f'{name}|{t.dtype}|{tuple(t.shape)}\n'.encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def _flatten(value: Any, prefix: str = '') -> Dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f'{prefix}.{k}' if prefix else str(k)))
        return out
    return {prefix: value}


def _short(value: Any) -> str:
    text = json.dumps(value)
    if isinstance(value, str) and len(value) == 64 and all(c in '0123456789abcdef' for c in value):
        return value[:12] + '...'  # a digest
    return text if len(text) <= 60 else text[:57] + '...'


def describe_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """``key saved -> current`` for every flattened key whose value differs."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k} {_short(a.get(k))} -> {_short(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _normalise(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists, ...), so saved and current compare equal."""
    return json.loads(json.dumps(value, default=repr))


class ResultsStore:
    """The JSON file the finished units go to (the results file, or ``<results-file>.progress.json`` next to a CSV).

    ``load`` (rank 0) reads an existing file and refuses, with one line, a file of another evaluation; every ``save``
    rewrites the whole file atomically. Without a path nothing is saved (the run cannot be resumed).
    """

    def __init__(self, path: str, fingerprint: Dict[str, Any], overwrite: bool = False):
        self.path = path
        self.fingerprint = _normalise(fingerprint)
        self.overwrite = overwrite
        self.units: Dict[str, Dict[str, Any]] = {}
        self.suite_info: Dict[str, Dict[str, Any]] = {}

    def load(self) -> Dict[str, Any]:
        """The saved document if the file exists and belongs to the same evaluation ({} if there is none, or with
        ``overwrite``); its finished ``units`` and per-suite settings are kept for :meth:`check_suite`."""
        if not self.path or self.overwrite or not os.path.exists(self.path):
            return {}
        name = self.path
        try:
            with open(self.path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f'{name} exists but is not a readable validate.py results file ({e}): '
                              f'{OVERWRITE_HINT}') from None
        if not isinstance(saved, dict) or saved.get('format') != FORMAT or 'fingerprint' not in saved:
            raise ConfigError(f'{name} exists but holds no resumable validate.py results (written by another '
                              f'program or version): {OVERWRITE_HINT}')
        diffs = describe_differences(saved['fingerprint'], self.fingerprint)
        if diffs:
            raise ConfigError(f'{name} holds results of another evaluation ({"; ".join(diffs[:4])}'
                              f'{"; ..." if len(diffs) > 4 else ""}): {OVERWRITE_HINT}')
        self.units = dict(saved.get('units') or {})
        self.suite_info = dict(saved.get('suite_info') or {})
        return saved

    def check_suite(self, suite: str, info: Dict[str, Any], must_match: Iterable[str]) -> Optional[str]:
        """Compare the settings of ``suite`` with those its saved units were evaluated with: a ConfigError if a key
        of ``must_match`` differs (never mixed), else a warning text for any other difference (e.g. the data moved),
        or None. Records ``info`` for the next save."""
        info = _normalise(info)
        saved = self.suite_info.get(suite)
        has_units = any(_unit_suite(k) == suite for k in self.units)
        self.suite_info[suite] = info
        if saved is None or not has_units:
            return None
        hard = [k for k in must_match if saved.get(k) != info.get(k)]
        if hard:
            diffs = '; '.join(f'{k} {_short(saved.get(k))} -> {_short(info.get(k))}' for k in hard)
            raise ConfigError(f'{self.path} holds {suite} results of other data or settings ({diffs}): '
                              f'{OVERWRITE_HINT}')
        soft = [k for k in sorted(set(saved) | set(info)) if saved.get(k) != info.get(k)]
        if soft:
            return (f'{suite}: continuing the saved units although ' +
                    '; '.join(f'{k} was {_short(saved.get(k))}, now {_short(info.get(k))}' for k in soft))
        return None

    def save(self, document: Dict[str, Any]) -> None:
        if self.path:
            atomic_write_text(self.path, json.dumps(document, indent=2) + '\n')


def _unit_suite(key: str) -> str:
    return key.split('/', 1)[0]
