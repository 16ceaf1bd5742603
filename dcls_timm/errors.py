"""User-facing errors shared by train.py and validate.py: shown as one line, without a traceback."""
import difflib

import timm

__all__ = ['ConfigError', 'check_model_name']


class ConfigError(ValueError):
    """A configuration or data problem the user must fix."""


def check_model_name(name: str) -> None:
    """Raise a ConfigError naming close matches if ``name`` is not a registered timm model."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ''
        raise ConfigError(f"Unknown model '{name}'.{hint} (timm.list_models() lists them all.)")
