"""What a sweep (``flmnist -m``) keeps across its jobs: the jobs that failed or finished degraded,
its local SuperLink, and its comparison table's rows.

One sweep's jobs run in the command's process, or in lanes (:mod:`flmnist.launch.lanes`): forked
processes, each with its own SuperLink, that send each job's outcome back to the command's
process, which alone writes the table and says how the sweep ended.
"""

from __future__ import annotations

from pathlib import Path

from flmnist.launch.comparison import write_comparison
from flmnist.launch.sweep_link import SweepLink

failed_jobs: list[str] = []  # sweep jobs that did not finish (the sweep goes on, then exits 1)
degraded: list[str] = []  # the lines saying which runs (sweep jobs) finished degraded: the command exits 3
links: list[SweepLink] = []  # the sweep's (this lane's) shared local SuperLink, once started
table: dict[int, dict] = {}  # job number -> its summary, for the comparison table
in_lane = False  # this process is a lane of the sweep: the command's process writes the table


def close_links() -> None:
    """Stop the sweep's local SuperLink and everything under its FLWR_HOME (if one was started)."""
    for link in links:
        link.close()


def record(sweep_dir: Path, job: int, summary: dict) -> str | None:
    """Job ``job`` ended with ``summary``: the comparison table with it, written (its Markdown); a
    lane writes nothing (its jobs' outcomes go to the command's process, which records them)."""
    table[job] = summary
    if in_lane:
        return None
    return write_table(sweep_dir)


def write_table(sweep_dir: Path) -> str:
    """The comparison table of the jobs ended so far, in job order, written; its Markdown."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    jobs = sorted(table)
    return write_comparison(sweep_dir, [table[j] for j in jobs], jobs)
