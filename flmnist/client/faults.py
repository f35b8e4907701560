"""Fault injection: a node that misbehaves on purpose, for robustness tests and benchmarks.

``client.fault=MODE`` with ``client.fault_nodes=[partition ids]`` makes those nodes corrupt
their replies after honest work. Each mode is one attack class the server must survive:

- ``error``: the ClientApp raises (an error reply).
- ``nan``: NaN weights. ``complex-nan``: complex weights holding NaN.
- ``dtype``: float64 bytes under float32 metadata. ``shape``: a (1,) payload under the
  declared full shape.
- ``scale``: the update times 1e30. ``sign-flip``: the update reversed and scaled by 5
  (``w - 5 (w_k - w)``). ``boost``: the update times 10 (a model-replacement attempt).
- ``huge-examples``: ``num-examples`` = 2**62, claiming the whole weight of an average.
- ``extra-metric`` / ``missing-metric``: an out-of-date client's metric keys.
- ``loss-trace-number``, ``train-loss-list``, ``partition-inf``, ``long-trace``: metrics of
  the wrong type or size.
- ``bad-node-info``: a malformed ``node-info`` record (train, evaluate and query replies).
- ``eval-list``, ``eval-missing``, ``eval-inconsistent``: malformed evaluation counts.
- ``rotate``: a different one of the train attacks every round, and of the evaluation
  attacks on every evaluation.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flmnist.core.arrays import to_record
from flmnist.protocol import messages as p
from flmnist.protocol.fault_modes import EVALUATE_ATTACKS, FAULTS, TRAIN_ATTACKS  # noqa: F401 - re-exported for tests


def active_fault(settings: p.TrainSettings, partition: int, server_round: int, attacks: tuple[str, ...]) -> str:
    """The fault this node commits on this message, or ''."""
    if not settings.fault or partition not in settings.fault_nodes:
        return ""
    if settings.fault == "rotate":
        return attacks[server_round % len(attacks)]
    return settings.fault


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def corrupt_train(fault: str, content: RecordDict, received: ArrayRecord) -> None:
    """Corrupt a train reply in place (``received``: the model the node was sent)."""
    if fault == "error":
        raise RuntimeError("injected fault (client.fault=error)")
    metrics: MetricRecord = content[p.METRICS]
    arrays = content[p.ARRAYS]
    first = next(iter(arrays))
    if fault in ("nan", "scale", "sign-flip", "boost"):
        new, old = _arrays(arrays), _arrays(received)
        for k, v in new.items():
            if fault == "nan":
                new[k] = np.full_like(v, np.nan)
            elif fault == "scale":
                new[k] = (v * np.float32(1e30)).astype(v.dtype)
            elif fault == "sign-flip":
                new[k] = (old[k] - 5 * (v - old[k])).astype(v.dtype)
            else:
                new[k] = (old[k] + 10 * (v - old[k])).astype(v.dtype)
        content[p.ARRAYS] = to_record(new)
    elif fault == "complex-nan":
        v = arrays[first].numpy()
        arrays[first] = Array(np.full(v.shape, complex(np.nan, np.nan), dtype=np.complex64))
    elif fault == "dtype":
        v = arrays[first].numpy()
        arrays[first] = Array(dtype=str(v.dtype), shape=tuple(v.shape), stype="numpy.ndarray",
                              data=Array(v.astype(np.float64)).data)
    elif fault == "shape":
        v = arrays[first].numpy()
        arrays[first] = Array(dtype=str(v.dtype), shape=tuple(v.shape), stype="numpy.ndarray",
                              data=Array(np.ones(1, dtype=v.dtype)).data)
    elif fault == "huge-examples":
        metrics[p.NUM_EXAMPLES] = 2**62
    elif fault == "extra-metric":
        metrics["accuracy"] = 0.5
    elif fault == "missing-metric":
        del metrics[p.TRAIN_LOSS]
    elif fault == "loss-trace-number":
        metrics[p.LOSS_TRACE] = 0.5
    elif fault == "train-loss-list":
        metrics[p.TRAIN_LOSS] = [0.5, 0.5]
    elif fault == "partition-inf":
        metrics[p.PARTITION_ID] = float("inf")
    elif fault == "long-trace":
        metrics[p.LOSS_TRACE] = list(metrics[p.LOSS_TRACE]) * 3 + [0.1]
    elif fault == "bad-node-info":
        content[p.NODE_INFO] = ConfigRecord({p.NODE_NAME: 12345, "x": "y" * 1000})


def corrupt_evaluate(fault: str, content: RecordDict) -> None:
    """Corrupt an evaluate reply in place."""
    if fault == "error":
        raise RuntimeError("injected fault (client.fault=error)")
    metrics: MetricRecord = content[p.METRICS]
    if fault == "eval-list":
        metrics[p.CORRECT] = [1, 2]
    elif fault == "eval-missing":
        del metrics[p.LOSS_SUM]
    elif fault == "eval-inconsistent":
        metrics[p.CORRECT] = int(metrics[p.NUM_EXAMPLES]) + 5
    elif fault == "bad-node-info":
        content[p.NODE_INFO] = ConfigRecord({p.NODE_NAME: 12345})


def corrupt_query(fault: str, content: RecordDict) -> None:
    """Corrupt a query reply (asynchronous node discovery) in place."""
    if fault == "bad-node-info":  # not under "rotate": the node must stay discoverable
        content[p.NODE_INFO] = ConfigRecord({p.PARTITION_ID: "seven", p.TRAIN_EXAMPLES: [1, 2]})
