"""flmnist's ServerApp: compose the config, build the run, start its engine, write the results.

The run config key ``overrides`` carries Hydra overrides, e.g.::

    flwr run . --run-config 'overrides="experiment=seed002 strategy=fedprox"'
"""

from __future__ import annotations

import threading
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import RunNotRunningException
from omegaconf import DictConfig

from flmnist.config.compose import compose_config, parse_overrides
from flmnist.config.resume import extend_in_place, split_budget
from flmnist.core.build import build
from flmnist.core.run_files import CHECKPOINT, ConfigBackup, find_checkpoint
from flmnist.ml.export import export_model
from flmnist.ml.threads import confine_torch
from flmnist.runtime.run_setup import build_run

app = ServerApp()


def run(grid: Grid, cfg: DictConfig) -> dict:
    """One federated training as ``cfg`` describes it; returns the run summary.

    The results so far are written whatever happens; a run that did not finish is saved with
    status "failed" and the error (``stopped`` when it was stopped from outside), and the error is
    raised again so Flower reports it too.
    """
    run = build_run(grid, cfg)
    status, error, late = "failed", None, None
    try:
        run.engine.run(run.initial, run.checkpoint)
        run.checkpoints_written()  # (written on a thread of their own: an error writing one fails the run)
        status = "finished"
    except BaseException as err:
        try:  # before outcome() looks for a checkpoint to resume from
            run.checkpoints_written()
        except BaseException as late_err:  # noqa: BLE001 - the run's own error is the one raised (a second Ctrl-C too)
            log(ERROR, "Writing a checkpoint failed too: %s: %s", type(late_err).__name__, late_err)
        status, error = outcome(err, run.run_dir)
        raise
    finally:
        try:  # what the engine and its observers have to add to the summary, then the model's exports
            run.engine.finish()
            if run.recorder.save_model():  # (a model.pt that cannot be written is said, not raised)
                export_model(build(run.cfg.model, "model"), run.run_dir)
        except Exception as err:  # noqa: BLE001 - never instead of the summary, nor of the run's own error
            log(ERROR, "Finishing the run failed: %s: %s", type(err).__name__, err)
            if status == "finished":
                status, error, late = "failed", f"finishing the run: {type(err).__name__}: {err}", err
        summary = run.recorder.finish(status, error)  # summary.json last: the run is over
    if late is not None:
        raise late
    return summary


def outcome(err: BaseException, run_dir) -> tuple[str, str]:
    """The summary's status and error for a run that ``err`` ended. Stopped from outside (Ctrl-C,
    SIGTERM, ``flwr stop``): Flower's signal handler exits the process's main thread while the run
    goes on in this one, whose next step then meets the interpreter's shutdown ("cannot schedule
    new futures after interpreter shutdown"); or the handler's exit reaches this thread itself; or the
    SuperLink says the run is no longer running (``flwr stop`` in a deployment). (The shutdown's
    error can come before the main thread is marked ended: Python's shutdown runs the executors'
    exit hooks first, so that error says so itself.)"""
    shutdown = isinstance(err, RuntimeError) and "after interpreter shutdown" in str(err)
    outside = isinstance(err, (KeyboardInterrupt, SystemExit, RunNotRunningException)) or (
        threading.current_thread() is not threading.main_thread()
        and (shutdown or not threading.main_thread().is_alive()))
    if outside:
        more = f"; continue it with resume={run_dir}" if (Path(run_dir) / CHECKPOINT).is_file() else ""
        return "stopped", (f"stopped from outside (Ctrl-C, SIGTERM or flwr stop: the ServerApp's process is "
                           f"exiting; {type(err).__name__}: {err}){more}")
    return "failed", f"{type(err).__name__}: {err}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: compose the config from the run config's overrides and run."""
    confine_torch()  # before anything here starts PyTorch threads
    notes: list[str] = []
    overrides = parse_overrides(str(context.run_config.get("overrides", "")))
    cfg = compose_config(split_budget(overrides)[0], notes)
    backup = None
    if cfg.resume:  # plain flwr run: extend or refuse, as the flmnist command does
        checkpoint = find_checkpoint(str(cfg.resume), cfg.output_dir)
        cfg.resume = str(checkpoint)  # resume=latest: the one found, once
        backup = ConfigBackup(checkpoint)
        if changed := extend_in_place(overrides, checkpoint, backup):
            log(INFO, "flmnist: extending the run: %s", changed)
        else:
            backup = None
    for note in notes:
        log(INFO, "%s", note)
    try:
        run(grid, cfg)
    except BaseException:
        if backup is not None:
            backup.put_back_unless_stepped()
        raise
