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
builds its backend after it has loaded the ClientApp, whose import calls :func:`install`. Unless
Flower's Ray backend module is loaded already, a module holding only :class:`InProcessBackend`
takes its name, so the process never imports Ray.
"""

from __future__ import annotations

import pickle
import sys
import types
from collections.abc import Callable
from logging import INFO

from flmnist.flower_patches.pinned import FLWR_VERSION
from flmnist.ml.threads import active, on_torch_thread

RAYBACKEND = "flwr.server.superlink.fleet.vce.backend.raybackend"  # vce_api imports RayBackend from it
INPROCESS_NOTE = "ClientApps run in this simulation process, one at a time (flmnist's in-process backend)"


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
    import flwr.server.superlink.fleet.vce.backend as backends

    raybackend = sys.modules.get(RAYBACKEND)
    if raybackend is not None and getattr(raybackend.RayBackend, "flmnist", False):
        return True
    from flwr.common.logger import log

    cls = backend_class()
    cls.flmnist = True
    if raybackend is None:  # not Flower's module, which imports Ray (0.5 s of a core at each run's start)
        raybackend = types.ModuleType(RAYBACKEND, "flmnist's in-process backend in place of Flower's Ray backend")
        sys.modules[RAYBACKEND] = raybackend
        backends.raybackend = raybackend
    raybackend.RayBackend = cls  # the engine imports this name when it builds its backend
    log(INFO, INPROCESS_NOTE)
    return True
