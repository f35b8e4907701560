"""Building objects from config nodes with ``_target_``, with errors that name the key at fault."""

from __future__ import annotations

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

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
        raise ConfigError(f"cannot build {key} from {OmegaConf.to_container(node)}: {one_line(err)}") from err
