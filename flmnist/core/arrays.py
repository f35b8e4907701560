"""A model's weights as numpy arrays, and back to Flower's ``ArrayRecord``: the one conversion;
the dot product every norm and cosine of weights goes through; whether a strategy's state is finite."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

Weights = dict[str, np.ndarray]


def to_weights(arrays: ArrayRecord) -> Weights:
    """Each array of the record as a numpy array (decoded with its own dtype and shape)."""
    return {k: v.numpy() for k, v in arrays.items()}


def to_record(weights: Weights) -> ArrayRecord:
    """The weights as an ArrayRecord (contiguous copies where needed)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def all_finite(value) -> bool:
    """Whether every float in ``value`` (an array, or dicts, lists and tuples of them, as a
    strategy's state holds them; anything else is skipped) is finite."""
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(all_finite(v) for v in value)
    if isinstance(value, np.ndarray | np.floating | float):
        return bool(np.isfinite(value).all()) if np.asarray(value).dtype.kind in "fc" else True
    return True


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """``a . b`` in float64, multiplied and summed elementwise.

    Not ``a @ b``, ``np.dot`` or ``np.linalg.norm``: a BLAS call wakes OpenBLAS's worker threads,
    which then spin on a core for up to 0.1 s after it, the core PyTorch trains or evaluates on
    in the same process. Measured: a seed002 client update took 80 ms instead of 45 ms (the
    screen's update norms), the effect guard's first probe evaluation of a round 105-130 ms
    instead of 30 ms (its lengths and cosines); docs/benchmarks.md."""
    return float(np.multiply(a, b, dtype=np.float64).sum())
