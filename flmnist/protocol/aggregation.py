"""How reply metrics are combined across nodes.

Flower's default averages every metric weighted by ``num-examples``. That is
right for a mean loss, wrong for per-digit accuracy (a node without a digit
would pull its accuracy down), so evaluation replies carry counts and we sum them.
"""

from __future__ import annotations

import math

from flwr.app import MetricRecord, RecordDict

from flmnist.core.constants import NUM_CLASSES

PER_NODE_KEYS = ("partition-id",)


def _metric_record(content: RecordDict) -> MetricRecord:
    return next(iter(content.metric_records.values()))


def aggregate_train_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of the scalar training metrics; lists (loss traces) and node ids are skipped."""
    records = [_metric_record(r) for r in records]
    total = sum(float(r[weight_key]) for r in records)
    out = MetricRecord()
    for r in records:
        w = float(r[weight_key]) / total
        for key, value in r.items():
            if key == weight_key or key in PER_NODE_KEYS or isinstance(value, list):
                continue
            out[key] = out.get(key, 0.0) + float(value) * w
    out[weight_key] = int(total)
    return out


def aggregate_evaluate_counts(records: list[RecordDict], weight_key: str) -> MetricRecord | None:
    """Sum loss and correct counts over nodes, overall and per digit, then divide. None when the
    replies hold no examples; no ``loss`` when the summed losses are not finite (each reply's is
    finite, but two near the float maximum add up to infinity)."""
    records = [_metric_record(r) for r in records]
    total = sum(int(r[weight_key]) for r in records)
    if total <= 0:
        return None
    loss_sum = sum(float(r["loss-sum"]) for r in records)
    correct = sum(int(r["correct"]) for r in records)
    out = MetricRecord({weight_key: total, "accuracy": correct / total})
    if math.isfinite(loss_sum / total):
        out["loss"] = loss_sum / total
    for d in range(NUM_CLASSES):
        c = sum(int(r.get(f"correct-{d}", 0)) for r in records)
        t = sum(int(r.get(f"total-{d}", 0)) for r in records)
        if t:
            out[f"accuracy-{d}"] = c / t
    return out
