"""Parameter checks shared by every settings object: each constructor checks its own values
with these, and a bad value becomes one ConfigError naming the setting and what is allowed."""

from __future__ import annotations

import inspect
import math

from flmnist.core.errors import ConfigError


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if high == math.inf:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_number(key: str, value, low: float = 0.0, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = False, allow_none: bool = False) -> float | None:
    """``value`` as a float if it is a finite real number in the interval (or None when allowed),
    else a ConfigError naming ``key``."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        raise ConfigError(f"{key} must be a finite number {_interval(low, high, low_open, high_open)}"
                          f"{' or null' if allow_none else ''}, got {value!r}")
    return float(value)


def check_integer(key: str, value, low: int, allow_none: bool = False, high: int | None = None) -> int | None:
    """``value`` if it is an integer in ``low..high`` (or None when allowed), else a ConfigError naming ``key``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key} must be an integer >= {low}{' or null' if allow_none else ''}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{key} must be at most {high}, got {value}")
    if value >= 2**63:  # (a Flower message, PyTorch's seed and NumPy's sizes take 64-bit integers)
        raise ConfigError(f"{key} must be below 2**63, got {value}")
    return value


SEED_STYLES = ("seed002", "seed000")  # ``eval.style``: how the global model's evaluation is printed


def check_style(style: str) -> str:
    """``style`` if it is one of :data:`SEED_STYLES`, else a ConfigError naming ``eval.style``."""
    if style not in SEED_STYLES:
        raise ConfigError(f"eval.style must be one of {', '.join(SEED_STYLES)}, got {style!r}")
    return style


def check_writable_folder(key: str, value) -> None:
    """The folder ``value`` exists or can be made, and can be written to; else a ConfigError naming
    ``key`` (Hydra made the run's directory there first and failed with a traceback)."""
    import os
    from pathlib import Path

    path = Path(str(value)).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        why = "a file is in its path" if isinstance(err, (FileExistsError, NotADirectoryError)) else err.strerror or err
        raise ConfigError(f"{key}={value}: cannot create the folder ({why}); "
                          f"give {key} a folder you can write to") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={value}: the folder is not writable; give {key} a folder you can write to")


def settings_of(cls) -> list[str] | None:
    """The keyword settings ``cls`` takes (its constructor's parameters); None if it takes any (``**kwargs``)."""
    parameters = inspect.signature(cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind is not p.VAR_POSITIONAL]
