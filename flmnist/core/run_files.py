"""The run directory's files that more than one layer reads: finding a run's checkpoint (the
``flmnist`` command does, without PyTorch), reading its config and writing a text file atomically."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
from logging import INFO, WARNING
from pathlib import Path

import yaml
from flwr.common.logger import log

from flmnist.core.atomic import replaced
from flmnist.core.errors import ConfigError

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
CHECKPOINT_INFO = "checkpoint.json"  # the checkpoint's kind and step, readable without PyTorch


def quoted(path: str | Path) -> str:
    """A path as a quoted Hydra override value (paths may hold '=', ',' or spaces)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def home_expanded(overrides: list[str]) -> list[str]:
    """``output_dir='~/runs'`` (a ``~`` the shell left, inside quotes) with the home folder expanded:
    Hydra takes ``~`` as a folder's name, so the run went to ``./~/runs`` while flmnist's checks and
    ``resume=latest`` looked in ``$HOME/runs``."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        bare = value.strip("'\"")  # (a sweep's list of folders, a,b: left to Hydra as given)
        home = key.lstrip("+") == "output_dir" and sep and bare.startswith("~") and "," not in bare
        out.append(f"{key}={quoted(Path(bare).expanduser())}" if home else item)
    return out


def resume_arg(path: str | Path) -> str:
    """``resume=PATH`` as a user types it in a shell. A path Hydra cannot take bare (a sweep job's
    directory holds '=' and ',') is quoted for Hydra, and that for the shell."""
    if re.fullmatch(r"[\w./:@+-]+", str(path)):
        return f"resume={path}"
    arg = f"resume={quoted(path)}"
    return f'"{arg}"' if not re.search(r'["$`\\!]', arg) else shlex.quote(arg)


def atomic_write(path: Path, text: str, durable: bool = False) -> None:
    """Write then rename (:func:`replaced`). ``durable``: synced to disk before and after the
    rename (the run's ``config.yaml`` and ``checkpoint.json``, which a resume needs: after a power
    loss the rename alone may leave an empty file)."""
    with replaced(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


PREVIOUS_SUMMARY = "summary.prev.json"


class ConfigBackup:
    """A resumed run's ``config.yaml`` as it was before the resume extended it, put back if the
    run then fails before its first step: a refused resume leaves the run as it was (the next
    resume saw it extended). The flmnist command and a plain ``flwr run`` (the ServerApp) each
    extend it, and keep a backup."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint, self.path = checkpoint, checkpoint.parent / "config.yaml"
        self.metrics = checkpoint.parent / "metrics.json"
        self.text, self.stamp, self.metrics_stamp = self.path.read_text(), file_stamp(checkpoint), file_stamp(self.metrics)
        self.step = _step(checkpoint)
        self.summary = checkpoint.parent / "summary.json"
        self.retired = False  # whether this extension moved the summary aside (:meth:`retire_summary`)

    def retire_summary(self) -> None:
        """The extension is written: the run's ``summary.json``, of the run before, moves to
        ``summary.prev.json`` until the run writes its own (put back by :meth:`put_back_unless_stepped`).
        Left in place, a crash before then (SIGKILL, power loss) left it saying "finished" on limits
        the run no longer has, and the next resume's checks refused on it ("finished on its
        time_budget=...")."""
        if self.summary.is_file():
            os.replace(self.summary, self.summary.with_name(PREVIOUS_SUMMARY))
            self.retired = True

    def stepped(self) -> bool:
        """Whether the run trained a step since: its checkpoint changed, or ``metrics.json`` was
        written with a row past the checkpoint's step (an asynchronous run checkpoints at its
        evaluation points, ``checkpoint_every`` may skip rounds: steps come between checkpoints)."""
        if file_stamp(self.checkpoint) != self.stamp:
            return True
        if self.step is None or file_stamp(self.metrics) == self.metrics_stamp:
            return False
        try:  # (a row without wall_time is a step that started and did not end)
            return max(int(row["round"]) for row in json.loads(self.metrics.read_text()) if "wall_time" in row) > self.step
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def put_back_unless_stepped(self) -> None:
        """The config as it was, and the summary this extension moved aside (over the failed
        attempt's: the run is as it was)."""
        if self.stepped():
            return
        try:
            atomic_write(self.path, self.text, durable=True)
            if self.retired:
                os.replace(self.summary.with_name(PREVIOUS_SUMMARY), self.summary)
        except OSError as err:  # (a full disk: the failure that led here is the one to report, not this)
            log(WARNING, "Could not put %s back as it was before the extension (%s); the run resumes with the "
                "extended one", self.path, err)


def file_stamp(path: Path) -> tuple[int, int] | None:
    """A file's identity (inode, modification time): a rewritten file (atomic_write) has another;
    None if there is none."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _step(checkpoint: Path) -> int | None:
    """The step of ``checkpoint.pt`` (``checkpoint.json``); None for another file or unreadable."""
    if checkpoint.name != CHECKPOINT:
        return None
    try:
        return int(json.loads((checkpoint.parent / CHECKPOINT_INFO).read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_config(directory: Path) -> dict | None:
    """A run directory's ``config.yaml`` as plain data, if it is a flmnist config (else None)."""
    try:
        config = yaml.safe_load((Path(directory) / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) and {"strategy", "num_nodes"} <= set(config) else None


def is_run_dir(directory: Path) -> bool:
    """Whether ``directory`` is a flmnist run directory: its ``config.yaml`` is a flmnist config."""
    return run_config(directory) is not None


def find_checkpoint(resume: str, output_dir: str) -> Path:
    """``resume`` is a checkpoint file, a run directory, or ``latest``: the newest checkpoint of
    a flmnist run directory under ``output_dir`` (other directories are skipped)."""
    if resume == "latest":
        root = Path(output_dir).expanduser().resolve()
        found = sorted(root.glob(f"**/{CHECKPOINT}") if root.is_dir() else [],
                       key=lambda p: p.stat().st_mtime, reverse=True)
        runs = [p for p in found if p.is_file() and is_run_dir(p.parent)]
        if not runs:
            skipped = f"; {len(found)} outside flmnist run directories skipped" if found else ""
            raise ConfigError(f"resume=latest: no {CHECKPOINT} under output_dir={root} in a flmnist run "
                              f"directory (one with a flmnist config.yaml){skipped}")
        log(INFO, "resume=latest: %s (the newest of %d flmnist run(s) with a checkpoint under %s)",
            runs[0].parent, len(runs), root)
        return runs[0]
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"resume={resume}: no checkpoint at {path.resolve()} (expected a run directory "
                          f"holding {CHECKPOINT}, the file itself, or 'latest')")
    if path.name not in (CHECKPOINT, PREVIOUS):  # (config.yaml given: the resume rewrote it, then refused it)
        raise ConfigError(f"resume={resume}: {path.name} is not a checkpoint; give the run directory, its "
                          f"{CHECKPOINT} (or {PREVIOUS}, the one before), or 'latest'")
    if not is_run_dir(path.parent):
        raise ConfigError(f"resume={resume}: {path.parent.resolve()} is not a flmnist run directory "
                          "(no config.yaml with strategy and num_nodes beside the checkpoint)")
    return path.resolve()


def absolute_overrides(overrides: list[str], run_dir: Path) -> list[str]:
    """The job's overrides with relative paths made absolute and the run directory pinned."""
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key in ("data.root", "output_dir") and value not in ("", "null"):
            item = f"{key}={quoted(Path(value.strip(chr(39) + chr(34))).expanduser().resolve())}"
        if key != "run_dir":
            out.append(item)
    return out + [f"run_dir={quoted(run_dir)}"]


def hold_run_dir(run_dir: Path, resume: bool, what: str = "run directory") -> int:
    """Hold ``run_dir`` for this command: an exclusive lock on the directory (released when the
    command ends, kill -9 too); returns the descriptor to close at the end. ConfigError if another
    command holds it: a resume of a run still going, or a run started in the same second with the
    same name (Hydra names the directory to the second), would write the same files at once."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if not isinstance(err, BlockingIOError):  # a file system without locks: run unguarded, as before
            log(WARNING, "Cannot lock %s (%s): another command could write in it at the same time", run_dir, err)
            return fd
        os.close(fd)
        if resume:
            raise ConfigError(f"resume: {run_dir} is in use by another flmnist command: the run (or a resume "
                              "of it) is still going; wait for it to end, or stop it, then resume it") from None
        raise ConfigError(f"the {what} {run_dir} is in use by another flmnist command (one started in the same "
                          "second with the same name gets the same directory): start this one again, or give it a "
                          "name= of its own") from None
    return fd
