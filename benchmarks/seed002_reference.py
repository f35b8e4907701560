"""Plain-PyTorch reference for the seed-002 scenario: the compute floor, one process, no Flower.

Same work as `flmnist experiment=seed002`: three clients holding digits 0-3, 4-6, 7-9
(the same partition and held-out split), 40 rounds, each client 10 SGD steps of batch 32
at lr 0.1 from the global model (same per-node seeds), weights averaged by examples;
at rounds 1, 11, 21, 31 and 40 each client's update and the averaged model are evaluated
on the 10,000 test images (with --no-update-eval, only the averaged model).

    python benchmarks/seed002_reference.py [--no-update-eval]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from flmnist.config import build, compose_config
from flmnist.data import load_mnist, resolve_root
from flmnist.node_data import node_seed
from flmnist.partition import holdout_split
from flmnist.training import evaluate, train


def run(update_eval: bool = True) -> dict:
    cfg = compose_config(["experiment=seed002"])
    start = time.perf_counter()
    root = str(resolve_root(cfg.data.root))
    images, labels = load_mnist(root, True)
    test_x, test_y = load_mnist(root, False)
    parts = build(cfg.partition, "partition")(labels.numpy(), cfg.num_nodes, cfg.seed)
    clients = []
    for i, p in enumerate(parts):
        tr, _ = holdout_split(p, cfg.data.holdout_fraction, node_seed(cfg.seed, i))
        idx = torch.from_numpy(tr)
        clients.append((images[idx], labels[idx]))
    torch.manual_seed(cfg.seed)
    model = build(cfg.model, "model")
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    eval_rounds = set(cfg.eval.rounds)
    history = []
    for rnd in range(1, cfg.num_rounds + 1):
        states, weights = [], []
        for i, (x, y) in enumerate(clients):
            model.load_state_dict(global_state)
            torch.manual_seed(node_seed(cfg.seed, i, rnd, 1))
            train(model, x, y, batch_size=cfg.client.batch_size, lr=cfg.client.lr,
                  momentum=cfg.client.momentum, steps=cfg.client.local_steps,
                  generator=torch.Generator().manual_seed(node_seed(cfg.seed, i, rnd)))
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            weights.append(len(y))
            if update_eval and rnd in eval_rounds:
                evaluate(model, test_x, test_y, cfg.eval.batch_size)
        total = sum(weights)
        global_state = {k: sum(s[k] * (w / total) for s, w in zip(states, weights)) for k in global_state}
        if rnd in eval_rounds:
            model.load_state_dict(global_state)
            r = evaluate(model, test_x, test_y, cfg.eval.batch_size)
            history.append({"round": rnd, "accuracy": r.accuracy})
            print(f"round {rnd}: Federated model accuracy {r.correct}/{r.total} ({100 * r.accuracy:.2f}%)", flush=True)
    return {"wall_time_s": round(time.perf_counter() - start, 1), "final_accuracy": history[-1]["accuracy"],
            "history": history, "update_eval": update_eval}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-update-eval", action="store_true")
    print(json.dumps(run(not parser.parse_args().no_update_eval), indent=1))
