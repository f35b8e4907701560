"""The effect guard: an update is judged by what it does to the model, on the probe set.

The screen checks a reply's form; a well-formed update can still wreck the model (one node of
four sending its weights times -5 took FedAvg from 92% to 0.08%). Before updates are applied,
:class:`EffectGuard` measures each one's *leave-one-out effect*: the probe accuracy of the
aggregate with it against the aggregate without it (the examples-weighted mean of the updates'
deltas, added to the global model they will be applied to, as FedAvg would). An update whose
presence makes the aggregate worse by more than ``screen.guard_max_harm`` percentage points is
rejected, with its per-digit figures in the reason; then the others are judged again without
it, so two attackers cannot hide behind each other. Judging the aggregate, not the update alone,
keeps a node that holds digits nobody else holds (seed002): its update alone forgets the other
digits, but the aggregate without it is worse on its own digits.

- synchronous engine: the round's screened updates, among themselves;
- asynchronous engine: each arriving update against the latest accepted ones of up to
  ``screen.guard_window`` other nodes (the aggregate it would have been part of), applied to the
  current global model; for a buffered strategy (FedBuff, buffer K) against at most K - 1, so the
  update's share of the guard's aggregate is its share of the real one; for FedAsync, which mixes
  each update in alone at alpha * s(staleness), against one (a share of 1/2, equal weights). One per node, and never
  the node's own: a fast node's earlier updates filled the window, so each new one agreed with them.

Probing costs evaluations, so a cheap test comes first: updates that point the way the others
do (cosine with the others' mean at least 0) and are no longer than 3 times the median length
of the others' and the recent accepted updates' pass unprobed, as honest updates on an even
split do. A round with an update pointing away or
much longer is probed whole. An aggregate without an update is evaluated chunk by chunk, on the
CPU the digits it gets most wrong first (:meth:`Probe.per_digit_unless_below`), and stops once it
certainly cannot beat the aggregate with it by more than ``max_harm`` (every image not yet
evaluated counted as right): that update is not the one rejected, so the decisions and reasons are
those of evaluating every image (on seed002 the guard evaluates about 71,000 probe images instead
of 160,000). The probe is the attribution's: ``probe_size`` test images, the
same in every run, and the same :class:`~flmnist.observers.probe.Probe` object when attribution is on.
Synchronous, each aggregate (with every candidate, and without each) is computed from the
replies' models in Flower's FedAvg arithmetic (:func:`fedavg`), and the probe keeps
the scores of the accepted updates' aggregate: when the round's global model is that aggregate
(FedAvg, nothing clipped or noised after the guard), attribution does not evaluate it again.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum

from flmnist.core.arrays import Weights, dot
from flmnist.observers.probe import Probe
from flmnist.protocol.messages import NUM_EXAMPLES, UNIT_WEIGHT

MAX_LENGTH_RATIO = 3.0   # longer than this multiple of the median update length: probe
MIN_COSINE = 0.0         # pointing away from the others' mean: probe


@dataclass
class Candidate:
    """One update before the guard: who, its delta, its weight in the mean."""

    key: object            # what the caller gets back (its ClientUpdate)
    name: str
    delta: Weights
    weight: float
    model: Weights | None = None     # synchronous: the reply's checked model, which FedAvg averages into the global one,
    metrics: Mapping | None = None   # and the metrics FedAvg weighs it by


def fedavg(members: Sequence[Candidate], weighted_by: str = NUM_EXAMPLES) -> Weights:
    """The members' aggregate as Flower's FedAvg makes the global model of them, value for value:
    the arithmetic of its ``aggregate_arrayrecords`` (each array times its member's metric
    ``weighted_by`` over their sum, a Python float, added up in the members' order, with NumPy's
    type rules: float32 stays float32; a 0-d array comes back 1-d, as a record holds it) on the
    models already decoded. Flower's decodes every array from its bytes on each call and encodes
    the aggregate, and the guard makes one aggregate more than the round has updates, and again
    after each rejection (``tests/test_effect_guard.py`` compares the two bit for bit)."""
    weights = [m.metrics[weighted_by] for m in members]
    total = sum(weights)
    out: dict = {}
    for member, w in zip(members, weights, strict=True):
        factor = w / total
        for k, v in member.model.items():
            v = np.ascontiguousarray(v)  # (as the reply's record holds it: to_record; a 0-d array becomes 1-d)
            if k in out:
                out[k] += v * factor
            else:
                out[k] = v * factor
    return {k: np.asarray(v) for k, v in out.items()}


def _flat(delta: Weights) -> np.ndarray:
    return np.concatenate([v.ravel() for v in delta.values()]).astype(np.float64)


class EffectGuard:
    """Rejects updates whose leave-one-out effect on the probe accuracy is worse than ``max_harm`` pp."""

    def __init__(self, probe: Probe, max_harm: float = 2.0, window: int = 10, equal_weights: bool = False) -> None:
        """``equal_weights``: the strategy averages updates with equal weights (:func:`equal_weights`),
        so the guard's aggregate does too; else each update counts by its examples."""
        self.probe, self.max_harm, self.equal_weights = probe, max_harm, equal_weights
        self.window: deque[Candidate] = deque(maxlen=window)   # asynchronous: each node's latest accepted update
        self.pool_size = window  # asynchronous: an update is judged among the newest this many of other nodes
        self.seconds = 0.0
        self.evaluations = 0
        self.images = 0   # probe images evaluated (an evaluation stops once its aggregate is certainly harmless)
        self.judged = 0
        self.probed = 0
        self.rejected = 0

    def limit_pool(self, size: int) -> None:
        """Judge asynchronous updates among at most ``size`` recent accepted ones of other nodes (the
        window keeps one per node, up to ``screen.guard_window``: a node's own accepted update must
        not push the others out, or its next one is judged against nothing)."""
        self.pool_size = min(self.pool_size, size)

    # ------------------------------------------------------------ measuring
    def aggregate(self, before: Weights, members: Sequence[Candidate]) -> tuple[Weights, Weights | None]:
        """The members' aggregate as (weights, delta to add): with their models (synchronous) FedAvg's
        own (:func:`fedavg`), else ``before`` plus their mean delta."""
        if not members or any(m.model is None for m in members):
            return before, self.mean(members)
        return fedavg(members, UNIT_WEIGHT if self.equal_weights else NUM_EXAMPLES), None

    def aggregate_accuracy(self, before: Weights, members: Sequence[Candidate]) -> tuple[np.ndarray, tuple | None]:
        """Per-digit probe accuracy of the members' aggregate (:meth:`aggregate`), and (weights, scores)
        to keep should it become the global model (FedAvg's, synchronous; else nothing to keep)."""
        self.evaluations += 1
        self.images += self.probe.size
        weights, delta = self.aggregate(before, members)
        scores = self.probe.scores(weights, delta)
        return np.nan_to_num(scores[0]), ((weights, scores) if weights is not before else None)  # (FedAvg's made it)

    def accuracy_unless_below(self, before: Weights, members: Sequence[Candidate], ceiling: float) -> np.ndarray | None:
        """As :meth:`aggregate_accuracy`'s accuracy, or None once its mean is certainly at most
        ``ceiling`` (:meth:`Probe.per_digit_unless_below`: the rest of the probe need not be evaluated)."""
        self.evaluations += 1
        accuracy, images = self.probe.per_digit_unless_below(*self.aggregate(before, members), ceiling)
        self.images += images
        return None if accuracy is None else np.nan_to_num(accuracy)

    @staticmethod
    def mean(members: Sequence[Candidate]) -> Weights | None:
        total = sum(m.weight for m in members)
        if not members or total <= 0:
            return None
        first = members[0].delta
        return {k: sum(np.float32(m.weight / total) * m.delta[k] for m in members).astype(first[k].dtype)
                for k in first}

    @staticmethod
    def suspicious(candidates: Sequence[Candidate], pool: Sequence[Candidate], lengths: Sequence[float] = ()) -> bool:
        """Whether any candidate points away from the others or is much longer than the median
        length of the others and ``lengths`` (recent accepted updates'); then: probe. (Of the
        lengths of all, two nodes' median is their mean: a boosted update never passed 3x it.)"""
        everyone = [*pool, *candidates]
        if len(everyone) < 2:
            return True  # nothing to compare with: probe it against the model itself
        flats = [_flat(m.delta) for m in everyone]
        norms = [math.sqrt(dot(f, f)) for f in flats]
        total = sum(m.weight * f for m, f in zip(everyone, flats))
        weight = sum(m.weight for m in everyone)
        for i in range(len(pool), len(everyone)):
            median = float(np.median([*lengths, *norms[:i], *norms[i + 1:]]))
            if median > 0 and norms[i] > MAX_LENGTH_RATIO * median:
                return True
            rest = (total - everyone[i].weight * flats[i]) / max(weight - everyone[i].weight, 1e-12)
            denom = norms[i] * math.sqrt(dot(rest, rest))
            if denom > 0 and dot(flats[i], rest) / denom < MIN_COSINE:
                return True
        return False

    # --------------------------------------------------------------- judging
    def judge(self, before: Weights, candidates: list[Candidate], asynchronous: bool,
              lengths: Sequence[float] = ()) -> list[tuple[Candidate, str]]:
        """The candidates to reject, each with its reason; the rest may be applied to ``before``.
        Asynchronous: judged against the recent accepted updates, and remembered if accepted.
        ``lengths``: recent accepted updates' lengths, for the cheap test's median."""
        if not candidates:
            return []
        if self.equal_weights:  # (by examples, an update claiming 1 example weighed nothing here, 1/K there)
            candidates = [dataclasses.replace(c, weight=1.0) for c in candidates]
        t = time.perf_counter()
        names = {c.name for c in candidates}  # judged among other nodes' updates, not their own earlier ones
        pool = [m for m in self.window if m.name not in names] if asynchronous else []
        pool = pool[max(0, len(pool) - self.pool_size):]  # the newest
        if self.equal_weights:  # (the window's are already, unless the weighting changed since they came)
            pool = [dataclasses.replace(m, weight=1.0) for m in pool]
        self.judged += len(candidates)
        rejected: list[tuple[Candidate, str]] = []
        active = list(candidates)
        if self.suspicious(active, pool, lengths):
            self.probed += 1
            while active:
                members = pool + active
                with_all, scored = self.aggregate_accuracy(before, members)
                ceiling = float(with_all.mean()) + self.max_harm / 100.0  # an aggregate without one scoring at most this: harmless
                worst, worst_harm, worst_without = None, -math.inf, None
                for c in active:
                    without = self.accuracy_unless_below(before, [m for m in members if m is not c], ceiling)
                    if without is None:  # certainly no more harm than allowed: never the one rejected
                        continue
                    harm = 100.0 * float(without.mean() - with_all.mean())
                    if harm > worst_harm:
                        worst, worst_harm, worst_without = c, harm, without
                if worst is None or worst_harm <= self.max_harm:
                    if scored is not None:  # the accepted updates' aggregate: FedAvg's global model, scored
                        self.probe.keep(*scored)
                    break
                per_digit = " ".join(f"{d}:{100 * (a - b):+.0f}" for d, (a, b) in enumerate(zip(with_all, worst_without)))
                reason = (f"makes the aggregate worse on the probe set ({worst_harm:.1f} pp: "
                          f"{with_all.mean():.1%} with it, {worst_without.mean():.1%} without; over "
                          f"screen.guard_max_harm={self.max_harm:g}; per digit, with minus without: {per_digit})")
                rejected.append((worst, reason))
                active.remove(worst)
                if not asynchronous and len(active) < 2:
                    break  # one update left: nothing to compare it with in its round
        if asynchronous:  # each node's latest accepted update: a fast node cannot fill the window
            kept = [m for m in self.window if m.name not in {c.name for c in active}]
            self.window = deque([*kept, *active], maxlen=self.window.maxlen)
        self.rejected += len(rejected)
        self.seconds += time.perf_counter() - t
        return rejected

    COUNTERS = ("seconds", "evaluations", "images", "judged", "probed", "rejected")

    def state(self) -> dict:
        """The counters, for a checkpoint (not the asynchronous window: a resumed run refills it)."""
        return {k: getattr(self, k) for k in self.COUNTERS}

    def load_state(self, state: dict) -> None:
        for k in self.COUNTERS:
            setattr(self, k, state.get(k, getattr(self, k)))
        if "images" not in state and self.probe is not None:  # a checkpoint from before the early stop
            self.images = self.evaluations * self.probe.size  # (every evaluation took the whole probe)

    def report(self) -> str:
        """The end-of-run line: what the guard judged, what it cost, how to turn it off."""
        cost = (f" ({self.evaluations} aggregates on {self.images:,} probe images, {self.seconds:.1f} s; "
                "screen.guard_max_harm=null turns the guard off)") if self.probed else ""
        return (f"Effect guard (screen.guard_max_harm={self.max_harm:g}): {self.judged} updates judged, "
                f"probed {self.probed} time{'s' * (self.probed != 1)}{cost}, {self.rejected} rejected")

    def summary(self) -> dict:
        return {
            "max_harm_pp": self.max_harm,
            "weights": "equal" if self.equal_weights else "examples",
            "probe_size": self.probe.size,
            "updates_judged": self.judged,
            "probed": self.probed,
            "evaluations": self.evaluations,
            "probe_images_evaluated": self.images,
            "rejected": self.rejected,
            "seconds": round(self.seconds, 3),
            "ms_per_update": round(1000 * self.seconds / self.judged, 3) if self.judged else None,
        }


# Flower's robust aggregators that combine the models without their example counts (Krum keeps one
# model); their weighted_by_key weighs only the metrics. MultiKrum averages the ones it keeps by examples.
UNWEIGHTED = (FedMedian, FedTrimmedAvg, Bulyan, Krum)


def equal_weights(strategy) -> bool:
    """Whether ``strategy`` combines updates with equal weights: a Flower strategy weighted by
    ``unit-weight`` (``strategy=unweighted_fedavg``; central DP's, inside its wrapper), FedMedian,
    FedTrimmedAvg, Bulyan and Krum (examples ignored: a node claiming 1 example still counts fully),
    FedBuff with ``weight_by_examples`` false, FedAsync (which ignores examples)."""
    strategy = getattr(strategy, "strategy", strategy)  # Flower's DP wrappers hold the averaging strategy
    return (isinstance(strategy, UNWEIGHTED) or getattr(strategy, "weighted_by_key", None) == UNIT_WEIGHT
            or getattr(strategy, "weight_by_examples", True) is False)
