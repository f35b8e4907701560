"""Which node taught or broke which digit: per-update, per-digit attribution.

For every update the server applies (synchronous: each accepted update of a round whose
aggregate became the global model; asynchronous: each update folded into the global model),
:class:`Attribution` evaluates on a fixed probe set

- the global model the update is applied to (``before``), and
- that model with the update applied alone, at full strength: ``before + delta``, where
  ``delta`` is what the node's training changed (its trained model minus the model it was sent,
  or the delta it sent).

The per-digit accuracy difference (after - before, in percentage points) is the update's
contribution; contributions add up per node and digit over the run (and, summed over the
digits, per step and node: ``by_step``, which names the suspects of a collapse,
:mod:`flmnist.observers.collapse`). "Alone, at full strength"
makes the measure independent of the strategy (FedAvg gives an update a share of the average,
FedAsync a staleness-dependent mixing weight, Krum may drop it): it says what the node's work
does to the model everyone shares, so nodes are comparable with each other; it is not a split
of the global model's accuracy gain.

The probe set is stratified: ``probe_size / 10`` test images of each digit, the same images in
every run (drawn with a fixed seed, independent of the run's seed).

A digit's accuracy also rises when a model labels most images with it: an untrained model often
does so for one digit (seed 002's initial LeNet labels 79% of all probe images 2). Updates applied
to such a model lower that digit's accuracy whatever they teach, its holder's too, until the
model stops guessing; :meth:`Attribution.finish` says so for a digit no update helped, with the
largest share of the probe images the global models labelled with it (``guessing`` in the summary).
"""

from __future__ import annotations

import csv
import io
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from flmnist.core.run_files import atomic_write
from flmnist.ml.threads import in_background
from flmnist.observers.attribution_table import HEADER, NUM_DIGITS, helped_and_hurt, node_order
from flmnist.observers.base import Observer, RunContext
from flmnist.observers.probe import Probe, probe_indices  # noqa: F401 - probe_indices re-exported

Weights = dict  # name -> numpy array
GUESSING = 0.25  # a model labelling at least this share of all probe images with one digit guesses it (fair: 0.1)


class Attribution(Observer):
    """Cumulative node x digit contributions (percentage points), ``attribution.csv`` and plot."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        model_fn: Callable[[], torch.nn.Module],
        probe_size: int = 1000,
        run_dir: Path | None = None,
        printer: Callable[[str], None] = print,
        batch_size: int = 1000,
        label: str = "",
        probe: Probe | None = None,
        unit: str = "round",
    ) -> None:
        """``probe``: the run's shared probe (then ``images``, ``labels``, ``model_fn`` and the
        sizes are its); else one of ``probe_size`` images is built here. ``unit``: what a step is
        (``round``; asynchronous: ``server update``)."""
        self.probe = probe or Probe(images, labels, model_fn, probe_size, batch_size)
        self.run_dir, self.printer = run_dir, printer
        self.label = label  # the run's strategy, split and model, for the plot's title
        self.unit = unit
        self.totals: dict[str, np.ndarray] = {}   # node -> cumulative contribution per digit (pp)
        self.counts: Counter = Counter()          # node -> attributed updates
        self.by_step: dict[int, dict[str, float]] = {}  # step -> node -> summed gain over digits (pp)
        self.snapshots: list[str] = []             # CSV lines: step,node,updates,digit_0..9,total
        self.seconds = 0.0
        self.evaluations = 0   # probe passes
        self.reused = 0        # global models already scored (the global evaluation's predictions, the guard's aggregate)
        # per digit: the largest share of all probe images that a global model updates were applied to
        # labelled with it, and that model's step
        self.label_share = np.zeros(NUM_DIGITS)
        self.label_share_step = np.zeros(NUM_DIGITS, dtype=int)
        self._before: tuple[object, np.ndarray] | None = None  # (key, per-digit accuracy)
        self._pending: list = []  # attributions started in the background, not yet waited for

    @classmethod
    def from_run(cls, run: RunContext, enabled: bool = True, probe_size: int = 1000,
                 batch_size: int = 250) -> Attribution | None:
        """Built from ``observers.attribution`` (``eval.attribution``, ``eval.probe_size``); None
        (no observer) when turned off or with no probe images."""
        if not enabled or not probe_size:
            return None
        return cls(run.test_images, run.test_labels, run.model_fn, run_dir=run.run_dir, printer=run.printer,
                   label=run.label, probe=run.probe(probe_size, batch_size) if run.probe else None,
                   unit="server update" if run.asynchronous else "round")

    @property
    def probe_size(self) -> int:
        return self.probe.size

    # ------------------------------------------------------------ measuring
    def per_digit(self, weights: Weights, delta: Weights | None = None) -> np.ndarray:
        """Per-digit accuracy (0..1) of ``weights`` (+ ``delta``) on the probe set."""
        self.evaluations += 1
        return self.probe.per_digit(weights, delta)

    # ------------------------------------------------------------ hook calls
    def updates_applied(self, step: int, before: Weights, deltas: Sequence[tuple[str, Weights]],
                        key: object = None) -> dict | None:
        """Attribute the (node, delta) pairs applied to ``before``; ``key`` names ``before`` so
        that updates applied to the same global model share its evaluation. Started in the
        background (:func:`~flmnist.ml.threads.in_background`: in order, one at a time), so that the
        evaluations run while Flower sends the next round; everything that reads the figures waits
        for them first (:meth:`wait`)."""
        if deltas:
            self._pending.append(in_background(self.attribute, step, before, list(deltas), key))
        return None

    def wait(self) -> None:
        """Until every attribution started in the background has been added in (its error raised)."""
        pending, self._pending = self._pending, []
        for job in pending:
            job.result()

    def evaluate_global(self, server_round: int, arrays) -> dict | None:
        """After each round (async: each evaluation point): a snapshot of the cumulative table."""
        if server_round > 0:  # in the background too, after the step's attributions
            self._pending.append(in_background(self.snapshot, server_round))
        return None

    # ------------------------------------------------------------ measuring
    def attribute(self, step: int, before: Weights, deltas: Sequence[tuple[str, Weights]],
                  key: object = None) -> dict:
        """Each (node, delta) applied to ``before`` alone: its per-digit accuracy change (pp)."""
        t = time.perf_counter()
        if self._before is None or key is None or self._before[0] != key:
            known = self.probe.known_scores(before)  # the global evaluation's or the guard's, if it scored ``before``
            if known is None:
                self.evaluations += 1
            else:
                self.reused += 1
            accuracy, share = known or self.probe.scores(before)
            higher = share > self.label_share
            self.label_share = np.where(higher, share, self.label_share)
            self.label_share_step = np.where(higher, int(step), self.label_share_step)
            self._before = (key, accuracy)
        base = self._before[1]
        step_out = {}
        for name, delta in deltas:
            gain = 100.0 * (self.per_digit(before, delta) - base)
            self.totals[name] = self.totals.get(name, np.zeros(NUM_DIGITS)) + gain
            self.counts[name] += 1
            at = self.by_step.setdefault(int(step), {})
            at[name] = at.get(name, 0.0) + float(np.nansum(gain))
            step_out[name] = [round(float(g), 2) for g in gain]
        self.seconds += time.perf_counter() - t
        return step_out

    def snapshot(self, step: int) -> None:
        """Append the cumulative table after ``step`` to attribution.csv (replacing one of the same
        step: a resumed run that evaluates its checkpoint's model again)."""
        while self.snapshots and self.snapshots[-1].startswith(f"{step},"):
            self.snapshots.pop()
        for name in sorted(self.totals, key=node_order):
            row = self.totals[name]
            line = io.StringIO()  # the csv module quotes a node name with a comma or a quote in it
            csv.writer(line, lineterminator="").writerow(
                [step, name, self.counts[name], *(f"{v:.2f}" for v in row), f"{row.sum():.2f}"])
            self.snapshots.append(line.getvalue())
        if self.totals:
            self.write_csv()

    # -------------------------------------------------------------- outputs
    def write_csv(self) -> None:
        if self.run_dir is None:
            return
        buf = io.StringIO()
        buf.write(HEADER + "\n")
        buf.writelines(line + "\n" for line in self.snapshots)
        atomic_write(self.run_dir / "attribution.csv", buf.getvalue())

    def helped_and_hurt(self) -> tuple[dict[int, str | None], dict[int, str | None]]:
        """Per digit: the node with the largest positive total, and with the most negative."""
        self.wait()
        return helped_and_hurt(self.totals)

    def _credit(self, name: str, digit: int) -> str:
        """``node 0 (+156.0 pp over 8 updates, +19.5 each)``."""
        total, n = self.totals[name][digit], self.counts[name]
        return f"{name} ({total:+.1f} pp over {n} update{'s' * (n != 1)}, {total / max(n, 1):+.1f} each)"

    def guessing(self) -> dict[int, tuple[float, int]]:
        """Digits a global model that updates were applied to labelled at least ``GUESSING`` of
        all probe images with: digit -> (largest such share, its step)."""
        return {d: (float(self.label_share[d]), int(self.label_share_step[d]))
                for d in range(NUM_DIGITS) if self.label_share[d] >= GUESSING}

    def no_helper(self, digit: int) -> str:
        """Why no update alone raised ``digit``."""
        if digit in (guessed := self.guessing()):
            share, step = guessed[digit]
            return (f"no update alone raised it: the global model that {self.unit} {step}'s updates were applied to "
                    f"labelled {share:.0%} of all probe images {digit} (about {1 / NUM_DIGITS:.0%} once it knows the "
                    f"digits), so it scored on {digit} by guessing; every update, its holder's too, takes guesses "
                    f"away until the model stops guessing, which a longer run reaches")
        return ("no update alone raised it: the model knew it already when the updates came, or each update alone "
                "made it forget")

    def finish(self, wall_time: float | None = None) -> dict | None:
        """Print who helped and hurt each digit most, write the CSV and plot; the summary's part."""
        self.wait()
        if not self.totals:
            return None
        self.write_csv()
        helped, hurt = self.helped_and_hurt()
        self.printer(f"Attribution: each applied update measured alone on the global model it was applied to "
                     f"({self.probe_size} probe images); per digit, the change of its accuracy in points, summed "
                     f"over the node's updates (cumulative over the run; per update in brackets):")
        for d in range(NUM_DIGITS):
            h, b = helped[d], hurt[d]
            self.printer(f"  digit {d}: helped most by {self._credit(h, d) if h else 'no node'}, "
                         f"hurt most by {self._credit(b, d) if b else 'no node'}"
                         + ("" if h else f" ({self.no_helper(d)})"))
        if self.run_dir is not None:
            try:
                from flmnist.observers.plots import plot_attribution

                names = sorted(self.totals, key=node_order)
                plot_attribution(self.run_dir, names, np.array([self.totals[n] for n in names]), self.label)
            except Exception as err:  # noqa: BLE001 - a plot must never lose the run's results
                self.printer(f"Attribution plot failed ({err}); the table is in attribution.csv")
        return {
            "probe_size": self.probe_size,
            "evaluations": self.evaluations,
            "global_models_reused": self.reused,
            "seconds": round(self.seconds, 3),
            "share_of_wall_time": round(self.seconds / wall_time, 4) if wall_time else None,
            "helped_most": {str(d): n for d, n in helped.items()},
            "hurt_most": {str(d): n for d, n in hurt.items()},
            "guessing": {str(d): {"share": round(share, 4), "step": step}
                         for d, (share, step) in self.guessing().items()},
            "totals": {n: [round(float(v), 2) for v in self.totals[n]] for n in sorted(self.totals, key=node_order)},
            "updates": dict(self.counts),
            "by_step": {str(s): {n: round(v, 2) for n, v in sorted(gains.items(), key=lambda e: node_order(e[0]))}
                        for s, gains in sorted(self.by_step.items())},
        }

    # ---------------------------------------------------------------- state
    def state(self) -> dict:
        self.wait()
        return {"totals": {n: v.tolist() for n, v in self.totals.items()}, "counts": dict(self.counts),
                "snapshots": list(self.snapshots), "seconds": self.seconds, "evaluations": self.evaluations,
                "reused": self.reused,
                "by_step": {s: dict(gains) for s, gains in self.by_step.items()},
                "label_share": self.label_share.tolist(), "label_share_step": self.label_share_step.tolist()}

    def load_state(self, state: dict) -> None:
        self.totals = {n: np.array(v, dtype=float) for n, v in state.get("totals", {}).items()}
        self.counts = Counter(state.get("counts", {}))
        self.snapshots = list(state.get("snapshots", []))
        self.by_step = {int(s): {n: float(v) for n, v in gains.items()}
                        for s, gains in state.get("by_step", {}).items()}
        self.seconds, self.evaluations = state.get("seconds", 0.0), state.get("evaluations", 0)
        self.reused = state.get("reused", 0)
        self.label_share = np.array(state.get("label_share", [0.0] * NUM_DIGITS), dtype=float)
        self.label_share_step = np.array(state.get("label_share_step", [0] * NUM_DIGITS), dtype=int)

