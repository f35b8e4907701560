"""Benchmark: per-round overhead of a real deployment on loopback, flmnist's polling against
Flower's built-in `FedAvg.start()` waiting, in the same run.

It sets up the rehearsal's deployment (TLS, node authentication, SuperNodes with their own
data; see jetson/rehearsal.py), then runs a trivially small workload against the same
SuperLink: logistic regression, 1 local step, 6 rounds, each round a train and an evaluate
exchange plus a test-set evaluation on the server.

- `poll_interval=0.05`: flmnist's `PollingGrid` under Flower's round loop pulls replies every 50 ms;
- `poll_interval=null`: Flower's own `Grid.send_and_receive`, which sleeps 3 s between pulls.

Both loops also run without the client-side evaluate exchange (train only). This first
deployment sets `FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.05` (as the Jetson image does); a second
one keeps Flower's defaults throughout (SuperExec task polling every 1 s, send_and_receive).
A third, `flmnist_default`, is the deployment with flmnist's warm executor: each SuperNode in
`--isolation process` with `flmnist-warm-executor` beside it (Flower and PyTorch imported once,
a forked child per message running Flower's own run_clientapp; task polling every 50 ms), and
flmnist's polling loop; it also reports how long the executor's children took per message.
It also times what every message costs a SuperNode before any work: Flower 1.41 starts a new
`flwr-clientapp` process per message.

Per-round time is taken from the run's metrics (wall time between consecutive rounds,
rounds 2-6, so the cold start of round 1 is left out). Target: at most 5 s per round.

    FLMNIST_DATA_DIR=/path/to/mnist python benchmarks/deployment_overhead.py [--nodes 1|2|3]

Results: benchmarks/results/deployment_overhead_<N>nodes.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jetson"))

from rehearsal import BIN, CONNECTION, NAMES, TASK_POLL_INTERVAL, Rehearsal

CHILD_DONE = re.compile(r"task \d+: child \d+ exited with code 0 after (\d+\.\d+) s")

from flmnist.launch.flwr_local import write_run_config
from flmnist.ml.mnist_files import resolve_root

ROUNDS = 6


def one_run(r: Rehearsal, name: str, poll_interval: str, fraction_evaluate: float, nodes: int) -> dict:
    run_dir = r.work / name
    overrides = ["model=logreg", "client.local_steps=1", f"num_rounds={ROUNDS}", f"num_nodes={nodes}",
                 f"sampling.fraction_evaluate={fraction_evaluate}",
                 "partition=iid", "data.holdout_fraction=0.05", f"poll_interval={poll_interval}",
                 f"data.root={r.data_root}", f"run_dir={run_dir}", "wait_for_nodes=60"]
    cfg = write_run_config(r.work / f"{name}.toml", overrides)
    log = r.work / "logs" / f"{name}.log"
    seen = {node: len(r.executor_log(node)) for node in r.executors}
    load = os.getloadavg()[0]
    start = time.monotonic()
    proc = r.start([BIN / "flwr", "run", r.app_dir, CONNECTION, "--stream", "--run-config", cfg], r.cli_home, log)
    proc.wait(timeout=900)
    rows = json.loads((run_dir / "metrics.json").read_text())
    times = [row["wall_time"] for row in rows]
    per_round = [b - a for a, b in itertools.pairwise(times[1:])]  # rounds 2..ROUNDS
    row = {"executor": r.executor, "poll_interval": poll_interval, "client_evaluation": fraction_evaluate > 0,
           "per_round_s": [round(x, 2) for x in per_round],
           "mean_round_s": round(statistics.mean(per_round), 2), "flwr_run_s": round(time.monotonic() - start, 1),
           "final_accuracy": rows[-1].get("test_accuracy"),
           "load_1min": [round(load, 1), round(os.getloadavg()[0], 1)]}  # before, after: compare rows with care
    if r.executors:  # the warm executor's children: seconds from fork to exit, per message
        child_s = [float(s) for node, at in seen.items() for s in CHILD_DONE.findall(r.executor_log(node)[at:])]
        row.update(messages=len(child_s), child_median_s=round(statistics.median(child_s), 2) if child_s else None,
                   child_max_s=round(max(child_s), 2) if child_s else None)
    return row


def clientapp_start_s(repeats: int = 3) -> dict:
    """What every message costs a SuperNode before any training, on an otherwise idle machine:
    Flower 1.41 starts a new ``flwr-clientapp`` process per message, which imports Flower's
    SuperNode CLI, then flmnist's ClientApp (torch)."""
    def timed(code: str) -> float:
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            runs.append(time.perf_counter() - t)
        return round(statistics.median(runs), 2)

    return {"python": timed("pass"),
            "flwr_clientapp_cli": timed("from flwr.supernode.cli import flwr_clientapp"),
            "flwr_clientapp_cli_and_flmnist_client": timed(
                "from flwr.supernode.cli import flwr_clientapp; import flmnist.client_app")}


def deployment(tmp: Path, data_root: Path, task_poll_interval: float | None, runs: dict, nodes: int,
               executor: str = "flower") -> dict:
    """One rehearsal deployment of ``nodes`` SuperNodes; ``runs``: name -> (poll_interval, fraction_evaluate)."""
    r = Rehearsal(tmp, data_root, task_poll_interval=task_poll_interval, executor=executor)
    try:
        r.make_certs()
        r.start_superlink()
        r.add_nodes(["partition=iid", f"num_nodes={nodes}"], NAMES[:nodes])
        r.wait(f"{nodes} SuperNodes online", lambda: list(r.node_list().values()).count("online") >= nodes, 120)
        return {name: {**one_run(r, name, poll, fraction, nodes), "superexec_task_poll_s": task_poll_interval or 1.0}
                for name, (poll, fraction) in runs.items()}
    finally:
        stopped, leftover = r.stop()
        print(f"stopped {len(stopped)} processes, {len(leftover)} left", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3, choices=[1, 2, 3], help="SuperNodes (default 3)")
    nodes = parser.parse_args().nodes
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    data_root = resolve_root(os.environ.get("FLMNIST_DATA_DIR"))
    result = {"supernodes": nodes, "clientapp_process_start_s": clientapp_start_s()}
    print(json.dumps(result), flush=True)
    with tempfile.TemporaryDirectory(prefix="flmnist-deploy-bench-") as tmp:
        # flmnist's deployment: the warm executor beside each SuperNode (--isolation process).
        result.update(deployment(Path(tmp) / "warm", data_root, TASK_POLL_INTERVAL, {
            "flmnist_default": ("0.05", 1.0),
            "flmnist_default_train_only": ("0.05", 0.0),
        }, nodes, executor="warm"))
        # flmnist's settings: SuperExec task polling every 50 ms (as the Jetson image sets it).
        result.update(deployment(Path(tmp) / "fast", data_root, TASK_POLL_INTERVAL, {
            "flmnist_polling": ("0.05", 1.0),
            "flower_builtin": ("null", 1.0),
            "flmnist_polling_train_only": ("0.05", 0.0),
            "flower_builtin_train_only": ("null", 0.0),
        }, nodes))
        # Flower's defaults throughout: SuperExec polls every 1 s, send_and_receive every 3 s.
        result.update(deployment(Path(tmp) / "defaults", data_root, None, {
            "flower_defaults": ("null", 1.0),
            "flower_defaults_train_only": ("null", 0.0),
        }, nodes))
    result["target"] = "flmnist per-round overhead <= 5 s"
    result["met_with_client_evaluation"] = result["flmnist_polling"]["mean_round_s"] <= 5.0
    result["met_train_only"] = result["flmnist_polling_train_only"]["mean_round_s"] <= 5.0
    warm, defaults = result["flmnist_default"]["mean_round_s"], result["flower_defaults"]["mean_round_s"]
    result["flmnist_default_vs_flower_defaults"] = round(warm / defaults, 3)
    result["issue_target"] = "flmnist_default.mean_round_s <= 4 s and <= 0.2 x flower_defaults.mean_round_s"
    result["issue_target_met"] = warm <= 4.0 and warm <= 0.2 * defaults
    (out / f"deployment_overhead_{nodes}nodes.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
