"""The probe: a fixed, stratified set of test images and one model to score weights on it.

Attribution (:mod:`flmnist.observers.attribution`) measures each applied update on it, and the
effect guard (:mod:`flmnist.engine.effect_guard`) judges updates on it; a run builds one probe
(:func:`shared_probes`, the run's ``RunContext.probe``) and both share its images and model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch

from flmnist.core.constants import NUM_CLASSES
from flmnist.ml.threads import on_torch_thread
from flmnist.ml.training import device, evaluate

PROBE_SEED = 20170217  # fixed: every run probes the same images


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
        idx = torch.from_numpy(probe_indices(labels, size))
        self.images, self.labels = images[idx], labels[idx]
        self.model = model_fn()
        self.batch_size = batch_size
        self.device = device()
        self._lock = threading.Lock()  # one model: the guard and attribution's background job take turns

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

    def _scores(self, weights: dict, delta: dict | None) -> tuple[np.ndarray, np.ndarray]:
        if delta is not None:
            weights = {k: (v + delta[k]).astype(v.dtype) if v.dtype.kind == "f" and k in delta else v
                       for k, v in weights.items()}
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
        with self._lock:
            self.model.load_state_dict(state)
            result = evaluate(self.model, self.images, self.labels, self.batch_size, self.device)
        accuracy = np.array([a if a is not None else np.nan for a in result.per_digit_accuracy()])
        return accuracy, result.predicted_per_digit / max(result.total, 1)


def shared_probes(images: torch.Tensor, labels: torch.Tensor,
                  model_fn: Callable[[], torch.nn.Module]) -> Callable[[int, int], Probe]:
    """``probe(size, batch_size)``: the run's Probe of that size, built on first use, then shared."""
    built: dict[int, Probe] = {}

    def probe(size: int = 1000, batch_size: int = 1000) -> Probe:
        if size not in built:
            built[size] = Probe(images, labels, model_fn, size, batch_size)
        return built[size]

    return probe
