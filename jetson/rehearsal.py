"""Loopback deployment rehearsal: the deployment of ``jetson/README.md``, whole, on one machine.

    FLMNIST_DATA_DIR=/path/to/mnist python jetson/rehearsal.py [--work DIR] [--no-fault]

In a temporary folder it runs the server- and device-side scripts of ``jetson/`` for real:
a CA and SuperLink certificate (``server/make_certs.sh``), a real ``flower-superlink`` with
TLS, node authentication and a state database (``server/start_superlink.sh``) on 127.0.0.1
only, nginx in front of it on 127.0.0.2 (the server's "LAN" address here) forwarding the Fleet
API alone (``server/start_proxy.sh``), the operator's signing key, the boards' trusted-entities
file and the signed app store (``server/make_signing_key.sh``, ``server/sign_app.sh``,
``server/app_store.py``), three seed-002 partitions (``device/export_partition.py``), three node
keys (``device/make_node_key.sh``) registered with ``server/register_node.sh``, three real
``flower-supernode`` processes (own key, ``data-path``, ``node-name``, port and
``--trusted-entities``) that reach the SuperLink through the proxy, then the operator's
``flwr run @flmnist/flmnist==VERSION`` (the signed bundle) against the SuperLink with a reduced
seed-002 config. On the way it checks refusals: a SuperNode whose key is not registered, a
SuperNode without TLS; through the proxy a board's ``flwr run``, key registration and
revocation (CLI and Fleet API), the Control and Runtime APIs by raw HTTP, and the SuperLink's own
port; an unsigned bundle and one signed by a foreign key, each refused by every SuperNode. It
kills one SuperNode mid-run (SIGKILL, as a board losing power) and restarts it, and at the end
revokes a node with ``server/revoke_node.sh`` and shows that it stays out. Everything it started
is stopped by process id in a ``finally`` block (each component has its own ``FLWR_HOME`` under
the temporary folder; nginx is stopped through its master's process ID).

``rehearse()`` returns a :class:`Report` of what was observed; ``CHECKS`` judges it (each
check raises ``AssertionError``). ``tests/test_deployment.py`` runs the same.

``rehearse_try_it()`` rehearses the guide's other path, section 4's "Try it first": the plain
``flower-superlink --insecure``, one ``flower-supernode --insecure`` per board and the guide's
``flwr run . try``, with the commands written once here (``TRY_*``; the tests check that the guide
shows the same) and only addresses, ports, paths and the number of rounds changed.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import itertools
import json
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from flmnist.launch.flwr_local import (
    descendants,
    free_port,
    pids_with_flwr_home,
    started_at,
    stop_flwr_home,
    write_run_config,
)

REPO = Path(__file__).resolve().parents[1]
JETSON = REPO / "jetson"
BIN = Path(sys.executable).parent
NAMES = ["jetson-0", "jetson-1", "jetson-2"]
VICTIM = "jetson-2"  # the node killed mid-run
# Each emulated board's share of this machine's cores, as PyTorch threads (OMP_NUM_THREADS) for its
# SuperNode, executor and ClientApps. Three boards' children training at once with PyTorch's default
# (a thread per core each) oversubscribe the cores: on 2 cores a seed002 child's training took
# 1.1-1.5 s instead of 0.2 s. A real board has its cores to itself.
BOARD_THREADS = max(1, (os.cpu_count() or 1) // len(NAMES))
EXECUTOR_VICTIM = "jetson-1"  # the node whose warm executor is killed and restarted between the runs
PLAIN = "plaintext"  # a SuperNode without TLS (and without a key)
KILL_IN_ROUND = 2
NUM_ROUNDS = 6  # rounds 3-6 follow the one that waits for the killed node: the restarted node must
# be back within them (about 10 s after the SuperLink marks it offline), and a round takes 5 s
# since the boards train on their own threads (4 rounds: one CI run ended before it was back)
ROUND_TIMEOUT = 120  # > the ~60 s the SuperLink takes to mark a crashed node offline
CONNECTION = "rehearsal"
# Flower's SuperExec (started by the SuperLink and by every SuperNode) asks for new tasks once a
# second by default; a message then waits up to 1 s before its ClientApp process starts. The
# Jetson image sets the same value.
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
TASK_POLL_INTERVAL = 0.05
# Who runs a SuperNode's ClientApps: "flower", Flower's own executor (`--isolation subprocess`, a new
# `flwr-clientapp` process per message); "warm", `--isolation process` with flmnist's warm executor
# beside each SuperNode (flmnist/flower_patches/warm_executor.py: Flower and PyTorch imported once, a
# forked child per message running Flower's run_clientapp), with a SuperExec auth secret shared by both.
EXECUTORS = ("flower", "warm")
WARM_TASK_TIMEOUT = 600  # seconds before the warm executor kills a ClientApp that has not replied
# The server's LAN-facing address, on loopback: nginx listens here; the SuperLink (127.0.0.1) does not.
LAN_HOST = "127.0.0.2"
BOARD = "board"  # the CLI connection of a board: the LAN-facing proxy
SUPERLINK_PORT_FROM_LAN = "superlink-port"  # the SuperLink's own port at the LAN address
OPERATOR_KEY_ID = "fpk_flmnist_operator"
# A foreign app: unsigned as version 1.0.0; as 2.0.0 signed by a foreign key that claims the operator's key ID.
# (Two versions, so two bundles: the SuperLink keeps one set of signatures per bundle hash, the last stored.)
PROBE_SPEC = "@intruder/probe==2.0.0"
# What SuperNodes with --trusted-entities log when they refuse a bundle (Flower 1.41).
UNSIGNED_REFUSAL = "The FAB could not be verified. App verification is not supported by the connected SuperLink."
FOREIGN_REFUSAL = "FAB verification failed: the provided trusted entities could not verify the FAB."
PROBE_RAN = "PROBE RAN ON THIS NODE"
# Paths a board must not reach through the proxy (http.client sends them unnormalised).
FORBIDDEN_PATHS = [
    "/v1/control/start-run", "/v1/control/register-node", "/v1/control/unregister-node",
    "/v1/runtime/get-nodes", "/v1/fleet/../control/start-run", "/v1/fleet/%2e%2e/control/start-run",
    "/v1/fleet/..%2Fcontrol%2Fstart-run", "/v1/fleet//../control/register-node", "/docs", "/health",
]


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
    signing: dict = field(default_factory=dict)  # the operator's signed bundle and the foreign one
    lan: dict = field(default_factory=dict)  # what a registered board got through the LAN-facing address
    bundles: dict = field(default_factory=dict)  # the unsigned and the foreign bundle's runs
    executor_restart: dict = field(default_factory=dict)  # the restarted warm executor's log
    comeback: dict = field(default_factory=dict)  # the revoked board trying to come back
    proxy_log: str = ""
    store_log: str = ""
    operator_runs: int = 0  # `flwr run`s the operator started (the SuperLink must have no other)
    stopped: list = field(default_factory=list)
    leftover: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    async_run: dict = field(default_factory=dict)


def _load_export_partition():
    spec = importlib.util.spec_from_file_location("export_partition", JETSON / "device" / "export_partition.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SuperLinkExited(RuntimeError):
    """The SuperLink process ended while the rehearsal waited for it to answer."""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Process IDs whose parent is ``pid`` (nginx's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Rehearsal:
    """Starts and tracks the processes of one rehearsal; ``stop()`` ends them all.

    With ``control_plane`` the SuperNodes reach the SuperLink only through nginx on ``LAN_HOST``
    and run only bundles signed by the operator (``--trusted-entities``); ``flwr run`` then runs
    ``self.app``, the signed app spec. Without it (the deployment-overhead benchmark), they connect
    to the SuperLink directly and ``flwr run`` ships ``app_dir`` unsigned.
    """

    cli_connection = CONNECTION  # the operator's flwr CLI connection to the SuperLink

    def __init__(self, work: Path, data_root: Path, app_dir: Path = REPO, say=print,
                 task_poll_interval: float | None = TASK_POLL_INTERVAL, control_plane: bool = False,
                 executor: str = "flower") -> None:
        if executor not in EXECUTORS:
            raise ValueError(f"executor={executor!r}: one of {EXECUTORS}")
        self.work, self.data_root, self.app_dir, self.say = work, data_root, app_dir, say
        self.executor = executor
        self.warm_task_timeout = WARM_TASK_TIMEOUT
        self.task_poll_interval = task_poll_interval  # None: Flower's default (1 s)
        self.control_plane = control_plane
        self.t0 = time.monotonic()
        self.procs: list[subprocess.Popen] = []
        self.homes: list[Path] = []
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.certs = work / "certs"
        self.link_home = self.home("superlink")
        self.cli_home = self.home("cli")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"  # the SuperLink: loopback only (the operator's side)
        self.proxy_address = f"{LAN_HOST}:{_free_port(LAN_HOST)}"  # nginx: the boards' side
        self.store_port = free_port()
        self.fleet_address = self.proxy_address if control_plane else self.address
        self.signing, self.foreign = work / "signing", work / "foreign-signing"
        self.trusted = self.signing / "trusted-entities.yaml"
        self.app = str(app_dir)  # what `flwr run` runs: a folder, or a signed app spec
        self.proxy: subprocess.Popen | None = None
        self.proxy_pids: list[int] = []
        self.nodes: dict[str, subprocess.Popen] = {}
        self.executors: dict[str, subprocess.Popen] = {}  # name -> its warm executor (executor="warm")
        self.ports: dict[str, int] = {}  # name -> its SuperNode's Runtime API port (executor="warm")
        self.executor_children: dict[int, int | None] = {}  # their children at stop: pid -> start time
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

    def start(self, cmd: list, home: Path, log: Path, cwd: Path | None = None, board: bool = False) -> subprocess.Popen:
        """``cmd`` in the background, its output in ``log``; ``board``: a board's process (its SuperNode,
        its executor and what they start), given the board's share of this machine's cores."""
        if cwd is None:
            cwd = self.work / "cwd" / log.stem  # the ServerApp writes relative paths here
            cwd.mkdir(parents=True, exist_ok=True)
        env = self.env(home)
        if board:
            env["OMP_NUM_THREADS"] = str(BOARD_THREADS)
        with open(log, "a") as out:
            proc = subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def node_list(self) -> dict:
        """``flwr supernode list`` as {node id: status} ({} if the CLI fails this time)."""
        proc = self.sh(BIN / "flwr", "supernode", "list", self.cli_connection, "--format", "json", check=False)
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
        # The certificate names the LAN-facing address (nginx presents it to the boards) besides
        # 127.0.0.1 and localhost (the SuperLink's own, checked by nginx and the operator's CLI).
        self.sh(JETSON / "server" / "make_certs.sh", self.certs, LAN_HOST)
        return self.sh("openssl", "x509", "-in", self.certs / "superlink.crt", "-noout",
                       "-ext", "subjectAltName").stdout

    def connection(self, name: str, address: str) -> str:
        return f'[superlink.{name}]\naddress = "{address}"\nroot-certificates = "{self.certs / "ca.crt"}"\n'

    def start_superlink(self) -> None:
        log = self.work / "logs" / "superlink.log"
        log.parent.mkdir(exist_ok=True)

        def launch() -> subprocess.Popen:
            proc = self.start([JETSON / "server" / "start_superlink.sh", "--host", "127.0.0.1", "--port", self.port,
                               "--certs", self.certs, "--database", self.work / "superlink-state" / "state.db",
                               "--app-store", f"127.0.0.1:{self.store_port}"], self.link_home, log)
            (self.cli_home / "config.toml").write_text(
                f'[superlink]\ndefault = "{CONNECTION}"\n\n' + self.connection(CONNECTION, self.address))
            return proc
        self.bind_superlink(launch, log)

    def bind_superlink(self, launch, log: Path, tries: int = 3) -> None:
        """``launch()`` the SuperLink and wait until it answers; one that exits because its port was
        taken (by another process between ``free_port`` and the bind: tests run side by side) is
        started again on another free port."""
        for attempt in range(1, tries + 1):
            proc = launch()
            try:
                return self.wait_superlink(proc=proc)
            except SuperLinkExited:
                if attempt == tries or "address already in use" not in log.read_text(errors="replace")[-2000:]:
                    raise
                old, self.port = self.address, free_port()
                self.address = f"127.0.0.1:{self.port}"
                self.fleet_address = self.address if self.fleet_address == old else self.fleet_address
                print(f"the SuperLink's port {old} was taken; starting it on {self.address}", flush=True)

    def wait_superlink(self, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:
        def answers() -> bool:
            if proc is not None and proc.poll() is not None:
                raise SuperLinkExited(f"the SuperLink exited with code {proc.returncode}")
            return self.sh(BIN / "flwr", "supernode", "list", self.cli_connection, check=False).returncode == 0
        self.wait("the SuperLink", answers, timeout)

    def wait_port(self, what: str, address: str, timeout: float = 30) -> None:
        host, port = address.rsplit(":", 1)

        def accepts() -> bool:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                return True
            except OSError:
                return False
        self.wait(what, accepts, timeout, every=0.1)

    def start_proxy(self) -> None:
        """nginx on the LAN-facing address: TLS, the Fleet API only (``server/start_proxy.sh``)."""
        self.proxy = self.start([JETSON / "server" / "start_proxy.sh", "--listen", self.proxy_address,
                                 "--superlink", self.address, "--certs", self.certs, "--prefix", self.work / "proxy"],
                                self.home("proxy"), self.work / "logs" / "proxy.log")
        self.wait_port("nginx", self.proxy_address)
        self.proxy_pids = [self.proxy.pid, *_children(self.proxy.pid)]

    def start_app_store(self) -> None:
        """The operator's signed app store on loopback, where the SuperLink fetches signed bundles."""
        self.start([BIN / "python", JETSON / "server" / "app_store.py", "serve", "--store", self.work / "app-store",
                    "--port", self.store_port], self.home("app-store"), self.work / "logs" / "app-store.log")
        self.wait_port("the app store", f"127.0.0.1:{self.store_port}")

    def sign_command(self, app: Path | str, key_dir: Path) -> list:
        return [JETSON / "server" / "sign_app.sh", "--key", key_dir / "app-signing.key",
                "--store", self.work / "app-store", app]

    def board_home(self, name: str) -> Path:
        """A board's own flwr CLI: its default connection is the LAN-facing proxy."""
        home = self.home(f"board-cli-{name}")
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{BOARD}"\n\n' + self.connection(BOARD, self.proxy_address) + "\n"
            + self.connection(SUPERLINK_PORT_FROM_LAN, f"{LAN_HOST}:{self.port}"))
        return home

    @property
    def registry(self) -> Path:
        """The node registry register_node.sh writes and the runs' ``screen.registry`` reads."""
        return self.work / "registered_nodes.tsv"

    def register(self, name: str, partition: int) -> int:
        out = self.sh(JETSON / "server" / "register_node.sh", "--superlink", CONNECTION, "--registry",
                      self.registry, "--partition", str(partition), name,
                      f"{self.key(name)}.pub").stdout
        return int(out.split(" as node ")[1].split()[0])

    def revoke(self, name: str) -> None:
        self.sh(JETSON / "server" / "revoke_node.sh", "--superlink", CONNECTION,
                "--registry", self.registry, name)

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
        for i, name in enumerate(names):  # (partition i, as exported)
            self.make_key(name)
            ids[name] = self.register(name, i)
        for name in names:
            self.start_node(name)
        return ids

    def make_key(self, name: str) -> None:
        self.sh(JETSON / "device" / "make_node_key.sh", self.key(name), name)

    def supernode_command(self, name: str, port: int, tls: bool = True, key: bool = True) -> list:
        cmd = [BIN / "flower-supernode", "--superlink", self.fleet_address, "--port", port]
        cmd += ["--root-certificates", self.certs / "ca.crt"] if tls else ["--insecure", "--max-retries", "1"]
        if key:
            cmd += ["--auth-supernode-private-key", self.key(name)]
        if self.control_plane:
            cmd += ["--trusted-entities", self.trusted]
        return cmd + ["--node-config", f'data-path="{self.data(name)}" node-name="{name}"']

    def superexec_secret(self, name: str) -> Path:
        """The secret a board's SuperNode and warm executor share (the Runtime API's AcquireTask)."""
        path = self.work / "keys" / name / "superexec.secret"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_bytes(os.urandom(32))
        return path

    def warm_executor_command(self, name: str, port: int) -> list:
        """``flmnist-warm-executor`` for the SuperNode whose Runtime API listens on 127.0.0.1:``port``."""
        return [BIN / "flmnist-warm-executor", "--runtime-api-address", f"127.0.0.1:{port}", "--insecure",
                "--superexec-auth-secret-file", self.superexec_secret(name),
                "--poll-interval", self.task_poll_interval or 1.0, "--task-timeout", self.warm_task_timeout]

    def start_node(self, name: str, **kwargs) -> subprocess.Popen:
        """The board's SuperNode; with the warm executor, in ``--isolation process`` with its executor
        beside it (same FLWR_HOME: the bundle is installed there), both started together."""
        self.starts[name] = self.starts.get(name, 0) + 1
        home = self.work / "flwr-home" / name
        if home not in self.homes:
            home.mkdir(parents=True, exist_ok=True)
            self.homes.append(home)
        log = self.work / "logs" / f"{name}.{self.starts[name]}.log"
        port = free_port()
        cmd = self.supernode_command(name, port, **kwargs)
        if self.executor == "warm":
            cmd += ["--isolation", "process", "--superexec-auth-secret-file", self.superexec_secret(name)]
        proc = self.start(cmd, home, log, board=True)
        self.nodes[name] = proc
        if self.executor == "warm":
            self.ports[name] = port
            self.executors[name] = self.start(self.warm_executor_command(name, port), home,
                                              self.work / "logs" / f"{name}.{self.starts[name]}.executor.log",
                                              board=True)
        return proc

    def restart_executor(self, name: str) -> tuple[int, Path]:
        """SIGKILL the board's warm executor alone (its SuperNode stays up) and start it again, as its
        systemd unit does (``Restart=always``); the killed pid and the new executor's log."""
        old = self.executors[name]
        old.kill()
        old.wait(timeout=10)
        log = self.work / "logs" / f"{name}.{self.starts[name]}.executor.restarted.log"
        self.executors[name] = self.start(self.warm_executor_command(name, self.ports[name]),
                                          self.work / "flwr-home" / name, log, board=True)
        return old.pid, log

    def executor_log(self, name: str, start: int | None = None) -> str:
        path = self.work / "logs" / f"{name}.{start or self.starts[name]}.executor.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def node_log(self, name: str, start: int | None = None) -> str:
        path = self.work / "logs" / f"{name}.{start or self.starts[name]}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def crash(self, name: str) -> list[int]:
        """SIGKILL the SuperNode and everything it started (SuperExec, ClientApp), and its warm
        executor with its children (not dumpable, as Flower's SuperExec: their environment is not
        readable in /proc, so they are found by process id): a power cut."""
        pids = pids_with_flwr_home(self.work / "flwr-home" / name)
        if name in self.executors and self.executors[name].poll() is None:
            pids += [self.executors[name].pid, *descendants({self.executors[name].pid})]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes[name].wait(timeout=10)
        if name in self.executors:
            self.executors[name].wait(timeout=10)
        return pids

    def stop_executors(self) -> list[int]:
        """SIGTERM each warm executor (it kills and reaps its children, answering their tasks; one
        pushing its reply gets up to REPLY_GRACE to finish it), SIGKILL 40 s later to whatever of it
        and its children is left."""
        procs = [proc for proc in self.executors.values() if proc.poll() is None]
        children = {pid: started_at(pid) for pid in descendants({proc.pid for proc in procs})}
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for pid, start in children.items():
            if start is not None and started_at(pid) == start:  # the same process, not a later one with its id
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.executor_children = children
        return [proc.pid for proc in procs] + list(children)

    # -- cleanup --------------------------------------------------------------------------
    def stop_proxy(self) -> list[int]:
        """SIGTERM to nginx's master (it stops its workers), SIGKILL to whatever is left after 10 s."""
        if self.proxy is None or self.proxy.poll() is not None:
            return []
        self.proxy_pids = sorted(set(self.proxy_pids) | set(_children(self.proxy.pid)))
        self.proxy.terminate()
        try:
            self.proxy.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for pid in self.proxy_pids:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proxy.wait(timeout=10)
        return list(self.proxy_pids)

    def stop(self) -> tuple[list[int], list[int]]:
        """Stop everything started, by process id: nginx, each FLWR_HOME's processes, then our own children."""
        stopped = self.stop_proxy()
        stopped += self.stop_executors()
        for home in reversed(self.homes):
            stopped += stop_flwr_home(home, grace=5.0)
        for proc in self.procs:
            if proc.poll() is None:
                stopped.append(proc.pid)
                proc.kill()
            proc.wait(timeout=10)
        leftover = [pid for home in self.homes for pid in pids_with_flwr_home(home)]
        leftover += [pid for pid in self.proxy_pids if _alive(pid)]
        leftover += [pid for pid, start in self.executor_children.items()
                     if start is not None and started_at(pid) == start and pid not in leftover]
        return stopped, leftover


def run_overrides(run_dir: Path, data_root: Path, registry: Path) -> list[str]:
    """A reduced seed-002: ``NUM_ROUNDS`` rounds of 10 local steps; runs on with 2 of 3 nodes. Each
    node id is judged by ``registry`` (register_node.sh's file), as the guide's run is."""
    return [f"screen.registry={registry}",
        "experiment=seed002", f"num_rounds={NUM_ROUNDS}", "client.local_steps=10",
        f"eval.rounds=[1,{NUM_ROUNDS}]", f"eval.update_rounds=[{NUM_ROUNDS}]",
        "sampling.min_available_nodes=2", f"round_timeout={ROUND_TIMEOUT}", "wait_for_nodes=60",
        f"data.root={data_root}", f"run_dir={run_dir}",
    ]


def _start_flwr_run(r: Rehearsal, name: str, overrides: list[str]) -> tuple[subprocess.Popen, Path, float]:
    """Start ``flwr run`` against the rehearsal's SuperLink; its log goes to ``logs/flwr_<name>.log``."""
    run_config = write_run_config(r.work / f"{name}.toml", overrides)
    log = r.work / "logs" / f"flwr_{name}.log"
    proc = r.start([BIN / "flwr", "run", r.app, CONNECTION, "--stream", "--run-config", run_config],
                   r.cli_home, log)
    return proc, log, time.monotonic()


def _flwr_run(r: Rehearsal, report: Report, fault: bool, timeout: float) -> None:
    """``flwr run`` against the SuperLink; with ``fault``, crash the victim in round 2 and restart it."""
    run_dir = r.work / "run"
    proc, log, start = _start_flwr_run(r, "run", run_overrides(run_dir, r.data_root, r.registry))
    report.operator_runs += 1
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
                      seconds=time.monotonic() - start, app=r.app)
    r.log(f"flwr run exited with {proc.returncode} after {report.run['seconds']:.0f} s")


ASYNC_UPDATES = 9   # client updates of the asynchronous run
ASYNC_TIMEOUT = 25  # seconds before an in-flight update is given up (< the SuperLink's crash detection)


def async_overrides(run_dir: Path, data_root: Path, registry: Path) -> list[str]:
    """A short FedAsync run on the same deployment; an update lost in flight costs one timeout."""
    return [f"screen.registry={registry}",
        "experiment=seed002", "strategy=fedasync", "client.local_steps=5", "eval.update_rounds=[]",
        "async_loop.max_server_updates=null", f"async_loop.max_client_updates={ASYNC_UPDATES}",
        "async_loop.eval_every=3", f"async_loop.update_timeout={ASYNC_TIMEOUT}", "wait_for_nodes=60",
        # One task in flight per node, so the victim's is lost and timed out while the run goes on
        # (with a task queued behind it the two survivors reach max_client_updates first; the
        # queueing itself: tests/test_engines.py and benchmarks/deployment_overhead.py).
        "async_loop.prefetch=0",
        f"data.root={data_root}", f"run_dir={run_dir}",
    ]


def _flwr_run_async(r: Rehearsal, report: Report, fault: bool, timeout: float) -> None:
    """``flwr run`` of FedAsync; with ``fault``, kill the victim once it has received an update."""
    run_dir = r.work / "run_async"
    # The victim, restarted during the synchronous run, must be back before this run discovers its
    # nodes (on a loaded machine it was not yet, got no update, and so was never killed).
    ids = set(report.node_ids.values())
    r.wait("3 SuperNodes online before the asynchronous run",
           lambda: sum(r.node_list().get(i) == "online" for i in ids) == len(ids), 120)
    before = r.node_log(VICTIM).count("Receiving: train message")
    proc, log, start = _start_flwr_run(r, "run_async", async_overrides(run_dir, r.data_root, r.registry))
    report.operator_runs += 1
    while proc.poll() is None:
        if time.monotonic() > start + timeout:
            raise TimeoutError(f"the asynchronous flwr run did not finish within {timeout:.0f} s; see {log}")
        if fault and "killed_pids" not in report.async_run and \
                r.node_log(VICTIM).count("Receiving: train message") > before:
            report.async_run["killed_pids"] = r.crash(VICTIM)
            r.log(f"asynchronous run: killed {VICTIM} (SIGKILL) while it held an update")
        time.sleep(0.5)
    report.async_run.update(returncode=proc.returncode, log=log.read_text(errors="replace"), run_dir=run_dir,
                            seconds=time.monotonic() - start, victim_log=r.node_log(VICTIM))
    r.log(f"asynchronous flwr run exited with {proc.returncode} after {report.async_run['seconds']:.0f} s")


# -- the control plane: signing, the LAN-facing side, bundle refusals ---------------------------
def app_pyproject(name: str, version: str, description: str, publisher: str, config: dict) -> str:
    """A minimal Flower app's pyproject.toml: ``NAME.apps:server`` and ``NAME.apps:client``."""
    lines = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in config.items())
    return f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "{version}"
description = "{description}"
license = "Apache-2.0"
dependencies = ["flwr"]

[tool.flwr.app]
publisher = "{publisher}"

[tool.flwr.app.components]
serverapp = "{name}.apps:server"
clientapp = "{name}.apps:client"

[tool.flwr.app.config]
{lines}"""

PROBE_APPS = f'''"""Sends one query to every SuperNode and prints each reply; a ClientApp that ran would say so."""
import time

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.query()
def query(msg: Message, context: Context) -> Message:
    print("{PROBE_RAN}", flush=True)
    return Message(RecordDict(), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + float(context.run_config["wait"])
    nodes = []
    while len(nodes) < 3 and time.monotonic() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    messages = [Message(RecordDict(), dst_node_id=node, message_type="query") for node in nodes]
    pending = set(grid.push_messages(messages))
    while pending and time.monotonic() < deadline:  # poll every 0.2 s (send_and_receive: 3 s)
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            if reply.has_error():
                print(f"PROBE REPLY from node {{reply.metadata.src_node_id}}: error {{reply.error.code}}: "
                      f"{{reply.error.reason}}", flush=True)
            else:
                print(f"PROBE REPLY from node {{reply.metadata.src_node_id}}: ran", flush=True)
        time.sleep(0.2)
'''


def write_probe_app(folder: Path, version: str) -> Path:
    """A small foreign Flower app (``@intruder/probe``): cheap to run, and it shows whether it ran."""
    (folder / "probe").mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(app_pyproject(
        "probe", version, "A foreign app: what a board or an intruder might try to run on every SuperNode",
        "intruder", {"wait": 40}))
    (folder / "probe" / "__init__.py").write_text("")
    (folder / "probe" / "apps.py").write_text(PROBE_APPS)
    return folder


def _start_signing(r: Rehearsal) -> dict:
    """The operator's signing key and the boards' trusted-entities file (the SuperNodes need it at
    start), and a foreign key claiming the operator's key ID; then, in the background, flmnist signed
    by the operator and the probe signed by the foreign key, both into the app store."""
    r.sh(JETSON / "server" / "make_signing_key.sh", "--id", OPERATOR_KEY_ID, r.signing)
    r.sh(JETSON / "server" / "make_signing_key.sh", "--id", OPERATOR_KEY_ID, r.foreign)
    write_probe_app(r.work / "probe", "1.0.0")
    foreign = write_probe_app(r.work / "probe-foreign", PROBE_SPEC.split("==")[1])
    return {"flmnist": r.start(r.sign_command(r.app_dir, r.signing), r.home("sign-flmnist"),
                               r.work / "logs" / "sign_flmnist.log"),
            "probe": r.start(r.sign_command(foreign, r.foreign), r.home("sign-probe"), r.work / "logs" / "sign_probe.log")}


def _finish_signing(r: Rehearsal, report: Report, procs: dict) -> None:
    for name, proc in procs.items():
        returncode = proc.wait(timeout=120)
        output = (r.work / "logs" / f"sign_{name}.log").read_text(errors="replace")
        report.signing[name] = {"returncode": returncode, "output": output}
        if returncode != 0:
            raise RuntimeError(f"sign_app.sh failed for {name} ({returncode}):\n{output}")
    r.app = report.signing["spec"] = report.signing["flmnist"]["output"].split("flwr run ")[-1].split()[0]
    report.signing["trusted_entities"] = r.trusted.read_text()
    r.log(f"bundles signed: {r.app} by the operator, {PROBE_SPEC} by a foreign key")


def _refused(seen: dict) -> bool:
    """A flwr CLI call that failed: non-zero exit, or (``--format json`` exits 0) ``"success": false``."""
    out = seen.get("output", "")
    return '"success": true' not in out and (seen.get("returncode") not in (None, 0) or '"success": false' in out)


def _start_board_attempts(r: Rehearsal, report: Report) -> dict:
    """A registered board (jetson-1) with its own flwr CLI, pointed at the LAN-facing address: run an
    app, register a new key, register its own key again, revoke another board, and reach the
    SuperLink's own port. Each in its own FLWR_HOME, all at once."""
    flwr, name = BIN / "flwr", NAMES[1]
    attempts = {
        "run": [flwr, "run", r.work / "probe", BOARD, "--format", "json"],
        "register_new_key": [flwr, "supernode", "register", f"{r.key('stranger')}.pub", BOARD, "--format", "json"],
        "register_own_key": [flwr, "supernode", "register", f"{r.key(name)}.pub", BOARD, "--format", "json"],
        "revoke_other_board": [flwr, "supernode", "unregister", str(report.node_ids[NAMES[2]]), BOARD,
                               "--format", "json"],
        "superlink_port": [flwr, "supernode", "list", SUPERLINK_PORT_FROM_LAN, "--format", "json"],
    }
    return {what: r.start(cmd, r.board_home(what), r.work / "logs" / f"board_{what}.log")
            for what, cmd in attempts.items()}


def _collect_board_attempts(r: Rehearsal, report: Report, procs: dict) -> None:
    for what, proc in procs.items():
        try:
            returncode = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            returncode = None
        report.lan[what] = {"returncode": returncode,
                            "output": (r.work / "logs" / f"board_{what}.log").read_text(errors="replace")}
    report.lan["listed_after"] = r.node_list()
    r.log("through the LAN-facing address: " + ", ".join(
        f"{what} {'refused' if _refused(report.lan[what]) else 'NOT REFUSED'}" for what in procs))


def http_post(address: str, path: str, ca: Path, method: str = "POST") -> tuple[int, str]:
    """One raw HTTPS request (path sent as is, unnormalised); returns (status, start of the body)."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), timeout=10,
                                       context=ssl.create_default_context(cafile=str(ca)))
    try:
        conn.request(method, path, body=b"" if method == "POST" else None,
                     headers={"content-type": "application/protobuf"})
        response = conn.getresponse()
        return response.status, response.read(300).decode(errors="replace").strip()
    finally:
        conn.close()


def fleet_api_attempts(address: str, ca: Path, key_file: Path, other_node_id: int) -> dict:
    """A board's key used on the Fleet API itself (what the proxy forwards), signed as a SuperNode
    signs: register that key as a node, and unregister another board. {call: {status, body}}."""
    import httpx
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import RegisterNodeFleetRequest, UnregisterNodeFleetRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    key = load_ssh_private_key(Path(key_file).read_bytes(), None)
    seen = {}
    with FleetHttpClient.from_server_address(address, False, Path(ca).read_bytes(),
                                             [NodeAuthHttpInterceptor(key, key.public_key())]) as client:
        calls = {
            "register_key": lambda: client.RegisterNode(
                RegisterNodeFleetRequest(public_key=public_key_to_bytes(key.public_key()))),
            "unregister_other": lambda: client.UnregisterNode(UnregisterNodeFleetRequest(node_id=other_node_id)),
        }
        for what, call in calls.items():
            try:
                seen[what] = {"status": 200, "body": str(call())}
            except httpx.HTTPStatusError as err:
                seen[what] = {"status": err.response.status_code, "body": err.response.text[:300]}
            except httpx.HTTPError as err:
                seen[what] = {"status": None, "body": repr(err)}
    return seen


def _lan_requests(r: Rehearsal, report: Report) -> None:
    """Raw requests to the proxy for everything but the Fleet API, and the Fleet API's own
    register/unregister with a registered board's key."""
    ca = r.certs / "ca.crt"
    report.lan["http"] = {path: http_post(r.proxy_address, path, ca) for path in FORBIDDEN_PATHS}
    report.lan["http"]["GET /v1/fleet/get-run"] = http_post(r.proxy_address, "/v1/fleet/get-run", ca, "GET")
    report.lan["fleet_api"] = fleet_api_attempts(r.proxy_address, ca, r.key(NAMES[1]), report.node_ids[NAMES[2]])


def _bundle_refusals(r: Rehearsal, report: Report, timeout: float = 120) -> None:
    """The operator, on the server, runs an unsigned bundle (``flwr run APP_DIR``) and a bundle signed
    by a foreign key (from the app store), at once; every SuperNode must refuse both."""
    start = time.monotonic()
    runs = {"unsigned": [BIN / "flwr", "run", r.work / "probe", CONNECTION, "--stream"],
            "foreign": [BIN / "flwr", "run", PROBE_SPEC, CONNECTION, "--stream"]}
    procs = {}
    for what, cmd in runs.items():
        home = r.home(f"cli-{what}")
        (home / "config.toml").write_text((r.cli_home / "config.toml").read_text())
        procs[what] = r.start(cmd, home, r.work / "logs" / f"flwr_probe_{what}.log")
        report.operator_runs += 1
    logs = {what: r.work / "logs" / f"flwr_probe_{what}.log" for what in procs}

    def answered(what: str) -> bool:  # every SuperNode's reply printed (the log stream ends seconds later)
        return procs[what].poll() is not None or logs[what].read_text(errors="replace").count("PROBE REPLY") >= len(NAMES)

    while not all(answered(what) for what in procs) and time.monotonic() < start + timeout:
        time.sleep(0.3)
    for what, proc in procs.items():
        returncode = proc.poll()
        if returncode is None:
            proc.terminate()  # the CLI's log stream; the run itself is over or ends on its own
            proc.wait(timeout=10)
        report.bundles[what] = {"returncode": returncode, "seconds": time.monotonic() - start,
                                "log": logs[what].read_text(errors="replace")}
    report.bundles["nodes"] = {
        name: [line.strip() for line in r.node_log(name).splitlines()
               if UNSIGNED_REFUSAL in line or FOREIGN_REFUSAL in line or PROBE_RAN in line]
        for name in NAMES}
    r.log(f"unsigned and foreign bundles: {sum(len(v) for v in report.bundles['nodes'].values())} refusals "
          f"logged by the SuperNodes in {time.monotonic() - start:.0f} s")


def _start_comeback(r: Rehearsal, report: Report) -> dict:
    """Right after its revocation, the revoked board restarts its SuperNode (same key, through the
    proxy, as its restart policy would) and registers its key again with its own flwr CLI."""
    name = NAMES[0]
    report.comeback["start"] = time.monotonic()
    return {"node": r.start_node(name),
            "cli": r.start([BIN / "flwr", "supernode", "register", f"{r.key(name)}.pub", BOARD, "--format", "json"],
                           r.board_home("revoked"), r.work / "logs" / "board_revoked_register.log")}


def _revoked_board_comes_back(r: Rehearsal, report: Report, procs: dict) -> None:
    """... and tries the Fleet API's registration with that key: all refused."""
    name = NAMES[0]
    report.comeback["fleet_api"] = fleet_api_attempts(r.proxy_address, r.certs / "ca.crt", r.key(name),
                                                      report.node_ids[NAMES[1]])
    for key, proc in (("returncode", procs["node"]), ("register_returncode", procs["cli"])):
        try:
            report.comeback[key] = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            report.comeback[key] = None
    report.comeback.update(
        log=r.node_log(name), seconds=time.monotonic() - report.comeback["start"],
        register={"returncode": report.comeback["register_returncode"],
                  "output": (r.work / "logs" / "board_revoked_register.log").read_text(errors="replace")},
        status=r.node_list().get(report.node_ids[name]))
    r.log(f"revoked {name} tried to come back: SuperNode exited {report.comeback['returncode']}, "
          f"status {report.comeback['status']} ({report.comeback['seconds']:.0f} s)")


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
             timeout: float = 900, say=print, executor: str = "flower") -> Report:
    """Run the whole rehearsal in ``work``; always stops what it started. Returns what it saw.
    ``executor``: who runs the SuperNodes' ClientApps (``EXECUTORS``)."""
    work, data_root = Path(work).resolve(), Path(data_root).resolve()
    report = Report(work=work, data_root=data_root)
    r = Rehearsal(work, data_root, app_dir, say, control_plane=True, executor=executor)
    try:
        report.sans = r.make_certs()
        r.log("CA and SuperLink certificate made")
        signing = _start_signing(r)
        r.start_app_store()
        r.start_superlink()
        r.start_proxy()
        r.log(f"SuperLink up on {r.address} only (TLS, node authentication, state database); nginx on "
              f"{r.proxy_address} forwards its Fleet API; signed app store on 127.0.0.1:{r.store_port}")
        report.node_ids = r.add_nodes(["experiment=seed002"])
        r.log(f"3 partitions exported, 3 keys made and registered, 3 SuperNodes started through the proxy: "
              f"{report.node_ids}")
        refused = _start_refusals(r)
        board = _start_board_attempts(r, report)
        _lan_requests(r, report)
        _finish_signing(r, report, signing)
        ids = set(report.node_ids.values())
        r.wait("3 SuperNodes online", lambda: sum(r.node_list().get(i) == "online" for i in ids) == 3, 90)
        report.status_before_run = r.node_list()
        report.timings["setup"] = time.monotonic() - r.t0
        r.log("3 SuperNodes online")
        _collect_board_attempts(r, report, board)
        _collect_refusals(r, report, refused)
        t = time.monotonic()
        _bundle_refusals(r, report)
        report.timings["bundle_refusals"] = time.monotonic() - t
        _flwr_run(r, report, fault, timeout)
        if executor == "warm":  # the asynchronous run shows that the node gets work again
            pid, report.executor_restart["log"] = r.restart_executor(EXECUTOR_VICTIM)
            r.log(f"killed {EXECUTOR_VICTIM}'s warm executor (pid {pid}, SIGKILL) and started it again")
        _flwr_run_async(r, report, fault, timeout)
        revoked = r.nodes[NAMES[0]]
        r.revoke(NAMES[0])
        comeback = _start_comeback(r, report)  # while the revoked SuperNode is being disconnected
        try:
            report.revoke["returncode"] = revoked.wait(timeout=60)
        except subprocess.TimeoutExpired:
            report.revoke["returncode"] = None
        report.revoke["status"] = r.node_list().get(report.node_ids[NAMES[0]])
        r.log(f"revoked {NAMES[0]}: status {report.revoke['status']}, its SuperNode exited "
              f"{report.revoke['returncode']}")
        _revoked_board_comes_back(r, report, comeback)
        report.timings["comeback"] = report.comeback["seconds"]
    finally:
        logs = work / "logs"
        report.superlink_log = (logs / "superlink.log").read_text(errors="replace") \
            if (logs / "superlink.log").exists() else ""
        report.store_log = (logs / "app-store.log").read_text(errors="replace") \
            if (logs / "app-store.log").exists() else ""
        report.stopped, report.leftover = r.stop()
        report.proxy_log = "".join((work / "proxy" / f).read_text(errors="replace")
                                   for f in ("access.log", "error.log") if (work / "proxy" / f).exists())
        report.timings["total"] = time.monotonic() - r.t0
        r.log(f"stopped {len(report.stopped)} processes; {len(report.leftover)} left")
    return report


# -- section 4 of the guide, "Try it first": a plain connection on a trusted LAN -------------------
# Its commands, written once with the guide's addresses and paths as fields; tests/test_deployment.py
# checks that jetson/README.md shows exactly these with GUIDE_VALUES filled in, so that the guide
# and its rehearsal cannot drift apart. (The export is section 2's, which section 4 runs on.)
TRY_EXPORT = "python jetson/device/export_partition.py --node {k} --out {out} --data-root {mnist} experiment=seed002"
TRY_SUPERLINK = "flower-superlink --insecure --host {host} --port {port} --disable-runtime-dependency-installation"
TRY_SUPERNODE = ("flower-supernode --insecure --superlink {superlink} "
                 "--node-config 'data-path=\"{data}\" node-name=\"{name}\"'")
TRY_CONNECTION = "try"
TRY_CONFIG = '[superlink.try]\naddress = "{address}"\ninsecure = true\n'  # appended after `flwr config list`
TRY_OVERRIDES = "experiment=seed002 num_rounds={rounds} data.root={mnist} output_dir={runs}"
TRY_RUN = "flwr run . try --stream --run-config {run_config}"
GUIDE_VALUES = {"k": "$k", "out": "/srv/flmnist/partitions/jetson-$k", "mnist": "/srv/flmnist/mnist",
                "host": "0.0.0.0", "port": 8000, "superlink": "192.168.1.10:8000", "data": "/srv/flmnist/data",
                "address": "127.0.0.1:8000", "rounds": 3, "runs": "/srv/flmnist/runs", "run_config": "~/try.toml"}


def _argv(template: str, **values) -> list[str]:
    """A guide command as argv; its program is found on ``Rehearsal.env``'s PATH, this environment's
    bin first (the guide's venv on PATH)."""
    return shlex.split(template.format(**values))


class TryIt(Rehearsal):
    """Section 4's deployment on loopback: a plain SuperLink, SuperNodes started as a board's venv
    command (this environment's bin on PATH: ``Rehearsal.env``), the operator's ``try`` connection.
    Flower's own task polling (1 s), as the guide's commands get it."""

    cli_connection = TRY_CONNECTION

    def __init__(self, work: Path, data_root: Path, say=print, executor: str = "flower") -> None:
        super().__init__(work, data_root, say=say, task_poll_interval=None, executor=executor)

    def start_superlink(self) -> None:
        # The one change from the guide's command: 127.0.0.1 and a free port, not 0.0.0.0:8000, so
        # that the rehearsal opens nothing to the LAN and cannot clash with anything on this host.
        log = self.work / "logs" / "superlink.log"
        self.sh(BIN / "flwr", "config", "list")  # creates FLWR_HOME/config.toml, as in the guide
        config = (self.cli_home / "config.toml").read_text()

        def launch() -> subprocess.Popen:
            proc = self.start(_argv(TRY_SUPERLINK, host="127.0.0.1", port=self.port), self.link_home, log)
            (self.cli_home / "config.toml").write_text(config + "\n" + TRY_CONFIG.format(address=self.address))
            return proc
        self.bind_superlink(launch, log)  # the CLI, through the `try` connection

    def supernode_command(self, name: str, port: int, **_) -> list:
        # The guide's command for a board, pointed at the loopback SuperLink; each SuperNode also
        # gets its own --port (its Runtime API, default 127.0.0.1:9094): here they share one host.
        return _argv(TRY_SUPERNODE, superlink=self.address, data=self.data(name), name=name) + ["--port", str(port)]


def rehearse_try_it(work: Path, data_root: Path, names: list[str] = NAMES, rounds: int = 1,
                    timeout: float = 600, say=print) -> dict:
    """Section 4 of ``jetson/README.md`` on loopback: section 2's partition export, the plain
    SuperLink, one SuperNode per name (partition k for ``names[k]``), the ``try`` connection, the
    guide's ``flwr run`` with ``num_rounds=rounds`` and ``output_dir`` in ``work``; always stops
    what it started. Returns the commands, each SuperNode's ID and log, the run directory and its
    summary, seconds taken, the processes stopped and any left over."""
    work, data_root = Path(work).resolve(), Path(data_root).resolve()
    r = TryIt(work, data_root, say)
    seen: dict = {"work": work, "commands": {}, "run_dir": None, "summary": {}, "returncode": None}
    export = _load_export_partition()
    try:
        for k, name in enumerate(names):
            argv = _argv(TRY_EXPORT, k=k, out=r.data(name), mnist=data_root)
            seen["commands"][f"export {name}"] = shlex.join(argv)
            if export.main(argv[2:]) != 0:  # the script's own main, in this process
                raise RuntimeError(f"export_partition.py failed for {name}")
        r.start_superlink()
        seen["commands"]["superlink"] = shlex.join(r.procs[0].args)
        for name in names:
            seen["commands"][name] = shlex.join(r.start_node(name).args)
        # Each SuperNode logs its ID once the SuperLink has activated it; then `flwr supernode list try`.
        r.wait(f"{len(names)} SuperNodes' IDs", lambda: all("SuperNode ID:" in r.node_log(n) for n in names), 120, 0.2)
        r.wait(f"{len(names)} SuperNodes online",
               lambda: list(r.node_list().values()).count("online") == len(names), 60)
        seen["status_before_run"] = r.node_list()
        r.log(f"plain SuperLink on {r.address}, {len(names)} SuperNodes online")
        run_config = write_run_config(work / "try.toml", shlex.split(
            TRY_OVERRIDES.format(rounds=rounds, mnist=data_root, runs=work / "runs")))
        argv = _argv(TRY_RUN, run_config=run_config)
        seen["commands"]["try.toml"], seen["commands"]["flwr run"] = run_config.read_text().strip(), shlex.join(argv)
        log, start = work / "logs" / "flwr_try.log", time.monotonic()
        proc = r.start(argv, r.cli_home, log, cwd=REPO)  # `flwr run .` in the checkout
        try:
            seen["returncode"] = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"flwr run did not finish within {timeout:.0f} s; see {log}") from None
        seen["seconds_run"] = time.monotonic() - start
        seen["log"] = log.read_text(errors="replace")
        run_dirs = sorted(path.parent for path in (work / "runs").glob("*/*/summary.json"))
        if run_dirs:
            seen["run_dir"] = run_dirs[-1]
            seen["summary"] = json.loads((run_dirs[-1] / "summary.json").read_text())
        r.log(f"flwr run exited with {seen['returncode']} after {seen['seconds_run']:.0f} s: {seen['run_dir']}")
    finally:
        seen["node_logs"] = {name: r.node_log(name) for name in r.starts}
        seen["node_ids"] = {name: int(log.split("SuperNode ID:")[1].split()[0])
                            for name, log in seen["node_logs"].items() if "SuperNode ID:" in log}
        seen["stopped"], seen["leftover"] = r.stop()
        seen["seconds"] = time.monotonic() - r.t0
        r.log(f"stopped {len(seen['stopped'])} processes; {len(seen['leftover'])} left")
    return seen


# -- checks ---------------------------------------------------------------------------------
def _rows(report: Report) -> list[dict]:
    return json.loads((report.run["run_dir"] / "metrics.json").read_text())


def check_certificate(report: Report) -> None:
    assert "IP Address:127.0.0.1" in report.sans and "DNS:localhost" in report.sans, report.sans
    assert f"IP Address:{LAN_HOST}" in report.sans, report.sans


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

    from flmnist.ml.data import load_mnist
    from flmnist.ml.models import LeNet
    from flmnist.ml.training import evaluate

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
    assert seen.get("killed_pids"), (
        "the victim was never killed during the asynchronous run (it never logged a train message);"
        f" run log:\n{seen.get('log', '')[-2500:]}\nvictim's log:\n{seen.get('victim_log', '')[-1500:]}")
    run_dir = seen["run_dir"]
    assert (run_dir / "summary.json").is_file(), seen["log"][-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    stats = json.loads((run_dir / "async_stats.json").read_text())
    assert stats["client_updates"] == ASYNC_UPDATES, stats
    # The victim's task is dropped: timed out, lost with its node, or still unanswered when the survivors' updates ended
    # the run first (with the warm executor they can reach max_client_updates within the timeout).
    lost = sum(stats["outcomes"].get(k, 0) for k in ("timed out", "failed", "unavailable"))
    unanswered = stats["unanswered_at_end"].get(VICTIM, 0)
    assert lost + unanswered >= 1, (f"the killed node's in-flight update was not dropped: {stats['outcomes']},"
                                    f" unanswered at the end {stats['unanswered_at_end']}")
    assert stats["outcomes"].get("applied", 0) >= ASYNC_UPDATES - lost - 1, stats["outcomes"]


def check_runs_judged_by_the_registry(report: Report) -> None:
    """Both runs read the registry (``screen.registry``, as the guide's run does), bound each board's
    node id to its registered name and partition, and rejected nothing for its identity."""
    for seen in (report.run, report.async_run):
        screen = json.loads((seen["run_dir"] / "screen_stats.json").read_text())
        identities = screen["identities"]
        assert identities["registry"] is True, identities
        bound = {int(k): (v["name"], v["partition"]) for k, v in identities["bound"].items()}
        assert bound == {report.node_ids[name]: (name, i) for i, name in enumerate(NAMES)}, bound
        assert not identities["flagged"] and identities["refused_claims"] == 0, identities
        assert not [r for r in screen["rejection_reasons"] if "claims" in r or "registr" in r or "identit" in r], screen


def check_killed_executor_restarts_and_its_node_gets_work(report: Report) -> None:
    """The warm executor of a board, killed and started again (its unit's Restart=always), takes the
    node's next task: the asynchronous run's updates reached that board through the new executor."""
    log_path = report.executor_restart.get("log")
    assert log_path is not None, "no warm executor was killed (the rehearsal ran with executor='flower')"
    log = Path(log_path).read_text(errors="replace")
    assert re.search(r"task \d+: child \d+ exited with code 0", log), log[-2000:]
    stats = json.loads((report.async_run["run_dir"] / "async_stats.json").read_text())
    assert stats["updates_per_node"].get(EXECUTOR_VICTIM, 0) >= 1, stats["updates_per_node"]


def check_superlink_unreachable_from_lan(report: Report) -> None:
    seen = report.lan["superlink_port"]
    assert _refused(seen) and "Connection to the SuperLink is unavailable" in seen["output"], seen


def check_nodes_connect_through_proxy(report: Report) -> None:
    activations = report.proxy_log.count('"POST /v1/fleet/activate-node HTTP/1.1" 200')
    assert activations >= len(NAMES), report.proxy_log[-3000:]
    assert report.proxy_log.count('"POST /v1/fleet/push-messages HTTP/1.1" 200') > 0


def check_proxy_serves_only_fleet_api(report: Report) -> None:
    assert len(report.lan["http"]) == len(FORBIDDEN_PATHS) + 1
    for path, (status, body) in report.lan["http"].items():
        assert status == 403, (path, status, body)


def check_board_cannot_start_run(report: Report) -> None:
    seen = report.lan["run"]
    assert _refused(seen) and "403 Forbidden" in seen["output"], seen
    # The SuperLink saw no run but the operator's.
    assert report.superlink_log.count("ControlServicer.StartRun") == report.operator_runs, report.operator_runs


def check_board_cannot_register_or_revoke_keys(report: Report) -> None:
    for what in ("register_new_key", "register_own_key", "revoke_other_board"):
        seen = report.lan[what]
        assert _refused(seen) and "403 Forbidden" in seen["output"], (what, seen)
    fleet = report.lan["fleet_api"]
    assert fleet["register_key"]["status"] == 412, fleet
    assert "must be registered via the CLI" in fleet["register_key"]["body"], fleet
    assert fleet["unregister_other"]["status"] in (401, 412), fleet
    listed = report.lan["listed_after"]
    assert set(listed) == set(report.node_ids.values()), listed  # no key added, none removed
    assert listed[report.node_ids[NAMES[2]]] == "online", listed


def _bundle_refused(report: Report, what: str, refusal: str) -> None:
    seen = report.bundles[what]
    for name in NAMES:
        assert any(refusal in line for line in report.bundles["nodes"][name]), (name, report.bundles["nodes"])
        assert not any(PROBE_RAN in line for line in report.bundles["nodes"][name]), name
    # The probe's ServerApp got one error reply per SuperNode.
    assert seen["log"].count("error 7: The FAB could not be verified.") == len(NAMES), seen["log"][-3000:]
    assert ": ran" not in seen["log"], seen["log"][-3000:]


def check_unsigned_bundle_refused(report: Report) -> None:
    _bundle_refused(report, "unsigned", UNSIGNED_REFUSAL)


def check_foreign_bundle_refused(report: Report) -> None:
    _bundle_refused(report, "foreign", FOREIGN_REFUSAL)
    assert f"GET /v1/fabs/{PROBE_SPEC[1:].replace('==', '/')}.fab HTTP/1.1\" 200" in report.store_log, report.store_log


def check_signed_run_accepted(report: Report) -> None:
    spec = report.signing["spec"]
    assert spec.startswith("@flmnist/flmnist==") and report.run["app"] == spec, (spec, report.run.get("app"))
    assert f"{OPERATOR_KEY_ID}: \"ssh-ed25519 " in report.signing["trusted_entities"]
    assert f"GET /v1/fabs/{spec[1:].replace('==', '/')}.fab HTTP/1.1\" 200" in report.store_log, report.store_log
    assert (report.run["run_dir"] / "summary.json").is_file(), report.run["log"][-3000:]


def check_revoked_board_stays_out(report: Report) -> None:
    seen = report.comeback
    assert seen["returncode"] not in (None, 0), f"the revoked board's SuperNode was admitted:\n{seen['log'][-2000:]}"
    assert "Failed to activate SuperNode" in seen["log"] and "Receiving:" not in seen["log"], seen["log"][-2000:]
    assert _refused(seen["register"]) and "403 Forbidden" in seen["register"]["output"], seen["register"]
    assert seen["fleet_api"]["register_key"]["status"] == 412, seen["fleet_api"]
    assert seen["status"] == "unregistered", seen["status"]


def check_revoked_node_is_disconnected(report: Report) -> None:
    assert report.revoke["status"] == "unregistered", report.revoke
    assert report.revoke["returncode"] is not None, "the revoked SuperNode is still running"


def check_everything_stopped(report: Report) -> None:
    assert report.stopped, "nothing was stopped: the check would be empty"
    assert report.leftover == [], report.leftover


CHECKS = {f.__name__.removeprefix("check_"): f for f in (
    check_certificate, check_nodes_joined, check_unregistered_key_refused, check_plaintext_client_refused,
    check_run_finished, check_log_lines, check_model_scores_above_chance, check_run_survives_killed_node,
    check_restarted_node_gets_work, check_async_run_survives_killed_node, check_runs_judged_by_the_registry,
    check_revoked_node_is_disconnected,
    check_killed_executor_restarts_and_its_node_gets_work,
    check_superlink_unreachable_from_lan, check_nodes_connect_through_proxy, check_proxy_serves_only_fleet_api,
    check_board_cannot_start_run, check_board_cannot_register_or_revoke_keys, check_unsigned_bundle_refused,
    check_foreign_bundle_refused, check_signed_run_accepted, check_revoked_board_stays_out,
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
    parser.add_argument("--executor", choices=EXECUTORS, default="flower",
                        help="who runs the ClientApps: Flower's own executor (default), or flmnist's warm "
                             "executor beside each SuperNode in --isolation process")
    args = parser.parse_args(argv)
    # SIGTERM ends the rehearsal through its finally blocks: every process it started is stopped
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if not args.data_root:
        parser.error("set FLMNIST_DATA_DIR or --data-root to the MNIST root (holding MNIST/raw/)")
    work = Path(args.work or tempfile.mkdtemp(prefix="flmnist-rehearsal-"))
    report = rehearse(work, Path(args.data_root), fault=not args.no_fault, executor=args.executor)
    skipped = {"run_survives_killed_node", "restarted_node_gets_work",
               "async_run_survives_killed_node"} if args.no_fault else set()
    if args.executor != "warm":
        skipped.add("killed_executor_restarts_and_its_node_gets_work")
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
