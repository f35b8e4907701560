"""Checkpoints: everything a run needs to continue after a crash, written atomically.

A checkpoint holds the global model, the strategy's state (momentum buffers, FedBuff's
buffer, the version counter), the round or server-update number, the metrics so far and
the random-generator states. It is written to ``checkpoint.pt.tmp`` and renamed, so a crash
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from flmnist.errors import ConfigError

CHECKPOINT = "checkpoint.pt"
# Attributes of Flower's and flmnist's strategies that change during a run.
STRATEGY_STATE = ("current_arrays", "momentum_vector", "m_t", "v_t", "virtual_time", "client_updates")


def _plain(value):
    """ArrayRecords become dicts of numpy arrays, so a checkpoint needs no Flower objects."""
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": {k: v.numpy() for k, v in value.items()}}
    return value


def _restore(value):
    if isinstance(value, dict) and "__arrayrecord__" in value:
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in value["__arrayrecord__"].items()})
    return value


def strategy_state(strategy) -> dict:
    state = {k: _plain(getattr(strategy, k)) for k in STRATEGY_STATE if hasattr(strategy, k)}
    if hasattr(strategy, "state_dict"):
        state["strategy"] = strategy.state_dict()
    return state


def load_strategy_state(strategy, state: dict) -> None:
    for key, value in state.items():
        if key == "strategy":
            strategy.load_state_dict(value)
        else:
            setattr(strategy, key, _restore(value))


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: Path, payload: dict) -> Path:
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def find_checkpoint(resume: str, output_dir: str) -> Path:
    """``resume`` is a checkpoint file, a run directory, or ``latest`` (newest under output_dir)."""
    if resume == "latest":
        found = sorted(Path(output_dir).expanduser().glob(f"**/{CHECKPOINT}"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(f"resume=latest: no {CHECKPOINT} under output_dir={Path(output_dir).resolve()}")
        return found[-1].resolve()
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise ConfigError(f"resume={resume}: no checkpoint at {path.resolve()} (expected a run directory "
                          f"holding {CHECKPOINT}, the file itself, or 'latest')")
    return path.resolve()


def load_checkpoint(path: Path) -> dict:
    try:
        # Our own file: it holds numpy arrays and generator states, not only tensors.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ConfigError(f"resume: cannot read checkpoint {path} ({err})") from err
