"""A run's MLflow run, as its directory records it (``RUN_DIR/mlflow_run_id``), without PyTorch:
the command reads it for a run stopped from outside."""

from __future__ import annotations

from logging import WARNING
from pathlib import Path

from flwr.common.logger import log

from flmnist.observers.trackers import TIMEOUT, within

RUN_ID_FILE = "mlflow_run_id"  # the run's MLflow run id, then the tracking URI of its store


def reachable(uri: str | None) -> str | None:
    """``uri``, unless it is a local SQLite store that is not there (a run directory copied from
    another machine: its store is then the one this machine's output_dir names)."""
    if uri and uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return None
    return uri


def saved_run(run_dir: Path) -> tuple[str | None, str | None]:
    """The MLflow run id and tracking URI in ``RUN_DIR/mlflow_run_id`` (None for what is missing)."""
    try:
        lines = [line.strip() for line in (run_dir / RUN_ID_FILE).read_text().splitlines() if line.strip()]
    except OSError:
        return None, None
    return (lines[0] if lines else None), (lines[1] if len(lines) > 1 else None)


def mark_stopped(run_dir: Path, timeout: float = TIMEOUT) -> None:
    """A run stopped from outside: its MLflow run (``RUN_DIR/mlflow_run_id``), still RUNNING, is
    KILLED (the server that would have ended it is gone), within ``timeout`` seconds (the run's
    ``logger.timeout``). Never raises."""
    run_id, uri = saved_run(run_dir)
    if run_id is None or reachable(uri) is None:
        return
    def kill() -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")

    try:
        within(timeout, kill)  # (an unreachable tracking server must not hold the command)
    except Exception as err:  # noqa: BLE001 - a tracker must never lose the run's summary
        log(WARNING, "MLflow run %s of the stopped run could not be marked KILLED (%s: %s)", run_id,
            type(err).__name__, err)
