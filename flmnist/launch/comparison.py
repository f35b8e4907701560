"""The comparison table of a sweep (``flmnist -m ...``): ``comparison.csv`` and ``comparison.md``
in the sweep directory, one row per job."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from flmnist.core.run_files import atomic_write
from flmnist.observers.collapse import describe

COLUMNS = ["job", "overrides", "status", "final_accuracy", "best_accuracy", "rounds_to_target", "unit",
           "client_updates_to_target", "wall_time", "run_dir"]


def degraded_message(summary: dict) -> str:
    """How a run that finished degraded collapsed, and where its results are (its summary)."""
    return f"{describe(summary['degraded'], summary.get('unit') or 'round')}; results in {summary.get('run_dir')}"


def comparison_rows(summaries: list[dict], jobs: list[int] | None = None) -> list[dict]:
    """The table's rows (``jobs``: their job numbers, by default 0, 1, ...); status ``degraded``:
    the run finished, but its accuracy collapsed."""
    return [{"job": i, **{c: s.get(c) for c in COLUMNS if c != "job"},
             "status": "degraded" if s.get("status") == "finished" and s.get("degraded") else s.get("status")}
            for i, s in zip(jobs if jobs is not None else range(len(summaries)), summaries)]


def write_comparison(sweep_dir: Path, summaries: list[dict], jobs: list[int] | None = None) -> str:
    """Write comparison.csv and comparison.md into the sweep directory; return the Markdown. A job
    that finished degraded has the status ``degraded`` and a note under the Markdown table."""
    rows = comparison_rows(summaries, jobs)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(sweep_dir / "comparison.csv", buf.getvalue())  # (a stop while writing: the last table stays whole)

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    # The Markdown names what the jobs share once, above the table, and each row's own settings.
    tokens = [list(s.get("override_list") or (s.get("overrides") or "").split()) for s in summaries]
    shared = [t for t in tokens[0] if all(t in other for other in tokens[1:])] if len(rows) > 1 else []
    targets = {t for s in summaries if (t := s.get("target_accuracy")) is not None}  # a failed job has none
    units = {s["unit"] for s in summaries if s.get("unit")} or {"round"}  # a failed job has none
    mixed = len(units) > 1  # sync rounds beside async server updates: each cell names its unit
    to = (f"{'rounds' if units <= {'round'} else 'steps'} to "
          + (f"{100 * next(iter(targets)):.1f}%" if len(targets) == 1 else "target"))

    def reached(r):
        if not r["rounds_to_target"]:
            return "not reached"
        if not mixed:
            return str(r["rounds_to_target"])
        client = f", {r['client_updates_to_target']} client updates" if r["client_updates_to_target"] else ""
        return f"{r['rounds_to_target']} {'server update' if r['unit'] == 'update' else 'round'}s{client}"
    lines = [*([f"Shared settings: {' '.join(shared)}", ""] if shared else []),
             f"| job | {'settings' if shared else 'overrides'} | status | final acc | best acc | {to} | wall time (s) |",
             "|---|---|---|---|---|---|---|"]
    for r, own in zip(rows, tokens):
        wall = "-" if r["wall_time"] is None else f"{r['wall_time']:.1f}"
        settings = " ".join(t for t in own if t not in shared) or "(shared only)"
        lines.append(
            f"| {r['job']} | {settings} | {r['status']} | {pct(r['final_accuracy'])} | "
            f"{pct(r['best_accuracy'])} | {reached(r)} | "
            f"{wall} |"
        )
    notes = [f"Job {r['job']} finished degraded: {degraded_message(s)}"
             for r, s in zip(rows, summaries) if r["status"] == "degraded"]
    md = "\n".join(lines) + "\n" + "".join(f"\n{note}\n" for note in notes)
    atomic_write(sweep_dir / "comparison.md", md)
    return md


def job_overrides(task) -> dict:
    """A job's overrides as the user gave them (``run_dir=`` is the command's own), for its summary:
    joined, and each whole (a quoted value may hold spaces)."""
    own = [o for o in task if not o.startswith("run_dir=")]
    return {"overrides": " ".join(own), "override_list": own}
