"""User-facing errors shared by train.py and validate.py: shown as one line, without a traceback."""
import difflib
import sys
from typing import Callable, Optional, Tuple, Type

import timm

__all__ = ['ConfigError', 'UnreadableImageError', 'Interrupted', 'check_model_name', 'run_cli']


class ConfigError(ValueError):
    """A configuration or data problem the user must fix."""


class UnreadableImageError(ConfigError):
    """An image file that cannot be opened or decoded: ``cannot read image <path> (<reason>)``.

    Takes one message string, so a DataLoader worker's exception is re-raised in the main process as this type. The
    worker re-raise passes the whole worker traceback as the message; only its last ``cannot read image`` line is
    kept, so the error stays one line.
    """
    PREFIX = 'cannot read image '

    def __init__(self, message: str, path: Optional[str] = None):
        if '\n' in message:  # DataLoader's "Caught ... in DataLoader worker process N.\nOriginal Traceback ..."
            found = [line for line in message.splitlines() if self.PREFIX in line]
            if found:
                message = found[-1][found[-1].index(self.PREFIX):]
        super().__init__(message)
        self.path = path

    @classmethod
    def from_exception(cls, path: str, exc: BaseException) -> 'UnreadableImageError':
        """The error for ``path``, with the reason from PIL's (or the OS's) exception, without the file repeated."""
        reason = str(exc)
        if type(exc).__name__ == 'UnidentifiedImageError' or reason.startswith('cannot identify image file'):
            reason = 'cannot identify image file'
        elif isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror  # e.g. 'No such file or directory', 'Permission denied'
        reason = ' '.join(reason.replace(repr(str(path)), '').split()) or type(exc).__name__
        return cls(f'{cls.PREFIX}{path} ({reason})', path=str(path))


class Interrupted(Exception):
    """A run stopped by a signal (SIGTERM, SIGINT) after saving what it finished; the message says how to go on.

    ``exit_status`` is the shell's convention for a process ended by that signal (128 + its number).
    """

    def __init__(self, message: str, exit_status: int = 1):
        super().__init__(message)
        self.exit_status = exit_status


def check_model_name(name: str) -> None:
    """Raise a ConfigError naming close matches if ``name`` is not a registered timm model."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ''
        raise ConfigError(f"Unknown model '{name}'.{hint} (timm.list_models() lists them all.)")


def run_cli(main: Callable[[], object], prog: str, errors: Tuple[Type[BaseException], ...] = ()) -> None:
    """Run a script's ``main``; user-facing errors become one ``prog: error: ...`` line and exit status 2, an
    :class:`Interrupted` run one ``prog: ...`` line and its own exit status."""
    try:
        main()
    except Interrupted as e:
        if str(e):  # under torchrun only rank 0 says it
            print(f'{prog}: {e}', file=sys.stderr)
        sys.exit(e.exit_status)
    except (ConfigError, FileNotFoundError, *errors) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        sys.exit(2)
