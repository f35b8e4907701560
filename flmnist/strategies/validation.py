"""Checks on every client reply before it may enter an aggregate.

A reply is rejected when its weights do not match the global model (missing or
extra arrays, wrong shape or dtype), hold non-finite values, or when its
``num-examples`` is missing, not an integer or not positive.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, RecordDict


def reply_problem(
    content: RecordDict,
    reference: ArrayRecord | None,
    arrays_key: str = "arrays",
    weight_key: str = "num-examples",
    check_arrays: bool = True,
) -> str | None:
    """Why this reply must be rejected, or None if it is sound."""
    metric_records = list(content.metric_records.values())
    if len(metric_records) != 1:
        return f"expected one MetricRecord, found {len(metric_records)}"
    metrics = metric_records[0]
    weight = metrics.get(weight_key)
    if weight is None:
        return f"missing '{weight_key}'"
    if isinstance(weight, bool) or not isinstance(weight, int) or weight <= 0:
        return f"'{weight_key}' must be a positive integer, got {weight!r}"
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            return f"non-finite metric '{key}'"
    if not check_arrays:
        return None
    if len(content.array_records) != 1 or arrays_key not in content.array_records:
        return f"expected one ArrayRecord named '{arrays_key}', found {list(content.array_records)}"
    arrays = content.array_records[arrays_key]
    if reference is not None:
        missing = set(reference) - set(arrays)
        extra = set(arrays) - set(reference)
        if missing or extra:
            return f"arrays do not match the model (missing {sorted(missing)}, unexpected {sorted(extra)})"
        for name, ref in reference.items():
            arr = arrays[name]
            if tuple(arr.shape) != tuple(ref.shape):
                return f"array '{name}' has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}"
            if arr.dtype != ref.dtype:
                return f"array '{name}' has dtype {arr.dtype}, expected {ref.dtype}"
    for name, arr in arrays.items():
        try:
            values = arr.numpy()
        except Exception as err:  # noqa: BLE001 - undecodable bytes of any kind
            return f"array '{name}' cannot be decoded ({err})"
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"array '{name}' holds non-finite values"
    return None
