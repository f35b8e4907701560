"""PyTorch on one thread when ClientApps run in Flower's simulation process (the ``inprocess``
backend): training and evaluation go to the process's one PyTorch thread; the ServerApp's
thread runs PyTorch single-threaded. No Flower here: :mod:`flmnist.flower_patches.inprocess_backend`
decides when ClientApps run in-process, through :data:`~flmnist.core.constants.BACKEND_ENV`."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from flmnist.core.constants import BACKEND_ENV

_torch_thread: ThreadPoolExecutor | None = None
_background: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def active() -> bool:
    """Whether this process runs ClientApps in-process (the ``flmnist`` command said so)."""
    return os.environ.get(BACKEND_ENV) == "inprocess"


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


def in_background(fn, *args, **kwargs) -> Future:
    """``fn(*args, **kwargs)`` started without waiting for it, for work whose result is read later
    (attribution): on the process's one PyTorch thread when ClientApps run in-process (in turn
    with training: on 2 cores there is no idle core to hide it in), else on one worker thread of
    its own, so that a deployed ServerApp evaluates while it waits for the next round's replies.
    Background jobs run one at a time, in the order given."""
    global _background
    if active():
        return _torch_executor().submit(fn, *args, **kwargs)
    with _lock:
        if _background is None:
            _background = ThreadPoolExecutor(1, "flmnist-background")
    return _background.submit(fn, *args, **kwargs)


def confine_torch() -> None:
    """On the ServerApp's thread when ClientApps run in-process: PyTorch single-threaded here,
    training and evaluation go to :func:`on_torch_thread` (whose thread starts first, so that it
    keeps PyTorch's thread count)."""
    if active():
        _torch_executor()
        _set_threads(1)
