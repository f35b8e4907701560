"""Benchmark (issue 10): per-client-update overhead and memory of flmnist at 1,000-50,000 nodes.

For each node count N the whole `flmnist` command is run once, in a temporary directory:

    flmnist model=logreg partition=iid num_nodes=N num_rounds=3 \
        sampling.fraction_train=0.01 sampling.fraction_evaluate=0 \
        eval.every=null eval.attribution=false

- 1% of the nodes train each round (Flower samples max(int(0.01 N), min_train_nodes=1):
  10, 100, 500), no node evaluates (fraction_evaluate=0: Flower's FedAvg sends no evaluate
  messages at all).
- The server evaluates the global model only at round 0 and the last round (``eval.every=null``):
  a logreg pass over the 10,000 test images, ~0.1 s, twice per run.
- ``eval.attribution=false``: attribution evaluates the probe set once per applied update
  (1 + updates evaluations per round), work on the server that grows with the updates and is
  not part of the per-update overhead of the federation itself.
- Everything else is the default: client 1 local epoch, batch 32, lr 0.05, momentum 0 (logreg's
  own default), holdout 10%, checkpoint every round, `simulation.client_cpus=2` (one ClientApp
  at a time on 2 cores, so client updates run one after another and round time / updates is the
  cost of one update), `simulation.backend=auto` (on 2 cores: in Flower's simulation process;
  ``--backend ray`` for Ray's workers).

Measured per N:

- wall: the whole command, from its start to its exit (SuperLink start and stop included);
- startup: command start to the ``Strategy ..., rounds 1-3`` line, when round 1 starts (stamped on arrival;
  Flower streams its log every 0.2-0.5 s, so +-0.7 s);
- round times from the run's ``metrics.json`` (``wall_time`` stamped by the ServerApp at the
  end of each round, after its evaluation and checkpoint): round 1 (the first ClientApp process
  starts: imports, MNIST, partitioning) and the steady rounds 2..3, whose mean is "s/round";
- updates/round (``num_updates``), s/update = steady s/round / updates per round;
- compute/update: the pure local training of one node's partition, measured in this process
  with ``flmnist.ml.training.train`` on the same data a node gets (IID partition, its 90% training
  part, batch 32, 1 epoch, lr 0.05, momentum 0, a fresh LogReg), median over 20 nodes x 5 repeats;
  the run's own ``train-time`` (mean measured inside the ClientApps) is reported beside it;
- overhead ms/update = 1000 x (s/update - compute/update);
- peak memory: the summed RSS (and PSS, which does not double-count shared pages) of every
  process started by the command (the CLI, `flwr run`, SuperLink, SuperExec, the
  flwr-simulation process that runs the ServerApp and the simulation engine, Ray's processes
  and ClientApp actors), found by an environment marker this script gives the command, sampled
  every 0.5 s; also the peak of each kind of process, to see which one grows with N.

    FLMNIST_DATA_DIR=/path/to/mnist python benchmarks/scale.py                 # 1000, 10000, 50000
    FLMNIST_DATA_DIR=/path/to/mnist python benchmarks/scale.py --nodes 10000   # one size
    python benchmarks/scale.py --nodes 50000 --timeout 900 --py-spy-every 45   # + stack dumps
    python benchmarks/scale.py --nodes 10000 --py-spy-record      # diagnosis: sampled profile

Run each under ``flock /tmp/flmnist-cpu.lock`` on a shared machine.

Each size is merged into ``benchmarks/results/scale.json`` (so sizes can be run one at a time);
its log, summary and metrics go to ``benchmarks/results/scale/N<N>/``. A Markdown table of all
sizes measured so far is printed. ``--timeout`` stops a run with SIGTERM (the command then stops
everything it started); ``--py-spy-every S`` dumps the stacks of the flwr-simulation process
every S seconds (``py-spy dump``) to ``scale/N<N>/py-spy-dumps.txt``, ``--py-spy-record``
samples it for the whole run (``py-spy record``, collapsed stacks, ``py-spy-record.txt``) and
reports the functions taking the most samples: both slow the run down, use them for diagnosis,
not for the timing (they need py-spy: ``pip install py-spy``). Profiled runs go to the
"diagnosis" section of scale.json and their own directories (``N<N>-py-spy-record``).

Targets (issue 10): memory flat in N (no per-node copies of MNIST); overhead < 25 ms per update.

Issue 23, ``--attribution``: what attribution costs per update at 100 updates a round. One run

    flmnist model=lenet partition=iid num_nodes=1000 num_rounds=2 sampling.fraction_train=0.1 \
        sampling.fraction_evaluate=0 eval.every=null        (attribution on: the default)

and its ``summary.json``'s attribution seconds over its evaluations (one per applied update,
one per global model), against the plain-PyTorch floor in this process: a LeNet forward pass
over the same 1,000 probe images (channels-last, batches of 250, no autograd), median of 20.
Target: under 5 ms per update. Written to ``scale.json``'s ``attribution``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_NODES = (1000, 10000, 50000)
TARGET_OVERHEAD_MS = 25.0
SEED = 42
# The run's client settings (conf/client/default.yaml with conf/model/logreg.yaml's momentum 0).
CLIENT = {"batch_size": 32, "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0, "epochs": 1, "steps": None}
HOLDOUT = 0.1


def overrides(n: int, backend: str | None = None) -> list[str]:
    return [
        "model=logreg", "partition=iid", f"num_nodes={n}", "num_rounds=3", f"seed={SEED}",
        "sampling.fraction_train=0.01", "sampling.fraction_evaluate=0",
        "eval.every=null", "eval.attribution=false", f"name=scale_{n}",
    ] + ([f"simulation.backend={backend}"] if backend else [])


# ------------------------------------------------------------------------------ memory
def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def marked_pids(marker: bytes) -> list[int]:
    """Processes whose environment holds ``marker`` (``NAME=value``)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        found.append(int(name))
            except OSError:
                pass
    return found


def role(pid: int) -> str:
    """What kind of process ``pid`` is, from its command line."""
    cmd = _read(f"/proc/{pid}/cmdline").replace("\0", " ")
    comm = _read(f"/proc/{pid}/comm").strip()
    for pattern, name in (
        ("ClientAppActor", "ray ClientAppActor"), ("ray::", "ray worker (other)"),
        ("default_worker", "ray worker (starting)"), ("gcs_server", "ray gcs_server"), ("dashboard", "ray dashboard"),
        ("log_monitor", "ray log_monitor"), ("monitor.py", "ray monitor"), ("runtime_env", "ray runtime_env"),
        ("raylet", "ray raylet"),
        ("flwr-simulation", "flwr-simulation (ServerApp + engine)"), ("flower-superexec", "flower-superexec"),
        ("flwr-serverapp", "flwr-serverapp"), ("flower-superlink", "flower-superlink"),
        ("bin/flwr run", "flwr run"), ("bin/flmnist", "flmnist CLI"),
    ):
        if pattern in cmd or pattern in comm:
            return name
    return comm or "?"


def _mem(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in bytes."""
    rss = pss = 0
    for line in _read(f"/proc/{pid}/smaps_rollup").splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Pss:"):
            pss = int(line.split()[1]) * 1024
    return rss, pss


class Sampler:
    """Peak summed RSS/PSS of the marked processes, every ``interval`` s, and per process kind."""

    def __init__(self, marker: str, interval: float = 0.5) -> None:
        self.marker, self.interval = marker.encode(), interval
        self.peak_rss = self.peak_pss = 0
        self.at_peak: dict[str, int] = {}
        self.role_peak: dict[str, int] = collections.defaultdict(int)
        self.role_count: dict[str, int] = collections.defaultdict(int)
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self.t0 = time.perf_counter()

    def sample(self) -> None:
        by_role: dict[str, int] = collections.defaultdict(int)
        count: dict[str, int] = collections.defaultdict(int)
        total_rss = total_pss = 0
        for pid in marked_pids(self.marker):
            rss, pss = _mem(pid)
            if not rss:
                continue
            r = role(pid)  # not cached: a Ray worker's command line becomes "ray::ClientAppActor" later
            by_role[r] += rss
            count[r] += 1
            total_rss += rss
            total_pss += pss
        for r, v in by_role.items():
            self.role_peak[r] = max(self.role_peak[r], v)
            self.role_count[r] = max(self.role_count[r], count[r])
        if total_rss > self.peak_rss:
            self.peak_rss, self.at_peak = total_rss, dict(by_role)
        self.peak_pss = max(self.peak_pss, total_pss)
        self.timeline.append((round(time.perf_counter() - self.t0, 1), total_rss))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        mib = 2**20
        return {
            "peak_rss_mib": round(self.peak_rss / mib),
            "peak_pss_mib": round(self.peak_pss / mib),
            "rss_mib_at_peak_by_process": {k: round(v / mib) for k, v in sorted(self.at_peak.items(), key=lambda kv: -kv[1])},
            "peak_rss_mib_by_process": {k: round(v / mib) for k, v in sorted(self.role_peak.items(), key=lambda kv: -kv[1])},
            "processes_by_kind": dict(sorted(self.role_count.items())),
        }


# ----------------------------------------------------------------------------- compute
def compute_per_update(n: int, nodes: int = 20, repeats: int = 5) -> dict:
    """Seconds of one node's local training (flmnist.ml.training.train), as in the ClientApp: the
    node's IID partition, its training part after the 10% holdout, a fresh LogReg, the run's
    client settings. IidPartition (Flower Datasets' IidPartitioner on a seeded permutation) is
    ``np.array_split`` of the permutation; it is rebuilt that way here (checked equal to
    flmnist.ml.partition.IidPartition for 1,000 and 10,000 nodes), which takes milliseconds
    instead of the partitioner's ~0.5 ms per node."""
    import torch

    from flmnist.client.node_data import node_seed
    from flmnist.ml.data import load_mnist
    from flmnist.ml.mnist_files import resolve_root
    from flmnist.ml.models import LogReg
    from flmnist.ml.partition import holdout_split
    from flmnist.ml.training import train

    torch.set_num_threads(2)  # the ClientAppActor's share: client_cpus=2
    images, labels = load_mnist(str(resolve_root()), True)
    order = np.random.default_rng(SEED).permutation(len(labels))
    parts = [np.sort(order[s]) for s in np.array_split(np.arange(len(labels)), n)]
    rng = np.random.default_rng(0)
    chosen = sorted(rng.choice(n, size=min(nodes, n), replace=False).tolist())
    times, sizes = [], []
    for pid in chosen:
        train_idx, _ = holdout_split(parts[pid], HOLDOUT, node_seed(SEED, pid))
        x, y = images[torch.from_numpy(train_idx)], labels[torch.from_numpy(train_idx)]
        sizes.append(len(y))
        for rep in range(repeats + 1):
            model = LogReg()
            gen = torch.Generator().manual_seed(node_seed(SEED, pid, rep))
            t = time.perf_counter()
            train(model, x, y, generator=gen, dev=torch.device("cpu"), **CLIENT)
            if rep:  # the first call of each node warms up
                times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times),
            "nodes_sampled": len(chosen), "train_examples_per_node": sorted(set(sizes)),
            "steps_per_update": sorted({-(-s // CLIENT["batch_size"]) for s in sizes})}


# --------------------------------------------------------------------------------- run
LANDMARKS = {  # flmnist's own lines (Flower's round lines are no longer shown since 2026-12-04)
    "superlink": r"Using SuperLink|Starting local SuperLink",
    "run_started": r"Successfully started run",
    "server_app": r"flmnist run directory",
    "partition_report": r"Partition report",
    "strategy": r"Strategy .+?, round",  # the engine is ready; round 1 starts (initial evaluation first)
}


def _find_sim(marker: bytes) -> int | None:
    for pid in marked_pids(marker):
        if "flwr-simulation" in _read(f"/proc/{pid}/cmdline"):
            return pid
    return None


class PySpy:
    """``py-spy dump`` of the flwr-simulation process every ``every`` s, or one ``py-spy record``."""

    def __init__(self, marker: str, out_dir: Path, every: float | None, record: bool) -> None:
        self.marker, self.out_dir, self.every, self.record = marker.encode(), out_dir, every, record
        self._stop = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.dumps = 0

    def _loop(self) -> None:
        t0 = time.perf_counter()
        pid = None
        while pid is None and not self._stop.wait(0.5):
            pid = _find_sim(self.marker)
        if pid is None:
            return
        pyspy = str(BIN / "py-spy")
        if self.record:
            self.proc = subprocess.Popen([pyspy, "record", "--pid", str(pid), "--rate", "50", "--format", "raw",
                                          "--output", str(self.out_dir / "py-spy-record.txt"), "--threads", "--nonblocking"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return
        with open(self.out_dir / "py-spy-dumps.txt", "w") as out:
            while not self._stop.wait(self.every):
                dump = subprocess.run([pyspy, "dump", "--pid", str(pid)], check=False, capture_output=True,
                                      text=True)
                out.write(f"===== t = {time.perf_counter() - t0:.1f} s after the simulation process appeared\n")
                out.write(dump.stdout + dump.stderr)
                out.flush()
                self.dumps += 1
                if dump.returncode and not Path(f"/proc/{pid}").exists():
                    return

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)  # py-spy record ends when its target exits
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGINT)
                self.proc.wait(timeout=30)


def top_functions(collapsed: Path, limit: int = 25) -> dict:
    """From ``py-spy record --format raw`` output: functions by inclusive share of the samples
    (counted once per stack), and which thread they ran on."""
    total = 0
    inclusive: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        count = int(count)
        total += count
        frames = stack.split(";")
        threads[frames[0]] += count
        seen = set()
        for frame in frames[1:]:
            name = re.sub(r":\d+\)$", ")", frame)  # a function, not a line
            if name not in seen:
                seen.add(name)
                inclusive[name] += count
    return {"samples": total, "threads": {k: round(v / total, 3) for k, v in threads.most_common(10)},
            "functions": [{"function": f, "share": round(c / total, 3)} for f, c in inclusive.most_common(limit)]}


def run_size(n: int, timeout: float, py_spy_every: float | None, py_spy_record: bool,
             backend: str | None = None) -> dict:
    suffix = ("-py-spy-record" if py_spy_record else "") + (f"-{backend}" if backend else "")
    out_dir = RESULTS / "scale" / f"N{n}{suffix}"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    marker = f"FLMNIST_SCALE_BENCH={uuid.uuid4().hex}"
    env = dict(os.environ)
    env[marker.split("=")[0]] = marker.split("=", 1)[1]
    args = overrides(n, backend)
    result: dict = {"nodes": n, "backend": backend, "command": "flmnist " + " ".join(args)}
    with tempfile.TemporaryDirectory(prefix="flmnist-scale-") as tmp:
        run_dir = Path(tmp) / "run"
        sampler = Sampler(marker)
        spy = PySpy(marker, out_dir, py_spy_every, py_spy_record) if (py_spy_every or py_spy_record) else None
        stamped: list[tuple[float, str]] = []
        start = time.perf_counter()
        proc = subprocess.Popen([str(BIN / "flmnist"), *args, f"hydra.run.dir={run_dir}"], cwd=tmp, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        sampler.t0 = start
        sampler.start()
        if spy:
            spy.start()
        timed_out = False

        def watchdog() -> None:
            nonlocal timed_out
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                proc.send_signal(signal.SIGTERM)  # flmnist stops its SuperLink, Ray, ... and exits 143

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            with open(out_dir / "stdout.log", "w") as log:
                assert proc.stdout is not None
                for line in proc.stdout:
                    t = time.perf_counter() - start
                    stamped.append((t, line.rstrip("\n")))
                    log.write(f"{t:8.2f} {line}")
                    log.flush()
                    sys.stdout.write(f"{t:8.2f} {line}")
                    sys.stdout.flush()
        except BaseException:  # Ctrl-C: the command runs in its own session, stop it (it stops the rest)
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise
        code = proc.wait()
        wall = time.perf_counter() - start
        sampler.stop()
        if spy:
            spy.stop()
        leftover = marked_pids(marker.encode())
        for name in ("summary.json", "metrics.json", "flwr_run.log", "config.yaml"):
            if (run_dir / name).exists():
                shutil.copy(run_dir / name, out_dir / name)
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
        rows = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else []

    def first(pattern: str) -> float | None:
        return next((round(t, 2) for t, line in stamped if re.search(pattern, line)), None)

    result.update({"exit_code": code, "timed_out": timed_out, "status": summary.get("status"),
                   "error": summary.get("error"), "wall_s": round(wall, 1)})
    result["landmarks_s"] = {k: first(p) for k, p in LANDMARKS.items()}
    result["landmarks_s"].update({f"round_{k}_end": first(rf"\[round {k}/") for k in (1, 2, 3)})
    result["landmarks_s"]["run_finished"] = first(r"Run finished")

    result["startup_s"] = result["landmarks_s"]["strategy"]
    train_time = [float(m.group(1)) for _, line in stamped if (m := re.search(r"'train-time': ([0-9.e-]+)", line))]
    by_round = {int(r["round"]): r for r in rows}
    # the replies each round received (every sampled node answers): the rows' client update counts
    sampled = [by_round[k]["client_updates"] - (by_round.get(k - 1) or {}).get("client_updates", 0)
               for k in sorted(by_round) if k > 0 and by_round[k].get("client_updates") is not None]
    rounds = sorted(k for k in by_round if k > 0)
    times = {k: by_round[k]["wall_time"] - by_round[k - 1]["wall_time"] for k in rounds if k - 1 in by_round}
    updates = [by_round[k].get("num_updates") for k in rounds]
    result.update({"sampled_per_round": sampled, "updates_per_round": updates,
                   "round_s": {str(k): round(v, 3) for k, v in times.items()},
                   "server_app_wall_s": summary.get("wall_time"),
                   "in_run_train_time_s": train_time})
    steady = [times[k] for k in times if k >= 2]
    if steady and updates and all(updates):
        per_round = statistics.fmean(steady)
        per_update = per_round / statistics.fmean(u for k, u in zip(rounds, updates) if k >= 2)
        result.update({"s_per_round": round(per_round, 3), "round_1_s": round(times.get(1, float("nan")), 3),
                       "s_per_update": round(per_update, 5)})
    result["memory"] = sampler.report()
    result["memory"]["rss_timeline_mib"] = [(t, round(v / 2**20)) for t, v in sampler.timeline[:: max(1, len(sampler.timeline) // 60)]]
    result["leftover_processes"] = leftover
    if spy and py_spy_record and (out_dir / "py-spy-record.txt").exists():
        result["py_spy"] = top_functions(out_dir / "py-spy-record.txt")
    if spy and py_spy_every:
        result["py_spy_dumps"] = spy.dumps
    if not summary and stamped:
        result["last_lines"] = [line for _, line in stamped[-15:]]
    return result


# ------------------------------------------------------------------------- attribution
ATTRIBUTION_RUN = ["model=lenet", "partition=iid", "num_nodes=1000", "num_rounds=2", f"seed={SEED}",
                   "sampling.fraction_train=0.1", "sampling.fraction_evaluate=0", "eval.every=null",
                   "name=scale_attribution"]


def probe_floor_ms(repeat: int = 20) -> float:
    """Plain PyTorch: one LeNet forward pass over the 1,000 probe images, as the probe batches them."""
    import torch

    from flmnist.ml.data import load_mnist
    from flmnist.ml.mnist_files import resolve_root
    from flmnist.ml.models import LeNet
    from flmnist.observers.probe import probe_indices

    torch.set_num_threads(2)
    images, labels = load_mnist(str(resolve_root()), False)
    x = images[torch.from_numpy(probe_indices(labels, 1000))].contiguous(memory_format=torch.channels_last)
    model = LeNet().eval().to(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for i in range(repeat + 2):
            t = time.perf_counter()
            for start in range(0, len(x), 250):
                model(x[start:start + 250]).argmax(1)
            if i >= 2:
                times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def attribution_cost(timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="flmnist-scale-") as tmp:
        run_dir = Path(tmp) / "run"
        start = time.perf_counter()
        proc = subprocess.run([str(BIN / "flmnist"), *ATTRIBUTION_RUN, f"hydra.run.dir={run_dir}"], cwd=tmp,
                              capture_output=True, text=True, timeout=timeout, check=False)
        wall = time.perf_counter() - start
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    attribution = summary.get("attribution") or {}
    rows = {"command": "flmnist " + " ".join(ATTRIBUTION_RUN), "exit_code": proc.returncode,
            "wall_s": round(wall, 1), "updates": sum((attribution.get("updates") or {}).values()),
            "evaluations": attribution.get("evaluations"), "seconds": attribution.get("seconds"),
            "floor_ms_per_evaluation": round(probe_floor_ms(), 2), "target_ms_per_update": 5.0,
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if attribution.get("evaluations"):
        rows["ms_per_evaluation"] = round(1000 * attribution["seconds"] / attribution["evaluations"], 2)
    if not summary:
        rows["last_lines"] = (proc.stdout + proc.stderr).splitlines()[-15:]
    return rows


# ------------------------------------------------------------------------------ output
def table(results: dict, key=lambda k: (int(k.split("-")[0]), k)) -> str:
    lines = [("| N | wall s | startup s | round 1 s | s/round (rounds 2-3) | updates/round | s/update | "
              "compute ms/update | overhead ms/update | peak RSS MiB | peak PSS MiB | status |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    for name in sorted(results, key=key):
        r = results[name]
        upd = r.get("updates_per_round") or []
        lines.append(
            f"| {r['nodes']:,}{' (' + r['backend'] + ')' if r.get('backend') else ''}"
            f"{' py-spy' if name.endswith('py-spy-record') else ''} | {f(r.get('wall_s'))} | {f(r.get('startup_s'))} | {f(r.get('round_1_s'), '{:.2f}')} "
            f"| {f(r.get('s_per_round'), '{:.2f}')} | {'/'.join(map(str, upd)) or '-'} "
            f"| {f(r.get('s_per_update'), '{:.4f}')} | {f(r.get('compute_ms_per_update'), '{:.2f}')} "
            f"| {f(r.get('overhead_ms_per_update'), '{:.1f}')} | {f(r['memory']['peak_rss_mib'], '{:,}')} "
            f"| {f(r['memory']['peak_pss_mib'], '{:,}')} | {r.get('status') or ('timed out' if r.get('timed_out') else 'failed')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=list(DEFAULT_NODES), help="node counts to run")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds before a run is stopped (SIGTERM)")
    parser.add_argument("--py-spy-every", type=float, default=None,
                        help="dump the flwr-simulation process's stacks every S seconds (diagnosis)")
    parser.add_argument("--py-spy-record", action="store_true",
                        help="sample the flwr-simulation process for the whole run (diagnosis; slows it down)")
    parser.add_argument("--backend", choices=("inprocess", "ray"), default=None,
                        help="simulation.backend for the runs (default: the command's auto)")
    parser.add_argument("--output", type=Path, default=RESULTS / "scale.json")
    parser.add_argument("--attribution", action="store_true",
                        help="only the attribution's cost per update at 100 updates a round (issue 23)")
    args = parser.parse_args()
    if not os.environ.get("FLMNIST_DATA_DIR"):
        sys.exit("set FLMNIST_DATA_DIR to the MNIST root")
    saved = json.loads(args.output.read_text()) if args.output.exists() else {}
    if args.attribution:
        saved["attribution"] = cost = attribution_cost(args.timeout)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(saved, indent=1))
        print(json.dumps(cost, indent=1))
        return
    results, diagnosis = saved.get("runs", {}), saved.get("diagnosis", {})
    for n in args.nodes:
        compute = compute_per_update(n)
        print(f"N={n}: pure compute of one update {1000 * compute['median_s']:.2f} ms "
              f"({compute['train_examples_per_node']} examples, {compute['steps_per_update']} steps)", flush=True)
        r = run_size(n, args.timeout, args.py_spy_every, args.py_spy_record, args.backend)
        r["compute_per_update"] = compute
        r["compute_ms_per_update"] = round(1000 * compute["median_s"], 3)
        if r.get("s_per_update") is not None:
            r["overhead_ms_per_update"] = round(1000 * (r["s_per_update"] - compute["median_s"]), 1)
        r["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        key = f"{n}-{args.backend}" if args.backend else str(n)
        if args.py_spy_record:  # profiled: kept apart from the measurements
            diagnosis[f"{key}-py-spy-record"] = r
        else:
            results[key] = r
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({
            **saved,
            "what": "issue 10: flmnist logreg, 1% of N nodes train per round, 3 rounds (see benchmarks/scale.py)",
            "targets": {"memory": "flat in N", "overhead_ms_per_update": f"< {TARGET_OVERHEAD_MS:g}"},
            "runs": results, "diagnosis": diagnosis}, indent=1))
        print(f"N={n}: exit {r['exit_code']}, wall {r['wall_s']} s, s/round {r.get('s_per_round')}, "
              f"peak RSS {r['memory']['peak_rss_mib']} MiB", flush=True)
    print(table(results))
    if diagnosis:
        print("\nDiagnosis runs (profiled: slowed down by py-spy):")
        print(table(diagnosis))


if __name__ == "__main__":
    main()
