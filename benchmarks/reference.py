"""Plain-PyTorch reference: the same federated work as an flmnist run, in one process, no Flower.

For a composed config it builds the same partitions and held-out splits, the same initial
model and per-node seeds, and runs synchronous FedAvg: each round every node trains from the
global model (the same local steps or epochs), weights are averaged by examples; the global
model is evaluated on the test set at the same rounds, each node's update at
``eval.update_rounds``, and each node's held-out data when ``sampling.fraction_evaluate > 0``.
This is the compute floor a federated run of the same work is measured against; a config whose
work it would not do (another strategy, node sampling, privacy) is refused (:func:`same_work`).

    python benchmarks/reference.py experiment=seed002 [--no-update-eval]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from flmnist.client.node_data import node_seed
from flmnist.config.compose import compose_config
from flmnist.core.build import build
from flmnist.ml.data import load_mnist
from flmnist.ml.mnist_files import resolve_root
from flmnist.ml.partition import holdout_split
from flmnist.ml.training import evaluate, train
from flmnist.observers.evaluation import DigitEvaluation


def same_work(cfg) -> str | None:
    """Why this reference would not do the run's work (it runs FedAvg, every node every round,
    no privacy), or None."""
    if not str(cfg.strategy._target_).endswith(".FedAvg") or cfg.strategy.get("server_momentum", 0.0) \
            or cfg.strategy.get("server_learning_rate", 1.0) != 1.0:
        return f"strategy {cfg.strategy._target_} (it runs FedAvg with server_learning_rate 1, no momentum)"
    if cfg.strategy.get("weighted_by_key", "num-examples") != "num-examples":
        return f"strategy.weighted_by_key={cfg.strategy.weighted_by_key} (it weighs updates by their examples)"
    if cfg.sampling.fraction_train != 1.0 or 0 < cfg.sampling.fraction_evaluate < 1:
        return (f"sampling.fraction_train={cfg.sampling.fraction_train} / fraction_evaluate="
                f"{cfg.sampling.fraction_evaluate} (it trains and evaluates every node every round)")
    if (cfg.get("privacy") or {}).get("mechanism", "none") != "none":
        return f"privacy={cfg.privacy.mechanism} (it adds no noise)"
    return None


def run(overrides: list[str], update_eval: bool = True) -> dict:
    cfg = compose_config(overrides)
    if problem := same_work(cfg):
        raise SystemExit(f"benchmarks/reference.py: not the same work as this run: {problem}")
    start = time.perf_counter()
    root = str(resolve_root(cfg.data.root))
    images, labels = load_mnist(root, True)
    test_x, test_y = load_mnist(root, False)
    parts = build(cfg.partition, "partition")(labels.numpy(), cfg.num_nodes, cfg.seed)
    nodes = []
    for i, p in enumerate(parts):
        tr, ho = holdout_split(p, cfg.data.holdout_fraction, node_seed(cfg.seed, i))
        tr, ho = torch.from_numpy(tr), torch.from_numpy(ho)
        nodes.append((images[tr], labels[tr], images[ho], labels[ho]))
    torch.manual_seed(cfg.seed)
    model = build(cfg.model, "model")
    schedule = DigitEvaluation(test_x, test_y, lambda: model, cfg.num_rounds, every=cfg.eval.every,
                               rounds=list(cfg.eval.rounds))
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    c = cfg.client
    history = []
    if schedule.is_scheduled(0):  # flmnist evaluates the initial model too (the same work)
        evaluate(model, test_x, test_y, cfg.eval.batch_size)
    for rnd in range(1, cfg.num_rounds + 1):
        states, weights = [], []
        for i, (x, y, _, _) in enumerate(nodes):
            model.load_state_dict(global_state)
            torch.manual_seed(node_seed(cfg.seed, i, rnd, 1))
            train(model, x, y, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                  weight_decay=c.weight_decay, epochs=c.local_epochs, steps=c.local_steps,
                  generator=torch.Generator().manual_seed(node_seed(cfg.seed, i, rnd)))
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            weights.append(len(y))
            if update_eval and rnd in cfg.eval.update_rounds:
                evaluate(model, test_x, test_y, cfg.eval.batch_size)
        total = sum(weights)
        global_state = {k: sum(s[k] * (w / total) for s, w in zip(states, weights)) for k in global_state}
        model.load_state_dict(global_state)
        if cfg.sampling.fraction_evaluate > 0:
            for _, _, hx, hy in nodes:
                evaluate(model, hx, hy, c.eval_batch_size)
        if schedule.is_scheduled(rnd):
            r = evaluate(model, test_x, test_y, cfg.eval.batch_size)
            history.append({"round": rnd, "accuracy": r.accuracy})
            print(f"[reference] round {rnd}: accuracy {r.correct}/{r.total} ({100 * r.accuracy:.2f}%)", flush=True)
    return {"wall_time_s": round(time.perf_counter() - start, 1), "final_accuracy": history[-1]["accuracy"],
            "history": history, "update_eval": update_eval}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--no-update-eval", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.overrides, not args.no_update_eval), indent=1))
