"""Loopback deployment rehearsal: the deployment of ``jetson/README.md``, whole, on one machine.

    FLMNIST_DATA_DIR=/path/to/mnist python jetson/rehearsal.py [--work DIR] [--no-fault]

In a temporary folder it runs the server- and device-side scripts of ``jetson/`` for real:
a CA and SuperLink certificate (``server/make_certs.sh``), a real ``flower-superlink`` with
TLS, node authentication and a state database (``server/start_superlink.sh``) on 127.0.0.1,
three seed-002 partitions (``device/export_partition.py``), three node keys
(``device/make_node_key.sh``) registered with ``server/register_node.sh``, three real
``flower-supernode`` processes (own key, ``data-path``, ``node-name`` and port), then
``flwr run`` against that SuperLink with a reduced seed-002 config. On the way it checks two
refusals (a SuperNode whose key is not registered; a SuperNode without TLS), kills one
SuperNode mid-run (SIGKILL, as a board losing power) and restarts it, and at the end revokes
a node with ``server/revoke_node.sh``. Everything it started is stopped by process id in a
``finally`` block (each component has its own ``FLWR_HOME`` under the temporary folder).

``rehearse()`` returns a :class:`Report` of what was observed; ``CHECKS`` judges it (each
check raises ``AssertionError``). ``tests/test_deployment.py`` runs the same.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from flmnist.flwr_local import free_port, pids_with_flwr_home, stop_flwr_home, write_run_config

REPO = Path(__file__).resolve().parents[1]
JETSON = REPO / "jetson"
BIN = Path(sys.executable).parent
NAMES = ["jetson-0", "jetson-1", "jetson-2"]
VICTIM = "jetson-2"  # the node killed mid-run
PLAIN = "plaintext"  # a SuperNode without TLS (and without a key)
KILL_IN_ROUND = 2
NUM_ROUNDS = 4
ROUND_TIMEOUT = 120  # > the ~60 s the SuperLink takes to mark a crashed node offline
CONNECTION = "rehearsal"
# Flower's SuperExec (started by the SuperLink and by every SuperNode) asks for new tasks once a
# second by default; a message then waits up to 1 s before its ClientApp process starts. The
# Jetson image sets the same value.
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
TASK_POLL_INTERVAL = 0.05


@dataclass
class Report:
    """What the rehearsal saw; judged by ``CHECKS``."""

    work: Path
    data_root: Path
    sans: str = ""
    node_ids: dict = field(default_factory=dict)  # name -> node id
    status_before_run: dict = field(default_factory=dict)  # node id -> status
    unregistered: dict = field(default_factory=dict)
    insecure: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)
    fault: dict = field(default_factory=dict)
    revoke: dict = field(default_factory=dict)
    superlink_log: str = ""
    stopped: list = field(default_factory=list)
    leftover: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    async_run: dict = field(default_factory=dict)


def _load_export_partition():
    spec = importlib.util.spec_from_file_location("export_partition", JETSON / "device" / "export_partition.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Rehearsal:
    """Starts and tracks the processes of one rehearsal; ``stop()`` ends them all."""

    def __init__(self, work: Path, data_root: Path, app_dir: Path = REPO, say=print,
                 task_poll_interval: float | None = TASK_POLL_INTERVAL) -> None:
        self.work, self.data_root, self.app_dir, self.say = work, data_root, app_dir, say
        self.task_poll_interval = task_poll_interval  # None: Flower's default (1 s)
        self.t0 = time.monotonic()
        self.procs: list[subprocess.Popen] = []
        self.homes: list[Path] = []
        self.certs = work / "certs"
        self.link_home = self.home("superlink")
        self.cli_home = self.home("cli")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self.starts: dict[str, int] = {}  # how often each node was started

    # -- plumbing -------------------------------------------------------------------------
    def log(self, text: str) -> None:
        self.say(f"[rehearsal +{time.monotonic() - self.t0:6.1f} s] {text}")

    def home(self, name: str) -> Path:
        path = self.work / "flwr-home" / name
        path.mkdir(parents=True, exist_ok=True)
        self.homes.append(path)
        return path

    def env(self, home: Path) -> dict:
        env = dict(os.environ, FLWR_HOME=str(home), PYTHONUNBUFFERED="1", FLMNIST_DATA_DIR=str(self.data_root))
        env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
        env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)  # the SuperLink flag must do it
        if self.task_poll_interval is not None:
            env[TASK_POLL_ENV] = str(self.task_poll_interval)
        else:
            env.pop(TASK_POLL_ENV, None)
        return env

    def sh(self, *cmd, home: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(c) for c in cmd], env=self.env(home or self.cli_home), cwd=self.work,
                              capture_output=True, text=True, timeout=120, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc

    def start(self, cmd: list, home: Path, log: Path) -> subprocess.Popen:
        cwd = self.work / "cwd" / log.stem  # the ServerApp writes relative paths here
        cwd.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as out:
            proc = subprocess.Popen([str(c) for c in cmd], env=self.env(home), cwd=cwd,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def node_list(self) -> dict:
        """``flwr supernode list`` as {node id: status} ({} if the CLI fails this time)."""
        proc = self.sh(BIN / "flwr", "supernode", "list", CONNECTION, "--format", "json", check=False)
        try:
            nodes = json.loads(proc.stdout[proc.stdout.index("{"):])["nodes"]
        except (ValueError, KeyError):
            return {}
        return {int(n["node-id"]): n["status"] for n in nodes}

    def wait(self, what: str, condition, timeout: float, every: float = 2.0):
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")
            time.sleep(every)

    # -- server side ----------------------------------------------------------------------
    def make_certs(self) -> str:
        self.sh(JETSON / "server" / "make_certs.sh", self.certs, "127.0.0.1")
        return self.sh("openssl", "x509", "-in", self.certs / "superlink.crt", "-noout",
                       "-ext", "subjectAltName").stdout

    def start_superlink(self) -> None:
        log = self.work / "logs" / "superlink.log"
        log.parent.mkdir(exist_ok=True)
        self.start([JETSON / "server" / "start_superlink.sh", "--host", "127.0.0.1", "--port", self.port,
                    "--certs", self.certs, "--database", self.work / "superlink-state" / "state.db"],
                   self.link_home, log)
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\nroot-certificates = "{self.certs / "ca.crt"}"\n'
        )
        self.wait("the SuperLink", lambda: self.sh(BIN / "flwr", "supernode", "list", CONNECTION,
                                                   check=False).returncode == 0, 60)

    def register(self, name: str) -> int:
        out = self.sh(JETSON / "server" / "register_node.sh", "--superlink", CONNECTION,
                      "--registry", self.work / "registered_nodes.tsv", name, f"{self.key(name)}.pub").stdout
        return int(out.split(" as node ")[1].split()[0])

    def revoke(self, name: str) -> None:
        self.sh(JETSON / "server" / "revoke_node.sh", "--superlink", CONNECTION,
                "--registry", self.work / "registered_nodes.tsv", name)

    # -- device side ----------------------------------------------------------------------
    def key(self, name: str) -> Path:
        return self.work / "keys" / name / "node.key"

    def data(self, name: str) -> Path:
        return self.work / "data" / name

    def export_partitions(self, overrides: list[str], names: list[str] = NAMES) -> None:
        export = _load_export_partition()
        for i, name in enumerate(names):
            args = ["--node", str(i), "--out", str(self.data(name)), "--data-root", str(self.data_root)]
            if export.main(args + overrides) != 0:
                raise RuntimeError(f"export_partition.py failed for {name}")

    def add_nodes(self, partition_overrides: list[str], names: list[str] = NAMES) -> dict[str, int]:
        """Each node's partition exported, its key made and registered, its SuperNode started;
        returns the node ids the SuperLink gave the keys."""
        self.export_partitions(partition_overrides, names)
        ids = {}
        for name in names:
            self.make_key(name)
            ids[name] = self.register(name)
        for name in names:
            self.start_node(name)
        return ids

    def make_key(self, name: str) -> None:
        self.sh(JETSON / "device" / "make_node_key.sh", self.key(name), name)

    def supernode_command(self, name: str, port: int, tls: bool = True, key: bool = True) -> list:
        cmd = [BIN / "flower-supernode", "--superlink", self.address, "--port", port]
        cmd += ["--root-certificates", self.certs / "ca.crt"] if tls else ["--insecure", "--max-retries", "1"]
        if key:
            cmd += ["--auth-supernode-private-key", self.key(name)]
        return cmd + ["--node-config", f'data-path="{self.data(name)}" node-name="{name}"']

    def start_node(self, name: str, **kwargs) -> subprocess.Popen:
        self.starts[name] = self.starts.get(name, 0) + 1
        home = self.work / "flwr-home" / name
        if home not in self.homes:
            home.mkdir(parents=True, exist_ok=True)
            self.homes.append(home)
        log = self.work / "logs" / f"{name}.{self.starts[name]}.log"
        proc = self.start(self.supernode_command(name, free_port(), **kwargs), home, log)
        self.nodes[name] = proc
        return proc

    def node_log(self, name: str, start: int | None = None) -> str:
        path = self.work / "logs" / f"{name}.{start or self.starts[name]}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def crash(self, name: str) -> list[int]:
        """SIGKILL the SuperNode and everything it started (SuperExec, ClientApp): a power cut."""
        pids = pids_with_flwr_home(self.work / "flwr-home" / name)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes[name].wait(timeout=10)
        return pids

    # -- cleanup --------------------------------------------------------------------------
    def stop(self) -> tuple[list[int], list[int]]:
        """Stop everything started, by process id: each FLWR_HOME's processes, then our own children."""
        stopped = []
        for home in reversed(self.homes):
            stopped += stop_flwr_home(home, grace=5.0)
        for proc in self.procs:
            if proc.poll() is None:
                stopped.append(proc.pid)
                proc.kill()
            proc.wait(timeout=10)
        leftover = [pid for home in self.homes for pid in pids_with_flwr_home(home)]
        return stopped, leftover


def run_overrides(run_dir: Path, data_root: Path) -> list[str]:
    """A reduced seed-002: 4 rounds of 10 local steps; runs on with 2 of 3 nodes."""
    return [
        "experiment=seed002", f"num_rounds={NUM_ROUNDS}", "client.local_steps=10",
        f"eval.rounds=[1,{NUM_ROUNDS}]", f"eval.update_rounds=[{NUM_ROUNDS}]",
        "sampling.min_available_nodes=2", f"round_timeout={ROUND_TIMEOUT}", "wait_for_nodes=60",
        f"data.root={data_root}", f"run_dir={run_dir}",
    ]


def _start_flwr_run(r: Rehearsal, name: str, overrides: list[str]) -> tuple[subprocess.Popen, Path, float]:
    """Start ``flwr run`` against the rehearsal's SuperLink; its log goes to ``logs/flwr_<name>.log``."""
    run_config = write_run_config(r.work / f"{name}.toml", overrides)
    log = r.work / "logs" / f"flwr_{name}.log"
    proc = r.start([BIN / "flwr", "run", r.app_dir, CONNECTION, "--stream", "--run-config", run_config],
                   r.cli_home, log)
    return proc, log, time.monotonic()


def _flwr_run(r: Rehearsal, report: Report, fault: bool, timeout: float) -> None:
    """``flwr run`` against the SuperLink; with ``fault``, crash the victim in round 2 and restart it."""
    run_dir = r.work / "run"
    proc, log, start = _start_flwr_run(r, "run", run_overrides(run_dir, r.data_root))
    victim_id = report.node_ids[VICTIM]
    stage = "kill" if fault else "done"
    deadline = start + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"flwr run did not finish within {timeout:.0f} s; see {log}")
        if stage == "kill" and r.node_log(VICTIM).count("Receiving: train message") >= KILL_IN_ROUND:
            report.fault.update(victim=VICTIM, killed_pids=r.crash(VICTIM), killed_at=time.monotonic() - start)
            r.log(f"killed {VICTIM} (SIGKILL) in round {KILL_IN_ROUND}, after it received its message")
            stage = "offline"
        elif stage == "offline" and r.node_list().get(victim_id) == "offline":
            # The SuperLink refuses to re-activate a node it still counts as online, so a
            # rebooted board rejoins only once its old session timed out (2 missed heartbeats).
            report.fault["offline_after"] = time.monotonic() - start - report.fault["killed_at"]
            r.log(f"SuperLink marks {VICTIM} offline {report.fault['offline_after']:.0f} s after the kill; restarting it")
            r.start_node(VICTIM)
            stage = "online"
        elif stage == "online" and r.node_list().get(victim_id) == "online":
            report.fault["online_again_after"] = time.monotonic() - start - report.fault["killed_at"]
            r.log(f"{VICTIM} is online again")
            stage = "done"
        time.sleep(0.5 if stage == "kill" else 2.0)
    report.fault["stage"] = stage
    if fault:
        report.fault["restarted_log"] = r.node_log(VICTIM, 2)
    report.run.update(returncode=proc.returncode, log=log.read_text(errors="replace"), run_dir=run_dir,
                      seconds=time.monotonic() - start)
    r.log(f"flwr run exited with {proc.returncode} after {report.run['seconds']:.0f} s")


ASYNC_UPDATES = 9   # client updates of the asynchronous run
ASYNC_TIMEOUT = 25  # seconds before an in-flight update is given up (< the SuperLink's crash detection)


def async_overrides(run_dir: Path, data_root: Path) -> list[str]:
    """A short FedAsync run on the same deployment; an update lost in flight costs one timeout."""
    return [
        "experiment=seed002", "strategy=fedasync", "client.local_steps=5", "eval.update_rounds=[]",
        "async_loop.max_server_updates=null", f"async_loop.max_client_updates={ASYNC_UPDATES}",
        "async_loop.eval_every=3", f"async_loop.update_timeout={ASYNC_TIMEOUT}", "wait_for_nodes=60",
        f"data.root={data_root}", f"run_dir={run_dir}",
    ]


def _flwr_run_async(r: Rehearsal, report: Report, fault: bool, timeout: float) -> None:
    """``flwr run`` of FedAsync; with ``fault``, kill the victim once it has received an update."""
    run_dir = r.work / "run_async"
    before = r.node_log(VICTIM).count("Receiving: train message")
    proc, log, start = _start_flwr_run(r, "run_async", async_overrides(run_dir, r.data_root))
    while proc.poll() is None:
        if time.monotonic() > start + timeout:
            raise TimeoutError(f"the asynchronous flwr run did not finish within {timeout:.0f} s; see {log}")
        if fault and "killed_pids" not in report.async_run and \
                r.node_log(VICTIM).count("Receiving: train message") > before:
            report.async_run["killed_pids"] = r.crash(VICTIM)
            r.log(f"asynchronous run: killed {VICTIM} (SIGKILL) while it held an update")
        time.sleep(0.5)
    report.async_run.update(returncode=proc.returncode, log=log.read_text(errors="replace"), run_dir=run_dir,
                            seconds=time.monotonic() - start)
    r.log(f"asynchronous flwr run exited with {proc.returncode} after {report.async_run['seconds']:.0f} s")


def _start_refusals(r: Rehearsal) -> dict:
    """A SuperNode with an unregistered key, and one without TLS: both must be turned away."""
    r.make_key("stranger")
    r.data("stranger").mkdir(parents=True, exist_ok=True)
    return {"stranger": r.start_node("stranger"), "plain": r.start_node(PLAIN, tls=False, key=False)}


def _collect_refusals(r: Rehearsal, report: Report, procs: dict) -> None:
    for name, node, seen in (("stranger", "stranger", report.unregistered), ("plain", PLAIN, report.insecure)):
        try:
            seen["returncode"] = procs[name].wait(timeout=90)
        except subprocess.TimeoutExpired:
            seen["returncode"] = None  # still running: not refused
        seen["log"] = r.node_log(node)
    report.unregistered["listed_nodes"] = r.node_list()
    r.log(f"refusals: unregistered key exited {report.unregistered['returncode']}, "
          f"no-TLS node exited {report.insecure['returncode']}")


def rehearse(work: Path, data_root: Path, fault: bool = True, app_dir: Path = REPO,
             timeout: float = 900, say=print) -> Report:
    """Run the whole rehearsal in ``work``; always stops what it started. Returns what it saw."""
    work, data_root = Path(work).resolve(), Path(data_root).resolve()
    report = Report(work=work, data_root=data_root)
    r = Rehearsal(work, data_root, app_dir, say)
    try:
        report.sans = r.make_certs()
        r.log("CA and SuperLink certificate made")
        r.start_superlink()
        r.log(f"SuperLink up on {r.address} (TLS, node authentication, state database)")
        report.node_ids = r.add_nodes(["experiment=seed002"])
        r.log(f"3 partitions exported, 3 keys made and registered, 3 SuperNodes started: {report.node_ids}")
        refused = _start_refusals(r)
        ids = set(report.node_ids.values())
        r.wait("3 SuperNodes online", lambda: sum(r.node_list().get(i) == "online" for i in ids) == 3, 90)
        report.status_before_run = r.node_list()
        report.timings["setup"] = time.monotonic() - r.t0
        r.log("3 SuperNodes online")
        _collect_refusals(r, report, refused)
        _flwr_run(r, report, fault, timeout)
        _flwr_run_async(r, report, fault, timeout)
        r.revoke(NAMES[0])
        try:
            report.revoke["returncode"] = r.nodes[NAMES[0]].wait(timeout=60)
        except subprocess.TimeoutExpired:
            report.revoke["returncode"] = None
        report.revoke["status"] = r.node_list().get(report.node_ids[NAMES[0]])
        r.log(f"revoked {NAMES[0]}: status {report.revoke['status']}, its SuperNode exited "
              f"{report.revoke['returncode']}")
    finally:
        report.superlink_log = (work / "logs" / "superlink.log").read_text(errors="replace") \
            if (work / "logs" / "superlink.log").exists() else ""
        report.stopped, report.leftover = r.stop()
        report.timings["total"] = time.monotonic() - r.t0
        r.log(f"stopped {len(report.stopped)} processes; {len(report.leftover)} left")
    return report


# -- checks ---------------------------------------------------------------------------------
def _rows(report: Report) -> list[dict]:
    return json.loads((report.run["run_dir"] / "metrics.json").read_text())


def check_certificate(report: Report) -> None:
    assert "IP Address:127.0.0.1" in report.sans and "DNS:localhost" in report.sans, report.sans


def check_nodes_joined(report: Report) -> None:
    for name, node_id in report.node_ids.items():
        assert report.status_before_run.get(node_id) == "online", (name, report.status_before_run)


def check_unregistered_key_refused(report: Report) -> None:
    seen = report.unregistered
    assert seen["returncode"] not in (None, 0), f"the unregistered SuperNode was not turned away:\n{seen['log'][-2000:]}"
    assert "No SuperNode found with the given public key" in report.superlink_log
    assert "Receiving:" not in seen["log"] and "SuperNode ID:" not in seen["log"]
    assert set(seen["listed_nodes"]) == set(report.node_ids.values()), seen["listed_nodes"]


def check_plaintext_client_refused(report: Report) -> None:
    seen = report.insecure
    assert seen["returncode"] not in (None, 0), f"a SuperNode without TLS was not refused:\n{seen['log'][-2000:]}"
    assert "SuperNode ID:" not in seen["log"] and "Receiving:" not in seen["log"]


def check_run_finished(report: Report) -> None:
    run_dir = report.run["run_dir"]
    assert (run_dir / "summary.json").is_file(), report.run["log"][-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished", summary
    rows = _rows(report)
    assert [row["round"] for row in rows] == list(range(NUM_ROUNDS + 1)), [row["round"] for row in rows]


def check_log_lines(report: Report) -> None:
    log = report.run["log"]
    assert "Federated model: Average loss:" in log, log[-3000:]
    assert "Federated model: Percentage numbers 0-3:" in log
    for name in NAMES:
        assert f"Model update {name}: Percentage numbers 0-3:" in log, name


def check_model_scores_above_chance(report: Report) -> None:
    import torch

    from flmnist.data import load_mnist
    from flmnist.models import LeNet
    from flmnist.training import evaluate

    model = LeNet()
    model.load_state_dict(torch.load(report.run["run_dir"] / "model.pt", weights_only=True))
    images, labels = load_mnist(str(report.data_root), False)
    accuracy = evaluate(model, images, labels).accuracy
    report.run["test_accuracy"] = accuracy
    assert accuracy > 0.3, f"final model scores {accuracy:.3f}; chance is 0.1"
    assert abs(accuracy - _rows(report)[-1]["test_accuracy"]) < 1e-9


def check_run_survives_killed_node(report: Report) -> None:
    rows = {row["round"]: row for row in _rows(report)}
    assert report.fault.get("killed_pids"), f"the victim was never killed: {report.fault}"
    assert rows[1]["num_updates"] == 3, rows[1]["num_updates"]
    assert rows[KILL_IN_ROUND]["num_updates"] == 2, rows[KILL_IN_ROUND]["num_updates"]


def check_restarted_node_gets_work(report: Report) -> None:
    assert report.fault.get("stage") == "done", report.fault
    assert "Receiving: train message" in report.fault["restarted_log"], report.fault["restarted_log"][-2000:]
    last = _rows(report)[-1]
    assert last["num_updates"] == 3, last["num_updates"]
    assert VICTIM in last.get("update_eval", {}), list(last.get("update_eval", {}))


def check_async_run_survives_killed_node(report: Report) -> None:
    seen = report.async_run
    assert seen.get("killed_pids"), f"the victim was never killed during the asynchronous run: {seen.keys()}"
    run_dir = seen["run_dir"]
    assert (run_dir / "summary.json").is_file(), seen["log"][-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    stats = json.loads((run_dir / "async_stats.json").read_text())
    assert stats["client_updates"] == ASYNC_UPDATES, stats
    lost = stats["outcomes"].get("timed out", 0) + stats["outcomes"].get("failed", 0)
    assert lost >= 1, f"the killed node's in-flight update was not dropped: {stats['outcomes']}"
    assert stats["outcomes"].get("applied", 0) >= ASYNC_UPDATES - lost - 1, stats["outcomes"]


def check_revoked_node_is_disconnected(report: Report) -> None:
    assert report.revoke["status"] == "unregistered", report.revoke
    assert report.revoke["returncode"] is not None, "the revoked SuperNode is still running"


def check_everything_stopped(report: Report) -> None:
    assert report.stopped, "nothing was stopped: the check would be empty"
    assert report.leftover == [], report.leftover


CHECKS = {f.__name__.removeprefix("check_"): f for f in (
    check_certificate, check_nodes_joined, check_unregistered_key_refused, check_plaintext_client_refused,
    check_run_finished, check_log_lines, check_model_scores_above_chance, check_run_survives_killed_node,
    check_restarted_node_gets_work, check_async_run_survives_killed_node, check_revoked_node_is_disconnected,
    check_everything_stopped,
)}


def round_times(report: Report) -> list[float]:
    """Seconds each round took (from metrics.json's wall times)."""
    times = [row["wall_time"] for row in _rows(report)]
    return [round(b - a, 1) for a, b in itertools.pairwise(times)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", help="folder to work in (default: a new temporary folder, kept)")
    parser.add_argument("--data-root", default=os.environ.get("FLMNIST_DATA_DIR"), help="MNIST root")
    parser.add_argument("--no-fault", action="store_true", help="do not kill a SuperNode mid-run")
    args = parser.parse_args(argv)
    if not args.data_root:
        parser.error("set FLMNIST_DATA_DIR or --data-root to the MNIST root (holding MNIST/raw/)")
    work = Path(args.work or tempfile.mkdtemp(prefix="flmnist-rehearsal-"))
    report = rehearse(work, Path(args.data_root), fault=not args.no_fault)
    skipped = {"run_survives_killed_node", "restarted_node_gets_work",
               "async_run_survives_killed_node"} if args.no_fault else set()
    failed = 0
    for name, check in CHECKS.items():
        if name in skipped:
            continue
        try:
            check(report)
            print(f"PASS {name}")
        except (AssertionError, KeyError, OSError, ValueError) as err:  # report every check, then fail
            failed += 1
            print(f"FAIL {name}: {err}")
    if report.run.get("run_dir") and (report.run["run_dir"] / "metrics.json").exists():
        print(f"round times (s): {round_times(report)}; whole run {report.run['seconds']:.0f} s; "
              f"rehearsal {report.timings['total']:.0f} s; work folder {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
