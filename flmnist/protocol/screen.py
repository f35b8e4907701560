"""The reply screen: every node reply is untrusted input, checked before it can touch the model.

:meth:`ReplyScreen.train` turns a train reply into an accepted :class:`ClientUpdate` or a
:class:`Rejection` with a reason, never an exception. It trusts nothing the node wrote:

- record names, metric keys and metric types exactly as :mod:`flmnist.protocol.messages` says;
- every array decoded from its bytes and compared with the global model: the same names,
  shapes and dtype (real floating point), all values finite; the declared metadata must
  agree with the bytes too;
- ``num-examples`` at most what that node holds (the partition sizes the server computed,
  or ``screen.max_examples`` for nodes with their own data); the loss trace no longer than the
  local steps sent, losses in 0..MAX_LOSS; ``partition-id`` a valid partition index;
- the update's L2 length: at most ``screen.max_norm_ratio`` times the median length of recent
  updates (a 1e30-scaled model is refused), and optionally an absolute ``screen.max_update_norm``.

:meth:`ReplyScreen.evaluate` and :meth:`ReplyScreen.query` do the same for evaluation
counts (also those a train reply carries, when asked) and node discovery; :func:`aggregate_problem` checks an aggregate before it may
become the global model. Sync and async engines use this one screen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from flmnist.core.arrays import Weights, dot
from flmnist.core.checks import check_integer, check_number
from flmnist.core.errors import ConfigError
from flmnist.protocol import messages as p
from flmnist.protocol.replies import (  # (what the screen returns)
    ClientUpdate,
    EvaluateReply,
    NodeInfo,
    Rejection,
)


@dataclass(frozen=True)
class ScreenSettings:
    """``conf/config.yaml``'s ``screen`` section."""

    max_examples: int | None = None       # cap on num-examples for nodes with their own data (null: partition sizes)
    max_update_norm: float | None = None  # reject updates farther than this (L2) from the global model
    max_norm_ratio: float | None = 100.0  # reject updates longer than this multiple of the median update norm
    clip_to_median: float | None = None   # scale updates longer than this multiple of the median norm down to it
    norm_window: int = 20                 # asynchronous: the median is over the last N accepted updates
    guard_max_harm: float | None = 2.0    # effect guard: reject updates whose presence costs the aggregate more probe accuracy (pp)
    guard_window: int = 10                # asynchronous: the effect guard judges an update against the last N accepted ones
    registry: str | None = None           # deployment: register_node.sh's registered_nodes.tsv (node id -> name)

    def __post_init__(self) -> None:
        check_integer("screen.max_examples", self.max_examples, 1, allow_none=True)
        for key, low in (("max_update_norm", 0.0), ("max_norm_ratio", 1.0), ("clip_to_median", 1.0)):
            check_number(f"screen.{key}", getattr(self, key), low, low_open=not low, allow_none=True)  # ratio < 1: cuts the median
        check_integer("screen.norm_window", self.norm_window, 1)
        check_number("screen.guard_max_harm", self.guard_max_harm, 0.0, allow_none=True)
        check_integer("screen.guard_window", self.guard_window, 1)
        if self.registry is not None and (not isinstance(self.registry, str) or not self.registry):
            raise ConfigError(f"screen.registry must be a file path or null, got {self.registry!r}")


@dataclass(frozen=True)
class NodeLimits:
    """What the server knows of each partition: training and held-out example counts."""

    train_examples: tuple[int, ...]
    holdout_examples: tuple[int, ...]
    max_examples: int | None = None  # set: nodes bring their own data; this caps their claims
    holdout_digits: tuple[tuple[int, ...], ...] | None = None  # per partition, its held-out images per digit

    @property
    def num_partitions(self) -> int:
        return len(self.train_examples)

    def train_cap(self, partition: int) -> int:
        return self.max_examples if self.max_examples is not None else self.train_examples[partition]

    def holdout_exact(self, partition: int) -> int | None:
        return None if self.max_examples is not None else self.holdout_examples[partition]

    def holdout_per_digit(self, partition: int) -> list[int] | None:
        known = self.max_examples is None and self.holdout_digits is not None
        return list(self.holdout_digits[partition]) if known else None


class Refused(Exception):
    """Raised inside the screen only; becomes a Rejection."""


def _int(value, key: str) -> int:  # (what the node sent in parentheses: a reason's kind leaves it out)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise Refused(f"metric '{key}' must be an integer, got {type(value).__name__} ({value!r:.40})")
    return int(value)


def _float(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise Refused(f"metric '{key}' must be a number, got {type(value).__name__} ({value!r:.40})")
    if not math.isfinite(value):
        raise Refused(f"metric '{key}' is not finite ({value!r})")
    return float(value)


def _metrics(record: MetricRecord, contract: dict) -> dict:
    keys = set(record.keys())
    if keys != set(contract):
        missing, extra = sorted(set(contract) - keys), sorted(keys - set(contract))
        raise Refused(f"metric keys differ from the contract (missing {missing}, unexpected {extra[:5]})")
    out = {}
    for key, kind in contract.items():
        value = record[key]
        if kind is int:
            out[key] = _int(value, key)
        elif kind is float:
            out[key] = _float(value, key)
        else:  # list of floats
            if not isinstance(value, list):
                raise Refused(f"metric '{key}' must be a list of numbers, got {type(value).__name__}")
            out[key] = [_float(v, key) for v in value]
    return out


def _records(content: RecordDict, arrays: bool, metrics: bool, evaluation: bool = False) -> None:
    want_arrays = {p.ARRAYS} if arrays else set()
    want_metrics = ({p.METRICS} if metrics else set()) | ({p.EVALUATION} if evaluation else set())
    if set(content.array_records) != want_arrays:
        raise Refused(f"array records {sorted(content.array_records)}, expected {sorted(want_arrays)}")
    if set(content.metric_records) != want_metrics:
        raise Refused(f"metric records {sorted(content.metric_records)}, expected {sorted(want_metrics)}")
    if set(content.config_records) != {p.NODE_INFO}:
        raise Refused(f"config records {sorted(content.config_records)}, expected ['{p.NODE_INFO}']")


def _node_info(content: RecordDict, contract: dict) -> dict:
    info = content.config_records[p.NODE_INFO]
    keys = set(info.keys())
    if not keys <= set(contract) or p.NODE_NAME not in keys:
        raise Refused(f"node-info keys {sorted(keys)[:6]} differ from the contract {sorted(contract)}")
    out = {}
    for key in keys:
        value, kind = info[key], contract[key]
        if kind is str:
            if not _sound_name(value):
                raise Refused(f"node-info '{key}' must be a string of 1-{p.MAX_NAME_LENGTH} printable characters, not starting with 'node id '")
            out[key] = value
        else:
            out[key] = _int(value, key)
    return out


def _partition(value: int, limits: NodeLimits) -> int:
    if not 0 <= value < limits.num_partitions:
        raise Refused(f"partition-id {value} is outside 0..{limits.num_partitions - 1}")
    return value


def decode(array: Array, name: str, ref: np.ndarray) -> np.ndarray:
    """Decode one array from its bytes; its data and its metadata must both match ``ref``."""
    if not isinstance(array, Array):
        raise Refused(f"array '{name}' is not an Array")
    if str(array.dtype) != str(ref.dtype) or tuple(array.shape) != tuple(ref.shape):
        raise Refused(f"array '{name}' declares {array.dtype} {tuple(array.shape)}, "
                      f"expected {ref.dtype} {tuple(ref.shape)}")
    try:
        values = array.numpy()
    except Exception as err:  # noqa: BLE001 - bytes of any kind
        raise Refused(f"array '{name}' cannot be decoded ({type(err).__name__})") from None
    if values.dtype != ref.dtype or values.shape != ref.shape:
        raise Refused(f"array '{name}' holds {values.dtype} {values.shape} data under "
                      f"{array.dtype} {tuple(array.shape)} metadata; expected {ref.dtype} {ref.shape}")
    if values.dtype.kind != "f":
        raise Refused(f"array '{name}' has dtype {values.dtype}; only real floating point is accepted")
    if not np.isfinite(values).all():
        raise Refused(f"array '{name}' holds non-finite values")
    return values


def decode_weights(record: ArrayRecord, reference: Weights) -> Weights:
    if not isinstance(record, ArrayRecord):
        raise Refused("'arrays' is not an ArrayRecord")
    names = list(record.keys())
    if set(names) != set(reference):
        missing, extra = sorted(set(reference) - set(names)), sorted(set(names) - set(reference))
        raise Refused(f"arrays do not match the model (missing {missing[:5]}, unexpected {extra[:5]})")
    return {k: decode(record[k], k, reference[k]) for k in reference}


def l2_norm(weights: Weights) -> float:
    """L2 norm of all the arrays together, in float64 (elementwise: :func:`~flmnist.core.arrays.dot`)."""
    return math.sqrt(sum(dot(v, v) for v in weights.values()))


def update_norm(weights: Weights, reference: Weights, delta: bool) -> float:
    """L2 norm of the update (a delta itself, or the model minus ``reference``), in float64."""
    if delta:
        return l2_norm(weights)
    return l2_norm({k: v.astype(np.float64) - reference[k] for k, v in weights.items()})


def aggregate_problem(new: Weights | None, reference: Weights) -> str | None:
    """Why an aggregate must not become the global model (None: it may)."""
    if new is None:
        return "no aggregate"
    if set(new) != set(reference):
        return "the aggregate's arrays differ from the model's"
    for k, ref in reference.items():
        v = np.asarray(new[k])
        if v.shape != ref.shape or v.dtype != ref.dtype:
            return f"aggregate array '{k}' is {v.dtype} {v.shape}, expected {ref.dtype} {ref.shape}"
        if not np.isfinite(v).all():
            return f"aggregate array '{k}' holds non-finite values"
    return None


def _sound_name(value) -> bool:
    return (isinstance(value, str) and 0 < len(value) <= p.MAX_NAME_LENGTH and value.isprintable()
            and not value.startswith("node id "))


def _name(msg: Message) -> str:
    """A name for logs before the reply is trusted: node-info's name if it is a short string,
    else ``node <partition-id>`` if the metrics hold an integer one, else the Flower node id."""
    try:
        name = msg.content.config_records[p.NODE_INFO][p.NODE_NAME]
    except Exception:  # noqa: BLE001 - anything malformed
        name = None
    if _sound_name(name):
        return name
    try:
        partition = msg.content.metric_records[p.METRICS][p.PARTITION_ID]
    except Exception:  # noqa: BLE001
        partition = None
    if isinstance(partition, int) and not isinstance(partition, bool) and 0 <= partition < 1_000_000:
        return p.simulated_node_name(partition)
    return f"node id {msg.metadata.src_node_id}"


class ReplyScreen:
    """Checks replies against the contract, the global model and what the server knows of nodes."""

    def __init__(self, settings: ScreenSettings, limits: NodeLimits) -> None:
        self.settings = settings
        self.limits = limits

    def _guard(self, msg: Message, check):
        node_id = msg.metadata.src_node_id
        if msg.has_error():
            reason = str(msg.error.reason).strip().splitlines() or ["no reason given"]  # (the node's words, shown:
            shown = "".join(ch if ch.isprintable() else "?" for ch in reason[-1][:300])  # no terminal control codes)
            return Rejection(node_id, f"node id {node_id}", shown, failed=True)
        try:
            return check()
        except Refused as err:  # (a reason may quote what the node sent: keys of any length)
            return Rejection(node_id, _name(msg), str(err)[:500])
        except Exception as err:  # noqa: BLE001 - a reply must never crash the server
            return Rejection(node_id, _name(msg), f"unreadable reply ({type(err).__name__}: {str(err)[:200]})")

    def train(self, msg: Message, reference: Weights, sent: p.TrainSettings, delta: bool = False):
        """A ClientUpdate or a Rejection for one train reply (``reference``: the model sent)."""

        def check() -> ClientUpdate:
            content = msg.content
            _records(content, arrays=True, metrics=True, evaluation=sent.evaluate_received)
            info = _node_info(content, p.NODE_INFO_KEYS)
            m = _metrics(content.metric_records[p.METRICS], p.TRAIN_METRICS)
            partition = _partition(m[p.PARTITION_ID], self.limits)
            evaluation = self._evaluation(content.metric_records[p.EVALUATION]) if sent.evaluate_received else None
            if evaluation is not None and evaluation[p.PARTITION_ID] != partition:
                raise Refused(f"the evaluation names partition {evaluation[p.PARTITION_ID]}, the update {partition}")
            n = m[p.NUM_EXAMPLES]
            cap = self.limits.train_cap(partition)
            if not 1 <= n <= cap:
                raise Refused(f"num-examples {n} is outside 1..{cap} (what partition {partition} holds)")
            steps = sent.batches_per_update(n)
            if len(m[p.LOSS_TRACE]) > steps:
                raise Refused(f"loss trace has {len(m[p.LOSS_TRACE])} entries for {steps} local steps")
            if m[p.EXAMPLES_PROCESSED] != (processed := sent.examples_per_update(n)):
                raise Refused(f"examples-processed {m[p.EXAMPLES_PROCESSED]} != {processed} "
                              "(local work sent for that many examples)")
            bad_loss = next((v for v in (m[p.TRAIN_LOSS], *m[p.LOSS_TRACE]) if not 0 <= v <= p.MAX_LOSS), None)
            if m[p.TRAIN_TIME] < 0 or bad_loss is not None:
                raise Refused("train-time is negative" if bad_loss is None else f"a loss of {bad_loss:.4g} is outside 0..{p.MAX_LOSS:g}")
            mean = float(np.mean(m[p.LOSS_TRACE])) if m[p.LOSS_TRACE] else 0.0  # (DP-SGD: every sample empty)
            if not math.isclose(m[p.TRAIN_LOSS], mean, rel_tol=1e-6, abs_tol=1e-9):
                raise Refused(f"train-loss {m[p.TRAIN_LOSS]:.6g} is not the mean of its loss trace ({mean:.6g})")
            weights = decode_weights(content.array_records[p.ARRAYS], reference)
            norm = update_norm(weights, reference, delta)
            if not math.isfinite(norm):
                raise Refused("the update's norm overflows")
            limit = self.settings.max_update_norm
            if limit is not None and norm > limit:
                raise Refused(f"update norm {norm:.4g} exceeds screen.max_update_norm={limit:g}")
            return ClientUpdate(msg.metadata.src_node_id, info[p.NODE_NAME], partition, n, weights, m, norm,
                                info.get(p.DEVICE, ""), evaluation=evaluation)

        return self._guard(msg, check)

    def evaluate(self, msg: Message):
        """An EvaluateReply or a Rejection for one evaluate reply."""

        def check() -> EvaluateReply:
            content = msg.content
            _records(content, arrays=False, metrics=True)
            info = _node_info(content, p.NODE_INFO_KEYS)
            m = self._evaluation(content.metric_records[p.METRICS])
            return EvaluateReply(msg.metadata.src_node_id, info[p.NODE_NAME], m[p.PARTITION_ID], m)

        return self._guard(msg, check)

    def _evaluation(self, record) -> dict:
        """Checked evaluation counts (an evaluate reply's metrics, or a train reply's evaluation)."""
        m = _metrics(record, p.EVALUATE_METRICS)
        partition = _partition(m[p.PARTITION_ID], self.limits)
        total, correct = m[p.NUM_EXAMPLES], m[p.CORRECT]
        exact = self.limits.holdout_exact(partition)
        if exact is not None and total != exact:
            raise Refused(f"evaluated {total} examples; partition {partition} holds out {exact}")
        if exact is None and not 0 <= total <= self.limits.train_cap(partition):
            raise Refused(f"num-examples {total} is outside 0..{self.limits.train_cap(partition)}")
        if not 0 <= correct <= total:
            raise Refused(f"correct={correct} is outside 0..{total}")
        if not 0 <= m[p.LOSS_SUM] <= p.MAX_LOSS * total:
            raise Refused(f"loss-sum {m[p.LOSS_SUM]:.4g} is outside 0..{p.MAX_LOSS:g} x {total} examples")
        per_c, per_t = [m[p.correct_key(d)] for d in range(p.NUM_CLASSES)], [m[p.total_key(d)] for d in range(p.NUM_CLASSES)]
        if any(not 0 <= c <= t for c, t in zip(per_c, per_t)) or sum(per_t) != total or sum(per_c) != correct:
            raise Refused("per-digit counts are inconsistent with the totals")
        if (digits := self.limits.holdout_per_digit(partition)) is not None and per_t != digits:
            raise Refused(f"per-digit totals {per_t} are not partition {partition}'s held-out digits {digits}")
        return m

    def query(self, msg: Message):
        """A NodeInfo or a Rejection for one query reply (asynchronous node discovery)."""

        def check() -> NodeInfo:
            content = msg.content
            _records(content, arrays=False, metrics=False)
            info = _node_info(content, p.QUERY_INFO)
            missing = {p.PARTITION_ID, p.TRAIN_EXAMPLES} - set(info)
            if missing:
                raise Refused(f"node-info lacks {sorted(missing)}")
            partition = _partition(info[p.PARTITION_ID], self.limits)
            n, held = info[p.TRAIN_EXAMPLES], info.get(p.HOLDOUT_EXAMPLES, 0)
            if not 0 <= n <= self.limits.train_cap(partition):
                raise Refused(f"train-examples {n} is outside 0..{self.limits.train_cap(partition)}")
            if (exact := self.limits.holdout_exact(partition)) is not None and held != exact:
                raise Refused(f"holdout-examples {held}; partition {partition} holds out {exact}")
            if exact is None and not 0 <= held <= self.limits.train_cap(partition):  # (unused today; no trap later)
                raise Refused(f"holdout-examples {held} is outside 0..{self.limits.train_cap(partition)}")
            return NodeInfo(msg.metadata.src_node_id, info[p.NODE_NAME], partition, n, info.get(p.DEVICE, ""))

        return self._guard(msg, check)
