"""Fault injection: a node that misbehaves on purpose, for robustness tests and benchmarks.

``client.fault=MODE`` with ``client.fault_nodes=[partition ids]`` makes those nodes corrupt
their replies after honest work. It is one Flower ClientApp mod, :func:`fault_mod`
(``ClientApp(mods=[fault_mod])`` in :mod:`flmnist.client_app`, whose handlers know nothing of
faults): the mod lets the handler compute the honest reply, then reads the settings from the
incoming message's ``config`` record and the node's partition id from the reply (``metrics``
of a train or evaluate reply, ``node-info`` of a query reply) and, on a fault node, corrupts
the reply's content in place with :func:`corrupt_train`, :func:`corrupt_evaluate` or
:func:`corrupt_query`. An error reply passes through untouched. Each mode is one attack class
the server must survive:

- ``error``: the ClientApp raises (an error reply).
- ``nan``: NaN weights. ``complex-nan``: complex weights holding NaN.
- ``dtype``: float64 bytes under float32 metadata. ``shape``: a (1,) payload under the
  declared full shape.
- ``scale``: the update times 1e30. ``sign-flip``: the update reversed and scaled by 5
  (``w - 5 (w_k - w)``). ``boost``: the update times 10 (a model-replacement attempt).
  With ``reply_delta`` (FedBuff) the reply is the update itself, so the model it is measured
  from is zero.
- ``huge-examples``: ``num-examples`` = 2**62, claiming the whole weight of an average.
- ``extra-metric`` / ``missing-metric``: an out-of-date client's metric keys.
- ``loss-trace-number``, ``train-loss-list``, ``partition-inf``, ``long-trace``: metrics of
  the wrong type or size.
- ``bad-node-info``: a malformed ``node-info`` record (train, evaluate and query replies).
- ``eval-list``, ``eval-missing``, ``eval-inconsistent``: malformed evaluation counts.
- ``replace``: model replacement, a well-formed reply whose weights are the trained model
  times -5 (with ``reply_delta`` the reply is the update itself, so it is the update times
  -5, the same as ``sign-flip`` there).
- ``impersonate``: ``replace``'s weights, and every reply (train, evaluate and query, so from
  discovery on) claims the identity of the next partition, ``(partition + 1) % num_partitions``
  (:func:`victim_of`): ``node-info``'s ``node-name`` and the ``partition-id`` of ``metrics``
  (train, evaluate) or of ``node-info`` (query). Counts (``num-examples``) stay the node's own.
- ``rotate``: a different one of the train attacks every round, and of the evaluation
  attacks on every evaluation (``server_round % len(attacks)``); query replies stay honest.
  ``replace`` and ``impersonate`` (:data:`HOSTILE_ATTACKS`) are never part of the rotation.
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log

from flmnist.core.arrays import to_record, to_weights
from flmnist.protocol import messages as p
from flmnist.protocol.fault_modes import (  # noqa: F401 - FAULTS, HOSTILE_ATTACKS re-exported
    EVALUATE_ATTACKS,
    FAULTS,
    HOSTILE_ATTACKS,
    TRAIN_ATTACKS,
)


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The ClientApp mod: the handler's honest reply, corrupted in place if this node is a fault
    node for this message (``error`` raises, which Flower turns into an error reply)."""
    reply = call_next(msg, context)
    if reply.has_error() or not reply.has_content():
        return reply
    config = msg.content[p.CONFIG]
    if not config.get(p.FAULT):  # an honest node: no need to read the settings again
        return reply
    if context.node_config.get("data-path") and context.node_config.get("allow-faults") is not True:
        # a real board attacks only when its operator says so: a client.fault left set on the
        # server made real boards send wrecked or borrowed updates
        log(WARNING, "client.fault=%s asked of this board: ignored (its node config has no allow-faults=true)",
            config.get(p.FAULT))
        return reply
    settings = p.TrainSettings.from_record(config)
    content = reply.content
    category = msg.metadata.message_type.split(".")[0]
    # the node's true partition id is read before any corruption rewrites it (impersonate)
    if category == MessageType.TRAIN:
        partition = int(content[p.METRICS][p.PARTITION_ID])
        fault = active_fault(settings, partition, p.server_round(config), TRAIN_ATTACKS)
        if fault:
            corrupt_train(fault, content, _received(msg, content, settings),
                          victim=victim_of(partition, settings.num_partitions))
        if p.EVALUATION in content:  # one exchange per round: the evaluation it carries has its attacks too
            fault = active_fault(settings, partition, p.server_round(config), EVALUATE_ATTACKS)
            if fault.startswith("eval-"):
                corrupt_evaluate(fault, RecordDict({p.METRICS: content[p.EVALUATION]}))
    elif category == MessageType.EVALUATE:
        partition = int(content[p.METRICS][p.PARTITION_ID])
        fault = active_fault(settings, partition, p.server_round(config), EVALUATE_ATTACKS)
        if fault:
            corrupt_evaluate(fault, content, victim=victim_of(partition, settings.num_partitions))
    elif category == MessageType.QUERY:
        partition = int(content[p.NODE_INFO][p.PARTITION_ID])
        # not under "rotate": the node must stay discoverable
        if settings.fault in ("bad-node-info", "impersonate") and partition in settings.fault_nodes:
            corrupt_query(settings.fault, content, victim=victim_of(partition, settings.num_partitions))
    return reply


def victim_of(partition: int, num_partitions: int) -> int:
    """The partition an ``impersonate`` node claims to be: the next one, wrapping round."""
    return (partition + 1) % num_partitions


def claim_identity(content: RecordDict, victim: int | None) -> None:
    """Make a reply claim to come from partition ``victim`` (``impersonate``): ``node-info``'s
    ``node-name`` and ``partition-id`` (query), ``metrics``' (and ``evaluation``'s) ``partition-id`` (train, evaluate)."""
    if victim is None:
        raise ValueError("client.fault=impersonate needs the partition id of the node it impersonates")
    info: ConfigRecord = content[p.NODE_INFO]
    info[p.NODE_NAME] = p.simulated_node_name(victim)
    if p.PARTITION_ID in info:
        info[p.PARTITION_ID] = victim
    for record in (p.METRICS, p.EVALUATION):  # the evaluation too: a coherent forgery
        if record in content:
            content[record][p.PARTITION_ID] = victim


def _received(msg: Message, content: RecordDict, settings: p.TrainSettings) -> ArrayRecord:
    """The model a train reply's update is measured from: the one the node was sent, or zeros
    (of the reply's shapes and dtypes) when the reply is the update itself (``reply_delta``)."""
    if settings.reply_delta:
        return to_record({k: np.zeros_like(v) for k, v in to_weights(content[p.ARRAYS]).items()})
    return msg.content[p.ARRAYS]


def active_fault(settings: p.TrainSettings, partition: int, server_round: int,
                 attacks: tuple[str, ...]) -> str:
    """The fault this node commits on this message, or ''."""
    if not settings.fault or partition not in settings.fault_nodes:
        return ""
    if settings.fault == "rotate":
        return attacks[server_round % len(attacks)]
    return settings.fault


def _arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def corrupt_train(fault: str, content: RecordDict, received: ArrayRecord, victim: int | None = None) -> None:
    """Corrupt a train reply in place (``received``: the model the node was sent; ``victim``:
    the partition ``impersonate`` claims to be, see :func:`victim_of`)."""
    if fault == "error":
        raise RuntimeError("injected fault (client.fault=error)")
    metrics: MetricRecord = content[p.METRICS]
    arrays = content[p.ARRAYS]
    first = next(iter(arrays))
    if fault in ("nan", "scale", "sign-flip", "boost", "replace", "impersonate"):
        new, old = _arrays(arrays), _arrays(received)
        for k, v in new.items():
            if fault == "nan":
                new[k] = np.full_like(v, np.nan)
            elif fault == "scale":
                new[k] = (v * np.float32(1e30)).astype(v.dtype)
            elif fault == "sign-flip":
                new[k] = (old[k] - 5 * (v - old[k])).astype(v.dtype)
            elif fault in ("replace", "impersonate"):
                new[k] = (-5 * v).astype(v.dtype)
            else:
                new[k] = (old[k] + 10 * (v - old[k])).astype(v.dtype)
        content[p.ARRAYS] = to_record(new)
        if fault == "impersonate":
            claim_identity(content, victim)
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


def corrupt_evaluate(fault: str, content: RecordDict, victim: int | None = None) -> None:
    """Corrupt an evaluate reply in place (``victim``: as for :func:`corrupt_train`)."""
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
    elif fault == "impersonate":  # the counts stay the node's own
        claim_identity(content, victim)


def corrupt_query(fault: str, content: RecordDict, victim: int | None = None) -> None:
    """Corrupt a query reply (asynchronous node discovery) in place (``victim``: as for
    :func:`corrupt_train`)."""
    if fault == "bad-node-info":  # not under "rotate": the node must stay discoverable
        content[p.NODE_INFO] = ConfigRecord({p.PARTITION_ID: "seven", p.TRAIN_EXAMPLES: [1, 2]})
    elif fault == "impersonate":  # lie from discovery on
        claim_identity(content, victim)
