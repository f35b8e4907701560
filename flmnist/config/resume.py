"""``flmnist resume=DIR``: continue a run from its checkpoint, or extend a finished or stopped one.

A resume runs with the run's own config (its ``config.yaml``). Beside ``resume=`` a command may
give only:

- the run's length, to extend it: ``num_rounds`` (synchronous strategies) or
  ``async_loop.max_server_updates`` / ``max_client_updates`` / ``time_budget`` (asynchronous);
- where it runs: ``simulation.*``, ``data.root``, ``data.download``;
- a larger privacy budget, ``privacy.max_epsilon`` (or ``null``: none), to go on with a run that
  stopped at its budget; the checkpoint's accountant goes on counting;
- how the run is waited for, checkpointed and tracked, which changes none of its figures:
  ``wait_for_nodes``, ``poll_interval``, ``checkpoint_every`` (not 0: an extension ends with a
  checkpoint), ``logger`` (not ``round_timeout``: a reply later than it is dropped, in simulation too).

Any other override that would change the run is refused in one line naming it: a changed
strategy, split or model is a new run. Overrides equal to the run's own values pass.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from flmnist.config.compose import GROUPS, compose_config, conf_dir, override_key, override_value
from flmnist.config.validate import run_length, validate
from flmnist.core.errors import ConfigError
from flmnist.core.run_files import CHECKPOINT, CHECKPOINT_INFO, atomic_write, resume_arg
from flmnist.ml.mnist_files import ensure_mnist, resolve_root
from flmnist.observers.stop import StopAtTarget

LENGTH = {"round": ("num_rounds",),
          "update": ("async_loop.max_server_updates", "async_loop.max_client_updates", "async_loop.time_budget")}
BUDGET = "privacy.max_epsilon"
WHERE = ("simulation", "data.root", "data.download", "output_dir", "resume", "run_dir", "hydra.")
RESUMABLE = (*LENGTH["round"], *LENGTH["update"], BUDGET, "stop_at_target")  # a resume may change these
# ... and these, which change how the run is waited for, checkpointed and tracked, not what it computes
OPERATIONAL = ("wait_for_nodes", "poll_interval", "checkpoint_every", "logger")
ADDED_SINCE = {"privacy": ("node_metrics",)}  # an option's settings a run's config may lack (started before them)


def _operational(key: str) -> bool:
    return key in OPERATIONAL or key.startswith("logger.")


def _identifies(key: str) -> bool:
    """Whether ``key`` (flat, ``client.lr``) is part of what makes the run what it is."""
    return key not in RESUMABLE and not key.startswith(WHERE) and not _operational(key)


def fingerprint(cfg: DictConfig) -> dict:
    """The settings that make a run what it is, flat (``client.lr``: 0.1): all but its length,
    privacy budget, stop_at_target and where it runs. A checkpoint holds its run's."""
    flat: dict = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return {k: v for k, v in flat.items() if _identifies(k)}


def check_fingerprint(saved: DictConfig, recorded: dict | None, config_path: Path) -> None:
    """The run's ``config.yaml`` (``saved``) is the config its checkpoint was saved under (its
    ``recorded`` fingerprint; a checkpoint of an older flmnist has none), but for what a resume may
    change; else a ConfigError naming the settings: a config.yaml edited by hand resumed silently
    as another run (another split, model or learning rate on the same checkpoint)."""
    if not isinstance(recorded, dict):
        return
    recorded = {k: v for k, v in recorded.items() if _identifies(k)}  # (an older checkpoint's held the operational ones)
    now, missing = fingerprint(saved), "(missing)"
    differ = sorted(k for k in set(now) | set(recorded) if now.get(k, missing) != recorded.get(k, missing))
    if differ:
        shown = ", ".join(f"{k}={now.get(k, missing)} (the checkpoint's: {recorded.get(k, missing)})"
                          for k in differ[:3])
        raise ConfigError(f"resume: {config_path} is not the config its checkpoint was saved under: {shown}"
                          f"{f' and {len(differ) - 3} more' if len(differ) > 3 else ''}. Put it back; a changed "
                          "run is a new run")


def _metric_rows(run_dir: Path) -> list[dict]:
    """The run's ``metrics.json`` rows (none if missing or unreadable)."""
    try:
        rows = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def steps_done(run_dir: Path) -> int:
    """The last step the run reached: its checkpoint's (``checkpoint.json``) or the last in its
    metrics, whichever is later (a run checkpointed every N steps may have gone past its last
    checkpoint; a length at or below that would lose those steps)."""
    steps = [0, *(int(r.get("round") or 0) for r in _metric_rows(run_dir))]
    try:
        steps.append(int(json.loads((run_dir / CHECKPOINT_INFO).read_text())["round"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return max(steps)


def run_summary(run_dir: Path) -> dict:
    """The run's ``summary.json`` ({} if missing, unreadable or not an object)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def client_updates_done(run_dir: Path) -> int:
    """An asynchronous run's client updates processed so far: its summary's count (the metrics rows
    stop at the last server version; later updates, a part-filled buffer, are only there), else
    the rows'."""
    try:
        counted = int(run_summary(run_dir)["async"]["client_updates"])
    except (KeyError, TypeError, ValueError):
        counted = 0
    return max([counted, *(int(r.get("client_updates") or 0) for r in _metric_rows(run_dir))])


def ended_on(run_dir: Path, saved: DictConfig, done: int) -> str | None:
    """The limit other than its server updates that a finished asynchronous run ended on
    (``async_loop.max_client_updates``, ``async_loop.time_budget``), or None."""
    loop = saved.async_loop
    if stopped_early(run_dir) or (loop.max_server_updates is not None and done >= loop.max_server_updates):
        return None  # (a target or privacy budget ended it)
    if loop.max_client_updates is not None and client_updates_done(run_dir) >= loop.max_client_updates:
        return "async_loop.max_client_updates"
    return "async_loop.time_budget" if loop.time_budget is not None else None


def extension(saved: DictConfig, cfg: DictConfig) -> str:
    """What a resume changed, as ``key=value`` settings (lengths, privacy budget, stop_at_target, the
    operational settings; the logger by its class)."""
    unit, _ = run_length(saved)

    def shown(k: str) -> str:
        value = OmegaConf.select(cfg, k)
        return f"{k}={value.get('_target_') if isinstance(value, DictConfig) else value}"

    return ", ".join(shown(k) for k in (*LENGTH[unit], BUDGET, "stop_at_target", *OPERATIONAL)
                     if OmegaConf.select(cfg, k) != OmegaConf.select(saved, k))


def stopped_early(run_dir: Path) -> str | None:
    """Why the run's summary.json says it stopped early (the target, the privacy budget), or None."""
    try:
        return (run_summary(run_dir).get("stopped_early") or {}).get("reason")
    except AttributeError:
        return None


def stopped_at_target(run_dir: Path) -> bool:
    """Whether the run's summary.json says ``stop_at_target`` ended it."""
    return stopped_early(run_dir) == StopAtTarget.reason


def finished(run_dir: Path) -> bool:
    """Whether the run's summary.json says it finished."""
    return run_summary(run_dir).get("status") == "finished"


def _same_option(group: str, option: str, cfg: DictConfig, saved: DictConfig) -> bool:
    """Whether ``group=option`` gives the run's own choice: the same class and values of the option's own
    settings (not shared sections', like sampling.*; nor one of ``ADDED_SINCE`` the run's config lacks)."""
    text = (conf_dir() / group / f"{option}.yaml").read_text()
    own = OmegaConf.create(text) or {}
    if text.startswith("# @package _global_"):  # (model=logreg, privacy=central: model:, privacy: and
        own = own.get(group) or {}  # the client or screen defaults they bring) its own section
    keys = [k for k in own if k != "defaults"]
    mine, theirs = cfg.get(group) or {}, saved.get(group) or {}
    return all((k in ADDED_SINCE.get(group, ()) and k not in theirs) or mine.get(k) == theirs.get(k) for k in keys)


def _choice(saved: DictConfig, group: str) -> str:
    """What the run chose in ``group``: its class, or (privacy) its mechanism."""
    section = saved.get(group) or {}
    return str(section.get("_target_") or section.get("mechanism") or "its defaults")


def resumed_config(overrides: list[str], saved: DictConfig, run_dir: Path, checkpoint: Path | None = None) -> DictConfig:
    """The config a resume of ``run_dir`` runs with: ``saved`` (its config.yaml), extended by a
    longer length given in ``overrides``; ConfigError for an override that would change the run,
    for a length that would not extend it, and for a finished run given no new length."""
    unit, _ = run_length(saved)
    given = given_beside_resume(overrides)
    out = saved.copy()
    _data_moved(out, overrides)
    extended = None
    for item in [o for o in given if override_key(o) == BUDGET]:
        given.remove(item)
        if _raise_budget(item, saved, out):
            extended = BUDGET
    cfg = compose_config(given) if given else None
    done = steps_done(run_dir)
    for item in given:
        key = override_key(item)
        if key == "experiment":
            same = override_value(item) == saved.get("name")
        elif key in GROUPS:
            same = _same_option(key, override_value(item), cfg, saved)
        else:
            same = OmegaConf.select(cfg, key) == OmegaConf.select(saved, key)
        if same:
            continue
        if key in LENGTH[unit]:
            new = OmegaConf.select(cfg, key)
            if new is not None and (isinstance(new, bool) or not isinstance(new, int | float)):
                raise ConfigError(f"resume: {item}: {key} must be a number (or null), got {new!r}")
            reached, what = _reached(run_dir, done)[key] if unit == "update" else (done, f"done {done} rounds")
            if new is not None and reached is not None and new <= reached:
                raise ConfigError(f"resume: {item} would not extend the run: it has {what} "
                                  f"(give more than {reached:g})")
            OmegaConf.update(out, key, new)
            extended = key
            continue
        if _operational(key):
            _take_operational(key, item, cfg, saved, out)
            continue
        if key == "stop_at_target" and OmegaConf.select(cfg, key) is False:  # train on past the target
            OmegaConf.update(out, key, False)
            extended = key if stopped_at_target(run_dir) else extended  # (else no step further: not one)
            continue
        if key == "experiment":
            raise ConfigError(f"resume: {item} is not the run being resumed (named {saved.get('name')!r}): a "
                              f"resume runs with the run's own config; give only {' or '.join(LENGTH[unit])} "
                              "beside resume= to extend it, or start a new run without resume=")
        what = "a setting of the run" if key not in GROUPS else f"its {key}"
        length = " or ".join(LENGTH[unit])
        raise ConfigError(f"resume: {item} would change the run being resumed ({what}: "
                          f"{OmegaConf.select(saved, key) if key not in GROUPS else _choice(saved, key)}); "
                          f"a changed strategy, split, model or setting is a new run: start it without resume=, "
                          f"or give only {length} to extend this one")
    length_key = LENGTH[unit][0]
    cap = OmegaConf.select(out, length_key)  # (null: an asynchronous run without a server-update cap)
    if extended == BUDGET and finished(run_dir) and cap is not None and done >= cap:
        raise ConfigError(f"resume: {run_dir} finished all its {done} {unit}s; a larger budget alone trains no "
                          f"further: give {length_key}=N beside {BUDGET}")
    if finished(run_dir) and stopped_at_target(run_dir) and OmegaConf.select(out, "stop_at_target"):
        # (a longer run alone trained one more step, reached the target again and stopped)
        raise ConfigError(f"resume: {run_dir} stopped when it reached its target accuracy ({unit} {done}, "
                          f"stop_at_target); to train on, give stop_at_target=false beside resume= (and "
                          f"{length_key}=N to train longer)")
    if (extended in LENGTH[unit] and finished(run_dir) and OmegaConf.select(out, "stop_at_target")
            and run_summary(run_dir).get("rounds_to_target") == done):
        # reached at its last step, where no stop is asked for: an uninterrupted longer run stops there
        raise ConfigError(f"resume: {run_dir} reached its target accuracy at its last {unit} ({done}) with "
                          f"stop_at_target on, so a longer run would have stopped there; to train on, give "
                          f"stop_at_target=false beside resume= and {length_key}=N")
    if (finished(run_dir) and stopped_early(run_dir) == "privacy budget" and OmegaConf.select(saved, BUDGET) is not None
            and OmegaConf.select(out, BUDGET) == OmegaConf.select(saved, BUDGET)):
        raise ConfigError(f"resume: {run_dir} stopped at its privacy budget ({BUDGET}="
                          f"{OmegaConf.select(saved, BUDGET)}, {unit} {done}); a longer run alone trains no further: "
                          f"raise {BUDGET} beside resume= (or give {BUDGET}=null)")
    limit = ended_on(run_dir, saved, done) if unit == "update" and finished(run_dir) else None
    if limit is not None and OmegaConf.select(out, limit) == OmegaConf.select(saved, limit):
        # it still holds: the resumed loop would stop at once (or, a simulated time budget, train on
        # past the end of a finished run)
        raise ConfigError(f"resume: {run_dir} finished on its {limit}={OmegaConf.select(saved, limit)}; to train "
                          f"on, raise it beside resume= (and {length_key} if it is reached too)")
    if extended is not None and unit == "update" and finished(run_dir):
        _still_reached(run_dir, out, done, extended)
    if extended is None and finished(run_dir) and done >= (OmegaConf.select(saved, length_key) or 0):
        given = checkpoint if checkpoint is not None and checkpoint.name != CHECKPOINT else run_dir  # as given
        raise ConfigError(f"resume: {run_dir} finished all its {done} {unit}s; to train on, extend it: "
                          f"flmnist {resume_arg(given)} {length_key}={2 * done}")
    try:  # what the resume changed, checked as a new run's settings are, before anything is written
        validate(out)
    except ConfigError as err:
        raise ConfigError(f"resume: {err}") from None
    return out


def time_used(run_dir: Path) -> float | None:
    """The seconds an asynchronous run has used of its ``async_loop.time_budget``: its summary's
    virtual time (simulation), else its loop's real seconds (deployment; a summary written before
    they were reported: its wall time, which adds the start); None if unknown."""
    summary = run_summary(run_dir)
    try:
        stats = summary.get("async") or {}
        used = stats.get("virtual_time")
        used = stats.get("loop_seconds") if used is None else used
        used = summary.get("wall_time") if used is None else used
        return float(used) if used is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


def _reached(run_dir: Path, done: int) -> dict[str, tuple[float | None, str]]:
    """An asynchronous run's limits: what it has reached of each, and saying so."""
    used = time_used(run_dir)
    return {"async_loop.max_server_updates": (done, f"done {done} server updates"),
            "async_loop.max_client_updates": ((n := client_updates_done(run_dir)), f"done {n} client updates"),
            "async_loop.time_budget": (used, f"used {used:.1f} s" if used is not None else "")}


def _still_reached(run_dir: Path, out: DictConfig, done: int, extended: str) -> None:
    """A finished asynchronous run extended by ``extended``: ConfigError if another of its limits
    in ``out`` is reached already (the resumed loop would stop at once, having trained nothing,
    and say it finished: a FedAsync run at its 20 server updates given only max_client_updates)."""
    for key, (count, what) in _reached(run_dir, done).items():
        limit = OmegaConf.select(out, key)
        if key != extended and limit is not None and count is not None and count >= limit:
            raise ConfigError(f"resume: {extended}={OmegaConf.select(out, extended)} would train nothing: {run_dir} "
                              f"has {what}, its {key}={limit} too; raise that as well "
                              f"(for example {key}={2 * count:g}, or null)")


def _take_operational(key: str, item: str, cfg: DictConfig, saved: DictConfig, out: DictConfig) -> None:
    """An operational setting given on resume into ``out``. ``logger=X`` naming the run's own
    tracker class keeps the run's settings of it (its MLflow experiment, say); ``logger.KEY=V``
    changes that one."""
    if key == "checkpoint_every" and OmegaConf.select(cfg, key) == 0:
        raise ConfigError(f"resume: {item} would leave what the resume trains without a checkpoint (the next "
                          "resume would start from the old one and train it again): give 1 or more")
    if key == "logger":
        if (cfg.logger or {}).get("_target_") != (saved.get("logger") or {}).get("_target_"):
            OmegaConf.update(out, "logger", cfg.logger, merge=False)
        return
    OmegaConf.update(out, key, OmegaConf.select(cfg, key), merge=False)


def given_beside_resume(overrides: list[str]) -> list[str]:
    """The overrides beside ``resume=`` that :func:`resumed_config` judges (not where the run runs)."""
    return [o for o in overrides if not override_key(o).startswith(WHERE)]


def split_budget(overrides: list[str]) -> tuple[list[str], list[str]]:
    """On resume, ``privacy.max_epsilon=X`` apart from the rest: the default ``privacy=none`` that the
    overrides are composed with has no such key; :func:`resumed_config` takes it. (The overrides, the budget.)"""
    if not any(override_key(o) == "resume" for o in overrides):
        return overrides, []
    budget = [o for o in overrides if override_key(o) == BUDGET]
    return [o for o in overrides if o not in budget], budget


def _data_moved(out: DictConfig, overrides: list[str]) -> None:
    """``data.root``/``data.download`` given on resume into ``out``: the data moved, and the run
    reads it from there now."""
    if moved := [o for o in overrides if override_key(o) in ("data.root", "data.download")]:
        where = compose_config(moved)
        for key in map(override_key, moved):
            OmegaConf.update(out, key, OmegaConf.select(where, key))


def extend_in_place(overrides: list[str], checkpoint: Path, backup=None) -> str:
    """Plain ``flwr run`` with ``resume=`` and other overrides (the ``flmnist`` command checks them
    before Flower starts, writes the run's ``config.yaml``, and hands the ServerApp only ``resume=``
    and where the run runs): :func:`resumed_config` on the run's ``config.yaml`` (with only a new
    ``data.*``: that), written back if it changed. What changed, or ''; ConfigError for an override
    that would change the run. ``backup``: the caller's :class:`~flmnist.core.run_files.ConfigBackup`,
    which retires the summary of a run extended (not of one whose data only moved)."""
    run_dir = checkpoint.parent
    saved = OmegaConf.load(run_dir / "config.yaml")
    if given_beside_resume(overrides):
        out = resumed_config(overrides, saved, run_dir, checkpoint)
    else:
        out = saved.copy()
        _data_moved(out, overrides)
        if resolve_root(out.data.root) == resolve_root(saved.data.root):  # the same folder (the command's case)
            out.data.root = saved.data.root
    if out == saved:
        return ""
    ensure_mnist(resolve_root(out.data.root), out.data.download)  # before config.yaml changes: a failed check keeps it
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(out), durable=True)
    if (changed := extension(saved, out)) and backup is not None:
        backup.retire_summary()
    return ", ".join(filter(None, [changed, *(f"{k}={OmegaConf.select(out, k)}" for k in (
        "data.root", "data.download") if OmegaConf.select(out, k) != OmegaConf.select(saved, k))]))


def _raise_budget(item: str, saved: DictConfig, out: DictConfig) -> bool:
    """``privacy.max_epsilon=X`` on resume: a budget above the run's (or ``null``, none) goes into
    ``out``; the run's own value passes; anything else is refused. Whether it changed."""
    import yaml

    if OmegaConf.select(saved, "privacy.mechanism", default="none") == "none":
        raise ConfigError(f"resume: {item}: the run being resumed has no differential privacy (privacy=none)")
    raw = item.partition("=")[2]
    try:
        new = yaml.safe_load(raw)
    except yaml.YAMLError:
        new = raw
    if new is not None and (isinstance(new, bool) or not isinstance(new, int | float) or new <= 0):
        raise ConfigError(f"resume: {item}: privacy.max_epsilon must be a positive number or null (no budget)")
    old = OmegaConf.select(saved, BUDGET)
    if new == old:
        return False
    if new is not None and (old is None or new < old):
        raise ConfigError(f"resume: {item} would lower the run's privacy budget "
                          f"({BUDGET}={old if old is not None else 'null'}): its releases are already spent; "
                          "give a larger budget, or null for none")
    OmegaConf.update(out, BUDGET, new)
    return True
