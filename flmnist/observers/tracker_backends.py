"""The two experiment trackers, TensorBoard and MLflow (``logger=tensorboard|mlflow``): each imports
its package only when a run uses it. Install the extras: ``pip install -e ".[tensorboard]"`` or
``".[mlflow]"``."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from flmnist.core.errors import ConfigError
from flmnist.core.run_files import atomic_write
from flmnist.observers.mlflow_run import RUN_ID_FILE, reachable, saved_run
from flmnist.observers.trackers import TIMEOUT, Tracker, check_timeout, flat


def _missing(package: str, extra: str) -> ConfigError:
    return ConfigError(f"logger={extra} needs the {package} package: pip install -e \".[{extra}]\"")


class TensorBoardTracker(Tracker):
    """Event files in ``RUN_DIR/tensorboard`` (``tensorboard --logdir outputs``): scalars per
    step, the config as text, the final summary as text."""

    def __init__(self, log_dir: str | None = None, timeout: float = TIMEOUT) -> None:
        self.timeout = check_timeout(timeout)
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as err:
            raise _missing("tensorboard", "tensorboard") from err
        self.log_dir = log_dir
        self.writer = None
        self.purge: int | None = None
        self.replay: dict[int, dict[str, float]] = {}

    def start(self, run_dir: Path, name: str, config: dict) -> None:
        self.path = Path(self.log_dir) / name if self.log_dir else run_dir / "tensorboard"
        self.config_text = "\n".join(f"    {k}: {v}" for k, v in flat(config).items())

    def resumed_at(self, step: int) -> None:
        """A resumed run: the steps after its checkpoint's, logged by the attempt that crashed, are
        purged (TensorBoard drew both, a zigzag)."""
        self.purge = step + 1

    def history(self, rows: dict[int, dict[str, float]]) -> None:
        self.replay = rows

    def _open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        fresh = not any(self.path.glob("events.out.tfevents.*"))  # (the logger added on resume: all the steps)
        self.writer = SummaryWriter(log_dir=str(self.path), purge_step=None if fresh else self.purge)
        if fresh:
            self.writer.add_text("config", self.config_text, 0)
            for step, metrics in sorted(self.replay.items()):
                for key, value in metrics.items():
                    self.writer.add_scalar(key, value, step)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer is None:  # opened at the first step, when a resume has said where it goes on
            self._open()
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self, run_dir: Path, summary: dict) -> None:
        if self.writer is None:
            self._open()
        self.writer.add_text("summary", "    " + json.dumps(summary, indent=1).replace("\n", "\n    "), 0)
        self.writer.close()


def mlflow_key(key: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_-. /``): a digit group's metrics
    (``test_pred_share_0,2,4,6,8``) get ``_`` for each other character (``test_pred_share_0_2_4_6_8``);
    MLflow refuses the whole batch, and the tracker is turned off, on one name it does not accept."""
    return re.sub(r"[^\w\-. /]", "_", key, flags=re.ASCII)


class MLflowTracker(Tracker):
    """One MLflow run per flmnist run: the config as parameters, metrics per step, the final
    model, the summary and the plots as artifacts. The store is local by default:
    ``OUTPUT_DIR/mlflow.db`` with artifacts in ``OUTPUT_DIR/mlartifacts`` (``mlflow ui
    --backend-store-uri sqlite:///outputs/mlflow.db``; beside the run directory when ``run_dir``
    is outside ``output_dir``); ``tracking_uri`` names another. A resumed or extended run
    continues its MLflow run."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = "flmnist", timeout: float = TIMEOUT) -> None:
        self.timeout = check_timeout(timeout)
        try:
            import mlflow  # noqa: F401
        except ImportError as err:
            raise _missing("mlflow-skinny", "mlflow") from err
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.client = None
        self.run_id: str | None = None
        self.replay: dict[int, dict[str, float]] = {}

    def history(self, rows: dict[int, dict[str, float]]) -> None:
        self.replay = rows

    def start(self, run_dir: Path, name: str, config: dict) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        out = Path(config.get("output_dir") or "outputs").expanduser().resolve()
        under = run_dir.resolve().is_relative_to(out)
        store = out if under else run_dir.parent  # (an explicit run_dir)
        # a resumed run outside output_dir (a relative output_dir resolved from another working
        # directory named another store, and the run started afresh there): the store it was in
        saved_id, saved_uri = saved_run(run_dir)
        uri = self.tracking_uri or (None if under else reachable(saved_uri)) or f"sqlite:///{store / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(
            self.experiment, artifact_location=(store / "mlartifacts").as_uri() if not self.tracking_uri else None)
        params = flat(config)
        self.run_id = self._continued(saved_id, experiment_id, params)
        if self.run_id is None:
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            atomic_write(run_dir / RUN_ID_FILE, f"{self.run_id}\n{uri}\n")  # (half a file: a resume's new MLflow run)
            self._log([m for step, metrics in sorted(self.replay.items())  # a resumed run new to MLflow:
                       for m in self._metrics(step, metrics)])            # its steps so far, in few requests
        keys = list(params)
        for i in range(0, len(keys), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=[Param(k, params[k][:6000]) for k in keys[i:i + 100]])

    def _continued(self, run_id: str | None, experiment_id: str, params: dict[str, str]) -> str | None:
        """A resumed or extended run's MLflow run (its id in ``RUN_DIR/mlflow_run_id``), back to
        RUNNING; ``params`` is left with the keys it does not have yet (MLflow refuses a changed
        parameter: those, such as an extension's ``num_rounds``, become ``resumed.*`` tags). None:
        a new run (no id file, or the run is not in this store's experiment)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id or "")
        except MlflowException:
            return None
        if run.info.experiment_id != experiment_id:
            return None
        logged = run.data.params
        for key in [k for k in params if k in logged]:
            value = params.pop(key)[:6000]
            if logged[key] != value:
                self.client.set_tag(run_id, f"resumed.{key}", value)
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._log(self._metrics(step, metrics))

    @staticmethod
    def _metrics(step: int, metrics: dict[str, float]) -> list:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        return [Metric(mlflow_key(k), v, now, step) for k, v in metrics.items()]

    def _log(self, items: list) -> None:
        for i in range(0, len(items), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def finish(self, run_dir: Path, summary: dict) -> None:
        """The run's status first, then the summary, the model and every plot: an upload cut
        short by ``logger.timeout`` (a slow server) leaves the run's artifacts incomplete, never
        the run RUNNING."""
        self.client.set_terminated(self.run_id, "FINISHED" if summary.get("status") == "finished" else "FAILED")
        self.client.log_dict(self.run_id, summary, "summary.json")  # the file is written after the trackers
        for path in [run_dir / "model.pt", *sorted(run_dir.glob("*.png"))]:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
