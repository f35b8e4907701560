"""Checking a composed config before Flower starts, naming the key at fault.

The objects that own settings are built here, so their constructors check them; this module
checks the settings no object owns and the rules spanning several keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

from flwr.serverapp.strategy import Bulyan, Krum, MultiKrum
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

from flmnist.config.targets import missing_module, undefined_name
from flmnist.core.build import build
from flmnist.core.checks import check_integer, check_number, check_style
from flmnist.core.constants import MNIST_TRAIN_SIZE
from flmnist.core.errors import ConfigError
from flmnist.core.model_spec import check_model_spec
from flmnist.engine.privacy import problem as privacy_problem
from flmnist.ml.partition import partition_from_spec
from flmnist.observers.collapse import DROP, PATIENCE
from flmnist.protocol.messages import NUM_EXAMPLES, UNIT_WEIGHT, TrainSettings
from flmnist.protocol.screen import ScreenSettings
from flmnist.protocol.settings import AsyncLoopSettings, PrivacySettings
from flmnist.strategies import FedSGD, build_strategy
from flmnist.strategies.asynchronous import AsyncStrategy

BACKENDS = ("auto", "inprocess", "ray")
CLIENT_EVALUATION = ("auto", "in_train", "exchange")  # sampling.client_evaluation

PROBE_MIN, PROBE_MAX = 10, 8920  # one image of each digit; MNIST's test set has 892 fives


def _number(cfg: DictConfig, key: str, low: float, high: float = math.inf, *, low_open: bool = False,
            allow_none: bool = False) -> None:
    """A finite real number in [low, high] ((low, high] if low_open), or null if allowed."""
    check_number(key, OmegaConf.select(cfg, key), low, high, low_open=low_open, allow_none=allow_none)


def _integer(cfg: DictConfig, key: str, low: int, allow_none: bool = False) -> None:
    check_integer(key, OmegaConf.select(cfg, key), low, allow_none=allow_none)


SECTIONS = ("client", "model", "partition", "strategy", "eval", "fleet", "simulation", "collapse", "data",
            "sampling", "async_loop", "screen", "observers", "privacy")


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


def _top_level(cfg: DictConfig) -> None:
    """Settings no constructor owns: the run's length, timing, files and server-side evaluation."""
    _integer(cfg, "num_rounds", 1)
    _integer(cfg, "checkpoint_every", 0)
    _integer(cfg, "max_failed_rounds", 1)
    _number(cfg, "wait_for_nodes", 0, low_open=True)
    _number(cfg, "round_timeout", 0, low_open=True)
    _number(cfg, "poll_interval", 0, 60, low_open=True, allow_none=True)  # (1e300 overflowed time.sleep)
    _number(cfg, "target_accuracy", 0, 1, low_open=True)
    _kind(cfg, "stop_at_target", bool, "true or false")
    _kind(cfg, "name", str, "a string", allow_none=True)
    if cfg.name and ("/" in cfg.name or "\\" in cfg.name or cfg.name.startswith(".")):
        raise ConfigError(f"name={cfg.name} names the run's directory: no '/', no '\\', not starting with '.'")
    _kind(cfg, "output_dir", str, "a path")
    if not cfg.output_dir.strip():  # (Hydra put the run in /DATE/TIME_NAME)
        raise ConfigError("output_dir is empty; give a folder, e.g. output_dir=outputs")
    _kind(cfg, "run_dir", str, "a path", allow_none=True)
    _kind(cfg, "resume", str, "a run directory, its checkpoint.pt, or latest", allow_none=True)
    _kind(cfg, "data.root", str, "a path", allow_none=True)
    if OmegaConf.select(cfg, "data.download") not in (True, False, "auto"):
        raise ConfigError(f"data.download must be auto, true or false, got {cfg.data.download!r}")
    if OmegaConf.is_missing(cfg.simulation, "ray_address"):
        raise ConfigError("simulation=ray_cluster needs the cluster's address: add simulation.ray_address=HEAD:6379 "
                          "(the address `ray start --head` printed)")
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


def _eval(cfg: DictConfig) -> None:
    """``eval``: the server-side evaluation's settings (the built-in observers take theirs from here)."""
    _kind(cfg, "eval.attribution", bool, "true or false")
    _integer(cfg, "eval.probe_size", 0)
    check_style(cfg.eval.get("style", "seed002"))
    if cfg.eval.probe_size and not PROBE_MIN <= cfg.eval.probe_size <= PROBE_MAX:
        raise ConfigError(f"eval.probe_size must be 0 (no probe) or {PROBE_MIN} to {PROBE_MAX} (as many of each "
                          f"digit: the test set has {PROBE_MAX // 10} fives), got {cfg.eval.probe_size}")
    _integer(cfg, "eval.every", 1, allow_none=True)
    _integer(cfg, "eval.batch_size", 1)
    _rounds(cfg, "eval.rounds")
    _rounds(cfg, "eval.update_rounds")
    for group in _list(cfg, "eval.digit_groups"):
        if not isinstance(group, ListConfig) or not group or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 9 for d in group):
            raise ConfigError(f"eval.digit_groups must list non-empty groups of digits 0-9, e.g. [[0, 1], [2]]; "
                              f"got the group {OmegaConf.to_container(group) if isinstance(group, ListConfig) else group!r}")
    listed = [d for group in cfg.eval.digit_groups for d in group]
    if twice := sorted({d for d in listed if listed.count(d) > 1}):
        raise ConfigError(f"eval.digit_groups lists digit {twice[0]} more than once; each digit belongs to one group")


def _collapse(cfg: DictConfig) -> None:
    """``collapse``: when a run is called degraded (:mod:`flmnist.observers.collapse`); a run saved
    before the section existed has none (the defaults apply)."""
    if cfg.get("collapse") is not None:
        _number(cfg, "collapse.drop", 0, 1, low_open=True, allow_none=True)
        _integer(cfg, "collapse.patience", 1)


def collapse_args(cfg: DictConfig) -> dict:
    """``collapse.drop`` and ``.patience`` as the recorder's ``collapse_drop``/``collapse_patience``."""
    section = cfg.get("collapse") or {}
    return {"collapse_drop": section.get("drop", DROP), "collapse_patience": section.get("patience", PATIENCE)}


def _model(cfg: DictConfig) -> None:
    """flmnist's models (``conf/model/``), the only ones a node builds (``ml.models.MODELS``): the
    class, widths, dropout and classes, checked here because the model is built (with PyTorch) only
    when the run starts (a misspelt class was refused by every node at its first message)."""
    check_model_spec(OmegaConf.to_container(cfg.model, resolve=True))


EVAL_OBSERVERS = {  # the built-in observers' settings: the eval.* key each is checked as
    "digits": {k: k for k in ("every", "rounds", "update_rounds", "digit_groups", "batch_size", "style")},
    "attribution": {"enabled": "attribution", "probe_size": "probe_size", "batch_size": "batch_size"}}


def _observers(cfg: DictConfig) -> None:
    """``observers``: each entry null (off) or a section naming its ``_target_`` (built when the run starts:
    its module, with PyTorch, is not imported here)."""
    section = cfg.get("observers")
    if section is None:
        return
    if not isinstance(section, DictConfig):
        raise ConfigError(f"observers must be a section of named observers, got {section!r}")
    for name, node in section.items():
        if node is not None and not (isinstance(node, DictConfig) and isinstance(node.get("_target_"), str)):
            raise ConfigError(f"observers.{name} must name its class with _target_ (or be null to turn it off), "
                              f"got {node!r}")
        if node is not None and (missing := missing_module(node._target_)):
            raise ConfigError(f"observers.{name}._target_ {node._target_!r}: no module {missing!r} here; the "
                              "module must be importable where the ServerApp runs (inside flmnist/, or on PYTHONPATH)")
        if node is not None and (undefined := undefined_name(node._target_)):
            raise ConfigError(f"observers.{name}._target_ {node._target_!r}: {undefined}")
    # The built-in observers take their settings from eval.*; one set here directly is checked as eval's
    # (observers.digits.every=0 passed, and divided by zero after the first round had trained).
    for name, keys in EVAL_OBSERVERS.items():
        node = section.get(name)
        for key, as_eval in keys.items() if isinstance(node, DictConfig) else ():
            given = OmegaConf.select(node, key)
            if key in node and given != OmegaConf.select(cfg, f"eval.{as_eval}"):
                probe = cfg.copy()
                OmegaConf.update(probe, f"eval.{as_eval}", given, force_add=True)
                try:
                    _eval(probe)
                except ConfigError as err:
                    raise ConfigError(str(err).replace(f"eval.{as_eval}", f"observers.{name}.{key}")) from None


def _rounds(cfg: DictConfig, key: str) -> None:
    """``key`` lists round numbers from 1 (past the run's end: see :func:`flmnist.config.notes.rounds_past_the_end`)."""
    for r in _list(cfg, key):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError(f"{key} lists {r!r}: round numbers are integers from 1")


def run_length(cfg: DictConfig) -> tuple[str, int]:
    """A run's step ("round"; "update" under an asynchronous strategy) and how many it is to take."""
    if issubclass(get_class(cfg.strategy._target_), AsyncStrategy):
        return "update", int(cfg.async_loop.max_server_updates or 0)
    return "round", int(cfg.num_rounds)


def validate(cfg: DictConfig) -> None:
    """Check every setting a run depends on, before Flower starts, naming the key at fault.

    The objects that own settings are built here, so their constructors check them:
    :class:`~flmnist.protocol.messages.TrainSettings` (``client.*``, ``num_nodes``, ``seed``,
    ``data.holdout_fraction``), :class:`~flmnist.protocol.screen.ScreenSettings`, the strategy,
    :class:`~flmnist.protocol.settings.AsyncLoopSettings` (asynchronous strategies), the fleet and
    the partition. Here: the settings no object owns, and the rules spanning several keys.
    """
    for section in SECTIONS:  # (data=null gave a traceback: every check reads its keys)
        _kind(cfg, section, DictConfig, f"a section of settings (change one with {section}.KEY=VALUE)")
    _kind(cfg, "client.fault_nodes", ListConfig, "a list of partition ids, e.g. [0, 2],", allow_none=True)
    TrainSettings.from_config(cfg)
    _top_level(cfg)
    _eval(cfg)
    _model(cfg)
    _collapse(cfg)
    _observers(cfg)
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
        _settings(AsyncLoopSettings, cfg, "async_loop")
    else:  # under a fleet, a synchronous round charges a dropped update this virtual time
        _number(cfg, "async_loop.update_timeout", 0, low_open=True)
    build(cfg.fleet, "fleet", num_nodes=cfg.num_nodes, seed=cfg.seed)
    if cfg.fleet.get("kind") == "none" and (unused := [k for k in cfg.fleet if k not in ("_target_", "kind")]):
        raise ConfigError(f"fleet.{unused[0]} needs a simulated fleet, and fleet=none has none: choose "
                          "fleet=homogeneous, fleet=lognormal or fleet=jetson_mixed (conf/fleet/)")
    partition = partition_from_spec(OmegaConf.to_container(cfg.partition, resolve=True))  # the nodes' own check

    # Rules spanning several keys.
    n = cfg.num_nodes
    if (fault := cfg.client.get("fault")) and not cfg.client.get("fault_nodes"):
        raise ConfigError(f"client.fault={fault} needs client.fault_nodes, the partition ids that misbehave, e.g. [0] "
                          f"(0..{n - 1}); without them no node misbehaves and the run looks clean")
    if n > MNIST_TRAIN_SIZE:
        raise ConfigError(f"num_nodes={n} is more partitions than the {MNIST_TRAIN_SIZE} training examples")
    groups = getattr(partition, "groups", None)
    if groups is not None and len(groups) != n:
        raise ConfigError(
            f"partition.groups lists {len(groups)} groups but num_nodes={n}; set num_nodes to the number of groups"
        )
    least = getattr(partition, "min_partition_size", None)
    if least is not None and least * n > MNIST_TRAIN_SIZE:
        raise ConfigError(f"partition.min_partition_size={least} x num_nodes={n} is more than the "
                          f"{MNIST_TRAIN_SIZE} training examples")
    spc = getattr(partition, "shards_per_client", None)
    if spc is not None and spc * n > MNIST_TRAIN_SIZE:
        raise ConfigError(f"partition.shards_per_client={spc} x num_nodes={n} is more shards than the "
                          f"{MNIST_TRAIN_SIZE} training examples")
    weighted_by = getattr(strategy, "weighted_by_key", NUM_EXAMPLES)
    if weighted_by not in (NUM_EXAMPLES, UNIT_WEIGHT):  # the metric each update is weighted by
        raise ConfigError(f"strategy.weighted_by_key must be {NUM_EXAMPLES} or {UNIT_WEIGHT} (equal weights), "
                          f"got {weighted_by!r}")
    if isinstance(strategy, FedSGD) and strategy.eta_l != cfg.client.lr:
        raise ConfigError(f"strategy.eta_l={strategy.eta_l:g} must be client.lr={cfg.client.lr:g}: the server divides "
                          "each model change by it to get the gradient (set client.lr; eta_l follows it)")
    fraction_evaluate = getattr(strategy, "fraction_evaluate", 0.0)
    privacy = _settings(PrivacySettings, cfg, "privacy") if cfg.get("privacy") is not None else None
    if privacy is not None and privacy.node_metrics == "withheld" and fraction_evaluate > 0:  # (before the
        default = f" (privacy={privacy.mechanism}'s default)" if privacy.mechanism in ("local", "dpsgd") else ""
        key = ("sampling" if str((cfg.get("sampling") or {}).get("fraction_evaluate")) == str(fraction_evaluate)
               else "strategy") + ".fraction_evaluate"  # holdout's check: the presets that withhold hold none out)
        raise ConfigError(f"privacy.node_metrics=withheld{default} withholds what nodes would send un-noised, but "
                          f"{key}={fraction_evaluate:g} asks them for their evaluation counts: set {key}=0, "
                          "or privacy.node_metrics=plain to send them outside epsilon")
    if cfg.data.holdout_fraction == 0 and fraction_evaluate > 0:
        raise ConfigError(
            "sampling.fraction_evaluate > 0 asks nodes to evaluate on held-out data, but "
            "data.holdout_fraction is 0: set one of them (fraction_evaluate=0 turns client evaluation off)"
        )
    least = getattr(strategy, "min_evaluate_nodes", 0)
    if fraction_evaluate > 0 and max(int(n * fraction_evaluate), least) == 0:  # (Flower's count: int(), floored)
        raise ConfigError(f"sampling.fraction_evaluate={fraction_evaluate:g} of num_nodes={n} is "
                          f"{n * fraction_evaluate:g} nodes, which Flower rounds down to 0, and min_evaluate_nodes="
                          f"{least}: no node would evaluate; raise either (or set fraction_evaluate=0 to turn client "
                          "evaluation off)")
    how = (cfg.get("sampling") or {}).get("client_evaluation", "auto")
    if how not in CLIENT_EVALUATION:
        raise ConfigError(f"sampling.client_evaluation={how} is not one of {', '.join(CLIENT_EVALUATION)} "
                          "(in_train: in the train reply; exchange: a separate evaluate message; auto: in_train "
                          "on real SuperNodes, exchange in simulation)")
    # Flower waits, with no timeout, until it can sample this many nodes.
    waits = {"min_available_nodes": getattr(strategy, "min_available_nodes", 0),
             "min_train_nodes": getattr(strategy, "min_train_nodes", 0),
             "min_evaluate_nodes": getattr(strategy, "min_evaluate_nodes", 0) if fraction_evaluate > 0 else 0}
    for key, value in waits.items():
        if value > n:  # named as written: sampling.KEY, unless strategy.KEY was set apart from it
            section = "sampling" if str((cfg.get("sampling") or {}).get(key)) == str(value) else "strategy"
            raise ConfigError(f"{section}.{key}={value} is more than num_nodes={n}: the server would wait for "
                              f"nodes that never come; use at most {n}")
    if isinstance(strategy, (Bulyan, MultiKrum)):  # (Krum is a MultiKrum choosing 1)
        f, name = strategy.num_malicious_nodes, type(strategy).__name__
        sampled = min(max(int(n * strategy.fraction_train), strategy.min_train_nodes), n)
        k = 4 if isinstance(strategy, Bulyan) else 2  # (Krum on two nodes: they tie, and the first always wins)
        if sampled < k * f + 3:
            raise ConfigError(f"strategy.num_malicious_nodes={f}: {name} needs at least {k} f + 3 = {k * f + 3} "
                              f"updates per round, but a round samples {sampled} of num_nodes={n}")
        m = getattr(strategy, "num_nodes_to_select", 1)
        if not isinstance(strategy, (Bulyan, Krum)) and not 1 <= m <= sampled:
            raise ConfigError(f"strategy.num_nodes_to_select={m} must be 1..{sampled}, the updates a round samples "
                              f"(num_nodes={n})")
    if privacy is not None:
        problem = privacy_problem(privacy, strategy)
        if problem:
            raise ConfigError(problem)
