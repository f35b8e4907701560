"""flmnist's ClientApp: translates Flower messages into local training and evaluation.

The server sends everything a node needs in each message's ``config`` record
(model, partition, local training settings); the node's identity comes from its
node config: ``partition-id``/``num-partitions`` in simulation, ``data-path``
(and an optional ``node-name``) on a real device.
"""

from __future__ import annotations

import json
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flmnist.models import model_from_spec
from flmnist.node_data import node_data, node_seed
from flmnist.training import device, evaluate, train

app = ClientApp()


def _model(config, arrays: ArrayRecord) -> torch.nn.Module:
    model = model_from_spec(json.loads(str(config["model"])))
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def _node_info(name: str, dev: torch.device) -> ConfigRecord:
    """Who answered and on what hardware (MetricRecords hold numbers only)."""
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return ConfigRecord({"node-name": name, "device": device_name})


def inject_fault(config, node: int, model: torch.nn.Module) -> None:
    """Fault injection for robustness tests (``client.fault`` on ``client.fault_nodes``):
    ``nan`` poisons the reply's weights, ``error`` makes the node fail."""
    fault = str(config.get("fault", ""))
    if not fault or node not in list(config.get("fault-nodes", [])):
        return
    if fault == "error":
        raise RuntimeError(f"injected fault on node {node} (client.fault=error)")
    if fault == "nan":
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train the received model on this node's data; reply with the new weights and metrics."""
    config = msg.content["config"]
    data = node_data(config, context.node_config)
    model = _model(config, msg.content["arrays"])
    server_round = int(config["server-round"])
    generator = torch.Generator().manual_seed(node_seed(int(config["seed"]), data.partition, server_round))
    torch.manual_seed(node_seed(int(config["seed"]), data.partition, server_round, 1))
    steps = int(config.get("local-steps", 0)) or None
    dev = device()
    start = time.perf_counter()
    mean_loss, trace = train(
        model,
        data.train_images,
        data.train_labels,
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"]),
        momentum=float(config["momentum"]),
        weight_decay=float(config["weight-decay"]),
        epochs=int(config["local-epochs"]),
        steps=steps,
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        generator=generator,
        dev=dev,
    )
    train_time = time.perf_counter() - start
    inject_fault(config, data.partition, model)
    epochs = int(config["local-epochs"])
    examples = len(data.train_labels) * epochs if steps is None else steps * int(config["batch-size"])
    metrics = MetricRecord(
        {
            "num-examples": len(data.train_labels),
            "train-loss": mean_loss,
            "loss-trace": trace,
            "partition-id": data.partition,
            "examples-processed": int(examples),
            "train-time": train_time,
        }
    )
    model.cpu()
    state = model.state_dict()
    if bool(config.get("reply-delta", False)):  # FedBuff: reply with x_k - x_received
        received = msg.content["arrays"].to_torch_state_dict()
        state = {k: v - received[k] for k, v in state.items()}
    content = RecordDict(
        {"arrays": ArrayRecord(state), "metrics": metrics, "node-info": _node_info(data.name, dev)}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this node's held-out data; reply with summable counts."""
    config = msg.content["config"]
    data = node_data(config, context.node_config)
    model = _model(config, msg.content["arrays"])
    dev = device()
    result = evaluate(model, data.holdout_images, data.holdout_labels, int(config["eval-batch-size"]), dev)
    metrics = {
        "num-examples": result.total,
        "loss-sum": result.loss_sum,
        "correct": result.correct,
        "partition-id": data.partition,
    }
    for d, (c, t) in enumerate(zip(result.correct_per_digit, result.total_per_digit)):
        metrics[f"correct-{d}"] = int(c)
        metrics[f"total-{d}"] = int(t)
    content = RecordDict({"metrics": MetricRecord(metrics), "node-info": _node_info(data.name, dev)})
    return Message(content=content, reply_to=msg)


@app.query()
def query_handler(msg: Message, context: Context) -> Message:
    """Say who this node is: its partition index, name and number of training examples."""
    config = msg.content["config"]
    data = node_data(config, context.node_config)
    info = _node_info(data.name, device())
    info["partition-id"] = data.partition
    info["train-examples"] = len(data.train_labels)
    return Message(content=RecordDict({"node-info": info}), reply_to=msg)
