"""The probe: a fixed, stratified set of test images and one model to score weights on it.

Attribution (:mod:`flmnist.observers.attribution`) measures each applied update on it, and the
effect guard (:mod:`flmnist.engine.effect_guard`) judges updates on it; a run builds one probe
(:class:`Probes`, the run's ``RunContext.probe``) and both share its images and model.

The probe images are test images, and the run evaluates each global model on the whole test set
anyway (:class:`~flmnist.observers.evaluation.DigitEvaluation`): that evaluation hands its
predictions over (:meth:`Probes.offer`), and the probe scores the same weights from them instead of
evaluating them again (:meth:`Probe.known_scores`): attribution's "before", the global model a
round's updates are applied to, costs no probe pass. So does a global model the effect guard
scored as its aggregate of the round's updates (Flower's own FedAvg aggregation of the same
replies, so the same values: :meth:`Probe.keep`) when no test-set evaluation
followed. (On the CPU a model's prediction for an
image does not depend on the other images of its batch: the figures are the same either way,
which ``tests/test_attribution.py`` checks on real MNIST. A GPU's kernels may depend on the batch
size, and a near tie could then flip: there the probe evaluates for itself.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch

from flmnist.core.constants import NUM_CLASSES
from flmnist.ml.threads import on_torch_thread
from flmnist.ml.training import counts, device, evaluate

PROBE_SEED = 20170217  # fixed: every run probes the same images
KNOWN = 4  # global models whose probe scores are kept (the global evaluation's, the guard's aggregates)


def probe_indices(labels: torch.Tensor | np.ndarray, size: int) -> np.ndarray:
    """``size // 10`` indices of each digit (the remainder to the lowest digits), fixed across runs."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(PROBE_SEED)
    picked = []
    for d in range(NUM_CLASSES):
        want = size // NUM_CLASSES + (1 if d < size % NUM_CLASSES else 0)
        of_d = np.flatnonzero(labels == d)
        picked.append(np.sort(rng.permutation(of_d)[:want]))
    return np.sort(np.concatenate(picked))


class Probe:
    """``size`` test images (:func:`probe_indices`) and a model of the run's architecture."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, model_fn: Callable[[], torch.nn.Module],
                 size: int = 1000, batch_size: int = 1000) -> None:
        self.indices = probe_indices(labels, size)  # into the test set
        idx = torch.from_numpy(self.indices)
        self.images, self.labels = images[idx], labels[idx]
        self.model = model_fn()
        self.batch_size = batch_size
        self._held = np.bincount(self.labels.numpy(), minlength=NUM_CLASSES)  # probe images of each digit
        self._share = np.divide(1.0, self._held, out=np.zeros(NUM_CLASSES), where=self._held > 0) / NUM_CLASSES
        self.device = device()
        self.worst_first = self.device.type == "cpu"  # (per_digit_unless_below: a GPU's kernels may depend on the batch)
        by_digit = [np.flatnonzero(self.labels.numpy() == d) for d in range(NUM_CLASSES)]
        sample = torch.from_numpy(np.concatenate([i[:max(1, len(i) // 10)] for i in by_digit]))
        self._sample = self.images[sample], self.labels[sample]
        self._rest = [i[max(1, len(i) // 10):] for i in by_digit]  # (:meth:`_evaluate_worst_first`)
        self._lock = threading.Lock()  # one model: the guard and attribution's background job take turns
        self._known: list[tuple[dict, tuple[np.ndarray, np.ndarray]]] = []  # (weights, scores), newest last

    @property
    def size(self) -> int:
        return len(self.labels)

    def per_digit(self, weights: dict, delta: dict | None = None) -> np.ndarray:
        """Per-digit accuracy (0..1; NaN for a digit the probe lacks) of ``weights`` (+ ``delta``)."""
        return self.scores(weights, delta)[0]

    def scores(self, weights: dict, delta: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-digit accuracy (as :meth:`per_digit`) and the share of all probe images the model
        labels with each digit (0..1; a model that knows the digits labels about a tenth with each)."""
        return on_torch_thread(self._scores, weights, delta)

    def per_digit_unless_below(self, weights: dict, delta: dict | None, ceiling: float) -> tuple[np.ndarray | None, int]:
        """:meth:`per_digit` of ``weights`` (+ ``delta``), or None as soon as the mean of its per-digit
        accuracies (a digit the probe lacks counted as 0) is certainly at most ``ceiling``: every
        image not yet evaluated counted as right, the mean would still be no higher. With the
        images evaluated. On the CPU the worst digits first (:meth:`_evaluate_worst_first`),
        elsewhere in the probe's own batches; a finished evaluation has :meth:`per_digit`'s figures
        bit for bit. (The effect guard: an aggregate without an update that cannot beat the
        aggregate with it by more than the harm allowed needs no more images.)"""
        def enough(confusion: np.ndarray) -> bool:  # the mean if every image still to come were right
            highest = np.diag(confusion) + self._held - confusion.sum(axis=1)
            return float(highest @ self._share) <= ceiling - 1e-9  # (a margin far above rounding)

        evaluate_ = self._evaluate_worst_first if self.worst_first else self._evaluate
        result = on_torch_thread(evaluate_, weights, delta, enough)
        if result.total < self.size:
            return None, result.total
        return self._figures(result)[0], result.total

    def learn(self, weights: dict, predictions: np.ndarray) -> None:
        """``weights`` predicted ``predictions`` on the whole test set (the images this probe was
        cut from): keep their probe scores for :meth:`known_scores`."""
        result = counts(self.labels.numpy(), np.asarray(predictions)[self.indices])
        self.keep(weights, self._figures(result))

    def keep(self, weights: dict, scores: tuple[np.ndarray, np.ndarray]) -> None:
        """``weights`` (which may become a global model) scored ``scores`` (:meth:`scores`' pair):
        keep them for :meth:`known_scores` (a copy: the caller's arrays may change)."""
        kept = {k: np.array(v, copy=True) for k, v in weights.items()}
        with self._lock:
            self._known = [*self._known[-(KNOWN - 1):], (kept, scores)]

    def known_scores(self, weights: dict) -> tuple[np.ndarray, np.ndarray] | None:
        """:meth:`scores` of ``weights`` if the global evaluation handed them over (the very same
        values: compared element by element), else None."""
        with self._lock:
            known = list(self._known)
        for kept, scores in reversed(known):
            if kept.keys() == weights.keys() and all(np.array_equal(kept[k], np.asarray(v)) for k, v in weights.items()):
                return scores
        return None

    @staticmethod
    def _figures(result) -> tuple[np.ndarray, np.ndarray]:
        accuracy = np.array([a if a is not None else np.nan for a in result.per_digit_accuracy()])
        return accuracy, result.predicted_per_digit / max(result.total, 1)

    def _scores(self, weights: dict, delta: dict | None) -> tuple[np.ndarray, np.ndarray]:
        return self._figures(self._evaluate(weights, delta))

    def _load(self, weights: dict, delta: dict | None) -> None:
        if delta is not None:
            weights = {k: (v + delta[k]).astype(v.dtype) if v.dtype.kind == "f" and k in delta else v
                       for k, v in weights.items()}
        self.model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})

    def _evaluate(self, weights: dict, delta: dict | None, enough=None):
        with self._lock:
            self._load(weights, delta)
            return evaluate(self.model, self.images, self.labels, self.batch_size, self.device, enough=enough)

    def _evaluate_worst_first(self, weights: dict, delta: dict | None, enough):
        """:meth:`_evaluate` with ``enough``, on the CPU, in the order that lets it stop soonest: a
        tenth of each digit's images first, then the digits the model got most wrong there, in
        chunks of a tenth of the probe. Every wrong image lowers the bound, so an aggregate without
        a node's update, which fails the node's digits, is told after one or two chunks instead of
        half the probe. The counts of a finished evaluation are those of any order (on the CPU an
        image's prediction does not depend on its batch; ``tests/test_effect_guard.py``)."""
        with self._lock:
            self._load(weights, delta)
            first = evaluate(self.model, *self._sample, len(self._sample[1]), self.device)
            if first.total == self.size or enough(first.confusion):
                return first
            wrong = first.total_per_digit - first.correct_per_digit
            rest = torch.from_numpy(np.concatenate([self._rest[d] for d in np.argsort(-wrong, kind="stable")]))
            more = evaluate(self.model, self.images[rest], self.labels[rest], max(1, self.size // NUM_CLASSES),
                            self.device, enough=lambda confusion: enough(first.confusion + confusion))
            more.confusion += first.confusion
            more.loss_sum += first.loss_sum
            return more


class Probes:
    """The run's probes: ``probes(size, batch_size)`` is the Probe of that size, built on first
    use, then shared; :meth:`offer` hands a global model's test-set predictions to each built one."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, model_fn: Callable[[], torch.nn.Module]) -> None:
        self.images, self.labels, self.model_fn = images, labels, model_fn
        self.built: dict[int, Probe] = {}

    def __call__(self, size: int = 1000, batch_size: int = 1000) -> Probe:
        if size not in self.built:
            self.built[size] = Probe(self.images, self.labels, self.model_fn, size, batch_size)
        return self.built[size]

    def offer(self, images: torch.Tensor, weights: dict, predictions: np.ndarray) -> None:
        """``weights`` predicted ``predictions`` on ``images``: if those are the test images the
        probes were cut from (the same tensor), each built probe keeps its scores."""
        if images is not self.images or len(predictions) != len(self.labels):
            return
        for probe in self.built.values():
            probe.learn(weights, predictions)
