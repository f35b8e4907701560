"""Experiment trackers beside the run directory's files: TensorBoard and MLflow (``logger=``).

A tracker gets the run's config at the start, every recorded round's (or server update's)
scalar metrics (losses, accuracies, per-digit accuracy, prediction shares, counts, times), and
the final model and summary at the end. Its failures are logged, never raised: a tracker must
not lose a run. Nor hold it: a call that takes longer than the tracker's ``timeout``
(``logger.timeout``, seconds; an unreachable tracking server, which MLflow's client retries for
minutes) is left behind on a thread of its own, and the tracker is off for the rest of the run.
Install the extras: ``pip install -e ".[tensorboard]"`` or ``".[mlflow]"``.
"""

from __future__ import annotations

import json
import math
import threading
from logging import WARNING
from pathlib import Path

from flwr.common.logger import log

from flmnist.core.checks import check_number

TIMEOUT = 30.0  # seconds a tracker call may take (logger.timeout)


class TrackerTimeout(Exception):
    """A tracker call that did not finish within its timeout (left running on its thread)."""


def check_timeout(timeout) -> float:
    """``logger.timeout`` as seconds (the project's number check, naming it), at most what a wait can count."""
    return min(check_number("logger.timeout", timeout, 0.0, low_open=True), threading.TIMEOUT_MAX)


class Tracker:
    """What the recorder calls; every method may be a no-op."""

    timeout: float = TIMEOUT  # seconds a call may take before the tracker is turned off

    def start(self, run_dir: Path, name: str, config: dict) -> None: ...

    def resumed_at(self, step: int) -> None: ...

    def history(self, rows: dict[int, dict[str, float]]) -> None:
        """A resumed run's metrics up to its checkpoint (step -> scalars), before :meth:`start`: a
        tracker that does not continue a tracker run of its own that has them logs them."""

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def finish(self, run_dir: Path, summary: dict) -> None: ...


def scalars(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row (not the step itself)."""
    return {k: float(v) for k, v in row.items() if k != "round" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def flat(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys, values as text (what trackers take as parameters)."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class Trackers:
    """The run's trackers behind one guard: a tracker that fails is logged and dropped."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = list(trackers)

    def resumed(self, step: int, rows: dict[int, dict]) -> None:
        """A resumed run, from its checkpoint of ``step`` with the metrics ``rows`` up to it."""
        self.call("resumed_at", step)
        self.call("history", {s: scalars(row) for s, row in sorted(rows.items()) if s <= step})

    def call(self, method: str, *args) -> None:
        for tracker in list(self.trackers):
            if type(tracker) is Tracker:  # logger=none: nothing to call
                continue
            timeout = getattr(tracker, "timeout", TIMEOUT)
            try:
                within(timeout, getattr(tracker, method), *args)
            except TrackerTimeout:
                log(WARNING, "%s did not finish %s within %g s (logger.timeout; an unreachable tracking server?); "
                    "it is off for the rest of the run, and the run's own files are complete",
                    type(tracker).__name__, method, timeout)
                self.trackers.remove(tracker)
            except Exception as err:  # noqa: BLE001 - a tracker must never lose the run
                log(WARNING, "%s failed in %s (%s: %s); it is off for the rest of the run",
                    type(tracker).__name__, method, type(err).__name__, err)
                self.trackers.remove(tracker)
            except BaseException:  # (Ctrl-C while waiting, in this thread: its call may still run; nothing else may call it)
                self.trackers.remove(tracker)
                raise


def within(timeout: float, fn, *args):
    """``fn(*args)``, or TrackerTimeout after ``timeout`` seconds, ``fn`` left running on its thread
    (a daemon: a call that never returns does not hold the process at its exit either)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as err:  # noqa: BLE001 - raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=run, name="flmnist-tracker", daemon=True)
    thread.start()
    thread.join(min(timeout, threading.TIMEOUT_MAX))
    if thread.is_alive():
        raise TrackerTimeout(f"no answer within {timeout:g} s")
    error = outcome.get("error")
    if error is not None and not isinstance(error, Exception):  # (a SystemExit in a tracker's library: its failure)
        raise RuntimeError(f"{type(error).__name__} {error}".strip()) from error
    if error is not None:
        raise error
    return outcome.get("value")
