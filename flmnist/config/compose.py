"""Composing and checking the Hydra configuration in ``conf/``.

The composed config is the single source of truth for a run: the ServerApp
composes it from the overrides in the run config, the ``flmnist`` command from
its command line, and clients receive what they need inside each message.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from flmnist.config.notes import rounds_past_the_end, unused_by_strategy, unused_holdout
from flmnist.config.validate import validate
from flmnist.core.build import one_line
from flmnist.core.checks import check_writable_folder
from flmnist.core.errors import ConfigError

GROUPS = ("model", "partition", "strategy", "client", "eval", "fleet", "logger", "simulation", "privacy",
          "experiment")


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


def option_files(group: str, option: str) -> list[Path]:
    """``conf/<group>/<option>.yaml``, after the shared parts of its group that its defaults list
    pulls in (a strategy's ``defaults: [_sampling, _self_]``: ``conf/strategy/_sampling.yaml``)."""
    path = conf_dir() / group / f"{option}.yaml"
    entries = (OmegaConf.load(path) or {}).get("defaults") or []
    parts = [path.parent / f"{e}.yaml" for e in entries
             if isinstance(e, str) and e.startswith("_") and e != "_self_"]
    return [*(p for p in parts if p.is_file()), path]


def parse_overrides(text: str) -> list[str]:
    """Split the run config's ``overrides`` string into Hydra overrides."""
    try:
        return shlex.split(text or "")
    except ValueError as err:
        raise ConfigError(f"run config 'overrides' cannot be parsed ({err}): {text!r}") from err


def override_key(item: str) -> str:
    return item.lstrip("+~").partition("=")[0].removeprefix("override ").strip()


def override_value(item: str) -> str:
    """An override's value as Hydra reads it: ``strategy='fedprox'`` is fedprox."""
    return item.partition("=")[2].strip().strip("'\"")


def check_group_overrides(overrides: list[str]) -> None:
    """Fail early, listing the valid options, when an override names an unknown group option."""
    for item in overrides:
        key, (_, sep, value) = override_key(item), item.partition("=")
        if sep and key in GROUPS and key != "experiment" and value in ("null", ""):
            raise ConfigError(f"{key}={value}: a run needs a {key}; choose one of {', '.join(group_options(key))}")
        if not sep or key not in GROUPS or value in ("null", ""):
            continue
        for choice in value.split(","):  # (a sweep's jobs come here one value each)
            choice = choice.strip().strip("'\"")  # strategy='fedprox' is fedprox
            if choice not in group_options(key):
                close = difflib.get_close_matches(choice, group_options(key), n=1, cutoff=0.6)
                hint = f"; did you mean {key}={close[0]}?" if close else ""
                raise ConfigError(
                    f"Unknown {key} '{choice}'. Valid options for {key}: "
                    f"{', '.join(group_options(key))}{hint}"
                )


def _holds(option, group: str, leaf: str) -> bool:
    """Whether a group option's file sets ``leaf``: at its top, or under ``group:`` in a file of
    ``# @package _global_`` (the privacy options)."""
    section = option.get(group) if isinstance(option, DictConfig) else None
    return leaf in option or (isinstance(section, DictConfig) and leaf in section)


def _unknown_key(overrides: list[str], key: str, adding: bool = False) -> str | None:
    """For ``Could not override 'key'``: the closest valid keys, or the group option to choose."""
    groups = [o for o in overrides if override_key(o) in GROUPS]
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
    if leaf in node and adding:
        return f"'{key}' exists in {where}: drop the + (it adds a new key)"
    if leaf in node:  # the setting exists: Hydra refused the value, a section adding settings it lacks
        return (f"cannot set '{key}' to that section: it adds settings {where}'s '{key}' has not got; set them one by one, "
                f"with + before each new one (e.g. {key}._target_=CLASS {key}.a=1 +{key}.b=2)")
    message = f"unknown setting '{key}'"
    owners = [o for o in group_options(parent) if o != choice
              and any(_holds(OmegaConf.load(f) or {}, parent, leaf) for f in option_files(parent, o))
              ] if parent in GROUPS else []
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
EXTENSIBLE = ("strategy.", "model.", "partition.", "fleet.", "observers.")


def _check_additions(overrides: list[str]) -> None:
    """``+key=value`` adds a key: refused where flmnist would silently ignore it."""
    for item in overrides:
        if not item.startswith("+"):
            continue
        key = override_key(item)
        if key in GROUPS or key.startswith(EXTENSIBLE):
            continue
        message = _unknown_key([o for o in overrides if o != item], key, adding=True) or f"unknown setting '{key}'"
        exists = message.startswith(f"'{key}' exists")
        raise ConfigError(f"{item}: {'' if exists else 'flmnist would ignore a new key here; '}{message}")


def without_no_preset(overrides: list[str]) -> list[str]:
    """``experiment=null`` left out: no preset, as config.yaml's default (Hydra refused it typed:
    "must be a string or a list")."""
    return [o for o in overrides if o.lstrip("+~") not in ("experiment=null", "experiment=")]


PATH_KEYS = ("resume", "data.root", "output_dir", "run_dir", "screen.registry")


def compose_config(overrides: list[str] | None = None, notes: list[str] | None = None) -> DictConfig:
    """Compose ``conf/config.yaml`` with ``overrides``, resolve it and check it.

    Every failure is a ConfigError with a one-line message naming the override or setting.
    ``notes`` receives what was adjusted (evaluation rounds past a shortened run's end, dropped).
    """
    overrides = without_no_preset(overrides or [])
    check_group_overrides(overrides)
    _check_additions(overrides)
    # Set by their group's option, whose file sets more (a fleet's parameters; privacy's screens off):
    for item in (o for o in overrides if override_key(o) in ("fleet.kind", "privacy.mechanism")):
        group, value = override_key(item).partition(".")[0], item.partition("=")[2].strip()
        value = "jetson_mixed" if (group, value) == ("fleet", "mixed") else value
        choose = f"{group}={value} (conf/{group}/{value}.yaml)" if value else f"one with {group}=NAME (conf/{group}/)"
        raise ConfigError(f"{item}: {override_key(item)} is set by the {group} option: choose {choose} instead")
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir()), job_name="flmnist"):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except Exception as err:  # Hydra raises several types for bad overrides
        match = re.match(r"Could not override '([^']+)'", str(err))
        message = _unknown_key(overrides, match.group(1)) if match else None
        paths = [o for o in overrides if override_key(o) in PATH_KEYS and not o.partition("=")[2].startswith(("'", '"'))]
        hint = f"; quote a path holding ',', '=' or spaces: \"{override_key(paths[0])}='PATH'\"" if paths else ""
        raise ConfigError(message or f"bad override in {' '.join(overrides)}: {one_line(err)}{hint}") from err
    name = run_name(cfg, cfg.hydra.runtime.choices)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    cfg.name = name
    if notes is not None:
        notes.extend(rounds_past_the_end(cfg))
        notes.extend(unused_by_strategy(cfg, [override_key(o).lstrip("+~") for o in overrides if "=" in o]))
        notes.extend(unused_holdout(cfg))
    try:
        OmegaConf.resolve(cfg)
    except Exception as err:  # an interpolation naming a missing key, or a cycle
        raise ConfigError(f"cannot resolve the config: {one_line(err)}") from err
    try:
        validate(cfg)
    except (ConfigAttributeError, ConfigKeyError) as err:  # a key every run reads, deleted (~client.lr)
        key = err.full_key or "a setting"
        raise ConfigError(f"{key} is missing (deleted with ~{key}?): every run needs it; give {key}=VALUE or drop "
                          f"~{key}") from None
    return cfg


def check_hydra_folder(overrides: list[str], multirun: bool) -> str | None:
    """The folder Hydra makes before a job starts (``hydra.run.dir``; a sweep's ``hydra.sweep.dir``)
    can be made and written to, as far as it is known before Hydra resolves it: up to its first
    interpolation. The folder checked; None for one that starts with an interpolation (the default
    ``${output_dir}/...``: output_dir's own check). Hydra failed there with a traceback."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [override_value(item) for item in overrides if override_key(item) == key]
    default = OmegaConf.to_container(OmegaConf.load(conf_dir() / "config.yaml").hydra, resolve=False)
    value = given[-1] if given else default["sweep" if multirun else "run"]["dir"]
    head, interpolated, _ = value.partition("${")
    if folder := head.rpartition("/")[0] if interpolated else head:
        check_writable_folder(key, folder)
    return folder or None


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override lists of the jobs a ``-m`` sweep runs (Hydra's basic sweeper's expansion; its
    config loader lists a group's options for ``glob(...)``)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(conf_dir())))
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(overrides)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception as err:  # Hydra's parser raises several types
        raise ConfigError(f"bad override in {' '.join(overrides)}: {' '.join(str(err).split())}") from err
    if not jobs:  # glob(...) matching no option: Hydra would run nothing and exit 0
        raise ConfigError(f"the sweep {' '.join(overrides)} has no jobs: a glob(...) matches no option of its group")
    for item in (o for job in jobs for o in job):  # glob(*) lists conf/strategy/_sampling.yaml too
        key, value = override_key(item), item.partition("=")[2]
        if key in GROUPS and value.startswith("_"):
            raise ConfigError(f"{key}={value}: a glob(...) matched {value}, a part the {key} options share, not "
                              f"one of them; leave it out with exclude: {key}='glob(*,exclude=_*)'")
    return jobs
