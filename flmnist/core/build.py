"""Building objects from config nodes with ``_target_``, with errors that name the key at fault."""

from __future__ import annotations

import re

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from flmnist.core.checks import settings_of
from flmnist.core.errors import ConfigError


def one_line(text) -> str:
    """Hydra's multi-line messages as one line (without the config search path)."""
    text = str(text).split("Config search path:", 1)[0]
    return " ".join(text.split())


def build(node: DictConfig, key: str, **kwargs):
    """``hydra.utils.instantiate`` that reports our own errors with the key at fault."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, TypeError) and (message := _not_taken(node, key, str(err))):
            raise ConfigError(message) from None
        raise ConfigError(f"cannot build {key} from {OmegaConf.to_container(node)}: {one_line(err)}") from err


def _not_taken(node: DictConfig, key: str, error: str) -> str | None:
    """``key.sub.name: Class takes no setting 'name' ...`` for settings the class at fault does not
    take (a switched ``_target_`` keeps the old class's settings), or None."""
    match = re.search(r"full_key: (\S+)", error)
    path = match.group(1) if match else key
    relative = path.removeprefix(key).lstrip(".")
    sub = OmegaConf.select(node, relative) if relative else node
    try:
        takes = settings_of(get_class(sub._target_))
    except Exception:  # noqa: BLE001 - no better message than Hydra's
        return None
    extra = [k for k in sub if k != "_target_" and k not in (takes or ())]
    if takes is None or not extra:
        return None
    takes, name = ", ".join(takes) or "none", sub._target_.rsplit(".", 1)[-1]
    return (f"{path}.{extra[0]}: {name} takes no setting {extra[0]!r} (its settings: {takes}); drop it with "
            f"~{path}.{extra[0]}")
