"""The child side of flmnist's warm ClientApp executor (:mod:`flmnist.flower_patches.warm_executor`).

A forked child runs one task: it drops this package's modules (the app's own ``flmnist`` must load
from the bundle the SuperNode installed), reseeds NumPy and PyTorch as a new process would be,
installs two observers around ``run_clientapp``'s module functions (``pull_task_input``: the
message pulled; ``push_message``: the reply about to be sent) that report to the executor over a
pipe, retries the message's objects after 50 ms instead of 1 s (``OBJECT_PULL_BACKOFF``), does not unpack a bundle that is already installed (:func:`_installed_path`),
then runs Flower 1.41.0's own ``run_clientapp`` with the task's token and exits with its status. The
reports let the executor answer a child that died before replying. Here too: what the executor
imports once for every child (``preload``), and its record of a child.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import signal
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

OWN_PACKAGE = __name__.split(".")[0]  # "flmnist": never in a child's sys.modules when the app loads
ORPHAN_GRACE = 5.0  # seconds past the task timeout at which a child kills itself (the executor may be gone)
# A SuperNode makes a message's task before it has pulled the message's objects from the SuperLink;
# a child started at once finds them missing and Flower retries after 1 s, 2 s, 4 s ... (its
# flwr-clientapp, seconds slower to start, rarely does). Here the first retry is after 50 ms,
# doubling to Flower's own cap (10 s): about as many tries in about the same time before giving up.
# (Retries from 10 ms, capped at 100 ms, were tried: on 2 shared cores the extra requests slowed
# the SuperNode's own pull, and messages arrived later, 0.20-0.47 s after the fork against 0.13-0.18 s.)
OBJECT_PULL_BACKOFF = {"initial_backoff": 0.05}

# Child -> executor reports, one frame each: kind (1 byte), payload length (4 bytes), payload.
PULLED = b"M"  # the message the child pulled (metadata only, protobuf)
REPLYING = b"R"  # the child is about to push its reply (Flower's own, or Flower's error reply)
REPLIED = b"D"  # the reply is pushed whole: its message and every object of it
# Seconds a child in the middle of pushing its reply is given past its deadline (the task timeout,
# the executor's stop): a reply cut off mid-upload leaves its message stored without all its
# objects, and Flower 1.41's SuperNode waits for them with no time limit (start_client_internal's
# _push_messages), so that node gets no further work until it is restarted.
REPLY_GRACE = 30.0
_FRAME = struct.Struct("!cI")

LOG = logging.getLogger("flmnist.warm_executor")  # configured by the executor; inherited at the fork

# Imported once in the executor: Flower's ClientApp side and the libraries flmnist's ClientApp
# uses (no app module: see warm_executor.py). A preload that is not installed is skipped.
DEFAULT_PRELOAD = (
    "numpy",
    "torch",
    "torch._dynamo",  # torch.optim imports it at an optimizer's first construction: 1.4 s a child on 2 cores
    # (training on the CPU needs none: CpuSGD; DP-SGD's and a GPU's optimizers are torch.optim's)
    "flwr.app",
    "flwr.clientapp",
    "flwr.server.superlink.fleet.vce.vce_api",
    "flwr.server.superlink.linkstate.in_memory_linkstate",
)


@dataclass
class Child:
    """The executor's record of one child."""

    pid: int
    task_id: int
    run_id: int
    token: str
    started: float
    pipe: int  # read end of the child's report pipe (non-blocking)
    received: bytearray = field(default_factory=bytearray)
    killed: str | None = None  # why the executor killed it


def describe(status: int) -> str:
    """A child's wait status in words."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with code {code}"
    name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    return f"killed by {name}"


def frames(data: bytes) -> list[tuple[bytes, bytes]]:
    """The whole frames in what a child reported, as (kind, payload)."""
    found, at = [], 0
    while at + _FRAME.size <= len(data):
        kind, size = _FRAME.unpack_from(data, at)
        if at + _FRAME.size + size > len(data):
            break
        found.append((kind, bytes(data[at + _FRAME.size: at + _FRAME.size + size])))
        at += _FRAME.size + size
    return found


def mid_reply(kinds) -> bool:
    """Whether a child whose reports hold these ``kinds`` of frame started pushing its reply and
    has not finished."""
    return REPLYING in kinds and REPLIED not in kinds


def report(fd: int, kind: bytes, payload: bytes = b"") -> None:
    """One frame to the executor; never fails the task (a closed pipe only loses the report)."""
    try:
        os.write(fd, _FRAME.pack(kind, len(payload)) + payload)
    except OSError:
        pass


_PHASES: dict[str, float] = {}  # in a child: when it pulled its message and started its reply
_KIND: list[str] = []  # in a child: the type of the message it pulled
_RUN: list = []  # in a child: the run of the task (its bundle's id and version)


def _observe_run_clientapp(fd: int) -> None:
    """Report, around Flower's own functions, the message pulled and the start of the reply; and
    retry the message's objects sooner (``OBJECT_PULL_BACKOFF``)."""
    from flwr.common.serde import message_to_proto
    from flwr.supernode.runtime import run_clientapp as flower

    pull_task_input, push_message = flower.pull_task_input, flower.push_message
    flower.pull_and_inflate_object_from_tree = functools.partial(
        flower.pull_and_inflate_object_from_tree, **OBJECT_PULL_BACKOFF)

    def pulled(client):
        message, context, run, fab = pull_task_input(client)
        _PHASES["pulled"] = time.monotonic()
        _RUN.append(run)
        _KIND.append(message.metadata.message_type)
        with contextlib.suppress(Exception):  # a report must never fail the task
            report(fd, PULLED, message_to_proto(flower.remove_content_from_message(message)).SerializeToString())
        return message, context, run, fab

    def replying(client, message, context):
        _PHASES["replying"] = time.monotonic()
        report(fd, REPLYING)
        pushed = push_message(client, message, context)
        _PHASES["replied"] = time.monotonic()
        report(fd, REPLIED)
        return pushed

    install_from_fab, get_load_client_app_fn = flower.install_from_fab, flower.get_load_client_app_fn

    def installed(*args, **kwargs):
        path = _installed_path(*args, **kwargs) or install_from_fab(*args, **kwargs)
        _PHASES["installed"] = time.monotonic()
        return path

    def loader(*args, **kwargs):
        load = get_load_client_app_fn(*args, **kwargs)

        def loaded(*a, **k):
            app = load(*a, **k)
            _PHASES["loaded"] = time.monotonic()
            return app
        return loaded

    flower.pull_task_input, flower.push_message = pulled, replying
    flower.install_from_fab, flower.get_load_client_app_fn = installed, loader


def _installed_path(fab_content=None, *args, skip_prompt: bool = False, **kwargs) -> Path | None:
    """Where the bundle ``fab_content`` is installed already, else None (then Flower installs it).

    Flower's ``install_from_fab`` unpacks the whole bundle and checks its files' hashes on every
    task (0.06-0.09 s a child for flmnist's 145 files), then, finding its directory (named by the
    bundle's id, version and hash) already there, keeps the installed copy. This returns that
    directory without unpacking: the same directory, so the same code runs. The bundle's signature
    is the SuperNode's check, before the task exists; this only skips the repeated unpacking."""
    import hashlib

    from flwr.cli.config_utils import get_fab_metadata
    from flwr.common.config import get_project_dir

    if not isinstance(fab_content, bytes) or args or kwargs or not skip_prompt:
        return None
    try:  # the task's run names the bundle; a simulation reads it from the bundle's pyproject.toml
        fab_id, version = (_RUN[-1].fab_id, _RUN[-1].fab_version) if _RUN else get_fab_metadata(fab_content)
        path = get_project_dir(fab_id, version, hashlib.sha256(fab_content).hexdigest())
    except Exception:  # noqa: BLE001 - not a bundle this can name: Flower installs it (and says what is wrong)
        return None
    return path if (path / "pyproject.toml").is_file() else None


def _forget_own_package() -> None:
    """Drop this package's modules, so that the app's (same-named) package loads from the bundle."""
    for name in [n for n in sys.modules if n == OWN_PACKAGE or n.startswith(OWN_PACKAGE + ".")]:
        del sys.modules[name]


def _reseed() -> None:
    """A forked child starts with the executor's random state; a new process would not."""
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()


def _app_origin(task_id: int, before: set[str], forked: float) -> None:
    """Log when the task pulled its message and started its reply, and where the modules it loaded
    came from: the installed bundle, or elsewhere."""
    from flwr.supercore.utils import get_flwr_home

    apps = (get_flwr_home() / "apps").resolve()

    def path(module) -> Path | None:
        file = getattr(module, "__file__", None)
        return Path(file).resolve() if file else None

    phases = ", ".join(f"{what} at {at - forked:.2f} s" for what, at in _PHASES.items())
    LOG.info("task %d (%s): %s, done at %.2f s after the fork", task_id, _KIND[0] if _KIND else "?",
             phases or "no message pulled", time.monotonic() - forked)
    loaded = {name: path(module) for name, module in list(sys.modules.items()) if name not in before}
    in_bundle = {name for name, file in loaded.items() if file is not None and file.is_relative_to(apps)}
    if not in_bundle:
        LOG.info("task %d: no app module was loaded from a bundle under %s", task_id, apps)
        return
    packages = {name.split(".")[0] for name in in_bundle}
    elsewhere = sorted(name for name, module in list(sys.modules.items())
                       if name.split(".")[0] in packages and name not in in_bundle
                       and (file := path(module)) is not None and not file.is_relative_to(apps))
    bundle = os.path.commonpath([str(loaded[name]) for name in in_bundle])
    if elsewhere:
        LOG.warning("task %d: %d app modules loaded from the bundle (%s), %d from elsewhere: %s",
                    task_id, len(in_bundle), bundle, len(elsewhere), ", ".join(elsewhere[:5]))
    else:
        LOG.info("task %d: %d app modules loaded from the bundle (%s), 0 from elsewhere",
                 task_id, len(in_bundle), bundle)


def _deadline(seconds: float) -> None:
    """In a child: SIGKILL itself ``seconds`` from now, even if the executor is gone by then (in the
    middle of pushing its reply: once it is pushed, or ``REPLY_GRACE`` later)."""
    def expire() -> None:
        time.sleep(max(0.0, seconds))
        grace = time.monotonic() + REPLY_GRACE
        while "replying" in _PHASES and "replied" not in _PHASES and time.monotonic() < grace:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=expire, daemon=True, name="warm-executor-deadline").start()


def in_child(task: Callable[[], object]) -> NoReturn:
    """What every forked child does around its ``task`` (a ClientApp message, a simulation run):
    its own process group (a timeout kills whatever it started too), default signal handlers, no
    module of this package (the app's loads from its bundle), fresh random seeds; then ``task``,
    and exit with its status: 0, the code Flower's ``flwr_exit`` raised, or 1 on an exception."""
    code = 1
    try:
        os.setpgid(0, 0)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        _forget_own_package()
        _reseed()
        try:
            task()
            code = 0
        except SystemExit as done:  # Flower's processes end through flwr_exit
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child must end here, whatever happened
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def child_main(settings, certificates: bytes | None, task_id: int, token: str, report_fd: int,
               forked: float) -> NoReturn:
    """Runs in the forked child: Flower's run_clientapp for one task; never returns.

    It is not tied to the executor's life (no ``parent_pid``: Flower's monitor would interrupt it,
    and Flower's interrupt handler finishes the task without a reply, which leaves the SuperNode
    waiting for one for good). A child whose executor died finishes its task and replies; with a
    task timeout it kills itself a little after the executor would have (Flower's task expiry then
    answers the SuperNode)."""
    def task() -> None:
        if settings.task_timeout:
            _deadline(settings.task_timeout + ORPHAN_GRACE - (time.monotonic() - forked))
        _observe_run_clientapp(report_fd)
        from flwr.supernode.runtime import run_clientapp as flower

        before = set(sys.modules)
        try:
            flower.run_clientapp(runtime_api_address=settings.runtime_api_address, token=token,
                                 insecure=settings.insecure, certificates=certificates,
                                 parent_pid=None, runtime_dependency_install=False)
        finally:
            _app_origin(task_id, before, forked)

    in_child(task)


# -- what every child inherits: imported once, in the executor ---------------------------------
def preload(modules: tuple[str, ...]) -> float:
    """Import ``modules`` (those installed) and Flower's ClientApp process code; seconds taken."""
    start = time.perf_counter()
    importlib.import_module("flwr.supernode.runtime.run_clientapp")
    for name in modules:
        if name == OWN_PACKAGE or name.startswith(OWN_PACKAGE + "."):
            raise SystemExit(f"--preload {name}: the executor never imports the app's own modules "
                             "(a child would load them instead of the verified bundle)")
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - a preload is an optimisation: the child imports it itself
            LOG.warning("preload %s skipped: %s", name, err)
    return time.perf_counter() - start


def cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())
