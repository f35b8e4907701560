"""A benchmark's flmnist run: a fresh run directory, and its summary only if it finished.

A run that dies before its summary must not be reported with the last invocation's accuracy and
this one's (short) wall time: the directory is emptied first, and the exit code and status read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def fresh(run_dir: Path) -> Path:
    """``run_dir`` emptied of an earlier invocation's files."""
    shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def finished(run_dir: Path, code: int, log_path: Path | None = None) -> dict:
    """The run's ``summary.json``, or SystemExit naming what went wrong (exit code, status)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    if code != 0 or summary.get("status") != "finished":
        raise SystemExit(f"{run_dir.name}: the run did not finish (exit {code}, status "
                         f"{summary.get('status', 'no summary')}): see {log_path or run_dir}")
    return summary
