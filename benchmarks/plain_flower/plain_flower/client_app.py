"""plain-flower: the ClientApp. Each node trains the global model on its own digits."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from plain_flower.task import Net, load_data
from plain_flower.task import train as train_fn

app = ClientApp()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@app.train()
def train(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    cfg = context.run_config
    trainloader, _ = load_data(context.node_config["partition-id"], cfg["data-root"], cfg["batch-size"])
    train_loss = train_fn(model, trainloader, cfg["local-steps"], msg.content["config"]["lr"], device)
    metrics = MetricRecord({"train_loss": train_loss, "num-examples": len(trainloader.dataset)})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)

