"""A model's weights as numpy arrays, and back to Flower's ``ArrayRecord``: the one conversion."""

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
