"""The summary of a run stopped from outside (SIGTERM, SIGHUP, Ctrl-C), made by the ``flmnist``
command from what the run wrote: its server process is gone by then, its files are not."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from flmnist.core.constants import PRIVACY_LEDGER as LEDGER
from flmnist.core.run_files import run_config
from flmnist.observers.attribution_table import last_snapshot, stopped_section
from flmnist.observers.collapse import DROP, PATIENCE
from flmnist.observers.mlflow_run import mark_stopped
from flmnist.observers.recorder import SECTIONS_FILE, RunRecorder, run_label
from flmnist.observers.trackers import TIMEOUT, check_timeout


def _json(path: Path, default=None):
    """The JSON in ``path``, ``default`` when there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else default


def summarize_stopped(run_dir: Path, num_rounds: int, target_accuracy: float, unit: str, reason: str,
                      collapse_drop: float | None = DROP, collapse_patience: int = PATIENCE) -> dict | None:
    """The summary of a stopped run: ``summary.json`` says ``status: stopped`` and why.

    The metrics files are read back as a checkpoint's recorder state is (:meth:`RunRecorder.restore`),
    the loop's and the screen's statistics and the other sections reported so far (privacy spent,
    the nodes' devices, an early stop: ``summary_sections.json``) too; the attribution section,
    made as a run finishes, from the last snapshot in ``attribution.csv``. The plots are drawn
    (titled as the run's were); ``model.pt`` and the checkpoint stay as the run left them. None
    when the run wrote no metrics yet.
    """
    run_dir = Path(run_dir)
    try:
        rows = {int(r["round"]): r for r in json.loads((run_dir / "metrics.json").read_text())}
        traces = json.loads((run_dir / "client_loss.json").read_text())
        points = _json(run_dir / "client_loss_means.json", {})
        async_stats, screen_stats = (_json(run_dir / f"{n}.json") for n in ("async_stats", "screen_stats"))
    except (OSError, ValueError, TypeError, KeyError):
        return None
    try:
        sections = _json(run_dir / SECTIONS_FILE, {})
        sections = sections if isinstance(sections, dict) else {}
    except (OSError, ValueError):  # (written atomically: not expected) the rest of the summary stands
        sections = {}
    snapshot = last_snapshot(run_dir / "attribution.csv")
    if sections.get("attribution") is None and snapshot is not None:
        sections["attribution"] = stopped_section(snapshot)
    sections["privacy"] = _with_ledger(sections.get("privacy"), run_dir / LEDGER)
    evaluated = [(n, r["test_accuracy"]) for n, r in sorted(rows.items()) if n > 0 and r.get("test_accuracy") is not None]
    best_round, best_accuracy = max(evaluated, key=lambda e: e[1], default=(None, None))  # ties: the earliest
    config = None
    try:  # the plots' titles name the run, as the run's own did
        config = run_config(run_dir)
        label = run_label(config)
    except (TypeError, KeyError, AttributeError):  # no flmnist config.yaml, or one without these keys
        label = ""
    rec = RunRecorder(run_dir, num_rounds, target_accuracy, printer=lambda _: None, unit=unit, label=label,
                      collapse_drop=collapse_drop, collapse_patience=collapse_patience)
    rec.restore({"rows": rows, "loss_traces": traces, "loss_points": points, "async_stats": async_stats,
                 "best_accuracy": best_accuracy, "best_round": best_round,
                 "elapsed": max((r.get("wall_time") or 0.0 for r in rows.values()), default=0.0)})
    rec.model_saved = True  # the global model is not in this process: model.pt stays as it was
    rec.screen_stats = screen_stats
    for name, value in sections.items():
        if value is not None and name not in ("async", "screen"):  # (their own files above)
            rec.set_section(name, value)
    summary = rec.finish("stopped", reason)
    plot_stopped_attribution(run_dir, label, snapshot)
    mark_stopped(run_dir, logger_timeout(config))
    return summary


def logger_timeout(config) -> float:
    """The run's ``logger.timeout`` (its tracker's calls), or the default."""
    try:
        return check_timeout(config["logger"]["timeout"])
    except Exception:  # noqa: BLE001 - no config, no tracker's timeout in it (an older run), a bad one
        return TIMEOUT


def _with_ledger(privacy, ledger: Path) -> dict | None:
    """The privacy section with the ledger's epsilon where it is higher (DP-SGD charges each task
    as it is sent, the section is reported at each step), or from the ledger alone (stopped
    before its first step's report)."""
    privacy = privacy if isinstance(privacy, dict) else None
    try:
        spent = float(json.loads(ledger.read_text())["epsilon"])
    except (OSError, ValueError, KeyError, TypeError):
        return privacy
    if privacy is None or spent > float(privacy.get("epsilon") or 0.0):
        return {**(privacy or {}), "epsilon": round(spent, 6), "epsilon_from": f"{ledger.name} (spent after the last step's report)"}
    return privacy


def plot_stopped_attribution(run_dir: Path, label: str = "", snapshot=None) -> None:
    """``attribution.png`` of a stopped run, from the last snapshot in its ``attribution.csv``
    (``snapshot``: that, read already); none without one (attribution off, or stopped before its
    first snapshot)."""
    snapshot = snapshot or last_snapshot(run_dir / "attribution.csv")
    if snapshot is None:
        return
    _, totals, _ = snapshot
    try:
        from flmnist.observers.plots import plot_attribution

        plot_attribution(run_dir, list(totals), np.array(list(totals.values())), label)
    except Exception as err:  # noqa: BLE001 - a plot must never lose the run's results
        logging.getLogger("flwr").warning("Attribution plot failed (%s); the table is in attribution.csv", err)
