"""The ``flmnist`` command: Hydra's command line in front of ``flwr run``.

``flmnist experiment=seed002 strategy=fedprox`` composes the same config as the
ServerApp, checks it, and launches ``flwr run`` on a private local SuperLink with
as many SuperNodes as ``num_nodes``; results go to Hydra's job directory.
``flmnist -m strategy=fedavg,fedprox ...`` runs a sweep and ends with a
comparison table (CSV and Markdown) in the sweep directory; its jobs share one local SuperLink
(:mod:`flmnist.launch.sweep_link`), stopped at the sweep's end. ``flmnist resume=DIR``
(or ``resume=latest``) continues a run in its own directory.

The outcome is honest: every job's config is composed and checked before Flower starts
(a bad setting: one line ``flmnist: error: ...`` and exit code 2, the traceback only with
``HYDRA_FULL_ERROR=1``); the exit code is 1 when a run did not finish (no summary, a
status other than "finished", or ``flwr run`` failing); the exit code is 3 when a run finished
degraded (its global test accuracy fell far below its best and stayed there: ``collapse.*``,
``degraded`` in ``summary.json``; the command's last line says so, and a sweep's comparison
table lists the job as ``degraded``; a sweep with a job that did not finish exits 1); SIGTERM or
SIGHUP stops every process the command started and exits with 128 + the signal number.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import hydra
from hydra._internal.utils import get_args_parser  # Hydra's own command-line parser
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from flmnist.config.compose import (
    check_group_overrides,
    check_hydra_folder,
    compose_config,
    conf_dir,
    override_key,
    sweep_jobs,
    without_no_preset,
)
from flmnist.config.help import help_text, version_text
from flmnist.config.resume import (
    extension,
    given_beside_resume,
    resumed_config,
    split_budget,
)
from flmnist.config.validate import validate
from flmnist.core.checks import check_writable_folder
from flmnist.core.errors import ConfigError, FlmnistError, RunFailed
from flmnist.core.run_files import (
    ConfigBackup,
    absolute_overrides,
    atomic_write,
    file_stamp,
    find_checkpoint,
    hold_run_dir,
    home_expanded,
    quoted,
)
from flmnist.launch import head_start, lanes, output, sweep_state, warm_link
from flmnist.launch.backend import BACKEND_NOTES, check_gpu_share, client_gpus, simulation_backend
from flmnist.launch.comparison import COLUMNS, degraded_message, job_overrides, write_comparison  # noqa: F401
from flmnist.launch.flwr_local import run_flwr
from flmnist.launch.outcome import (  # noqa: F401
    INTERRUPTED,
    Stop,
    finished_line,
    outcome,
    stopped,
    stopped_message,
)
from flmnist.launch.sweep_link import SweepLink
from flmnist.launch.watchdog import watch
from flmnist.ml.mnist_files import ensure_mnist, resolve_root
from flmnist.observers.recorder import final_line

APP_DIR = Path(__file__).resolve().parents[2]
EXIT_FAILED = 1  # a run did not finish
EXIT_ERROR = 2  # a bad setting or input: nothing ran
EXIT_DEGRADED = 3  # a run finished degraded (summary.json: degraded)
MULTIRUN = ("-m", "--multirun")
_resumed: dict[Path, DictConfig] = {}  # run directory -> the config its resume runs with (maybe extended)
_held: list[int] = []  # a sweep job's run directory, held (run_files.hold_run_dir)


def saved_config(run_dir: Path) -> DictConfig:
    """The checked config of the run a resume continues (its ``config.yaml``)."""
    path = run_dir / "config.yaml"
    try:
        saved = OmegaConf.load(path)
        validate(saved)
    except ConfigError as err:
        raise ConfigError(f"resume: the run's config {path} is not valid now: {err}") from err
    except Exception as err:  # an older flmnist's config lacking a section, unreadable YAML ...
        raise ConfigError(f"resume: cannot use the run's config {path} ({type(err).__name__}: {err})") from err
    return saved


def launch(cfg: DictConfig) -> dict:
    """Run one federated training for the composed ``cfg``; return its summary (RunFailed if
    it did not finish). A resume runs in the directory of the run it continues."""
    checked(cfg)
    gpus = client_gpus(cfg)  # this launch's (a resume may move to other hardware)
    check_gpu_share(cfg, gpus)
    hc = HydraConfig.get()
    run_cfg, overrides = cfg, list(hc.overrides.task)
    if cfg.resume:
        checkpoint = find_checkpoint(str(cfg.resume), cfg.output_dir)
        run_dir = checkpoint.parent
        saved = saved_config(run_dir)
        run_cfg = _resumed.get(run_dir, saved).copy()  # worked out before Hydra started (hydra_arguments)
        # config.yaml holds what the resume may change (checked before Hydra started), data.* too: the
        # ServerApp gets resume=, where the run runs and (below) the resolved data.root
        kept = [o for o in overrides if o not in given_beside_resume(overrides)
                and override_key(o) not in ("resume", "data.root", "data.download")]
        overrides = [*kept, f"resume={quoted(checkpoint)}"]
    else:
        run_dir = Path(hc.runtime.output_dir).resolve()
    if hc.mode == RunMode.MULTIRUN:  # a sweep job's own directory (a run's, resumed or not: launch.hold)
        _held.append(hold_run_dir(run_dir, False))  # (released as the job ends: _job)
    root = resolve_root(run_cfg.data.root)
    ensure_mnist(root, run_cfg.data.download)  # fail here, before starting Flower, if MNIST is missing
    backup = None
    if cfg.resume and (run_cfg.data.root != str(root) or run_cfg != saved):  # extended, or the data moved
        backup = ConfigBackup(checkpoint)
        run_cfg.data.root = str(root)
        atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(run_cfg), durable=True)  # once the checks passed
        if changed := extension(saved, run_cfg):
            backup.retire_summary()
            print(f"flmnist: extending {run_dir}: {changed}", flush=True)
    overrides = absolute_overrides(overrides, run_dir)
    if not any(o.startswith("data.root=") for o in overrides):
        overrides.append(f"data.root={quoted(root)}")
    before = file_stamp(run_dir / "summary.json")
    log_from = (run_dir / "flwr_run.log").stat().st_size if cfg.resume and (run_dir / "flwr_run.log").is_file() else 0
    sim, link, flwr_home = cfg.simulation, None, None
    try:
        backend = simulation_backend(cfg, gpus)
        if hc.mode == RunMode.MULTIRUN:  # the jobs share one local SuperLink, stopped at the sweep's end
            if not sweep_state.links:
                sweep_state.links.append(SweepLink())
            link = sweep_state.links[0]
        # the local SuperLink: a sweep's shared one, the one started ahead of the config, or a new one
        if link:
            flwr_home, ports, prepare = link.home_for(hc.job.num, (backend, sim.ray_address)), link.ports, link.warm_up
        elif ahead := head_start.claim():
            flwr_home, ports, prepare = ahead.home, ahead.ports, ahead.prepare
        else:
            flwr_home, ports, prepare = tempfile.mkdtemp(prefix="flmnist-flwr-home-"), None, warm_link.start_if_applies
        watch(flwr_home)  # (kill -9 of this command: the watchdog stops what it started)
        print(f"flmnist: simulation backend: {BACKEND_NOTES[backend]}", flush=True)
        code = run_flwr(APP_DIR, overrides, run_cfg.num_nodes, flwr_home, log_path=run_dir / "flwr_run.log",
                        append=bool(cfg.resume), client_cpus=float(sim.client_cpus), client_gpus=gpus,
                        ray_address=sim.ray_address, backend=backend, until=(until := finished_line(run_dir, before)),
                        ports=ports, stop=link.end_job if link else None, prepare=prepare)
    except (Stop, KeyboardInterrupt) as stop:
        raise stopped(stop, run_cfg, run_dir, before) from None
    except Exception:  # Flower did not start (a full /tmp, no process to spare): the run as it was
        if backup is not None:
            backup.put_back_unless_stepped()
        raise
    finally:
        if not link and flwr_home:
            shutil.rmtree(flwr_home, ignore_errors=True)
    try:
        summary = outcome(run_dir, before, code, log_from)
    except FlmnistError:
        if backup is not None:
            backup.put_back_unless_stepped()
        raise
    if not until.seen:  # Flower's log stream ended before the run's last line: say it from summary.json
        line = f"flmnist: {final_line(summary)}"
        print(line, flush=True)
        with contextlib.suppress(OSError), open(run_dir / "flwr_run.log", "a") as log:  # (full disk: finished still)
            log.write(line + "\n")
    summary.update(job_overrides(hc.overrides.task))
    if summary.get("degraded"):
        sweep_state.degraded.append(("the run" if hc.mode != RunMode.MULTIRUN else f"job {hc.job.num}")
                         + f" finished degraded: {degraded_message(summary)}")
    return summary


def checked(cfg: DictConfig) -> DictConfig:
    """Hydra's composed ``cfg``, checked as :func:`compose_config` checked it before Hydra started:
    ``name=42`` is the name "42" there (it passed, then failed here with its directory made)."""
    if isinstance(cfg.get("name"), int | float) and not isinstance(cfg.name, bool):
        cfg.name = str(cfg.name)
    validate(cfg)
    return cfg


class ComparisonTable(Callback):
    """Hydra callback: record each job's summary in the comparison table (written after every job:
    a stopped sweep keeps the table of the jobs done) and show the table after the sweep."""

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:  # a single run has no table
            return
        value = getattr(job_return, "_return_value", None)
        summary = value if isinstance(value, dict) else {**job_overrides(config.hydra.overrides.task), "status": "failed"}
        sweep_state.record(Path(config.hydra.sweep.dir), int(config.hydra.job.num), summary)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_state.close_links()
        md = sweep_state.write_table(Path(config.hydra.sweep.dir))
        print(f"\nComparison ({Path(config.hydra.sweep.dir) / 'comparison.md'}):\n{md}")


def _job(cfg: DictConfig) -> dict:
    try:
        return launch(cfg)
    except (FlmnistError, OSError) as err:
        hc = HydraConfig.get()
        code = EXIT_FAILED if isinstance(err, RunFailed) else EXIT_ERROR
        if hc.mode != RunMode.MULTIRUN:
            raise Stop(str(err), code, err) from err
        # A sweep goes on with its other jobs; the table lists this one as failed.
        print(f"flmnist: error: job {hc.job.num}: {err}", file=sys.stderr)
        sweep_state.failed_jobs.append(str(hc.job.num))
        return {**job_overrides(hc.overrides.task), "status": "failed", "run_dir": str(Path(hc.runtime.output_dir).resolve())}
    finally:
        while _held:
            os.close(_held.pop())


def hydra_arguments(args: list[str]) -> list[str]:
    """Check every job's config before anything starts (Hydra has not created a directory yet);
    return the arguments to hand to Hydra. A resume is pinned to the directory of its run,
    so Hydra creates no new one."""
    args = home_expanded(without_no_preset(args))
    multirun = any(a in MULTIRUN for a in args)
    overrides = [a for a in args if a not in MULTIRUN]
    if multirun:
        lane_args = [o for o in overrides if override_key(o) == "hydra.launcher.lanes"]  # the launcher's, not a run's
        overrides = [o for o in overrides if o not in lane_args]
        lanes.check_lanes(lane_args[-1].split("=", 1)[1] if lane_args else "auto")
        names, experiments, jobs, configs = set(), set(), sweep_jobs(overrides), []  # Hydra's expansion: a,b ...
        if any(without_no_preset(job) != job for job in jobs):  # (Hydra: "must be a string or a list")
            raise ConfigError(f"{next(o for o in overrides if override_key(o) == 'experiment')}: a sweep cannot "
                              "take null (no preset) among its experiments: run that job as its own command")
        for job in jobs:
            check_group_overrides(job)
            cfg = compose_config(job)
            if cfg.resume:
                raise ConfigError("resume continues one run: drop -m/--multirun")
            check_gpu_share(cfg, client_gpus(cfg))
            ensure_mnist(resolve_root(cfg.data.root), cfg.data.download)
            configs.append(cfg)
            names.add(cfg.name)
            experiments.add(tuple(o for o in job if override_key(o) == "experiment"))
        check_hydra_folder(overrides, multirun=True)  # where Hydra makes the sweep's directory, last: made here
        # Jobs of different names (experiment=a,b) share one sweep directory, named "sweep" (each job
        # named its own, and the table went to a third); a swept experiment names the jobs' folders.
        if len(names) > 1 and not any(override_key(o) == "hydra.sweep.dir" for o in overrides):
            args = [*args, "hydra.sweep.dir=multirun/${now:%Y-%m-%d}/${now:%H-%M-%S}_sweep"]
        if len(experiments) > 1:
            args = [*args, "hydra.job.config.override_dirname.exclude_keys=[data.root,run_dir]"]
        return lanes.with_launcher(args, lane_args, any(override_key(o) == "hydra/launcher" for o in overrides),
                                   configs)
    check_group_overrides(overrides)
    # resume=DIR privacy.max_epsilon=X: a key the default privacy=none lacks; for resumed_config only
    overrides, budget = split_budget(overrides)
    args = [a for a in args if a not in budget]
    cfg = compose_config(overrides)  # its notes (rounds past the end) are the ServerApp's to log, once
    if not cfg.resume:
        check_gpu_share(cfg, client_gpus(cfg))
        ensure_mnist(resolve_root(cfg.data.root), cfg.data.download)  # (downloads it if allowed)
        if check_hydra_folder(overrides, multirun=False) is None:  # where Hydra makes the run's directory, last:
            check_writable_folder("output_dir", cfg.output_dir)  # made here (by default under output_dir)
        return args
    checkpoint = find_checkpoint(str(cfg.resume), cfg.output_dir)  # resume=latest says which it picked
    _resumed[checkpoint.parent] = resumed_config(  # refuses what would change the run
        [o for o in overrides if not o.lstrip("+").startswith("resume=")] + budget, saved_config(checkpoint.parent),
        checkpoint.parent, checkpoint)
    args = [a for a in args if not a.lstrip("+").startswith("resume=")]
    return [*args, f"resume={quoted(checkpoint)}", f"hydra.run.dir={quoted(checkpoint.parent)}",
            "hydra.output_subdir=null"]


def _stop_on(signum: int, frame) -> None:
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)  # one is enough: the stopping must not be cut short
    name = signal.Signals(signum).name
    raise Stop(f"stopped by {name}; every process this run started has been stopped", 128 + signum)


def main() -> None:
    """Console entry point: one clear line and an honest exit code for every outcome."""
    output.install()  # flmnist ... | head: the run goes on when the reader ends
    for s in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(s) is not signal.SIG_IGN:  # (nohup flmnist: a hangup stays ignored)
            signal.signal(s, _stop_on)
    args = sys.argv[1:]
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    if "--version" in args:
        print(version_text())
        return
    if "--help" in args or "-h" in args:
        try:
            print(help_text([a for a in args if a not in ("--help", "-h")]), end="")
        except FlmnistError as err:  # (no conf/, an unknown GROUP=OPTION)
            print(f"flmnist: error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_ERROR) from None
        return
    if "--hydra-help" in args:  # Hydra's own help, for --cfg, --info, --multirun ...
        sys.argv = [sys.argv[0], *("--help" if a == "--hydra-help" else a for a in args)]
    dashed = [a for a in args if a.startswith("--") and "=" in a and not a.startswith(("--config", "--cfg"))]
    if dashed:  # argparse's usage says nothing useful about this
        plain = " ".join(a.lstrip("-") for a in dashed)
        print(f"flmnist: error: {' '.join(dashed)}: settings are Hydra overrides, written without dashes: "
              f"flmnist {plain}", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)
    try:
        if not any(a.startswith("-") and a not in MULTIRUN for a in args):  # not --help, --cfg ...: checked first
            sys.argv = [sys.argv[0], *hydra_arguments(args)]
        elif not any(a in MULTIRUN for a in args) and (hydra_flags := get_args_parser().parse_args(args)).cfg:
            # a preview of the composed config: its settings checked as a run's are (it showed ones that fail)
            compose_config(hydra_flags.overrides)  # (which drops experiment=null, as below)
            sys.argv = [sys.argv[0], *without_no_preset(args)]
        try:
            # (conf/ found here, not at import: a missing one is one error line, --help and --version too)
            hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")(_job)()
        finally:  # on every path out, a sweep's SuperLink too is stopped before the command says why
            sweep_state.close_links()
    except FlmnistError as err:
        if full_error:
            traceback.print_exc()
        print(f"flmnist: error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_FAILED if isinstance(err, RunFailed) else EXIT_ERROR) from None
    except Stop as stop:
        if full_error and stop.cause is not None:
            traceback.print_exception(stop.cause)
        print(f"flmnist: {'error: ' if stop.code in (EXIT_ERROR, EXIT_FAILED) else ''}{stop}", file=sys.stderr)
        raise SystemExit(stop.code) from None
    except KeyboardInterrupt:
        print(f"flmnist: {INTERRUPTED}", file=sys.stderr)
        raise SystemExit(130) from None
    for line in sorted(sweep_state.degraded, key=lambda line: [int(n) for n in re.findall(r"^job (\d+)", line)]):
        print(f"flmnist: {line}", file=sys.stderr)
    if failed := sorted(sweep_state.failed_jobs, key=int):  # (lanes end their jobs in any order)
        print(f"flmnist: error: {len(failed)} sweep job(s) did not finish: {', '.join(failed)}",
              file=sys.stderr)
        raise SystemExit(EXIT_FAILED)
    if sweep_state.degraded:
        raise SystemExit(EXIT_DEGRADED)


__all__ = ["ComparisonTable", "OmegaConf", "launch", "main", "outcome", "write_comparison"]
