"""The privacy ledger: what a run has spent, written after every accounting step.

A checkpoint holds the accountant as it was at the checkpoint; a run checkpointed every N steps
(asynchronous runs: at their evaluation points) has released noised models, or sent DP-SGD tasks,
since. Those left the server, so a resume must count them: ``RUN_DIR/privacy_ledger.json`` holds
the accountant after each round, server update or task, and a resume takes it where it spent more
than the checkpoint's.
"""

from __future__ import annotations

import json
from logging import WARNING
from pathlib import Path

from flwr.common.logger import log

from flmnist.core.constants import PRIVACY_LEDGER as LEDGER
from flmnist.core.run_files import atomic_write


def _ledger(recorder) -> Path | None:
    """``RUN_DIR/privacy_ledger.json`` of the run (None: no recorder, no run directory)."""
    return None if recorder is None else Path(recorder.run_dir) / LEDGER


def save_ledger(recorder, accountant, epsilon: float) -> None:
    """After each round's or server update's accounting, and each task sent: the accountant's
    state and its ``epsilon`` (as the caller just computed it) beside the checkpoint (a
    checkpoint every N steps would lose what was spent since)."""
    if (file := _ledger(recorder)) is not None:
        atomic_write(file, json.dumps({"epsilon": epsilon, "state": accountant.state_dict()}))


def restore_ledger(recorder, accountant) -> None:
    """On resume, after the checkpoint's accountant was loaded: the ledger's, where it spent more
    (releases or tasks after the checkpoint count: their noised models had left the server). The
    summary's privacy section is set from it at once (a resume that trains no step reports it too)."""
    try:
        saved = json.loads(_ledger(recorder).read_text())  # type: ignore[union-attr]
        spent = float(saved["epsilon"])
    except (AttributeError, OSError, ValueError, KeyError, TypeError):
        saved, spent = None, -1.0
    if saved is not None and (_more_tasks(accountant, saved["state"]) if hasattr(accountant, "tasks")
                              else spent > accountant.epsilon):
        log(WARNING, "Privacy: epsilon %.4g at the checkpoint, %.4g spent since (%s): counting on from that",
            accountant.epsilon, spent, LEDGER)
        accountant.load_state_dict(saved["state"])
    if recorder is not None:
        recorder.set_section("privacy", accountant.summary())


def _more_tasks(accountant, state: dict) -> bool:
    """A per-node accountant (DP-SGD, local DP): whether the ledger's ``state`` counts more tasks
    than the checkpoint's. (Its epsilon, the largest node's, says nothing of a node below the
    largest that was sent tasks since. The ledger is written at every step the checkpoint is, and
    after: it is never behind on a partition.)"""
    try:
        total = sum(int(v) for v in state.get("tasks", {}).values()) + int(state.get("unattributed", 0))
    except (AttributeError, TypeError, ValueError):
        return False
    return total > sum(accountant.tasks.values()) + accountant.unattributed
