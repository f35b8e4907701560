"""flmnist's ClientApp: translates Flower messages into local training and evaluation.

The server sends everything a node needs in each message's ``config`` record
(:class:`~flmnist.protocol.messages.TrainSettings`); the node's identity comes from its node
config: ``partition-id``/``num-partitions`` in simulation, ``data-path`` (and an optional
``node-name``) on a real device. Replies follow :mod:`flmnist.protocol.messages` exactly.

The handlers below only ever produce honest replies. Deliberate misbehaviour for robustness
tests (``client.fault``) is one ClientApp mod, :func:`flmnist.client.faults.fault_mod`, which
wraps every handler and corrupts its reply on the nodes the server's settings name. Under
``privacy=client`` or ``privacy=local`` the train handler's reply passes through
:func:`flmnist.client.update_dp.update_dp_mod` (the node clips, or clips and noises, its update)
before the fault mod sees it.
"""

from __future__ import annotations

import contextlib
import platform
import threading
import time
from collections.abc import Iterator

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flmnist.client.faults import fault_mod
from flmnist.client.node_data import node_data, node_seed
from flmnist.client.update_dp import update_dp_mod
from flmnist.flower_patches import inprocess_backend, vce_feeder
from flmnist.ml.models import model_from_spec
from flmnist.ml.training import device, evaluate, train
from flmnist.protocol import messages as p

app = ClientApp(mods=[fault_mod])  # made before the handlers: Flower wraps each as it registers
# Flower's simulation engine loads this module before it builds its backend and starts its feeder.
vce_feeder.install()
inprocess_backend.install()


_IDLE: dict[str, list[torch.nn.Module]] = {}  # modules of each architecture (spec) no message is using now
_IDLE_LOCK = threading.Lock()


@contextlib.contextmanager
def _model(settings: p.TrainSettings, arrays: ArrayRecord, reuse: bool = True) -> Iterator[torch.nn.Module]:
    """The received model, in a module of the run's architecture: one an earlier message of this
    process left (every parameter and buffer overwritten by ``load_state_dict``), else a new one.
    Building LeNet costs 1.5 ms, 120 times a seed002 run, on the thread that trains. The module
    goes back only after a handler that did not raise; never with ``reuse`` false (DP-SGD, whose
    Opacus hooks attach to it)."""
    key = repr(sorted(settings.model.items()))
    with _IDLE_LOCK:
        idle = _IDLE.get(key) if reuse else None
        model = idle.pop() if idle else None
    if model is None:
        model = model_from_spec(settings.model)
    model.load_state_dict(arrays.to_torch_state_dict())
    yield model
    if reuse:
        with _IDLE_LOCK:
            _IDLE[key] = [*_IDLE.get(key, ()), model]


def _node_info(name: str, dev: torch.device) -> ConfigRecord:
    """Who answered and on what hardware (MetricRecords hold numbers only)."""
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return ConfigRecord({p.NODE_NAME: name[: p.MAX_NAME_LENGTH], p.DEVICE: device_name[: p.MAX_NAME_LENGTH],
                         p.MACHINE: platform.machine() or "unknown"})


@app.train(mods=[update_dp_mod])  # privacy=client/local: the node clips (and noises) its update
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received model on this node's data; reply with the new weights and metrics."""
    config = msg.content[p.CONFIG]
    settings = p.TrainSettings.from_record(config)
    data = node_data(settings, context.node_config)
    received = msg.content[p.ARRAYS]
    with _model(settings, received, reuse=not settings.dp_noise_multiplier) as model:
        return _train(msg, settings, data, received, model)


def _train(msg: Message, settings: p.TrainSettings, data, received: ArrayRecord, model: torch.nn.Module) -> Message:
    config = msg.content[p.CONFIG]
    server_round = p.server_round(config)
    generator = torch.Generator().manual_seed(node_seed(settings.seed, data.partition, server_round))
    torch.manual_seed(node_seed(settings.seed, data.partition, server_round, 1))
    dev = device()
    # One exchange per round: the received (global) model evaluated before it is trained.
    evaluation = _evaluation(model, data, settings, dev) if settings.evaluate_received and not settings.withhold_losses else None
    start = time.perf_counter()
    mean_loss, trace = train(
        model,
        data.train_images,
        data.train_labels,
        batch_size=settings.batch_size,
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        epochs=settings.local_epochs,
        steps=settings.local_steps,
        proximal_mu=float(config.get(p.PROXIMAL_MU, settings.proximal_mu)),  # FedProx sets it per round
        generator=generator,
        dev=dev,
        dp_noise_multiplier=settings.dp_noise_multiplier,
        dp_clipping_norm=settings.dp_clipping_norm,
    )
    if settings.withhold_losses:  # privacy.node_metrics=withheld: the losses are the node's data, un-noised
        mean_loss, trace = 0.0, []
    n = len(data.train_labels)
    metrics = MetricRecord(
        {
            p.NUM_EXAMPLES: n,
            p.TRAIN_LOSS: mean_loss,
            p.LOSS_TRACE: trace,
            p.PARTITION_ID: data.partition,
            p.EXAMPLES_PROCESSED: settings.examples_per_update(n),
            p.TRAIN_TIME: time.perf_counter() - start,
        }
    )
    model.cpu()
    state = model.state_dict()
    if settings.reply_delta:  # FedBuff: reply with x_k - x_received
        sent = received.to_torch_state_dict()
        state = {k: v - sent[k] for k, v in state.items()}
    content = RecordDict({p.ARRAYS: ArrayRecord(state), p.METRICS: metrics, p.NODE_INFO: _node_info(data.name, dev)})
    if evaluation is not None:
        content[p.EVALUATION] = evaluation
    return Message(content=content, reply_to=msg)


def _evaluation(model: torch.nn.Module, data, settings: p.TrainSettings, dev: torch.device) -> MetricRecord:
    """Summable counts of ``model`` on this node's held-out data (:data:`~flmnist.protocol.messages.EVALUATE_METRICS`)."""
    result = evaluate(model, data.holdout_images, data.holdout_labels, settings.eval_batch_size, dev)
    metrics = {
        p.NUM_EXAMPLES: result.total,
        p.LOSS_SUM: result.loss_sum,
        p.CORRECT: result.correct,
        p.PARTITION_ID: data.partition,
    }
    for d, (c, t) in enumerate(zip(result.correct_per_digit, result.total_per_digit)):
        metrics[p.correct_key(d)] = int(c)
        metrics[p.total_key(d)] = int(t)
    return MetricRecord(metrics)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this node's held-out data; reply with summable counts."""
    config = msg.content[p.CONFIG]
    settings = p.TrainSettings.from_record(config)
    if settings.withhold_losses:
        raise ValueError("privacy.node_metrics=withheld: this node sends no evaluation counts")
    data = node_data(settings, context.node_config)
    dev = device()
    with _model(settings, msg.content[p.ARRAYS]) as model:
        content = RecordDict({p.METRICS: _evaluation(model, data, settings, dev), p.NODE_INFO: _node_info(data.name, dev)})
    return Message(content=content, reply_to=msg)


@app.query()
def query_handler(msg: Message, context: Context) -> Message:
    """Say who this node is: its partition index, name and numbers of examples."""
    settings = p.TrainSettings.from_record(msg.content[p.CONFIG])
    data = node_data(settings, context.node_config)
    info = _node_info(data.name, device())
    info[p.PARTITION_ID] = data.partition
    info[p.TRAIN_EXAMPLES] = len(data.train_labels)
    info[p.HOLDOUT_EXAMPLES] = len(data.holdout_labels)
    content = RecordDict({p.NODE_INFO: info})
    return Message(content=content, reply_to=msg)
