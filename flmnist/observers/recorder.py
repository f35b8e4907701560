"""The run directory: metrics per round (JSON and CSV, written as they come), models, summary.

Files are rewritten atomically after every round, so a crash keeps the results so far.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from flmnist.core.run_files import atomic_write
from flmnist.observers.collapse import DROP, PATIENCE, describe, find_collapse
from flmnist.observers.trackers import Trackers, scalars

SCALAR = (int, float, str, type(None))
SECTIONS = {"async": "async_stats", "screen": "screen_stats", "stopped_early": "stopped_early"}  # summary.json sections others report
SECTIONS_FILE = "summary_sections.json"  # the summary's other sections so far (privacy, node_devices ...)
FINAL_LINE = "Run {status}:"  # the start of the last line a run prints (after summary.json is written)
DEGRADED = "finished degraded"  # FINAL_LINE's status of a finished run that collapsed (summary.json: degraded)


def _clean(value):
    """``value`` as strict JSON takes it: non-finite numbers as null, NumPy scalars as Python's."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RunRecorder:
    """Collects each round's metrics from strategies and hooks, and writes the run directory."""

    def __init__(self, run_dir: Path, num_rounds: int, target_accuracy: float, printer=print,
                 unit: str = "round", save_tensors=None, label: str = "", trackers: Trackers | None = None,
                 collapse_drop: float | None = DROP, collapse_patience: int = PATIENCE) -> None:
        """``save_tensors(state_dict, path)`` writes ``model_best.pt`` and ``model.pt`` (the run
        passes :func:`flmnist.ml.export.save_state_dict`); None: no model files (the flmnist
        command's summary of a stopped run, which needs no PyTorch). ``label``: strategy, split and
        model, for plot titles; ``trackers``: experiment trackers (``logger=``).
        ``collapse_drop``, ``collapse_patience``: when the summary calls the run degraded
        (:func:`~flmnist.observers.collapse.find_collapse`; ``collapse.*``); drop None: never."""
        self.save_tensors = save_tensors
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.num_rounds = num_rounds
        self.target_accuracy = target_accuracy
        self.printer = printer
        self.rows: dict[int, dict] = {}
        self.loss_traces: dict[str, list[float]] = defaultdict(list)  # per node: every batch's loss
        self.loss_points: dict[str, list] = defaultdict(list)  # per node: [step, mean loss of that update]
        self.label = label
        self.t0 = time.perf_counter()
        self.best_accuracy: float | None = None
        self.best_round: int | None = None
        self.final_state: dict | None = None
        self.best_state: dict | None = None  # the weights in model_best.pt
        self.model_saved: bool | None = False  # None: it could not be written (said once)
        self.unit = unit  # "round" (synchronous) or "update" (asynchronous server updates)
        self.async_stats: dict | None = None
        self.screen_stats: dict | None = None  # what the reply screen rejected, per node and reason
        self.stopped_early: dict | None = None  # stop_at_target: when and why the run ended early
        self.extra: dict = {}  # summary sections from evaluation hooks (attribution)
        self.trackers = trackers if trackers is not None else Trackers([])
        self.losses_withheld = False  # privacy.node_metrics=withheld: the nodes send no training loss to record
        self.tracked: set[int] = set()  # rows handed to the trackers
        self.collapse_drop, self.collapse_patience = collapse_drop, collapse_patience

    def set_section(self, name: str, value) -> None:
        """Report a section of ``summary.json``: ``async`` (the asynchronous loop's statistics, also
        ``async_stats.json``), ``screen`` (the reply screen's counters), ``stopped_early``, or any
        other name (an observer's own section, a node table)."""
        if name in SECTIONS:
            setattr(self, SECTIONS[name], value)
        else:
            self.extra[name] = value

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def state(self, step: int | None = None) -> dict:
        """What a checkpoint of ``step`` keeps of the recorder; the best model's weights too when
        they are not the checkpoint's own model (the best came at an earlier step)."""
        return {"rows": self.rows, "loss_traces": dict(self.loss_traces), "loss_points": dict(self.loss_points),
                "best_accuracy": self.best_accuracy, "best_round": self.best_round,
                "best_state": self.best_state if self.best_round != step else None,
                "elapsed": self.elapsed(), "async_stats": self.async_stats}

    def restore(self, state: dict, final_state: dict | None = None, step: int | None = None) -> None:
        """Continue from a checkpoint of ``step``: earlier rows are kept and later rounds added to
        them; ``final_state`` is the checkpoint's model (the run's model until a new one is made).
        ``model_best.pt`` is written again from the checkpoint, so that it is the model of the
        restored ``best_round``, not one a crashed attempt saved after the checkpoint."""
        if final_state is not None:
            self.final_state = final_state
        best_round = state["best_round"]
        self.best_state = state.get("best_state") or (final_state if best_round == step else None)
        if self.save_tensors is not None:
            path = self.run_dir / "model_best.pt"
            if self.best_state is not None:
                self.save_tensors(self.best_state, path)
            elif best_round is None:
                path.unlink(missing_ok=True)
        self._forget_attempt()
        self.rows = {int(k): v for k, v in state["rows"].items()}
        self.loss_traces = defaultdict(list, state["loss_traces"])
        self.loss_points = defaultdict(list, state.get("loss_points", {}))
        self.best_accuracy, self.best_round = state["best_accuracy"], state["best_round"]
        self.tracked = set(self.rows)  # the trackers had them (a tracker new on resume is handed them: history)
        if step is not None:
            self.trackers.resumed(step, self.rows)
        self.async_stats = state.get("async_stats")
        self.t0 = time.perf_counter() - state["elapsed"]

    def _forget_attempt(self) -> None:
        """On restore: of the sections an earlier attempt left (``summary_sections.json``) keep what
        still holds (privacy spent, the nodes' devices); its early stop and its attribution (the
        CSV's last snapshot is newer) go."""
        path = self.run_dir / SECTIONS_FILE
        try:
            sections = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(sections, dict):
            kept = {k: v for k, v in sections.items() if k not in ("stopped_early", "attribution")}
            atomic_write(path, json.dumps(kept, indent=1))

    def add(self, server_round: int, **fields) -> None:
        """Merge fields into the record of ``server_round``; into a row the trackers already have
        (the client evaluation a train reply brings a round later), they go to the trackers too."""
        if self.losses_withheld:
            fields.pop("train_loss", None)
        row = self.rows.setdefault(server_round, {"round": server_round})
        row.update({k: {**row[k], **v} if isinstance(v, dict) and isinstance(row.get(k), dict) else v
                    for k, v in fields.items()})  # a table (update_eval) gains entries
        if server_round in self.tracked and (late := scalars(fields)):
            self.trackers.call("log_metrics", server_round, late)

    def add_loss_trace(self, name: str, trace: list[float], step: int | None = None) -> None:
        if self.losses_withheld:  # (a node that sent one all the same: not recorded)
            return
        self.loss_traces[name].extend(float(x) for x in trace)
        if step is not None and trace:
            self.loss_points[name].append([step, float(sum(trace) / len(trace))])

    def end_round(self, server_round: int, state_dict: dict | None = None, quiet: bool = False) -> None:
        """Stamp the time, keep the best model, write the metrics files and print one progress line."""
        self.add(server_round, wall_time=round(self.elapsed(), 3))
        row = self.rows[server_round]
        acc = row.get("test_accuracy")
        if state_dict is not None:
            self.final_state = state_dict
            # Round 0 is the initial model, untrained: never the run's best (as in every other figure).
            if acc is not None and server_round > 0 and (self.best_accuracy is None or acc > self.best_accuracy):
                self.best_accuracy, self.best_round, self.best_state = acc, server_round, state_dict
                if self.save_tensors is not None:
                    self.save_tensors(state_dict, self.run_dir / "model_best.pt")
        self.write_metrics()
        if server_round not in self.tracked:  # (a step recorded again, async's wind-down: add logged what is new)
            self.trackers.call("log_metrics", server_round, scalars(row))
            self.tracked.add(server_round)
        if server_round > 0 and not quiet:
            self.printer(self.progress_line(row))

    def progress_line(self, row: dict) -> str:
        total = f"/{self.num_rounds}" if self.num_rounds else ""
        parts = [f"[{self.unit} {row['round']}{total}]"]
        if row.get("test_accuracy") is not None:
            parts.append(f"test accuracy {100 * row['test_accuracy']:.2f}%")
        if row.get("train_loss") is not None:
            parts.append(f"train loss {row['train_loss']:.4f}")
        if row.get("client_accuracy") is not None:
            parts.append(f"client accuracy {100 * row['client_accuracy']:.2f}%")
        if row.get("virtual_time") is not None:
            parts.append(f"virtual time {row['virtual_time']:.1f} s")
        if row.get("client_updates") is not None:
            parts.append(f"{row['client_updates']} client updates")
        if row.get("rejected_updates"):
            parts.append(f"{row['rejected_updates']} update(s) rejected")
        if row.get("epsilon") is not None:
            parts.append(f"epsilon {row['epsilon']:.3g}")
        parts.append(f"{row['wall_time']:.1f} s elapsed")
        return parts[0] + " " + " | ".join(parts[1:])

    def scalar_rows(self) -> list[dict]:
        return [
            {k: v for k, v in row.items() if isinstance(v, SCALAR)}
            for _, row in sorted(self.rows.items())
        ]

    def write_metrics(self) -> None:
        rows = [_clean(row) for _, row in sorted(self.rows.items())]
        atomic_write(self.run_dir / "metrics.json", json.dumps(rows, indent=1))
        flat = [_clean(row) for row in self.scalar_rows()]  # (as metrics.json: nan and inf as empty cells)
        columns: list[str] = []
        for row in flat:
            columns += [k for k in row if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(flat)
        atomic_write(self.run_dir / "metrics.csv", buf.getvalue())
        atomic_write(self.run_dir / "client_loss.json", json.dumps(self.loss_traces))
        atomic_write(self.run_dir / "client_loss_means.json", json.dumps(self.loss_points))
        for name in ("async_stats", "screen_stats"):  # (the screen's: for the summary of a run stopped from outside)
            if (value := getattr(self, name)) is not None:
                atomic_write(self.run_dir / f"{name}.json", json.dumps(_clean(value), indent=1))
        sections = {**self.extra, "stopped_early": self.stopped_early}  # (the others', for the same summary)
        if any(v is not None for v in sections.values()):
            atomic_write(self.run_dir / SECTIONS_FILE, json.dumps(_clean(sections), indent=1))

    def degraded(self) -> dict | None:
        """The collapse of the global test accuracy (``summary.json``'s ``degraded``), or None:
        the evaluated steps after the initial model, suspects from the attribution's ``by_step``."""
        if self.collapse_drop is None:
            return None
        rows = [r for r in self.scalar_rows() if r["round"] > 0]
        attribution = self.extra.get("attribution")
        by_step = attribution.get("by_step") if isinstance(attribution, dict) else None
        return find_collapse(rows, self.collapse_drop, self.collapse_patience, by_step)

    def summary(self, status: str = "finished", error: str | None = None) -> dict:
        evaluated = [r for r in self.scalar_rows() if r.get("test_accuracy") is not None and r["round"] > 0]
        final = evaluated[-1] if evaluated else {}
        reached = [r for r in evaluated if r["test_accuracy"] >= self.target_accuracy]
        return {
            "status": status,
            # a round that ended (a failed round's partial row, before the run stopped, did not)
            "rounds_completed": max((r for r, row in self.rows.items() if r > 0 and "wall_time" in row), default=0),
            "final_accuracy": final.get("test_accuracy"),
            "final_loss": final.get("test_loss"),
            "best_accuracy": self.best_accuracy,
            "best_round": self.best_round,
            "target_accuracy": self.target_accuracy,
            "rounds_to_target": reached[0]["round"] if reached else None,
            "virtual_time_to_target": reached[0].get("virtual_time") if reached else None,
            "client_updates_to_target": reached[0].get("client_updates") if reached else None,
            "final_virtual_time": final.get("virtual_time"),
            "unit": self.unit,
            "stopped_early": self.stopped_early,
            "async": self.async_stats,
            "screen": self.screen_stats,
            **self.extra,
            "degraded": self.degraded(),
            "error": error,
            "wall_time": round(self.elapsed(), 2),
            "run_dir": str(self.run_dir),
        }

    def summary_table(self) -> str:
        """The evaluated steps as a Markdown table; columns fit the run (async: server updates,
        client updates and virtual time; client accuracy only when nodes evaluated)."""
        rows = [r for r in self.scalar_rows() if r["round"] > 0 and r.get("test_accuracy") is not None]

        def fmt(v, pct=False):
            if v is None:
                return "-"
            return f"{100 * v:.2f}%" if pct else f"{v:.4f}"

        columns = [("round" if self.unit == "round" else "server update", lambda r: str(r["round"]))]
        if self.unit != "round" or any(r.get("client_updates") is not None for r in rows):
            columns.append(("client updates", lambda r: str(r.get("client_updates", "-"))))
        if any(r.get("virtual_time") is not None for r in rows):
            columns.append(("virtual time (s)", lambda r: f"{r['virtual_time']:.1f}" if r.get("virtual_time")
                            is not None else "-"))
        columns.append(("train loss", lambda r: fmt(r.get("train_loss"))))
        if any(r.get("client_accuracy") is not None for r in rows):
            columns.append(("client acc", lambda r: fmt(r.get("client_accuracy"), True)))
        columns += [("test loss", lambda r: fmt(r.get("test_loss"))),
                    ("test acc", lambda r: fmt(r.get("test_accuracy"), True)),
                    ("wall time (s)", lambda r: f"{r['wall_time']:.1f}")]
        lines = ["| " + " | ".join(c for c, _ in columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(f(r) for _, f in columns) + " |" for r in rows]
        return "\n".join(lines)

    def save_model(self) -> Path | None:
        """Write the final global model to ``model.pt`` (exports are made from it); None if there
        is none or it cannot be written (said once: a full disk must not lose the summary too)."""
        if self.final_state is None or self.save_tensors is None or self.model_saved is None:
            return None
        try:
            self.save_tensors(self.final_state, self.run_dir / "model.pt")
        except Exception as err:  # noqa: BLE001 - the summary is written after it
            self.model_saved = None  # tried and failed: not again
            for name in ("model.pt", "model_scripted.pt", "model.onnx"):  # an earlier attempt's: not this run's model
                (self.run_dir / name).unlink(missing_ok=True)
            where = ("the last checkpoint.pt holds the final model" if (self.run_dir / "checkpoint.pt").is_file()
                     else "no file holds the final model")
            self.printer(f"Could not save {self.run_dir / 'model.pt'} ({type(err).__name__}: {err}); {where}")
            return None
        self.model_saved = True
        return self.run_dir / "model.pt"

    def finish(self, status: str = "finished", error: str | None = None) -> dict:
        """Save the final model, plots and summary; print the summary table. Safe after a crash.

        ``summary.json`` is the last file written: the ``flmnist`` command takes its appearance,
        and then the :data:`FINAL_LINE` in the output, as the sign that the run is over. A run
        whose accuracy collapsed (``degraded`` in the summary) says so in a line before it, and
        its last line starts ``Run finished degraded:`` (:data:`DEGRADED`); its status stays
        ``finished``."""
        if not self.model_saved:
            self.save_model()
        try:
            self.write_metrics()
        except OSError as err:  # (a full disk) the summary, smaller, is still tried: it says how the run ended
            self.printer(f"Could not write the metrics files in {self.run_dir} ({type(err).__name__}: {err})")
        summary = self.summary(status, error)
        try:
            from flmnist.observers.plots import plot_run

            plot_run(self.run_dir, self.scalar_rows(), self.loss_traces, self.async_stats, self.loss_points,
                     self.label, self.unit)
        except Exception as err:  # noqa: BLE001 - a plot must never lose the run's results
            self.printer(f"Plotting failed ({err}); metrics are in {self.run_dir}")
        self.trackers.call("finish", self.run_dir, _clean(summary))
        table = self.summary_table()
        atomic_write(self.run_dir / "summary.md", table + "\n")
        atomic_write(self.run_dir / "summary.json", json.dumps(_clean(summary), indent=1))
        self.printer(f"Summary of evaluated {'rounds' if self.unit == 'round' else 'server updates'}:\n" + table)
        screen = self.screen_stats or {}
        for node, n in screen.get("rejected_per_node", {}).items():
            self.printer(f"Rejected replies from {node}: {n}")
        if screen.get("rejection_reasons"):
            self.printer("Rejection reasons: " + "; ".join(f"{r} ({n})" for r, n in screen["rejection_reasons"].items()))
        if error:
            self.printer(f"Run {status}: {error}")
        if self.stopped_early:
            stop = self.stopped_early
            why = (f"epsilon {stop['epsilon']:.3g}, the next {self.unit} would pass privacy.max_epsilon="
                   f"{stop['max_epsilon']:g}" if "max_epsilon" in stop else f"{100 * self.target_accuracy:.2f}%")
            self.printer(f"Stopped early after {self.unit} {stop['step']}: {stop['reason']} ({why})")
        degraded = summary["degraded"]
        if degraded:
            self.printer(f"Run degraded: {describe(degraded, self.unit)}")
        self.printer(final_line(summary))
        return summary


def final_line(summary: dict) -> str:
    """The last line a finished run prints (:data:`FINAL_LINE`), from its ``summary.json``; the
    ``flmnist`` command prints it itself when Flower's log stream ended before the line came."""
    unit = summary.get("unit") or "round"
    status = DEGRADED if summary.get("status") == "finished" and summary.get("degraded") else summary.get("status")

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    return (f"{FINAL_LINE.format(status=status)} final test accuracy {pct(summary.get('final_accuracy'))}, best "
            f"{pct(summary.get('best_accuracy'))} ({unit} {summary.get('best_round')}), {unit}s to "
            f"{100 * (summary.get('target_accuracy') or 0):.1f}%: {summary.get('rounds_to_target') or 'not reached'}, "
            f"{summary.get('wall_time') or 0:.1f} s. Results in {summary.get('run_dir')}")


def run_label(cfg) -> str:
    """Strategy, split and model of a run, for plot titles ("seed002: FedAvg, DigitGroup split,
    LeNet, 3 nodes"); ``cfg``: its config, or its ``config.yaml`` read as a dict."""
    def short(node) -> str:
        return str((node or {}).get("_target_", "?")).rsplit(".", 1)[-1]

    split = short(cfg["partition"]).removesuffix("Partition")
    return f"{cfg['name']}: {short(cfg['strategy'])}, {split} split, {short(cfg['model'])}, {cfg['num_nodes']} nodes"
