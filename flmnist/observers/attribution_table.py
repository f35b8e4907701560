"""``attribution.csv``, the cumulative node x digit table after each evaluated step, and the
ranking read from it: which node helped and which hurt each digit most. Needs no PyTorch: the
``flmnist`` command reads the table back for the summary of a run stopped from outside."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

NUM_DIGITS = 10
HEADER = "step,node,updates," + ",".join(f"digit_{d}" for d in range(NUM_DIGITS)) + ",total"


def node_order(name: str) -> tuple:
    """"node 2" before "node 10"; other names after, alphabetically."""
    tail = name.rsplit(" ", 1)[-1]
    return (0, int(tail), name) if tail.isdigit() else (1, 0, name)


def helped_and_hurt(totals: dict[str, np.ndarray]) -> tuple[dict[int, str | None], dict[int, str | None]]:
    """Per digit: the node with the largest positive total, and with the most negative (None: no such node)."""
    helped, hurt = {}, {}
    names = sorted(totals, key=node_order)
    for d in range(NUM_DIGITS):
        values = [(totals[n][d], n) for n in names]
        best, worst = max(values, default=(0.0, None)), min(values, default=(0.0, None))
        helped[d] = best[1] if best[0] > 0 else None
        hurt[d] = worst[1] if worst[0] < 0 else None
    return helped, hurt


def last_snapshot(path: Path) -> tuple[int, dict[str, np.ndarray], dict[str, int]] | None:
    """The last step in ``attribution.csv``: (step, node -> per-digit totals, node -> updates);
    None when there is no such table or it is not one."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        last = max(int(r["step"]) for r in rows)  # (ValueError: no rows)
        rows = [r for r in rows if int(r["step"]) == last]
        totals = {r["node"]: np.array([float(r[f"digit_{d}"]) for d in range(NUM_DIGITS)]) for r in rows}
        return last, totals, {r["node"]: int(r["updates"]) for r in rows}
    except (OSError, ValueError, KeyError, TypeError):  # (TypeError: a row short of a column)
        return None


def stopped_section(snapshot: tuple[int, dict[str, np.ndarray], dict[str, int]]) -> dict:
    """The ``attribution`` section of a stopped run's summary from the last snapshot of its
    ``attribution.csv`` (the attribution's own, made as the run finishes, never came): the totals
    and updates per node, who helped and hurt each digit most, and that step."""
    step, totals, updates = snapshot
    helped, hurt = helped_and_hurt(totals)
    names = sorted(totals, key=node_order)
    return {"from": f"attribution.csv after step {step} (the run was stopped before its attribution finished)",
            "helped_most": {str(d): n for d, n in helped.items()}, "hurt_most": {str(d): n for d, n in hurt.items()},
            "totals": {n: [round(float(v), 2) for v in totals[n]] for n in names},
            "updates": {n: updates[n] for n in names}}
