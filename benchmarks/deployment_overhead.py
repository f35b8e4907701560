"""Benchmark: per-round overhead of a real deployment on loopback, flmnist's polling against
Flower's built-in `FedAvg.start()` waiting, in the same run.

It sets up the rehearsal's deployment (TLS, node authentication, SuperNodes with their own
data; see jetson/rehearsal.py), then runs a trivially small workload against the same
SuperLink: logistic regression, 1 local step, 6 rounds, each with client evaluation (or train only)
and a test-set evaluation on the server. Deployments, in one invocation:

- ``warm``, flmnist's deployment as ``jetson/`` sets it up: each SuperNode in ``--isolation process``
  with ``flmnist-warm-executor`` beside it (Flower and PyTorch imported once, a forked child per
  message running Flower's own run_clientapp; task polling every 50 ms), flmnist's polling loop
  and ``sampling.client_evaluation=auto`` (on SuperNodes: the node evaluates the model it receives
  in its train reply, one exchange per round). Rows: ``flmnist_default``, ``..._train_only``,
  ``flmnist_warm_evaluate_exchange`` (a separate evaluate message, as before), and
  ``flmnist_async_warm`` (FedAsync, 30 server updates; ``async_loop.prefetch=1``: each node's
  next task queued behind its current one). Each row says how long the executor's children took
  per message and how long nodes sat idle between messages (3.0 s and more: Flower's SuperNode
  found no message and slept its hard-coded 3 s).
- ``seed002``: the same with seed002's own data on the nodes; ``seed002_end_to_end`` runs its 40
  rounds (``flwr_run_s``: the whole ``flwr run``).
- ``fast``, before: Flower's own executor (a new ``flwr-clientapp`` process per message) with task
  polling every 50 ms (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.05``), a separate evaluate exchange;
  ``flmnist_polling`` (flmnist's loop polling replies every 50 ms) and ``flower_builtin`` (Flower's
  ``send_and_receive``, 3 s between pulls), and FedAsync without prefetching
  (``flmnist_async_flower_executor``).
- ``defaults``: Flower's defaults throughout (task polling every 1 s, ``send_and_receive``):
  ``flower_defaults``.

It also times what every message costs a SuperNode before any work with Flower's own executor:
a new ``flwr-clientapp`` process per message.

Per-round time is taken from the run's metrics (wall time between consecutive rounds, rounds 2-5
of 6: round 1 holds the cold start, and the last round the run's end, with client evaluation in the
train reply also the one evaluate exchange of the final model; that round is ``last_round_s``).
Issue 20's target: ``flmnist_default.mean_round_s`` at most 4 s and at most 0.2 x
``flower_defaults.mean_round_s``; seed002's 40 rounds end to end in at most 3 minutes.

    FLMNIST_DATA_DIR=/path/to/mnist python benchmarks/deployment_overhead.py [--nodes 1|2|3]

Results: benchmarks/results/deployment_overhead_<N>nodes.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
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
# The executor's log lines: when a child was started and when it exited (reply sent), per node.
STAMPED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO warm-executor\[\d+\]: task \d+"
                     r"(?: \(run \d+\))?: (started child|child \d+ exited)", re.MULTILINE)


def idle_gaps(log: str) -> list[float]:
    """Seconds each node sat between sending a reply (its child exited) and starting the next task.
    Flower's SuperNode sleeps 3 s when it pulls and finds nothing: gaps of 3.0-3.6 s are that sleep
    (the other nodes and the server, on loopback, take a fraction of a second between messages)."""
    from datetime import datetime

    events = [(datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f").timestamp(), what) for t, what in STAMPED.findall(log)]
    return [b - a for (a, what_a), (b, what_b) in itertools.pairwise(events)
            if what_a.startswith("child") and what_b == "started child"]

from flmnist.launch.flwr_local import write_run_config
from flmnist.ml.mnist_files import resolve_root

ROUNDS = 6


def one_run(r: Rehearsal, name: str, poll_interval: str, fraction_evaluate: float, nodes: int,
            client_evaluation: str, workload: list[str]) -> dict:
    """One ``flwr run`` against the deployment; ``workload``: the run's own overrides,
    ``client_evaluation``: ``sampling.client_evaluation``."""
    run_dir = r.work / name
    overrides = [*workload, f"num_nodes={nodes}", f"sampling.client_evaluation={client_evaluation}",
                 f"poll_interval={poll_interval}",
                 f"data.root={r.data_root}", f"run_dir={run_dir}", "wait_for_nodes=60"]
    cfg = write_run_config(r.work / f"{name}.toml", overrides)
    log = r.work / "logs" / f"{name}.log"
    seen = {node: len(r.executor_log(node)) for node in r.executors}
    load = os.getloadavg()[0]
    start = time.monotonic()
    proc = r.start([BIN / "flwr", "run", r.app_dir, CONNECTION, "--stream", "--run-config", cfg], r.cli_home, log)
    code = proc.wait(timeout=900)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    if code != 0 or summary.get("status") != "finished":  # a run that died early would read as a fast one
        raise SystemExit(f"{name}: the run did not finish (exit {code}, status {summary.get('status')}): see {log}")
    rows = json.loads((run_dir / "metrics.json").read_text())
    times = [row["wall_time"] for row in rows]
    # Rounds 2..N-1: round 1 holds the cold start, round N the run's end (and, with client evaluation
    # in the train reply, the one evaluate exchange that evaluates the final model): last_round_s.
    per_round = [b - a for a, b in itertools.pairwise(times[1:])][:-1]
    row = {"executor": r.executor, "poll_interval": poll_interval, "client_evaluation": fraction_evaluate > 0,
           "client_evaluation_by": client_evaluation if fraction_evaluate > 0 else None,
           "per_round_s": [round(x, 2) for x in per_round], "status": summary.get("status"),
           "last_round_s": round(times[-1] - times[-2], 2) if len(times) > 2 else None,
           "mean_round_s": round(statistics.mean(per_round), 2), "flwr_run_s": round(time.monotonic() - start, 1),
           "final_accuracy": rows[-1].get("test_accuracy"),
           "client_accuracy": [row.get("client_accuracy") for row in rows],
           "load_1min": [round(load, 1), round(os.getloadavg()[0], 1)]}  # before, after: compare rows with care
    if r.executors:  # the warm executor's children: seconds from fork to exit, per message
        child_s = [float(s) for node, at in seen.items() for s in CHILD_DONE.findall(r.executor_log(node)[at:])]
        gaps = [g for node, at in seen.items() for g in idle_gaps(r.executor_log(node)[at:])]
        row.update(messages=len(child_s), child_median_s=round(statistics.median(child_s), 2) if child_s else None,
                   child_max_s=round(max(child_s), 2) if child_s else None,
                   idle_gap_median_s=round(statistics.median(gaps), 2) if gaps else None,
                   idle_gaps_reaching_the_3s_sleep=f"{sum(g >= 3.0 for g in gaps)} of {len(gaps)}")
    counted = [r for r in rows if r.get("client_updates") is not None]
    if "strategy=fedasync" in workload and len(counted) >= 2 and counted[-1]["wall_time"] > counted[0]["wall_time"]:
        done = counted[-1]["client_updates"] - counted[0]["client_updates"]
        row["updates_per_min_per_node"] = round(done / (counted[-1]["wall_time"] - counted[0]["wall_time"]) * 60 / nodes, 1)
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
               executor: str = "flower", partition: list[str] | None = None) -> dict:
    """One rehearsal deployment of ``nodes`` SuperNodes (their data: ``partition``, default IID);
    ``runs``: name -> keyword arguments of :func:`one_run`."""
    r = Rehearsal(tmp, data_root, task_poll_interval=task_poll_interval, executor=executor)
    try:
        r.make_certs()
        r.start_superlink()
        r.add_nodes(partition or ["partition=iid", f"num_nodes={nodes}"], NAMES[:nodes])
        r.wait(f"{nodes} SuperNodes online", lambda: list(r.node_list().values()).count("online") >= nodes, 120)
        out = {}
        for name, kwargs in runs.items():
            out[name] = {**one_run(r, name, nodes=nodes, **kwargs), "superexec_task_poll_s": task_poll_interval or 1.0}
            print(name, json.dumps(out[name]), flush=True)
        return out
    finally:
        stopped, leftover = r.stop()
        print(f"stopped {len(stopped)} processes, {len(leftover)} left", flush=True)


def run(poll: str, fraction: float, client_evaluation: str = "exchange", workload: list[str] | None = None) -> dict:
    """One row's settings; ``workload``: the run's own overrides (default: the trivially small one)."""
    workload = workload or ["model=logreg", "client.local_steps=1", f"num_rounds={ROUNDS}",
                            f"sampling.fraction_evaluate={fraction}", "partition=iid", "data.holdout_fraction=0.05"]
    return {"poll_interval": poll, "fraction_evaluate": fraction, "client_evaluation": client_evaluation,
            "workload": workload}


# FedAsync on the same small workload: client updates per minute per node.
ASYNC = ["model=logreg", "client.local_steps=1", "strategy=fedasync", "async_loop.max_server_updates=30",
         "async_loop.eval_every=5", "partition=iid", "data.holdout_fraction=0.05", "sampling.fraction_evaluate=0"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3, choices=[1, 2, 3], help="SuperNodes (default 3)")
    parser.add_argument("--skip-seed002", action="store_true", help="leave out seed002's 40 rounds end to end")
    args = parser.parse_args()
    # SIGTERM (timeout, kill PID) ends the script through its finally blocks, which stop the
    # SuperLink, SuperNodes and executors by process id (they were left running)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    nodes = args.nodes
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    data_root = resolve_root(os.environ.get("FLMNIST_DATA_DIR"))
    result = {"supernodes": nodes, "clientapp_process_start_s": clientapp_start_s()}
    print(json.dumps(result), flush=True)
    asynchronous = ASYNC
    with tempfile.TemporaryDirectory(prefix="flmnist-deploy-bench-") as tmp:
        # flmnist's deployment as jetson/ sets it up: the warm executor beside each SuperNode
        # (--isolation process), client evaluation in the train reply (sampling.client_evaluation=auto).
        result.update(deployment(Path(tmp) / "warm", data_root, TASK_POLL_INTERVAL, {
            "flmnist_default": run("0.05", 1.0, "auto"),
            "flmnist_default_train_only": run("0.05", 0.0),
            "flmnist_warm_evaluate_exchange": run("0.05", 1.0, "exchange"),
            "flmnist_async_warm": run("0.05", 0.0, workload=asynchronous),
        }, nodes, executor="warm"))
        if not args.skip_seed002 and nodes == 3:  # seed002's 40 rounds, its own data on the nodes
            result.update(deployment(Path(tmp) / "seed002", data_root, TASK_POLL_INTERVAL, {
                "seed002_end_to_end": run("0.05", 0.0, "auto", ["experiment=seed002"]),
            }, nodes, executor="warm", partition=["experiment=seed002"]))
        # Before: Flower's own executor (a new flwr-clientapp process per message), SuperExec task
        # polling every 50 ms (as the Jetson image sets it), a separate evaluate exchange.
        result.update(deployment(Path(tmp) / "fast", data_root, TASK_POLL_INTERVAL, {
            "flmnist_polling": run("0.05", 1.0),
            "flower_builtin": run("null", 1.0),
            "flmnist_polling_train_only": run("0.05", 0.0),
            "flower_builtin_train_only": run("null", 0.0),
            "flmnist_async_flower_executor": run("0.05", 0.0, workload=[*asynchronous, "async_loop.prefetch=0"]),
        }, nodes))
        # Flower's defaults throughout: SuperExec polls every 1 s, send_and_receive every 3 s.
        result.update(deployment(Path(tmp) / "defaults", data_root, None, {
            "flower_defaults": run("null", 1.0),
            "flower_defaults_train_only": run("null", 0.0),
        }, nodes))
    warm, defaults = result["flmnist_default"]["mean_round_s"], result["flower_defaults"]["mean_round_s"]
    result["flmnist_default_vs_flower_defaults"] = round(warm / defaults, 3)
    result["issue_target"] = ("flmnist_default.mean_round_s <= 4 s and <= 0.2 x flower_defaults.mean_round_s; "
                              "seed002 end to end <= 180 s")
    result["issue_target_met"] = warm <= 4.0 and warm <= 0.2 * defaults
    if "seed002_end_to_end" in result:
        result["seed002_target_met"] = result["seed002_end_to_end"]["flwr_run_s"] <= 180
    (out / f"deployment_overhead_{nodes}nodes.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
