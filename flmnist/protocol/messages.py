"""The message contract between flmnist's server and its nodes, both ways, in one place.

Server -> node: every train, evaluate and query message carries a ``config`` record built
from :class:`TrainSettings` (``to_record``); a node reads it back with ``from_record``.
Train messages also carry the global model under ``arrays``.

Node -> server: a train reply holds ``arrays`` (the trained model, or its difference from
the received one when ``reply-delta`` is set), one MetricRecord ``metrics`` with exactly
:data:`TRAIN_METRICS`, and a ConfigRecord ``node-info`` with :data:`NODE_INFO`; when the
message sets ``evaluate-received``, also a MetricRecord ``evaluation`` with exactly
:data:`EVALUATE_METRICS`: the node's evaluation of the model it received, before training (one
exchange per round instead of a train and an evaluate message). An
evaluate reply holds ``metrics`` with exactly :data:`EVALUATE_METRICS` and ``node-info``;
a query reply holds ``node-info`` with :data:`QUERY_INFO` as well.

No other module spells a record or metric key: they import the names below. What the
server does with a reply that breaks this contract is :mod:`flmnist.protocol.screen`'s business.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from flwr.app import ConfigRecord

from flmnist.core.checks import check_integer, check_number
from flmnist.core.constants import MNIST_TRAIN_SIZE, NUM_CLASSES
from flmnist.core.errors import ConfigError
from flmnist.protocol.fault_modes import FAULTS

# Record names inside a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
NODE_INFO = "node-info"
EVALUATION = "evaluation"  # train reply, when asked (evaluate-received): the received model evaluated

# Metric keys of replies.
NUM_EXAMPLES = "num-examples"          # the weight of an update in an average
TRAIN_LOSS = "train-loss"
LOSS_TRACE = "loss-trace"
PARTITION_ID = "partition-id"
EXAMPLES_PROCESSED = "examples-processed"
TRAIN_TIME = "train-time"
LOSS_SUM = "loss-sum"
CORRECT = "correct"
NODE_NAME = "node-name"
DEVICE = "device"
MACHINE = "machine"
TRAIN_EXAMPLES = "train-examples"
HOLDOUT_EXAMPLES = "holdout-examples"
# Added by the server's screen to every accepted update (never sent by a node): 1 for every
# update, so a Flower strategy with weighted_by_key=UNIT_WEIGHT averages plainly (seed 001).
UNIT_WEIGHT = "unit-weight"

# Keys the server (or Flower's strategies) add to a message's config record.
SERVER_ROUND = "server-round"
SERVER_VERSION = "server-version"
PROXIMAL_MU = "proximal-mu"
REPLY_DELTA = "reply-delta"
FAULT = "fault"                        # client.fault: the misbehaviour the fault mod commits ("" none)
CLIPPING_NORM = "clipping_norm"        # privacy=client/local: the node clips its update (Flower's KEY_CLIPPING_NORM)
LOCAL_DP_NOISE = "local-dp-noise-multiplier"  # privacy=local: the node adds noise of std this x clipping_norm
EVALUATE_RECEIVED = "evaluate-received"  # train: also evaluate the received model before training
WITHHOLD_LOSSES = "withhold-losses"    # privacy.node_metrics=withheld: train replies carry no losses


def correct_key(digit: int) -> str:
    return f"correct-{digit}"


def total_key(digit: int) -> str:
    return f"total-{digit}"


# Allowed metric keys of each reply and their types: int, float (any finite real, ints
# allowed), or list of floats. Exactly these keys, no more, no fewer.
FLOAT_LIST = "list[float]"
TRAIN_METRICS: dict[str, object] = {
    NUM_EXAMPLES: int,
    TRAIN_LOSS: float,
    LOSS_TRACE: FLOAT_LIST,
    PARTITION_ID: int,
    EXAMPLES_PROCESSED: int,
    TRAIN_TIME: float,
}
EVALUATE_METRICS: dict[str, object] = {
    NUM_EXAMPLES: int,
    LOSS_SUM: float,
    CORRECT: int,
    PARTITION_ID: int,
    **{correct_key(d): int for d in range(NUM_CLASSES)},
    **{total_key(d): int for d in range(NUM_CLASSES)},
}
NODE_INFO_KEYS: dict[str, type] = {NODE_NAME: str, DEVICE: str, MACHINE: str}
QUERY_INFO: dict[str, type] = {**NODE_INFO_KEYS, PARTITION_ID: int, TRAIN_EXAMPLES: int, HOLDOUT_EXAMPLES: int}
MAX_LOSS = 1e6  # a loss (per example) above this, or below 0, is refused: no model's honest NLL
MAX_NAME_LENGTH = 128  # node names and device strings longer than this are refused
MAX_LOCAL_EPOCHS = 1_000    # a task asking for more keeps a node busy for hours: refused
MAX_LOCAL_STEPS = 100_000
MAX_SPEC_LENGTH = 10_000    # a model or partition spec is a few settings of JSON


def simulated_node_name(partition: int) -> str:
    """How a simulated node (and a device without ``node-name``) is named in logs and tables."""
    return f"node {partition}"


def batches_per_update(train_examples: int, batch_size: int, local_epochs: int, local_steps: int | None) -> int:
    """Number of SGD steps (and loss-trace entries) of one local update."""
    if local_steps:
        return local_steps if train_examples > 0 else 0
    return local_epochs * math.ceil(train_examples / batch_size)


def examples_per_update(train_examples: int, batch_size: int, local_epochs: int, local_steps: int | None) -> int:
    """Examples processed by one local update: the fleet's workload and the virtual clock's input.
    ``local_steps`` batches run in shuffled passes, each ending with a short batch when
    ``batch_size`` does not divide the data (:func:`flmnist.ml.training.batches`)."""
    if local_steps:
        if train_examples <= 0:
            return 0
        per_pass = math.ceil(train_examples / batch_size)
        return local_steps // per_pass * train_examples + local_steps % per_pass * batch_size
    return local_epochs * train_examples


class _Reader:
    """A node's reading of its task's ``config`` record: each field of the type the server writes
    (an int is no bool, a float is an int or float, a spec a JSON object), else a ConfigError naming it."""

    def __init__(self, record: ConfigRecord) -> None:
        self.record = record

    def _get(self, key: str, default, types: tuple, what: str):
        value = self.record[key] if default is _REQUIRED else self.record.get(key, default)
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise ConfigError(f"the server's config record: {key} must be {what}, got {value!r}")
        return value

    def int(self, key: str, default=None) -> int:
        return self._get(key, _REQUIRED if default is None else default, (int,), "an integer")

    def float(self, key: str, default=None) -> float:
        return float(self._get(key, _REQUIRED if default is None else default, (int, float), "a number"))

    def bool(self, key: str, default: bool) -> bool:
        return self._get(key, default, (bool,), "true or false")

    def str(self, key: str, default: str) -> str:
        return self._get(key, default, (str,), "a string")

    def ints(self, key: str) -> list[int]:
        values = self._get(key, [], (list,), "a list of integers")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"the server's config record: {key} must be a list of integers, got {values!r}")
        return values

    def spec(self, key: str) -> dict:
        text = self._get(key, _REQUIRED, (str,), "a JSON object")
        try:
            spec = json.loads(text) if len(text) <= MAX_SPEC_LENGTH else None
        except (ValueError, RecursionError):
            spec = None
        if not isinstance(spec, dict):
            raise ConfigError(f"the server's config record: {key} must be a JSON object of at most "
                              f"{MAX_SPEC_LENGTH} characters, got {text[:80]!r}")
        return spec


_REQUIRED = object()


@dataclass(frozen=True)
class TrainSettings:
    """Everything a node needs to train and evaluate, sent in every message's ``config`` record.

    The constructor checks every value, so a bad ``client.*`` setting fails before Flower starts.
    """

    model: dict                      # model spec (``conf/model``), allow-listed by the node
    partition: dict                  # partition spec (``conf/partition``), allow-listed by the node
    num_partitions: int
    seed: int
    holdout_fraction: float
    data_root: str = ""
    local_epochs: int = 1
    local_steps: int | None = None
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    eval_batch_size: int = 1000
    proximal_mu: float = 0.0
    reply_delta: bool = False
    fault: str = ""
    fault_nodes: tuple[int, ...] = field(default_factory=tuple)
    dp_noise_multiplier: float = 0.0  # privacy=dpsgd: DP-SGD on the node (0: plain SGD)
    dp_clipping_norm: float = 0.0     # privacy=dpsgd: each image's gradient clipped to this L2 norm
    update_clip: float = 0.0          # privacy=client/local: the node clips its update to this L2 norm (0: no)
    update_noise: float = 0.0         # privacy=local: ... and adds Gaussian noise of std this x update_clip
    evaluate_received: bool = False   # train replies carry the received model's evaluation (EVALUATION)
    withhold_losses: bool = False     # privacy.node_metrics=withheld: train-loss 0 and an empty loss trace

    def __post_init__(self) -> None:
        check_integer("num_nodes", self.num_partitions, 1)
        check_integer("seed", self.seed, 0)
        check_number("data.holdout_fraction", self.holdout_fraction, 0.0, 1.0, high_open=True)
        # bounded: a node trains what its task says, and a task must not keep it busy for ever
        check_integer("client.local_epochs", self.local_epochs, 1, high=MAX_LOCAL_EPOCHS)
        check_integer("client.local_steps", self.local_steps, 1, allow_none=True, high=MAX_LOCAL_STEPS)
        check_integer("client.batch_size", self.batch_size, 1, high=MNIST_TRAIN_SIZE)
        check_integer("client.eval_batch_size", self.eval_batch_size, 1, high=MNIST_TRAIN_SIZE)
        check_number("client.lr", self.lr, 0.0, low_open=True)
        check_number("client.momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_number("client.weight_decay", self.weight_decay, 0.0)
        check_number("proximal_mu", self.proximal_mu, 0.0)
        check_number("privacy.noise_multiplier", self.dp_noise_multiplier, 0.0)
        check_number("privacy.clipping_norm", self.dp_clipping_norm, 0.0)
        if (self.dp_noise_multiplier > 0) != (self.dp_clipping_norm > 0):
            raise ConfigError("DP-SGD needs both privacy.noise_multiplier and privacy.clipping_norm > 0")
        check_number("privacy.clipping_norm", self.update_clip, 0.0)
        check_number("privacy.noise_multiplier", self.update_noise, 0.0)
        if self.update_noise > 0 and not self.update_clip > 0:
            raise ConfigError("local DP needs privacy.clipping_norm > 0 to calibrate its noise")
        if self.fault and self.fault not in FAULTS:
            raise ConfigError(f"client.fault '{self.fault}' is unknown; valid: {', '.join(sorted(FAULTS))} or null")
        for n in self.fault_nodes:
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < self.num_partitions:
                raise ConfigError(f"client.fault_nodes lists {n!r}; partition ids are 0..{self.num_partitions - 1}")

    # ------------------------------------------------------------ server side
    @classmethod
    def from_config(cls, cfg, data_root: str = "", **overrides) -> TrainSettings:
        """The settings of a composed flmnist config (``client``, ``model``, ``partition`` ...)."""
        from omegaconf import OmegaConf

        c = cfg.client
        values = {
            "model": OmegaConf.to_container(cfg.model),
            "partition": OmegaConf.to_container(cfg.partition),
            "num_partitions": cfg.num_nodes,
            "seed": cfg.seed,
            "holdout_fraction": cfg.data.holdout_fraction,
            "data_root": str(data_root),
            "local_epochs": c.local_epochs if c.local_steps is None else (c.local_epochs or 1),
            "local_steps": c.local_steps,
            "batch_size": c.batch_size,
            "lr": c.lr,
            "momentum": c.momentum,
            "weight_decay": c.weight_decay,
            "eval_batch_size": c.eval_batch_size,
            "fault": str(c.fault or ""),
            "fault_nodes": tuple(c.fault_nodes or ()),
        }
        values.update(overrides)
        return cls(**values)

    def to_record(self, **extra) -> ConfigRecord:
        """The ``config`` record of a message (``extra``: per-message keys such as SERVER_ROUND)."""
        record = ConfigRecord(
            {
                "model": json.dumps(self.model, sort_keys=True),
                "partition": json.dumps(self.partition, sort_keys=True),
                "num-partitions": self.num_partitions,
                "seed": self.seed,
                "holdout-fraction": float(self.holdout_fraction),
                "data-root": self.data_root,
                "local-epochs": self.local_epochs,
                "local-steps": self.local_steps or 0,
                "batch-size": self.batch_size,
                "lr": float(self.lr),
                "momentum": float(self.momentum),
                "weight-decay": float(self.weight_decay),
                "eval-batch-size": self.eval_batch_size,
                PROXIMAL_MU: float(self.proximal_mu),
                REPLY_DELTA: bool(self.reply_delta),
                FAULT: self.fault,
                "fault-nodes": [int(n) for n in self.fault_nodes],
                "dp-noise-multiplier": float(self.dp_noise_multiplier),
                "dp-clipping-norm": float(self.dp_clipping_norm),
                CLIPPING_NORM: float(self.update_clip),
                LOCAL_DP_NOISE: float(self.update_noise),
                EVALUATE_RECEIVED: bool(self.evaluate_received),
                WITHHOLD_LOSSES: bool(self.withhold_losses),
            }
        )
        for key, value in extra.items():
            record[key] = value
        return record

    # -------------------------------------------------------------- node side
    @classmethod
    def from_record(cls, record: ConfigRecord) -> TrainSettings:
        """Read a message's ``config`` record: a node checks what its server asks as a server checks
        a reply (each field of its type, not converted: "false" was True, 2.9 steps were 2)."""
        r = _Reader(record)
        try:
            return cls(
                model=r.spec("model"), partition=r.spec("partition"),
                num_partitions=r.int("num-partitions"), seed=r.int("seed"),
                holdout_fraction=r.float("holdout-fraction"), data_root=r.str("data-root", ""),
                local_epochs=r.int("local-epochs"), local_steps=r.int("local-steps", 0) or None,
                batch_size=r.int("batch-size"), lr=r.float("lr"), momentum=r.float("momentum"),
                weight_decay=r.float("weight-decay"), eval_batch_size=r.int("eval-batch-size"),
                proximal_mu=r.float(PROXIMAL_MU, 0.0), reply_delta=r.bool(REPLY_DELTA, False),
                fault=r.str(FAULT, ""), fault_nodes=tuple(r.ints("fault-nodes")),
                dp_noise_multiplier=r.float("dp-noise-multiplier", 0.0),
                dp_clipping_norm=r.float("dp-clipping-norm", 0.0),
                update_clip=r.float(CLIPPING_NORM, 0.0), update_noise=r.float(LOCAL_DP_NOISE, 0.0),
                evaluate_received=r.bool(EVALUATE_RECEIVED, False), withhold_losses=r.bool(WITHHOLD_LOSSES, False),
            )
        except KeyError as err:
            raise ConfigError(f"the server's config record has no {err}; are server and node running the same "
                              "flmnist version?") from err

    def batches_per_update(self, train_examples: int) -> int:
        return batches_per_update(train_examples, self.batch_size, self.local_epochs, self.local_steps)

    def examples_per_update(self, train_examples: int) -> int:
        return examples_per_update(train_examples, self.batch_size, self.local_epochs, self.local_steps)

    def as_dict(self) -> dict:
        return asdict(self)


def server_round(record: ConfigRecord) -> int:
    """The round (sync) or the node's update count (async) a train message belongs to (it seeds the
    node's batches: an integer from 0, else a ConfigError naming it)."""
    value = record.get(SERVER_ROUND, 0)
    check_integer(f"the server's config record: {SERVER_ROUND}", value, 0)
    return value
