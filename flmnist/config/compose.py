"""Composing and checking the Hydra configuration in ``conf/``.

The composed config is the single source of truth for a run: the ServerApp
composes it from the overrides in the run config, the ``flmnist`` command from
its command line, and clients receive what they need inside each message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import shlex
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf

from flmnist.core.build import build, one_line
from flmnist.core.checks import check_integer, check_number, check_style
from flmnist.core.errors import ConfigError

GROUPS = ("model", "partition", "strategy", "client", "eval", "fleet", "logger", "experiment")
MNIST_TRAIN_SIZE = 60_000


def first_given(*values):
    """The first value that is set (not null or empty): the run name's fallbacks."""
    return next((v for v in values if v not in (None, "", "null", "None")), "run")


# hydra.run.dir names a run by its name, else its experiment, else STRATEGY_SPLIT.
OmegaConf.register_new_resolver("flmnist_first", first_given, replace=True)


def run_name(cfg: DictConfig, choices) -> str:
    """The run's name: ``name``, else the experiment's, else STRATEGY_SPLIT (the choices made)."""
    return str(first_given(cfg.get("name"), choices.get("experiment"),
                           f"{choices.get('strategy')}_{choices.get('partition')}"))


def conf_dir() -> Path:
    """The ``conf/`` folder: ``$FLMNIST_CONF_DIR``, else the one beside the package."""
    path = Path(os.environ.get("FLMNIST_CONF_DIR") or Path(__file__).resolve().parents[2] / "conf")
    if not (path / "config.yaml").is_file():
        raise ConfigError(
            f"No config.yaml in {path}. Install flmnist from its repository with "
            "`pip install -e .` (the conf/ folder lives beside the package) or set FLMNIST_CONF_DIR."
        )
    return path


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files in ``conf/<group>/`` (``_*.yaml``: shared parts, not options)."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml") if not p.stem.startswith("_"))


def parse_overrides(text: str) -> list[str]:
    """Split the run config's ``overrides`` string into Hydra overrides."""
    try:
        return shlex.split(text or "")
    except ValueError as err:
        raise ConfigError(f"run config 'overrides' cannot be parsed ({err}): {text!r}") from err


def _override_key(item: str) -> str:
    return item.lstrip("+~").partition("=")[0].removeprefix("override ").strip()


def check_group_overrides(overrides: list[str]) -> None:
    """Fail early, listing the valid options, when an override names an unknown group option."""
    for item in overrides:
        key, (_, sep, value) = _override_key(item), item.partition("=")
        if not sep or key not in GROUPS or value in ("null", ""):
            continue
        for choice in value.split(","):  # a multirun sweep lists several
            if choice not in group_options(key):
                raise ConfigError(
                    f"Unknown {key} '{choice}'. Valid options for {key}: "
                    f"{', '.join(group_options(key))}"
                )


def _unknown_key(overrides: list[str], key: str) -> str | None:
    """For ``Could not override 'key'``: the closest valid keys, or the group option to choose."""
    import difflib

    groups = [o for o in overrides if _override_key(o) in GROUPS]
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir()), job_name="flmnist"):
            base = compose(config_name="config", overrides=groups, return_hydra_config=True)
    except Exception:  # noqa: BLE001 - only an aid to the message
        return None
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(base, parent) if parent else base
    if not isinstance(node, DictConfig):
        return None
    choice = OmegaConf.select(base, f"hydra.runtime.choices.{parent}") if parent in GROUPS else None
    where = f"{parent}={choice}" if choice else parent or "the top level"
    valid = [k for k in node if k not in ("hydra", "_target_")]
    message = f"unknown setting '{key}'"
    owners = [o for o in group_options(parent) if o != choice
              and leaf in (OmegaConf.load(conf_dir() / parent / f"{o}.yaml") or {})] if parent in GROUPS else []
    if owners:
        return (f"{message}: it belongs to {' or '.join(f'{parent}={o}' for o in owners)}, not to {where}; "
                f"add {parent}={owners[0]} to the command")
    close = difflib.get_close_matches(leaf, valid, n=3, cutoff=0.6)
    if not close and not parent:  # a nested key written without its section (lr= for client.lr=)
        nested = [f"{k}.{leaf}" for k in valid if isinstance(node.get(k), DictConfig) and leaf in node[k]]
        close = nested[:3]
    else:
        close = [f"{parent}.{c}" if parent else c for c in close]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"{message}{hint} ({where} has: {', '.join(valid) or 'no settings'}; `flmnist --help` describes them)"


# Sections built from a ``_target_`` take extra constructor arguments with ``+key=value``.
EXTENSIBLE = ("strategy.", "model.", "partition.", "fleet.")


def _check_additions(overrides: list[str]) -> None:
    """``+key=value`` adds a key: refused where flmnist would silently ignore it."""
    for item in overrides:
        if not item.startswith("+"):
            continue
        key = _override_key(item)
        if key in GROUPS or key.startswith(EXTENSIBLE):
            continue
        message = _unknown_key([o for o in overrides if o != item], key) or f"unknown setting '{key}'"
        raise ConfigError(f"{item}: flmnist would ignore a new key here; {message}")


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with ``overrides``, resolve it and check it.

    Every failure is a ConfigError with a one-line message naming the override or setting.
    """
    overrides = list(overrides or [])
    check_group_overrides(overrides)
    _check_additions(overrides)
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir()), job_name="flmnist"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except Exception as err:  # Hydra raises several types for bad overrides
        match = re.match(r"Could not override '([^']+)'", str(err))
        message = _unknown_key(overrides, match.group(1)) if match else None
        raise ConfigError(message or f"bad override in {' '.join(overrides)}: {one_line(err)}") from err
    name = run_name(cfg, cfg.hydra.runtime.choices)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    cfg.name = name
    try:
        OmegaConf.resolve(cfg)
    except Exception as err:  # an interpolation naming a missing key, or a cycle
        raise ConfigError(f"cannot resolve the config: {one_line(err)}") from err
    validate(cfg)
    return cfg


def _number(cfg: DictConfig, key: str, low: float, high: float = math.inf, *, low_open: bool = False,
            allow_none: bool = False) -> None:
    """A finite real number in [low, high] ((low, high] if low_open), or null if allowed."""
    check_number(key, OmegaConf.select(cfg, key), low, high, low_open=low_open, allow_none=allow_none)


def _integer(cfg: DictConfig, key: str, low: int, allow_none: bool = False) -> None:
    check_integer(key, OmegaConf.select(cfg, key), low, allow_none=allow_none)


def _kind(cfg: DictConfig, key: str, kind: type, allowed: str, allow_none: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if not (isinstance(value, kind) or (value is None and allow_none)):
        raise ConfigError(f"{key} must be {allowed}{' or null' if allow_none else ''}, got {value!r}")


def _list(cfg: DictConfig, key: str) -> ListConfig:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, ListConfig):
        raise ConfigError(f"{key} must be a list, got {value!r}")
    return value


def _settings(cls, cfg: DictConfig, section: str):
    """``cls(**cfg[section])`` for a settings dataclass; an unknown key is named with the known ones."""
    values = cfg.get(section)
    if not isinstance(values, DictConfig):
        raise ConfigError(f"{section} must be a section of settings, got {values!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown setting '{section}.{key}'; {section} has: {', '.join(known)}")
    return cls(**values)


def _as_written(err: ConfigError, cfg: DictConfig) -> ConfigError:
    """A strategy parameter set through ``sampling.*`` is reported under the key the user writes."""
    message = str(err)
    for key in cfg.get("sampling") or {}:
        prefix = f"strategy.{key} "
        if message.startswith(prefix) and str(cfg.strategy.get(key)) == str(cfg.sampling[key]):  # NaN too
            return ConfigError(f"sampling.{key} (strategy.{key}) {message[len(prefix):]}")
    return err


@contextlib.contextmanager
def quiet_flower():
    """Flower's logger at ERROR inside the block."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def client_gpus(cfg: DictConfig) -> float:
    """``simulation.client_gpus``, with ``auto`` resolved: 0.5 when PyTorch sees a CUDA GPU, else 0."""
    value = cfg.simulation.client_gpus
    if value != "auto":
        return float(value)
    if not gpu_device_nodes():
        return 0.0  # PyTorch cannot see a GPU the kernel does not show: its import (about 1 s) is spared
    import torch

    return 0.5 if torch.cuda.is_available() else 0.0


BACKENDS = ("auto", "inprocess", "ray")


def simulation_backend(cfg: DictConfig, gpus: float, cores: int | None = None) -> str:
    """``simulation.backend``, with ``auto`` resolved (``gpus``: the resolved GPU share per ClientApp):
    ``inprocess`` when only one ClientApp could train at a time anyway (fewer than 2 x
    ``simulation.client_cpus`` cores), on no GPU share and no Ray cluster; else ``ray``."""
    sim = cfg.simulation
    if sim.backend != "auto":
        return str(sim.backend)
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    alone = cores < 2 * float(sim.client_cpus)
    return "inprocess" if alone and not gpus and not sim.ray_address else "ray"


def gpu_device_nodes() -> bool:
    """Whether the machine shows a GPU to programs: NVIDIA's device nodes or driver, a Jetson's
    GPU nodes, AMD's ROCm node (PyTorch's CUDA API serves ROCm too). True off Linux: unknown."""
    if not sys.platform.startswith("linux"):
        return True
    dev = Path("/dev")
    return (Path("/proc/driver/nvidia").exists() or (dev / "kfd").exists()
            or any(dev.glob("nvidia[0-9]*")) or any(dev.glob("nvhost-*")))


def _top_level(cfg: DictConfig) -> None:
    """Settings no constructor owns: the run's length, timing, files and server-side evaluation."""
    _integer(cfg, "num_rounds", 1)
    _integer(cfg, "checkpoint_every", 0)
    _integer(cfg, "max_failed_rounds", 1)
    _number(cfg, "wait_for_nodes", 0, low_open=True)
    _number(cfg, "round_timeout", 0, low_open=True)
    _number(cfg, "poll_interval", 0, low_open=True, allow_none=True)
    _number(cfg, "target_accuracy", 0, 1, low_open=True)
    _kind(cfg, "stop_at_target", bool, "true or false")
    _kind(cfg, "eval.attribution", bool, "true or false")
    _integer(cfg, "eval.probe_size", 0)
    check_style(cfg.eval.get("style", "seed002"))
    if cfg.eval.probe_size > 10000:
        raise ConfigError(f"eval.probe_size must be at most 10000 (the test set), got {cfg.eval.probe_size}")
    _kind(cfg, "name", str, "a string", allow_none=True)
    _kind(cfg, "output_dir", str, "a path")
    _kind(cfg, "run_dir", str, "a path", allow_none=True)
    _kind(cfg, "resume", str, "a run directory, its checkpoint.pt, or latest", allow_none=True)
    _kind(cfg, "data.root", str, "a path", allow_none=True)
    if OmegaConf.select(cfg, "data.download") not in (True, False, "auto"):
        raise ConfigError(f"data.download must be auto, true or false, got {cfg.data.download!r}")
    _integer(cfg, "eval.every", 1, allow_none=True)
    _integer(cfg, "eval.batch_size", 1)
    _number(cfg, "simulation.client_cpus", 0, low_open=True)
    if cfg.simulation.client_gpus != "auto":
        _number(cfg, "simulation.client_gpus", 0)
    _kind(cfg, "simulation.ray_address", str, "a Ray address (host:port)", allow_none=True)
    backend = OmegaConf.select(cfg, "simulation.backend")
    if backend not in BACKENDS:
        raise ConfigError(f"simulation.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "inprocess" and cfg.simulation.ray_address:
        raise ConfigError("simulation.backend=inprocess runs ClientApps in Flower's simulation process and cannot "
                          "join the Ray cluster simulation.ray_address names: set simulation.backend=ray (or auto), "
                          "or drop simulation.ray_address")
    for group in _list(cfg, "eval.digit_groups"):
        for d in group if isinstance(group, ListConfig) else [group]:
            if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 9:
                raise ConfigError(f"eval.digit_groups must list groups of digits 0-9, e.g. [[0, 1], [2]]; got {d!r}")


def _rounds(cfg: DictConfig, key: str, last: int | None) -> None:
    """``key`` lists round numbers in 1..last (from 1 when ``last`` is None)."""
    for r in _list(cfg, key):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1 or (last is not None and r > last):
            allowed = f"1..num_rounds={last}" if last is not None else "integers from 1"
            raise ConfigError(f"{key} lists {r!r}, outside {allowed}")


def run_length(cfg: DictConfig) -> tuple[str, int]:
    """A run's step ("round"; "update" under an asynchronous strategy) and how many it is to take."""
    from hydra.utils import get_class

    from flmnist.strategies.asynchronous import AsyncStrategy

    if issubclass(get_class(cfg.strategy._target_), AsyncStrategy):
        return "update", int(cfg.async_loop.max_server_updates or 0)
    return "round", int(cfg.num_rounds)


def validate(cfg: DictConfig) -> None:
    """Check every setting a run depends on, before Flower starts, naming the key at fault.

    The objects that own settings are built here, so their constructors check them:
    :class:`~flmnist.protocol.messages.TrainSettings` (``client.*``, ``num_nodes``, ``seed``,
    ``data.holdout_fraction``), :class:`~flmnist.protocol.screen.ScreenSettings`, the strategy,
    :class:`~flmnist.engine.async_loop.AsyncLoopSettings` (asynchronous strategies), the fleet and
    the partition. Here: the settings no object owns, and the rules spanning several keys.
    """
    from flwr.serverapp.strategy import Bulyan

    from flmnist.protocol.messages import TrainSettings
    from flmnist.protocol.screen import ScreenSettings
    from flmnist.strategies import build_strategy
    from flmnist.strategies.asynchronous import AsyncStrategy

    TrainSettings.from_config(cfg)
    _top_level(cfg)
    if cfg.get("logger") is not None:
        build(cfg.logger, "logger")  # a tracker whose package is missing says how to install it
    _settings(ScreenSettings, cfg, "screen")
    try:
        with quiet_flower():  # the run builds it again and Flower says its warnings then
            strategy = build_strategy(cfg.strategy)
    except ConfigError as err:
        raise _as_written(err, cfg) from err.__cause__
    asynchronous = isinstance(strategy, AsyncStrategy)
    if asynchronous:
        # imported here: it imports PyTorch, which only asynchronous runs pay for at this point
        from flmnist.engine.async_loop import AsyncLoopSettings

        _settings(AsyncLoopSettings, cfg, "async_loop")
    else:  # under a fleet, a synchronous round charges a dropped update this virtual time
        _number(cfg, "async_loop.update_timeout", 0, low_open=True)
    build(cfg.fleet, "fleet", num_nodes=cfg.num_nodes, seed=cfg.seed)
    partition = build(cfg.partition, "partition")

    # Rules spanning several keys.
    n = cfg.num_nodes
    if n > MNIST_TRAIN_SIZE:
        raise ConfigError(f"num_nodes={n} is more partitions than the {MNIST_TRAIN_SIZE} training examples")
    groups = getattr(partition, "groups", None)
    if groups is not None and len(groups) != n:
        raise ConfigError(
            f"partition.groups lists {len(groups)} groups but num_nodes={n}; set num_nodes to the number of groups"
        )
    spc = getattr(partition, "shards_per_client", None)
    if spc is not None and spc * n > MNIST_TRAIN_SIZE:
        raise ConfigError(f"partition.shards_per_client={spc} x num_nodes={n} is more shards than the "
                          f"{MNIST_TRAIN_SIZE} training examples")
    fraction_evaluate = getattr(strategy, "fraction_evaluate", 0.0)
    if cfg.data.holdout_fraction == 0 and fraction_evaluate > 0:
        raise ConfigError(
            "sampling.fraction_evaluate > 0 asks nodes to evaluate on held-out data, but "
            "data.holdout_fraction is 0: set one of them (fraction_evaluate=0 turns client evaluation off)"
        )
    # Flower waits, with no timeout, until it can sample this many nodes.
    waits = {"min_available_nodes": getattr(strategy, "min_available_nodes", 0),
             "min_train_nodes": getattr(strategy, "min_train_nodes", 0),
             "min_evaluate_nodes": getattr(strategy, "min_evaluate_nodes", 0) if fraction_evaluate > 0 else 0}
    for key, value in waits.items():
        if value > n:
            raise ConfigError(f"sampling.{key}={value} is more than num_nodes={n}: the server would wait for "
                              f"nodes that never come; use at most {n}")
    if isinstance(strategy, Bulyan):
        f = strategy.num_malicious_nodes
        sampled = max(int(n * strategy.fraction_train), strategy.min_train_nodes)
        if sampled < 4 * f + 3:
            raise ConfigError(f"strategy.num_malicious_nodes={f}: Bulyan needs at least 4 f + 3 = {4 * f + 3} "
                              f"updates per round, but a round samples {sampled} of num_nodes={n}")
    _rounds(cfg, "eval.rounds", cfg.num_rounds)
    _rounds(cfg, "eval.update_rounds", None if asynchronous else cfg.num_rounds)
