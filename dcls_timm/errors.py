"""User-facing errors shared by train.py and validate.py: shown as one line, without a traceback."""
import difflib
import sys
from typing import Callable, Tuple, Type

import timm

__all__ = ['ConfigError', 'check_model_name', 'run_cli']


class ConfigError(ValueError):
    """A configuration or data problem the user must fix."""


def check_model_name(name: str) -> None:
    """Raise a ConfigError naming close matches if ``name`` is not a registered timm model."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ''
        raise ConfigError(f"Unknown model '{name}'.{hint} (timm.list_models() lists them all.)")


def run_cli(main: Callable[[], object], prog: str, errors: Tuple[Type[BaseException], ...] = ()) -> None:
    """Run a script's ``main``; user-facing errors become one ``prog: error: ...`` line and exit status 2."""
    try:
        main()
    except (ConfigError, FileNotFoundError, *errors) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        sys.exit(2)
