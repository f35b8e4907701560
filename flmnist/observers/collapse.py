"""Was the run wrecked? A check of the global test accuracy for a fall from its best that lasted.

A run is *degraded* when its global test accuracy fell far below its best and stayed there to
the end: a poisoned or exploding update, a learning rate that blew the model up. The recorder
runs :func:`find_collapse` when the run ends and puts the answer in ``summary.json``
(``degraded``); the ``flmnist`` command exits with status 3 on it. Pure Python (no PyTorch, no
Flower): the command that reads the answer never imports either.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

DROP = 0.2  # absolute fall below the best evaluation (0.2 = 20 percentage points)
PATIENCE = 2  # ... for this many evaluations in a row, to the end of the run
SUSPECTS = 3  # nodes named as most responsible, at most


def _accuracy(row: Mapping) -> float | None:
    value = row.get("test_accuracy")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def find_collapse(rows: Sequence[Mapping], drop: float = DROP, patience: int = PATIENCE,
                  by_step: Mapping | None = None) -> dict | None:
    """The collapse of a run's global test accuracy, or None when it did not collapse.

    ``rows``: the recorder's rows in step order, each a dict with ``round`` (the step: a round, or
    an asynchronous server update) and, when the global model was evaluated then,
    ``test_accuracy`` (0..1). Rows without a (finite) accuracy are skipped.

    The run is degraded when its last ``patience`` evaluations are all more than ``drop``
    (absolute: 0.2 is 20 percentage points) below the best accuracy of the evaluations before
    them; so at least ``patience`` evaluations follow the best one. A dip that recovered to within
    ``drop`` of the best by the end is no collapse.

    ``by_step``: the attribution observer's summed gain per step and node (percentage points,
    the sum over digits of what each applied update did; keys str or int), to name suspects.

    Returns ``best_accuracy`` and ``best_step`` (the best evaluation before the fall; the earliest
    on ties), ``fell_at_step`` (the first evaluation after the best from which on every
    evaluation stayed more than ``drop`` below it) and ``fell_to_accuracy`` (its accuracy),
    ``final_accuracy``, ``drop`` (best - final),
    and ``suspects``: up to 3 nodes whose applied updates in the steps ``best_step < s <=
    fell_at_step`` have the most negative summed gain, worst first, each ``{"node", "gain_pp"}``
    (only nodes with a negative sum; empty without ``by_step``).
    """
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    evals = [(int(r["round"]), acc) for r in rows if (acc := _accuracy(r)) is not None]
    evals.sort(key=lambda e: e[0])
    if len(evals) <= patience:
        return None
    before = evals[:-patience]
    best_i = max(range(len(before)), key=lambda i: (before[i][1], -i))  # the highest; ties: the earliest
    best_step, best = before[best_i]
    if not all(best - acc > drop for _, acc in evals[-patience:]):
        return None
    fell_i = len(evals) - 1
    while fell_i - 1 > best_i and best - evals[fell_i - 1][1] > drop:
        fell_i -= 1
    fell_at, final = evals[fell_i][0], evals[-1][1]
    return {
        "best_accuracy": best,
        "best_step": best_step,
        "fell_at_step": fell_at,
        "fell_to_accuracy": evals[fell_i][1],
        "final_accuracy": final,
        "drop": round(best - final, 6),
        "suspects": suspects(by_step, best_step, fell_at),
    }


def suspects(by_step: Mapping | None, after: int, upto: int, most: int = SUSPECTS) -> list[dict]:
    """The nodes with the most negative summed gain over the steps ``after < s <= upto``."""
    totals: dict[str, float] = {}
    for step, gains in (by_step or {}).items():
        try:
            s = int(step)
        except (TypeError, ValueError):
            continue
        if after < s <= upto:
            for node, gain in (gains or {}).items():
                if isinstance(gain, (int, float)) and math.isfinite(gain):
                    totals[str(node)] = totals.get(str(node), 0.0) + float(gain)
    worst = sorted(((g, n) for n, g in totals.items() if g < 0))[:most]
    return [{"node": n, "gain_pp": round(g, 2)} for g, n in worst]


def describe(degraded: Mapping, unit: str = "round") -> str:
    """One line saying how the run collapsed (from :func:`find_collapse`'s dict)."""
    fell_to = degraded.get("fell_to_accuracy", degraded["final_accuracy"])
    line = (f"test accuracy fell from {100 * degraded['best_accuracy']:.1f}% ({unit} {degraded['best_step']}) "
            f"to {100 * fell_to:.1f}% at {unit} {degraded['fell_at_step']} and stayed there "
            f"(final {100 * degraded['final_accuracy']:.1f}%)")
    found = degraded.get("suspects") or []
    if found:
        names = ", ".join(f"{s['node']} ({s['gain_pp']:+.1f} pp)" for s in found)
        line += f"; attribution holds {names} most responsible"
    return line
