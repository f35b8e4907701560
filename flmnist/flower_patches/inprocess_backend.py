"""A simulation backend that runs the ClientApp in Flower's simulation process, one message at a time.

Flower 1.41's simulation engine hands each message to a backend; its only backend is Ray's,
which starts a Ray head (GCS, raylet, dashboard and runtime-env agents) and a worker process
that imports Ray, Flower and PyTorch and loads MNIST again before the first ClientApp runs:
on a 2-core machine that is 6-7 s of a seed002 run's 32 s, when only one ClientApp trains at
a time anyway. :class:`InProcessBackend` runs that one ClientApp in the simulation process
instead, on the process's one PyTorch thread (:func:`on_torch_thread`). What crosses between
server and node stays what Ray carries: the message and the node's context go in and come out
as pickled copies, so a node can neither see nor change the server's objects, and an exception
in the ClientApp becomes the same error reply.

:func:`install` puts it in place of Ray's backend for flwr 1.41.0 when the ``flmnist`` command
asks for it (environment variable :data:`ENV`, set from ``simulation.backend``); the engine
builds its backend after it has loaded the ClientApp, whose import calls :func:`install`.
"""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from logging import INFO

FLWR_VERSION = "1.41.0"  # the version whose engine this plugs into
INPROCESS_NOTE = "ClientApps run in this simulation process, one at a time (flmnist's in-process backend)"
ENV = "FLMNIST_SIMULATION_BACKEND"  # set by the flmnist command: "inprocess" for this backend, else Ray's


_torch_thread: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def active() -> bool:
    """Whether this process runs ClientApps in-process (the ``flmnist`` command said so)."""
    return os.environ.get(ENV) == "inprocess"


def _set_threads(threads: int) -> None:
    import torch

    torch.get_num_threads()  # PyTorch's per-thread setup first, so that the count below stays
    torch.set_num_threads(threads)


def _torch_executor() -> ThreadPoolExecutor:
    """The process's one PyTorch thread, started on first use with PyTorch's thread count then."""
    global _torch_thread
    with _lock:
        if _torch_thread is None:
            import torch

            _torch_thread = ThreadPoolExecutor(1, "flmnist-torch", initializer=_set_threads,
                                               initargs=(torch.get_num_threads(),))
        return _torch_thread


def on_torch_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on the process's one PyTorch thread when ClientApps run in-process,
    else right here.

    The ServerApp's thread and the engine's worker thread would each start an OpenMP team of
    PyTorch threads. With more OpenMP threads than cores, OpenMP's threads stop spinning between
    parallel regions and sleep instead: a seed002 update then took 75 ms instead of 48 ms (23,000
    context switches against 300 in 40 updates). Training and evaluation therefore all run on
    one thread; the ServerApp's thread runs PyTorch single-threaded for anything else."""
    if not active() or threading.current_thread().name.startswith("flmnist-torch"):
        return fn(*args, **kwargs)
    return _torch_executor().submit(fn, *args, **kwargs).result()


def confine_torch() -> None:
    """On the ServerApp's thread when ClientApps run in-process: PyTorch single-threaded here,
    training and evaluation go to :func:`on_torch_thread` (whose thread starts first, so that it
    keeps PyTorch's thread count)."""
    if active():
        _torch_executor()
        _set_threads(1)


def _copy(obj):
    """What a transport would deliver: a copy sharing nothing with ``obj``."""
    return pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def backend_class():
    """The backend class (imported here: Flower's simulation modules load only in the engine)."""
    from flwr.clientapp.client_app import ClientAppException, LoadClientAppError
    from flwr.server.superlink.fleet.vce.backend.backend import Backend

    class InProcessBackend(Backend):
        """One worker: the ClientApp runs on the PyTorch thread, on copies of the message and context."""

        def __init__(self, backend_config) -> None:
            super().__init__(backend_config)
            self.app_fn: Callable | None = None

        def build(self, app_fn) -> None:
            self.app_fn = app_fn

        @property
        def num_workers(self) -> int:
            return 1

        def is_worker_idle(self) -> bool:
            return True

        def terminate(self) -> None:
            self.app_fn = None

        def process_message(self, message, context):
            if self.app_fn is None:
                raise ValueError("the backend was not built: no ClientApp to run")
            message, context = _copy(message), _copy(context)
            try:
                reply = on_torch_thread(self.app_fn(), message=message, context=context)
            except LoadClientAppError:
                raise
            except Exception as ex:
                raise ClientAppException(str(ex)) from ex
            return _copy(reply), _copy(context)

    return InProcessBackend


def install() -> bool:
    """Use :class:`InProcessBackend` instead of Ray's in this process, if :data:`ENV` asks for it
    and Flower is the version this follows; True if done."""
    if not active():
        return False
    import flwr

    if flwr.__version__ != FLWR_VERSION:
        return False
    from flwr.server.superlink.fleet.vce.backend import raybackend

    if getattr(raybackend.RayBackend, "flmnist", False):
        return True
    from flwr.common.logger import log

    cls = backend_class()
    cls.flmnist = True
    raybackend.RayBackend = cls  # the engine imports this name when it builds its backend
    log(INFO, INPROCESS_NOTE)
    return True
