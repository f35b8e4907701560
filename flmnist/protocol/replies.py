"""What the reply screen (:mod:`flmnist.protocol.screen`) turns a node's reply into: an accepted
:class:`ClientUpdate`, :class:`EvaluateReply` or :class:`NodeInfo` holding only checked values, or
a :class:`Rejection` with its reason."""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import ArrayRecord, MetricRecord, RecordDict

from flmnist.core.arrays import Weights, to_record
from flmnist.protocol import messages as p


@dataclass
class ClientUpdate:
    """An accepted train reply: clean numpy weights and metrics, ready to aggregate."""

    node_id: int
    name: str
    partition: int
    num_examples: int
    weights: Weights                      # decoded, checked arrays (the model, or a delta)
    metrics: dict                         # exactly protocol.TRAIN_METRICS, clean Python values
    norm: float = 0.0                     # L2 distance from the global model (or of the delta)
    device: str = ""
    evaluation: dict | None = None        # the received model's checked evaluation counts (evaluate-received)
    metadata: object = field(default=None, repr=False)   # the reply's Flower metadata
    _arrays: ArrayRecord | None = field(default=None, repr=False)

    @property
    def arrays(self) -> ArrayRecord:
        """The weights as a Flower ArrayRecord (built from the checked arrays, not the reply's)."""
        if self._arrays is None:
            self._arrays = to_record(self.weights)
        return self._arrays

    @property
    def aggregation_metrics(self) -> dict:
        """The checked metrics plus the server's ``unit-weight`` 1 (``weighted_by_key: unit-weight``
        averages unweighted): what Flower's aggregation weighs the update by."""
        return {**self.metrics, p.UNIT_WEIGHT: 1}

    def content(self) -> RecordDict:
        """A clean reply content for Flower's aggregation: only checked arrays and :attr:`aggregation_metrics`."""
        return RecordDict({p.ARRAYS: self.arrays, p.METRICS: MetricRecord(self.aggregation_metrics)})

    def scale_update(self, factor: float, reference: Weights, delta: bool) -> None:
        """Shrink the update (its difference from ``reference``) by ``factor`` (norm clipping)."""
        for k, v in self.weights.items():
            self.weights[k] = (v * factor if delta else reference[k] + (v - reference[k]) * factor).astype(v.dtype)
        self.norm *= factor
        self._arrays = None


@dataclass(frozen=True)
class EvaluateReply:
    """An accepted evaluate reply: summable counts."""

    node_id: int
    name: str
    partition: int
    metrics: dict


@dataclass(frozen=True)
class NodeInfo:
    """An accepted query reply: who a node is."""

    node_id: int
    name: str
    partition: int
    train_examples: int
    device: str = ""


@dataclass(frozen=True)
class Rejection:
    """A reply that did not pass: who sent it and why. ``failed``: an error reply (no content)."""

    node_id: int
    name: str
    reason: str
    failed: bool = False
