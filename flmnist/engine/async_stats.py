"""What the asynchronous loop counts: client updates processed and their outcomes, applied
updates per node, staleness; the fields of each metrics row, the loop's statistics
(``async_stats.json``) and their printed form (:func:`stats_lines`)."""

from __future__ import annotations

from collections import Counter

import numpy as np


class AsyncStats:
    """The loop's counters (checkpointed) and the updates applied since the last metrics row."""

    def __init__(self) -> None:
        self.client_updates = 0       # replies processed (applied or not)
        self.applied = 0
        self.counts = Counter()       # outcome -> number
        self.node_counts = Counter()  # node name -> applied updates
        self.staleness: list[int] = []
        self.pending_staleness: list[int] = []
        self.pending_nodes: list[str] = []
        self.pending_loss: list[float] = []
        self.unanswered: dict[str, int] = {}  # node name -> tasks still unanswered when the loop ended
        self.buffered: dict[str, int] = {}    # node name -> updates in FedBuff's buffer when the loop ended

    def processed(self) -> int:
        """One more client update processed; its number."""
        self.client_updates += 1
        return self.client_updates

    def count(self, outcome: str) -> None:
        self.counts[outcome] += 1

    def applied_update(self, name: str, staleness: int, train_loss: float) -> None:
        self.applied += 1
        self.counts["applied"] += 1
        self.node_counts[name] += 1
        self.staleness.append(staleness)
        self.pending_staleness.append(staleness)
        self.pending_nodes.append(name)
        self.pending_loss.append(train_loss)

    def take_row(self) -> dict:
        """The counters' fields of a metrics row; the updates applied since the last row go in it."""
        fields = {
            "client_updates": self.client_updates,
            "applied_updates": self.applied,
            "staleness": self.pending_staleness,
            "nodes": self.pending_nodes,
            "train_loss": float(np.mean(self.pending_loss)) if self.pending_loss else None,
            "mean_staleness": float(np.mean(self.pending_staleness)) if self.pending_staleness else None,
        }
        self.pending_staleness, self.pending_nodes, self.pending_loss = [], [], []
        return fields

    def as_dict(self, server_updates: int, virtual_time: float | None, bookkeeping: float,
                devices: dict[str, str] | None, loop_seconds: float | None = None) -> dict:
        """The loop's statistics (``async_stats.json``, the summary's ``async``). ``loop_seconds``
        (deployment): the real seconds the loop has run, resumed runs' earlier parts included, which
        ``async_loop.time_budget`` counts (the run's wall time adds its start and the wait for nodes)."""
        return {
            "server_updates": server_updates,
            "client_updates": self.client_updates,
            "outcomes": dict(self.counts),
            "unanswered_at_end": dict(sorted(self.unanswered.items())),
            "buffered_at_end": dict(sorted(self.buffered.items())),
            "updates_per_node": dict(sorted(self.node_counts.items())),
            "staleness_histogram": {int(k): int(v) for k, v in sorted(Counter(self.staleness).items())},
            "mean_staleness": float(np.mean(self.staleness)) if self.staleness else None,
            "max_staleness": int(max(self.staleness)) if self.staleness else None,
            "virtual_time": virtual_time,
            "loop_seconds": loop_seconds,
            "bookkeeping_seconds": bookkeeping,
            "devices": devices,
        }

    def state(self) -> dict:
        """The checkpointed counters (keys of the checkpoint's ``engine["loop"]``)."""
        return {"client_updates": self.client_updates, "applied": self.applied, "counts": dict(self.counts),
                "node_counts": dict(self.node_counts), "staleness": self.staleness}

    def load_state(self, state: dict) -> None:
        self.client_updates, self.applied = state["client_updates"], state["applied"]
        self.counts, self.node_counts = Counter(state["counts"]), Counter(state["node_counts"])
        self.staleness = list(state["staleness"])


def stats_lines(stats: dict) -> list[str]:
    """The loop's statistics as a few aligned lines (updates per node with their device)."""
    outcomes = ", ".join(f"{k} {v}" for k, v in stats["outcomes"].items()) or "none"
    lines = [f"{'server updates':<16}{stats['server_updates']}",
             f"{'client updates':<16}{stats['client_updates']} ({outcomes})"]
    if stats.get("unanswered_at_end"):
        unanswered = ", ".join(f"{k} {v}" for k, v in stats["unanswered_at_end"].items())
        lines.append(f"{'unanswered':<16}{unanswered} (tasks in flight when the loop ended, never applied)")
    if stats.get("buffered_at_end"):
        buffered = ", ".join(f"{k} {v}" for k, v in stats["buffered_at_end"].items())
        lines.append(f"{'buffered':<16}{buffered} (in the buffer when the loop ended: applied if the run is extended)")
    if stats.get("mean_staleness") is not None:
        lines.append(f"{'staleness':<16}mean {stats['mean_staleness']:.2f}, max {stats['max_staleness']}")
    if stats.get("virtual_time") is not None:
        lines.append(f"{'virtual time':<16}{stats['virtual_time']:.1f} s")
    devices = stats.get("devices") or {}
    for name, n in stats["updates_per_node"].items():
        lines.append(f"{name:<16}{n} applied updates" + (f" ({devices[name]})" if name in devices else ""))
    return lines
