"""flmnist's ServerApp: compose the config, build model, strategy and hooks, run, write results.

The run config key ``overrides`` carries Hydra overrides, e.g.::

    flwr run . --run-config 'overrides="experiment=seed002 strategy=fedprox"'
"""

from __future__ import annotations

import json
import random
import time
from datetime import datetime
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from flmnist.async_loop import AsyncLoop
from flmnist.checkpoint import find_checkpoint, load_checkpoint, load_strategy_state, set_rng_state
from flmnist.config import build, compose_config, parse_overrides
from flmnist.data import ensure_mnist, load_mnist, resolve_root
from flmnist.errors import ConfigError
from flmnist.evaluation import DigitEvaluation
from flmnist.export import export_model
from flmnist.partition import label_counts
from flmnist.polling_grid import PollingGrid
from flmnist.recorder import RunRecorder, atomic_write
from flmnist.strategies.asynchronous import AsyncStrategy

app = ServerApp()


def say(line: str) -> None:
    """One line to the run's log (streamed by ``flwr run --stream``)."""
    log(INFO, "%s", line)


def make_run_dir(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir).expanduser().resolve()
    strategy = cfg.strategy._target_.rsplit(".", 1)[-1].lower()
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return (Path(cfg.output_dir) / f"{stamp}_{cfg.name}_{strategy}").expanduser().resolve()


def client_config(cfg: DictConfig, root: Path) -> ConfigRecord:
    """What each node needs, sent inside every message (clients never read Hydra files)."""
    c = cfg.client
    return ConfigRecord(
        {
            "model": json.dumps(OmegaConf.to_container(cfg.model)),
            "partition": json.dumps(OmegaConf.to_container(cfg.partition), sort_keys=True),
            "num-partitions": int(cfg.num_nodes),
            "seed": int(cfg.seed),
            "holdout-fraction": float(cfg.data.holdout_fraction),
            "data-root": str(root),
            "local-epochs": int(c.local_epochs or 1),
            "local-steps": int(c.local_steps or 0),
            "batch-size": int(c.batch_size),
            "lr": float(c.lr),
            "momentum": float(c.momentum),
            "weight-decay": float(c.weight_decay),
            "eval-batch-size": int(c.eval_batch_size),
            "fault": str(c.fault or ""),
            "fault-nodes": [int(n) for n in c.fault_nodes],
        }
    )


def partition_report(cfg: DictConfig, root: Path, run_dir: Path) -> list[dict]:
    """Examples and per-digit counts of each node's partition; printed and saved."""
    labels = load_mnist(str(root), True)[1].numpy()
    parts = build(cfg.partition, "partition")(labels, cfg.num_nodes, cfg.seed)
    rows = [{"node": i, "examples": len(p), "digits": label_counts(labels[p])} for i, p in enumerate(parts)]
    atomic_write(run_dir / "partition_report.json", json.dumps(rows, indent=1))
    header = "node,examples," + ",".join(f"digit_{d}" for d in range(10))
    lines = [f"{r['node']},{r['examples']}," + ",".join(map(str, r["digits"])) for r in rows]
    atomic_write(run_dir / "partition_report.csv", "\n".join([header, *lines]) + "\n")
    say(f"Partition report ({len(rows)} nodes, holdout {cfg.data.holdout_fraction:.0%} per node):")
    shown = rows if len(rows) <= 20 else rows[:10] + rows[-5:]
    for r in shown:
        counts = " ".join(f"{d}:{n}" for d, n in enumerate(r["digits"]))
        say(f"  node {r['node']:>3}: {r['examples']:>6} examples | {counts}")
    if len(rows) > len(shown):
        say(f"  ... {len(rows) - len(shown)} more nodes in {run_dir / 'partition_report.csv'}")
    return rows


def wait_for_nodes(grid: Grid, needed: int, timeout: float) -> None:
    """Wait until ``needed`` SuperNodes are connected, else fail saying how to fix it."""
    deadline = time.monotonic() + timeout
    while True:
        found = len(list(grid.get_node_ids()))
        if found >= needed:
            return
        if time.monotonic() > deadline:
            raise ConfigError(
                f"num_nodes={needed} but only {found} SuperNode(s) connected after {timeout:.0f} s. "
                f"In simulation pass --federation-config \"num-supernodes={needed}\" to flwr run "
                "(the flmnist command does this); in deployment start that many SuperNodes."
            )
        time.sleep(0.5)


def resume_config(cfg: DictConfig) -> tuple[DictConfig, dict | None]:
    """With ``resume`` set: the checkpoint and the config of the run it continues."""
    if not cfg.resume:
        return cfg, None
    path = find_checkpoint(str(cfg.resume), cfg.output_dir)
    checkpoint = load_checkpoint(path)
    saved = OmegaConf.load(path.parent / "config.yaml")
    saved.run_dir = str(path.parent)
    saved.resume = str(path)
    say(f"Resuming {path.parent} after {checkpoint.get('kind')} step {checkpoint.get('round')}")
    return saved, checkpoint


def run(grid: Grid, cfg: DictConfig) -> dict:
    """One federated training as ``cfg`` describes it; returns the run summary."""
    cfg, checkpoint = resume_config(cfg)
    torch.manual_seed(cfg.seed)  # the initial global model
    random.seed(cfg.seed)  # Flower samples nodes with the random module
    run_dir = make_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is None:
        atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    say(f"flmnist run directory: {run_dir}")
    root = resolve_root(cfg.data.root)
    ensure_mnist(root, cfg.data.download)
    partition_report(cfg, root, run_dir)

    model = build(cfg.model, "model")
    test_images, test_labels = load_mnist(str(root), False)
    asynchronous = issubclass(get_class(cfg.strategy._target_), AsyncStrategy)
    loop = cfg.async_loop
    recorder = RunRecorder(run_dir, loop.max_server_updates or 0 if asynchronous else cfg.num_rounds,
                           cfg.target_accuracy, printer=say, unit="update" if asynchronous else "round")
    hooks = [
        DigitEvaluation(
            test_images, test_labels, lambda: build(cfg.model, "model"),
            loop.max_server_updates or 0 if asynchronous else cfg.num_rounds,
            every=1 if asynchronous else cfg.eval.every, rounds=list(cfg.eval.rounds),
            update_rounds=list(cfg.eval.update_rounds),
            digit_groups=OmegaConf.to_container(cfg.eval.digit_groups), batch_size=cfg.eval.batch_size,
            confusion_dir=run_dir / "confusion", printer=say,
        )
    ]
    fleet = build(cfg.fleet, "fleet", num_nodes=cfg.num_nodes, seed=cfg.seed)
    # A deployment may start with some boards down: wait for the strategy's minimum.
    wait_for_nodes(grid, int(cfg.strategy.get("min_available_nodes") or cfg.num_nodes), cfg.wait_for_nodes)
    initial = ArrayRecord(model.state_dict())
    if checkpoint is not None:
        initial = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in checkpoint["arrays"].items()})
        recorder.restore(checkpoint["recorder"])
    status = "failed"
    try:
        if asynchronous:
            strategy = build(cfg.strategy, "strategy")
            AsyncLoop(
                grid, strategy, client_config(cfg, root), recorder=recorder, hooks=hooks, fleet=fleet,
                concurrency=loop.concurrency, max_server_updates=loop.max_server_updates,
                max_client_updates=loop.max_client_updates, time_budget=loop.time_budget,
                eval_every=loop.eval_every, update_timeout=loop.update_timeout, poll_interval=cfg.poll_interval or 0.05,
                checkpoint_every=cfg.checkpoint_every,
            ).run(initial, checkpoint)
        else:
            strategy = build(cfg.strategy, "strategy", hooks=hooks, recorder=recorder, fleet=fleet,
                             virtual_timeout=loop.update_timeout, checkpoint_every=cfg.checkpoint_every)
            done = 0
            if checkpoint is not None:
                load_strategy_state(strategy, checkpoint["strategy"])
                set_rng_state(checkpoint["rng"])
                done = strategy.round_offset = int(checkpoint["round"])
            if cfg.num_rounds > done:
                strategy.start(
                    grid=PollingGrid(grid, cfg.poll_interval) if cfg.poll_interval else grid,
                    initial_arrays=initial,
                    num_rounds=cfg.num_rounds - done,
                    timeout=cfg.round_timeout,
                    train_config=client_config(cfg, root),
                    evaluate_config=client_config(cfg, root),
                )
            if recorder.final_state is None:  # resumed after the last round: nothing left to train
                recorder.final_state = {k: torch.from_numpy(v.copy()) for k, v in checkpoint["arrays"].items()}
        status = "finished"
    finally:
        summary = recorder.finish(status)
        export_model(build(cfg.model, "model"), run_dir)
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: compose the config from the run config's overrides and run."""
    cfg = compose_config(parse_overrides(str(context.run_config.get("overrides", ""))))
    run(grid, cfg)
