"""plain-flower: the ServerApp. Flower's FedAvg, the global model tested at the listed rounds."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch.utils.data import DataLoader

from plain_flower.task import DIGIT_GROUPS, Net, mnist, test

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    eval_rounds = {int(r) for r in cfg["eval-rounds"].split(",")}
    testloader = DataLoader(mnist(cfg["data-root"], train=False), batch_size=1000)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round not in eval_rounds:
            return None
        model = Net()
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = test(model, testloader, device)
        print(f"[plain_flower] round {server_round}: accuracy {accuracy:.4f}", flush=True)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    torch.manual_seed(42)
    nodes = len(DIGIT_GROUPS)  # every round trains all three nodes
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=cfg["fraction-evaluate"],
                      min_train_nodes=nodes, min_available_nodes=nodes)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(Net().state_dict()),
        train_config=ConfigRecord({"lr": cfg["lr"]}),
        num_rounds=cfg["num-server-rounds"],
        evaluate_fn=global_evaluate,
    )
