"""Composing and checking the Hydra configuration in ``conf/``.

The composed config is the single source of truth for a run: the ServerApp
composes it from the overrides in the run config, the ``flmnist`` command from
its command line, and clients receive what they need inside each message.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flmnist.errors import ConfigError

GROUPS = ("model", "partition", "strategy", "client", "eval", "fleet", "experiment")
MNIST_TRAIN_SIZE = 60_000


def conf_dir() -> Path:
    """The ``conf/`` folder: ``$FLMNIST_CONF_DIR``, else the one beside the package."""
    path = Path(os.environ.get("FLMNIST_CONF_DIR") or Path(__file__).resolve().parents[1] / "conf")
    if not (path / "config.yaml").is_file():
        raise ConfigError(
            f"No config.yaml in {path}. Install flmnist from its repository with "
            "`pip install -e .` (the conf/ folder lives beside the package) or set FLMNIST_CONF_DIR."
        )
    return path


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files in ``conf/<group>/``."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def parse_overrides(text: str) -> list[str]:
    """Split the run config's ``overrides`` string into Hydra overrides."""
    try:
        return shlex.split(text or "")
    except ValueError as err:
        raise ConfigError(f"run config 'overrides' cannot be parsed ({err}): {text!r}") from err


def check_group_overrides(overrides: list[str]) -> None:
    """Fail early, listing the valid options, when an override names an unknown group option."""
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        key = key.removeprefix("override ").strip()
        if not sep or key not in GROUPS or value in ("null", ""):
            continue
        for choice in value.split(","):  # a multirun sweep lists several
            if choice not in group_options(key):
                raise ConfigError(
                    f"Unknown {key} '{choice}'. Valid options for {key}: "
                    f"{', '.join(group_options(key))}"
                )


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with ``overrides``, resolve it and check it."""
    overrides = list(overrides or [])
    check_group_overrides(overrides)
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir()), job_name="flmnist"):
        try:
            cfg = compose(config_name="config", overrides=overrides)
        except Exception as err:  # Hydra raises several types for bad overrides
            raise ConfigError(f"Bad override in {overrides}: {err}") from err
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    OmegaConf.resolve(cfg)
    validate(cfg)
    return cfg


def _positive(cfg: DictConfig, key: str, allow_none: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and allow_none:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{key} must be a positive number, got {value!r}")


def _fraction(cfg: DictConfig, key: str, allow_zero: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value <= 1):
        allowed = "[0, 1] (0 turns it off)" if allow_zero else "(0, 1]"
        raise ConfigError(f"{key} must be in {allowed}, got {value!r}")


def build(node: DictConfig, key: str, **kwargs):
    """``hydra.utils.instantiate`` that reports our own errors with the key at fault."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"Cannot build {key} from {OmegaConf.to_container(node)}: {err}") from err


def validate(cfg: DictConfig) -> None:
    """Check every setting a run depends on, before any training, naming the key at fault."""
    for key in ("num_nodes", "num_rounds", "client.batch_size", "client.eval_batch_size",
                "client.lr", "eval.batch_size", "round_timeout", "wait_for_nodes"):
        _positive(cfg, key)
    for key in ("num_nodes", "num_rounds", "client.batch_size"):
        if not isinstance(OmegaConf.select(cfg, key), int):
            raise ConfigError(f"{key} must be an integer, got {OmegaConf.select(cfg, key)!r}")
    _positive(cfg, "client.local_steps", allow_none=True)
    _positive(cfg, "poll_interval", allow_none=True)
    if cfg.client.local_steps is None:
        _positive(cfg, "client.local_epochs")
    for prefix in ("sampling", "strategy"):  # the documented keys, and a direct strategy override
        _fraction(cfg, f"{prefix}.fraction_train")
        _fraction(cfg, f"{prefix}.fraction_evaluate", allow_zero=True)
    _fraction(cfg, "target_accuracy")
    holdout = cfg.data.holdout_fraction
    if not 0 <= holdout < 1:
        raise ConfigError(f"data.holdout_fraction must be in [0, 1), got {holdout}")
    if holdout == 0 and (cfg.strategy.get("fraction_evaluate") or 0) > 0:
        raise ConfigError(
            "sampling.fraction_evaluate > 0 asks nodes to evaluate on held-out data, but "
            "data.holdout_fraction is 0: set one of them (fraction_evaluate=0 turns client evaluation off)"
        )
    if cfg.num_nodes > MNIST_TRAIN_SIZE:
        raise ConfigError(
            f"num_nodes={cfg.num_nodes} is more partitions than the {MNIST_TRAIN_SIZE} training examples"
        )
    if cfg.eval.every is not None:
        _positive(cfg, "eval.every")
    asynchronous = cfg.strategy._target_ in ("flmnist.strategies.FedAsync", "flmnist.strategies.FedBuff")
    if asynchronous:
        loop = cfg.async_loop
        for key in ("concurrency", "max_server_updates", "max_client_updates", "time_budget"):
            _positive(cfg, f"async_loop.{key}", allow_none=True)
        for key in ("eval_every", "update_timeout"):
            _positive(cfg, f"async_loop.{key}")
        if not (loop.max_server_updates or loop.max_client_updates or loop.time_budget):
            raise ConfigError(
                "async_loop needs a stop: set max_server_updates, max_client_updates or time_budget"
            )
        for r in cfg.eval.update_rounds:  # client-update numbers for the asynchronous loop
            if not isinstance(r, int) or r < 1:
                raise ConfigError(f"eval.update_rounds lists {r!r}; client-update numbers start at 1")
    for key in ("eval.rounds",) if asynchronous else ("eval.rounds", "eval.update_rounds"):
        for r in OmegaConf.select(cfg, key):
            if not isinstance(r, int) or not 1 <= r <= cfg.num_rounds:
                raise ConfigError(f"{key} lists round {r!r}, outside 1..num_rounds={cfg.num_rounds}")
    for group in cfg.eval.digit_groups:
        for d in group:
            if not isinstance(d, int) or not 0 <= d <= 9:
                raise ConfigError(f"eval.digit_groups: digit {d!r} is outside 0-9")
    partition = build(cfg.partition, "partition")
    groups = getattr(partition, "groups", None)
    if groups is not None and len(groups) != cfg.num_nodes:
        raise ConfigError(
            f"partition.groups lists {len(groups)} groups but num_nodes={cfg.num_nodes}; "
            "set num_nodes to the number of groups"
        )
    spc = getattr(partition, "shards_per_client", None)
    if spc is not None and spc * cfg.num_nodes > MNIST_TRAIN_SIZE:
        raise ConfigError(
            f"partition.shards_per_client={spc} x num_nodes={cfg.num_nodes} is more shards than examples"
        )
