"""Checkpoints: everything a run needs to continue after a crash, written safely, read safely.

A checkpoint holds the global model, the strategy's state (momentum buffers, FedBuff's
buffer, the version counter), the round or server-update number, the metrics so far and
the random-generator states.

Reading: ``torch.load(weights_only=True)``, so a checkpoint can only hold tensors and plain
values (dicts, lists, tuples, numbers, strings); unpickling never runs code named by the file.
Numpy arrays are stored as tensors tagged with their dtype and shape and come back as the
same numpy arrays.

Writing: the new checkpoint goes to ``checkpoint.pt.tmp`` and is fsynced; the current one is
kept as ``checkpoint.prev.pt``; then the new one is renamed over ``checkpoint.pt`` and the
directory fsynced. ``checkpoint.pt`` is therefore always a complete checkpoint, whenever the
process dies.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from flmnist.core.errors import ConfigError
from flmnist.core.run_files import CHECKPOINT, PREVIOUS, resume_arg

FORMAT = 1  # the layout of the file: {"flmnist-checkpoint": FORMAT, "payload": packed payload}
PAYLOAD_FORMAT = 2  # the layout of a run's payload ("format" in it): model, engine, screen, recorder, RNG
_NUMPY = "__numpy__"  # tag of a packed numpy array


def rng_state() -> dict:
    """Python's and PyTorch's generator states (Flower samples nodes with Python's). Not NumPy's
    global one: Flower's DP wrappers draw their noise from it, and a checkpoint holding its state
    would let anyone with the file regenerate that noise, and a resume draw the same noise again."""
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.seed()  # fresh entropy from the OS (an older checkpoint's NumPy state is not restored)
    torch.set_rng_state(state["torch"])


# ------------------------------------------------------------------ packing
def _pack_array(array: np.ndarray, where: str) -> dict:
    array = np.asarray(array)
    if array.dtype.hasobject or array.dtype.fields is not None:
        raise TypeError(f"checkpoint payload {where}: numpy array of dtype {array.dtype} cannot be saved")
    raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # any fixed-size dtype, any byte order
    return {_NUMPY: torch.from_numpy(raw.copy()), "dtype": array.dtype.str, "shape": list(array.shape)}


def _pack(value, where: str = "payload"):
    """The payload with numpy arrays and scalars as tagged tensors; TypeError (naming where)
    for anything ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(value, (np.ndarray, np.generic)):  # before float: np.float64 is a float
        packed = _pack_array(np.asarray(value), where)
        packed["scalar"] = isinstance(value, np.generic)
        return packed
    if value is None or type(value) in (bool, int, float, complex, str, bytes):
        return value
    if type(value) is torch.Tensor:  # a copy: a background write must not see the run change it
        return value.detach().clone()
    if type(value) is torch.nn.Parameter:
        return torch.nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
    if isinstance(value, dict):
        out = type(value)() if type(value) in (OrderedDict, Counter) else {}
        for k, v in value.items():
            key = k.item() if isinstance(k, np.generic) else k
            if not (key is None or type(key) in (bool, int, float, str, bytes, tuple)):
                raise TypeError(f"checkpoint payload {where}: a key of type {type(k).__qualname__} cannot be saved")
            out[key] = _pack(v, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, deque)):
        return [_pack(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(_pack(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, (set, frozenset)) and all(v is None or type(v) in (bool, int, float, str) for v in value):
        return set(value)
    raise TypeError(f"checkpoint payload {where}: a {type(value).__module__}.{type(value).__qualname__} "
                    "cannot be saved (only tensors, numpy arrays and plain values)")


def _unpack(value):
    if isinstance(value, dict):
        if _NUMPY in value and isinstance(value[_NUMPY], torch.Tensor):
            raw = value[_NUMPY].numpy().tobytes()
            array = np.frombuffer(raw, dtype=np.dtype(value["dtype"])).reshape(value["shape"]).copy()
            return array[()] if value.get("scalar") else array
        out = type(value)()
        for k, v in value.items():
            out[k] = _unpack(v)
        return out
    if isinstance(value, list):
        return [_unpack(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_unpack(v) for v in value)
    return value


# ------------------------------------------------------------------ writing
def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _keep_previous(path: Path) -> None:
    """``checkpoint.prev.pt`` becomes the current checkpoint (a hard link, else a copy);
    ``checkpoint.pt`` stays in place all along."""
    prev = path.with_name(PREVIOUS)
    staging = path.with_name(PREVIOUS + ".tmp")
    staging.unlink(missing_ok=True)
    try:
        os.link(path, staging)
    except OSError:  # a file system without hard links
        shutil.copyfile(path, staging)
        with open(staging, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(staging, prev)


def save_checkpoint(run_dir: Path, payload: dict) -> Path:
    """Write ``payload`` as ``run_dir/checkpoint.pt`` so that a crash at any moment leaves a
    complete checkpoint there (the previous one until the new one is complete)."""
    return _write(Path(run_dir), _packed(payload))


def _packed(payload: dict) -> dict:
    """The file's content: TypeError (naming where) before any write for what cannot be saved."""
    return {"flmnist-checkpoint": FORMAT, "payload": _pack(payload)}


def _write(run_dir: Path, data: dict) -> Path:
    path = run_dir / CHECKPOINT
    tmp = path.with_name(CHECKPOINT + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(data, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            _keep_previous(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(run_dir)
    return path


class CheckpointWriter:
    """Saves a run's checkpoints (:func:`save_checkpoint`, then ``then``), one after the other.

    ``background``: on a thread of their own while the run goes on (a seed002 round's checkpoint,
    its file written, fsynced and renamed, and ``checkpoint.json``, took 10-13 ms of the server's
    thread between rounds). The payload is packed when handed over (its arrays, tensors and
    containers copied), so the run may change its objects at once, and a payload that cannot be
    saved raises there. An error writing is
    raised at the next :meth:`save` or at :meth:`wait`, which the ServerApp calls when the engine's
    run ends, before anything reads the run's files; until then the checkpoint before it is the
    one on disk, complete, as after a crash."""

    def __init__(self, background: bool = False) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, run_dir: Path, payload: dict, then: Callable[[], object] | None = None) -> None:
        self.wait()  # the one before is on disk (or its error raised): in order, one at a time
        data = _packed(payload)

        def write() -> None:
            _write(Path(run_dir), data)
            if then is not None:
                then()

        if not self.background:
            write()
            return

        def on_its_thread() -> None:
            try:
                write()
            except BaseException as err:  # noqa: BLE001 - raised by wait(), in the run's thread
                self._error = err

        # Not a daemon: the interpreter's exit waits for the write. Recorded before it starts: a signal
        # raising in this thread between the two must not leave a write that wait() does not join.
        self._thread = threading.Thread(target=on_its_thread, name="flmnist-checkpoint")
        try:
            self._thread.start()
        except RuntimeError:  # no new thread (the interpreter finalizing): the write is done here
            self._thread = None
            write()

    def wait(self) -> None:
        """Until the last checkpoint handed over is on disk; raises the error of one that failed."""
        thread, self._thread = self._thread, None
        if thread is not None and thread.ident is not None:  # (started)
            thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error


# ------------------------------------------------------------------ reading
def _refusal(err: Exception) -> str:
    """The one useful sentence of torch's weights-only refusal."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split(". Please use", 1)[0].split(" Check the documentation", 1)[0]
    return " ".join(text.split())[:200]


def load_checkpoint(path: Path) -> dict:
    """The payload saved by :func:`save_checkpoint` (numpy arrays back as numpy arrays).

    Refuses, with a ConfigError naming the file, anything else: files that are not flmnist
    checkpoints, corrupt files, and pickles naming code or classes (never run).
    """
    path = Path(path)
    prev = path.with_name(PREVIOUS)
    hint = f"; the checkpoint before it is {prev} ({resume_arg(prev)})" if path.name == CHECKPOINT and prev.is_file() else ""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise ConfigError(f"resume: cannot read checkpoint {path}, corrupt or not a checkpoint "
                              f"({_refusal(err)}){hint}") from err
        raise ConfigError(f"resume: refused to load {path}: it holds objects a flmnist checkpoint never holds "
                          f"({_refusal(err)}){hint}") from err
    except Exception as err:  # corrupt or truncated files fail in many ways
        raise ConfigError(f"resume: cannot read checkpoint {path}, corrupt or not a checkpoint "
                          f"({type(err).__name__}: {' '.join(str(err).split())[:200]}){hint}") from err
    if not isinstance(data, dict) or data.get("flmnist-checkpoint") != FORMAT or "payload" not in data:
        raise ConfigError(f"resume: {path} is not a flmnist checkpoint (format {FORMAT}){hint}")
    return _unpack(data["payload"])


def check_layout(payload: dict, path: Path) -> dict:
    """A run's checkpoint payload if its layout is this version's, else a ConfigError saying so."""
    found = payload.get("format") if isinstance(payload, dict) else None
    if found != PAYLOAD_FORMAT:
        raise ConfigError(f"resume: {path} holds a run checkpoint of layout {found!r}; this flmnist reads layout "
                          f"{PAYLOAD_FORMAT}. Resume it with the flmnist version that wrote it, or start a new run")
    return payload
