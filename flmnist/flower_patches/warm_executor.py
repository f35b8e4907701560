"""A warm ClientApp executor for Flower 1.41 SuperNodes started with ``--isolation process``.

Per message, Flower's own executor (``flower-superexec``, which ``flower-supernode`` starts for
itself in its default ``--isolation subprocess``) starts a new ``flwr-clientapp`` process: a new
Python that imports Flower's SuperNode side, then the app and PyTorch, 3.6-3.9 s on a 2-core
machine before a ClientApp does any work. This executor is a long-lived process beside the
SuperNode that does the same job with those imports done once:

- it imports Flower and the libraries named by ``--preload`` (PyTorch by default) once, and never
  initialises CUDA (a forked child cannot inherit a CUDA context; it refuses to start if a preload
  did);
- it asks the SuperNode's Runtime API for ClientApp tasks every ``--poll-interval`` seconds
  (``AcquireTask`` with ``supported_task_types=["flwr-clientapp"]``, as Flower's SuperExec does);
- for each task it forks a child that runs Flower's own ``run_clientapp`` with the task's token,
  what ``flwr-clientapp --token`` runs: the child pulls the message, context and app bundle (FAB)
  from the SuperNode, installs the bundle, loads the ClientApp *from the bundle* and replies
  (unchanged but for a first retry of missing message objects after 50 ms: warm_child.py).

The parent never imports an app module, and the child drops its own copy of this package
(``flmnist``) from ``sys.modules`` before Flower loads the app: Flower keeps loaded app modules in
``sys.modules`` and would otherwise skip the bundle the SuperNode verified (``--trusted-entities``)
in favour of whatever was imported earlier. Each task's log says where its app modules came from.

A child that fails is that task's failure, never the executor's: an exception in the ClientApp is
answered by Flower's own code (an error reply); a child that dies after pulling its message and
before it starts replying (a signal, a hard exit, killed after ``--task-timeout`` seconds) gets an
error reply (``CLIENT_APP_CRASHED``) sent by the executor with the task's token (warm_child.py
reports those moments), so the SuperNode goes on at once instead of after Flower's task expiry
(up to 60 s; a hung ``flwr-clientapp`` holds its node for good). One pushing its reply gets up to
``REPLY_GRACE`` more before a kill (cut off, its reply holds the SuperNode: the log says to restart
it). Anything else is logged, and Flower's task expiry answers. A child outlives an executor that
dies, except in a container (its init exits with the executor, the kernel kills the rest).

Flower's internals used here (Runtime API client, ``run_clientapp``) are flwr 1.41.0's; on another version it refuses to start.

    flower-supernode ... --isolation process --port 9094 &
    flmnist-warm-executor --runtime-api-address 127.0.0.1:9094 --insecure   # no dependency installs
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

from flmnist.flower_patches import warm_simulation as simulation
from flmnist.flower_patches.pinned import FLWR_VERSION, installed_flower_version, version_refusal
from flmnist.flower_patches.warm_child import (
    DEFAULT_PRELOAD,
    PULLED,
    REPLY_GRACE,
    REPLYING,
    Child,
    child_main,
    cuda_initialised,
    describe,
    frames,
    mid_reply,
    preload,
)

DEFAULT_POLL_INTERVAL = 0.05
DEFAULT_MAX_CHILDREN = 4
LOG = logging.getLogger("flmnist.warm_executor")


@dataclass(frozen=True)
class Settings:
    runtime_api_address: str
    insecure: bool = True
    root_certificates: str | None = None  # path to the CA of the Runtime API's TLS certificate
    superexec_auth_secret_file: str | None = None
    poll_interval: float = DEFAULT_POLL_INTERVAL
    task_timeout: float | None = None  # seconds; None: no limit
    max_children: int = DEFAULT_MAX_CHILDREN
    preload: tuple[str, ...] = DEFAULT_PRELOAD
    exit_when_unreachable: float | None = None  # seconds; None: retry for good
    task_type: str = "flwr-clientapp"  # or "flwr-simulation": a local SuperLink's runs (warm_simulation.py)


# -- the executor: the parent side (the child's: warm_child.py) ----------------------------------
class WarmExecutor:
    """The polling loop: acquire ClientApp tasks, fork a child per task, reap, time out, answer crashes."""

    def __init__(self, settings: Settings) -> None:
        from flwr.supercore.tls import validate_and_resolve_root_certificates

        self.settings = settings
        self.certificates = validate_and_resolve_root_certificates(settings.root_certificates, settings.insecure)
        self.children: dict[int, Child] = {}
        self.stopping = False
        self.tasks = 0
        self.client = self._runtime_client(token=None)
        self._unreachable_since: float | None = None

    def _runtime_client(self, token: str | None):
        from flwr.supercore.auth import load_superexec_auth_secret
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )
        from flwr.supercore.runtime import RuntimeHttpClient

        if token is None:
            interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
            secret = load_superexec_auth_secret(self.settings.superexec_auth_secret_file)
            if secret:
                interceptors.append(SuperExecAuthHttpInterceptor(
                    master_secret=secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}))
        else:  # the task's own client, as the child's run_clientapp makes it
            interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                            RuntimeTokenHttpInterceptor(token)]
        # No retry invoker: Flower's interrupts its own process on a 401; this loop retries itself.
        return RuntimeHttpClient.from_server_address(
            server_address=self.settings.runtime_api_address, insecure=self.settings.insecure,
            root_certificates=self.certificates, interceptors=interceptors)

    # -- the loop --
    def run(self) -> None:
        LOG.info("polling the %s Runtime API at %s every %g s for %s tasks (task timeout: %s, at most %d children)",
                 "SuperLink's" if self.settings.task_type == simulation.TASK_TYPE else "SuperNode's",
                 self.settings.runtime_api_address, self.settings.poll_interval, self.settings.task_type,
                 f"{self.settings.task_timeout:g} s" if self.settings.task_timeout else "none",
                 self.settings.max_children)
        try:
            while not self.stopping:
                self.step()
                time.sleep(self.settings.poll_interval if self._unreachable_since is None else
                           min(2.0, max(self.settings.poll_interval,
                                        (time.monotonic() - self._unreachable_since) / 4)))
        finally:
            self.shutdown()

    def step(self) -> None:
        self.reap()
        self.enforce_timeout()
        if not self.stopping and len(self.children) < self.settings.max_children:
            task, token = self.acquire()
            if task is not None:
                self.launch(task, token)

    def acquire(self):
        import httpx
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        try:
            res = self.client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType(self.settings.task_type).value]))
        except httpx.HTTPStatusError as err:
            if err.response.status_code == 401:
                raise SystemExit(f"the Runtime API at {self.settings.runtime_api_address} refused this "
                                 f"executor (401): check --superexec-auth-secret-file against the SuperNode's")
            self._unreachable(f"HTTP {err.response.status_code}")
            return None, None
        except httpx.HTTPError as err:
            self._unreachable(type(err).__name__)
            return None, None
        if self._unreachable_since is not None:
            LOG.info("the Runtime API at %s answers again (after %.1f s)", self.settings.runtime_api_address,
                     time.monotonic() - self._unreachable_since)
            self._unreachable_since = None
        if res.HasField("task") and res.token:
            return res.task, res.token
        return None, None

    def _unreachable(self, why: str) -> None:
        if self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
            LOG.warning("the Runtime API at %s does not answer (%s); retrying",
                        self.settings.runtime_api_address, why)
        elif (limit := self.settings.exit_when_unreachable) and time.monotonic() - self._unreachable_since > limit:
            raise SystemExit(f"the Runtime API at {self.settings.runtime_api_address} did not answer for "
                             f"{limit:g} s ({why}): exiting, for the service manager to start this again")

    def launch(self, task, token: str) -> None:
        if threading.active_count() > 1:
            LOG.warning("forking with %d threads running", threading.active_count())
        started, fds = time.monotonic(), ()
        try:
            read_fd, write_fd = fds = os.pipe()
            pid = os.fork()
        except OSError as err:  # no pipe or process to run it in: the executor goes on, Flower's task expiry answers
            LOG.error("task %d: cannot start a child (%s); Flower's task expiry answers its message", task.task_id, err)
            for fd in fds:
                os.close(fd)
            return
        if pid == 0:  # the child
            os.close(read_fd)
            run = simulation.child_main if self.settings.task_type == simulation.TASK_TYPE else child_main
            run(self.settings, self.certificates, task.task_id, token, write_fd, started)
        os.close(write_fd)
        with contextlib.suppress(OSError):  # as the child does: its own group, even if killed at once
            os.setpgid(pid, pid)
        os.set_blocking(read_fd, False)
        self.tasks += 1
        self.children[pid] = Child(pid=pid, task_id=task.task_id, run_id=task.run_id, token=token,
                                   started=started, pipe=read_fd)
        LOG.info("task %d (run %d): started child %d", task.task_id, task.run_id, pid)

    @staticmethod
    def _drain(child: Child) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: nothing more for now
            while data := os.read(child.pipe, 65536):
                child.received += data

    def reap(self, block: bool = False) -> None:
        for child in list(self.children.values()):
            self._drain(child)
            try:
                pid, status = os.waitpid(child.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                pid, status = child.pid, 0
            if pid == 0:
                continue
            self._drain(child)
            os.close(child.pipe)
            del self.children[child.pid]
            self.finished(child, status)

    def finished(self, child: Child, status: int) -> None:
        seconds = time.monotonic() - child.started
        how = child.killed or f"{describe(status)} after {seconds:.1f} s"
        kinds = dict(frames(child.received))
        if self.settings.task_type == simulation.TASK_TYPE:
            simulation.finished(self._runtime_client(token=child.token), child, status, how)
        elif os.waitstatus_to_exitcode(status) == 0 and child.killed is None and REPLYING in kinds:
            LOG.info("task %d: child %d exited with code 0 after %.2f s", child.task_id, child.pid, seconds)
        elif mid_reply(kinds):
            LOG.error("task %d: child %d %s while pushing its reply (%.2f s): if its message was stored without "
                      "all its objects, Flower 1.41's SuperNode waits for them with no time limit and this node gets "
                      "no further work; if it gets none, restart its SuperNode (systemctl restart flmnist-supernode, "
                      "or docker compose restart supernode)", child.task_id, child.pid, how, seconds)
        elif PULLED in kinds and REPLYING not in kinds:
            reason = f"ClientApp process {how}, before replying (flmnist warm executor)"
            sent = self.send_error_reply(child, kinds[PULLED], reason)
            LOG.warning("task %d: child %d %s, before replying (%.2f s); %s", child.task_id, child.pid, how,
                        seconds, "error reply sent to the SuperNode" if sent else
                        "no error reply could be sent (Flower's task expiry answers within about 60 s)")
        else:
            LOG.warning("task %d: child %d %s (%.2f s; %s)", child.task_id, child.pid, how, seconds,
                        "Flower's run_clientapp sent the reply" if REPLYING in kinds else
                        "before it pulled its message: Flower's task expiry applies")

    def send_error_reply(self, child: Child, header: bytes, reason: str) -> bool:
        """Answer the message the child pulled with CLIENT_APP_CRASHED and finish the task, using
        the task's token (refused by the SuperNode if the task already finished)."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.common.serde import message_from_proto
        from flwr.proto.message_pb2 import Message as ProtoMessage
        from flwr.supercore.task_identity import TaskIdentity
        from flwr.supernode.runtime import run_clientapp as flower

        client = self._runtime_client(token=child.token)
        try:
            original = message_from_proto(ProtoMessage.FromString(header))
            TaskIdentity.task_id, TaskIdentity.run_id = child.task_id, original.metadata.run_id
            TaskIdentity.node_id = original.metadata.dst_node_id
            reply = Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=reason), reply_to=original)
            where = SimpleNamespace(node_id=original.metadata.dst_node_id, run_id=original.metadata.run_id)
            flower.push_message(client, reply, where)
            flower.push_task_output(client=client, context=None, sub_status=SubStatus.FAILED, details=reason)
            return True
        except Exception as err:  # noqa: BLE001 - Flower's ObjectPushError too: one task's, not the executor's
            LOG.warning("task %d: error reply not accepted: %s: %s", child.task_id, type(err).__name__, err)
            return False
        finally:
            TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None
            client.close()

    def enforce_timeout(self) -> None:
        limit = self.settings.task_timeout
        if not limit:
            return
        now = time.monotonic()
        for child in self.children.values():
            # one pushing its reply gets REPLY_GRACE more: cut off, its reply would hold the SuperNode
            over = now - child.started - limit - (REPLY_GRACE if mid_reply(dict(frames(child.received))) else 0)
            if child.killed is None and over > 0:
                child.killed = f"killed (SIGKILL) after the task timeout of {limit:g} s"
                LOG.warning("task %d: child %d still running after %g s; killing it", child.task_id,
                            child.pid, limit)
                self._kill(child)

    @staticmethod
    def _kill(child: Child) -> None:
        for kill in (os.killpg, os.kill):  # its process group (see launch), else the child alone
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(child.pid, signal.SIGKILL)

    def shutdown(self) -> None:
        """Kill the children still running (each task answered with an error), reap them, close.
        Those pushing their reply get until it is pushed (at most ``REPLY_GRACE``; none once the API is gone 5 s)."""
        gone = self._unreachable_since is not None and time.monotonic() - self._unreachable_since > 5
        grace = time.monotonic() + (0 if gone else REPLY_GRACE)
        while any(mid_reply(dict(frames(c.received))) for c in self.children.values()) and time.monotonic() < grace:
            time.sleep(0.05)
            self.reap()
        for child in self.children.values():
            child.killed = "killed (SIGKILL): the executor is stopping"
            self._kill(child)
        self.reap(block=True)
        self.client.close()
        LOG.info("stopped after %d tasks", self.tasks)

    def request_stop(self, signum, _frame) -> None:
        LOG.info("%s received: stopping", signal.Signals(signum).name)
        self.stopping = True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="flmnist-warm-executor",
        description="A warm ClientApp executor for a Flower 1.41 SuperNode started with --isolation process: "
                    "imports Flower and PyTorch once, forks a child per task that runs Flower's run_clientapp.")
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API, HOST:PORT (flower-supernode --host/--port, default "
                             "127.0.0.1:9094)")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true",
                     help="plain HTTP to the Runtime API (a SuperNode without --ssl-certfile)")
    tls.add_argument("--root-certificates", metavar="CA",
                     help="CA certificate of the Runtime API's TLS certificate (SuperNode --ssl-ca-certfile)")
    parser.add_argument("--superexec-auth-secret-file", metavar="FILE",
                        help="the same secret file as the SuperNode's --superexec-auth-secret-file")
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL, metavar="SECONDS",
                        help=f"seconds between task polls (default {DEFAULT_POLL_INTERVAL})")
    parser.add_argument("--task-timeout", type=float, default=0.0, metavar="SECONDS",
                        help="kill a task's child after this many seconds; the task is answered with an "
                             "error (default 0: no limit)")
    parser.add_argument("--max-children", type=int, default=DEFAULT_MAX_CHILDREN,
                        help=f"children running at once; no task is taken beyond (default {DEFAULT_MAX_CHILDREN})")
    parser.add_argument("--exit-when-unreachable", type=float, default=0.0, metavar="SECONDS",
                        help="exit (code 1) when the Runtime API has not answered for this long, for a "
                             "service manager to restart the executor beside a restarted SuperNode (default 0: never)")
    parser.add_argument("--preload", default=None, metavar="MODULES",
                        help="comma-separated modules to import once (libraries, never the app's own); default "
                             f"{','.join(DEFAULT_PRELOAD)}; with --task-type simulation {','.join(simulation.PRELOAD)}")
    parser.add_argument("--task-type", choices=["clientapp", "simulation"], default="clientapp",
                        help="clientapp: a SuperNode's ClientApp tasks (default); simulation: the runs of a local "
                             "SuperLink started with --simulation --isolation process (flwr-simulation's job)")
    args = parser.parse_args(argv)
    if args.preload is None:
        args.preload = ",".join(simulation.PRELOAD if args.task_type == "simulation" else DEFAULT_PRELOAD)
    if not 0.01 <= args.poll_interval <= 60 or args.task_timeout < 0 or args.max_children < 1:
        parser.error("--poll-interval lies in [0.01, 60], --task-timeout >= 0, --max-children >= 1")
    if not args.insecure and args.root_certificates is None:
        parser.error("say how to reach the Runtime API: --insecure (plain HTTP) or --root-certificates CA")
    return args


def main(argv: list[str] | None = None) -> int:
    refusal = version_refusal(installed_flower_version())
    if refusal:
        print(f"flmnist-warm-executor: {refusal}", file=sys.stderr)
        return 2
    args = parse_args(argv)
    # Started ignoring SIGCHLD (a service manager may), children reap themselves and a killed one reads as a clean exit
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    handler = logging.StreamHandler(sys.stderr)  # this logger only: the root's (httpx's requests) stay quiet
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s warm-executor[%(process)d]: %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    settings = Settings(
        runtime_api_address=args.runtime_api_address, insecure=args.insecure,
        root_certificates=args.root_certificates, superexec_auth_secret_file=args.superexec_auth_secret_file,
        poll_interval=args.poll_interval, task_timeout=args.task_timeout or None,
        max_children=args.max_children, exit_when_unreachable=args.exit_when_unreachable or None,
        preload=tuple(m.strip() for m in args.preload.split(",") if m.strip()), task_type=f"flwr-{args.task_type}")
    seconds = preload(settings.preload)
    if cuda_initialised():
        LOG.error("a preloaded module initialised CUDA; forked children could not use the GPU. Remove it from --preload.")
        return 2
    LOG.info("Flower %s and %s imported in %.2f s (CUDA not initialised)", FLWR_VERSION,
             ", ".join(settings.preload), seconds)
    from flwr.supercore.utils import disable_process_dumping

    disable_process_dumping(strict=False)  # as flower-superexec does: task tokens stay in this process
    executor = WarmExecutor(settings)
    signal.signal(signal.SIGTERM, executor.request_stop)
    signal.signal(signal.SIGINT, executor.request_stop)
    gc.freeze()  # what was imported stays shared with the children (copy-on-write)
    executor.run()
    return 0


def cli() -> None:
    sys.exit(main())

