"""Checkpoints are read with ``weights_only=True`` and written so that a crash at any moment
leaves a complete one; ``resume=latest`` only considers flmnist run directories."""

from __future__ import annotations

import copy
import os
import pickle
import random
import resource
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from flmnist.config.compose import compose_config
from flmnist.core.errors import ConfigError
from flmnist.core.run_files import CHECKPOINT, PREVIOUS, find_checkpoint
from flmnist.observers.checkpoint import (
    CheckpointWriter,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

CODE_RAN: list[str] = []


def _record(text: str) -> str:
    CODE_RAN.append(text)
    return text


class Exploit:
    """Unpickling this object would call ``_record``: the code a malicious checkpoint runs."""

    def __reduce__(self):
        return _record, ("unpickling ran code named by the file",)


def payload(step: int = 3) -> dict:
    rng = np.random.default_rng(step)
    return {
        "kind": "sync",
        "round": step,
        "arrays": {"conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
                   "fc.bias": rng.normal(size=10).astype(np.float64),
                   "steps": np.arange(5, dtype=np.int64), "counts": np.arange(3, dtype=np.uint32),
                   "scalar": np.array(2.5, dtype=np.float32)},
        "engine": {"buffer": None, "momentum": [np.ones((2, 2), np.float32)], "version": step,
                   "staleness": (0, 1, 1), "lr": np.float64(0.5)},
        "recorder": {"rows": {0: {"round": 0, "test_accuracy": 0.1}, step: {"round": step, "nodes": ["node 0"]}}},
        "rng": rng_state(),
    }


def assert_same(a, b) -> None:
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_round_trip_gives_back_the_numpy_arrays_and_rng_states(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    saved = payload()
    path = save_checkpoint(tmp_path, saved)
    assert path == tmp_path / CHECKPOINT
    torch.load(path, weights_only=True)  # plain tensors and values only: no allow-listed globals needed
    loaded = load_checkpoint(path)
    assert_same(saved, loaded)
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(loaded["rng"])
    assert (random.random(), torch.rand(1).item()) == (draws[0], draws[2])
    # NumPy's global generator, where Flower's DP wrappers draw their noise, is neither saved nor
    # restored: the file cannot regenerate the noise, and a resume draws fresh noise
    assert "numpy" not in loaded["rng"] and np.random.rand() != draws[1]


def test_a_pickled_object_is_refused_and_never_run(tmp_path):
    forged = tmp_path / CHECKPOINT
    torch.save({"flmnist-checkpoint": 1, "payload": {"round": 1, "arrays": Exploit()}}, forged)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"round": 1, "arrays": Exploit()}))
    for path in (forged, plain):
        with pytest.raises(ConfigError, match=f"refused to load {path}: it holds objects"):
            load_checkpoint(path)
    assert CODE_RAN == []


def test_corrupt_and_foreign_files_name_the_file(tmp_path):
    good = save_checkpoint(tmp_path, payload())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ConfigError, match=f"cannot read checkpoint {truncated}, corrupt"):
        load_checkpoint(truncated)
    state_dict = tmp_path / "model.pt"
    torch.save({"fc.bias": torch.zeros(10)}, state_dict)  # loadable, but not a checkpoint
    with pytest.raises(ConfigError, match=f"{state_dict} is not a flmnist checkpoint"):
        load_checkpoint(state_dict)


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, payload(1))
    with pytest.raises(TypeError, match=r"payload\['arrays'\]: a .*Exploit cannot be saved"):
        save_checkpoint(tmp_path, {"round": 2, "arrays": Exploit()})  # refused before any write
    # The disk fills up while the new checkpoint is written (a file size limit: the write fails).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises((OSError, RuntimeError)):
            save_checkpoint(tmp_path, {"round": 2, "arrays": {"w": np.ones(1_000_000, np.float32)}})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]
    assert_same(load_checkpoint(tmp_path / CHECKPOINT), payload(1))


KILLED_MIDWAY = """
import resource, signal, sys
import numpy as np
from flmnist.observers.checkpoint import save_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)   # exceeding the file size limit kills the process
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
save_checkpoint(sys.argv[1], {"round": 2, "arrays": {"w": np.ones(1_000_000, np.float32)}})
"""


def test_a_process_killed_while_writing_leaves_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, payload(1))
    proc = subprocess.run([sys.executable, "-c", KILLED_MIDWAY, str(tmp_path)], check=False, capture_output=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGXFSZ, proc.stderr.decode()[-2000:]
    assert (tmp_path / (CHECKPOINT + ".tmp")).is_file(), "the new checkpoint was being written"
    assert_same(load_checkpoint(tmp_path / CHECKPOINT), payload(1))
    # The next save completes; the one before is kept beside it.
    save_checkpoint(tmp_path, payload(3))
    assert_same(load_checkpoint(tmp_path / CHECKPOINT), payload(3))
    assert_same(load_checkpoint(tmp_path / PREVIOUS), payload(1))
    assert not (tmp_path / (CHECKPOINT + ".tmp")).exists()


def test_the_background_writer_saves_a_copy_in_order_off_the_runs_thread(tmp_path, monkeypatch):
    """CheckpointWriter(background=True), as a run's: the payload is packed when handed over (the
    run changes its arrays and tensors at once, while the write has not begun), written on a thread
    of its own with ``then`` after it, and on disk once wait() returns; the one before is kept as
    checkpoint.prev.pt."""
    from flmnist.observers import checkpoint

    go = threading.Event()
    write = checkpoint._write
    monkeypatch.setattr(checkpoint, "_write", lambda *args: (go.wait(10), write(*args))[1])
    writer = CheckpointWriter(background=True)
    seen = []
    first, second = payload(1), payload(2)
    first["engine"]["tensor"] = torch.ones(3)
    expected = copy.deepcopy(first)
    writer.save(tmp_path, first, then=lambda: seen.append((threading.current_thread().name,
                                                            load_checkpoint(tmp_path / CHECKPOINT)["round"])))
    first["arrays"]["conv.weight"][:] = -1  # the run goes on with its objects before the write begins
    first["engine"]["tensor"].add_(1)
    first["round"] = 99
    go.set()
    writer.save(tmp_path, second, then=lambda: seen.append((threading.current_thread().name, 2)))
    writer.wait()
    assert seen == [("flmnist-checkpoint", 1), ("flmnist-checkpoint", 2)]
    assert_same(load_checkpoint(tmp_path / PREVIOUS), expected)
    assert_same(load_checkpoint(tmp_path / CHECKPOINT), second)


def test_the_background_writer_raises_a_write_error_at_wait_and_an_unsavable_payload_at_once(tmp_path):
    writer = CheckpointWriter(background=True)
    with pytest.raises(TypeError, match=r"payload\['arrays'\]: a .*Exploit cannot be saved"):
        writer.save(tmp_path, {"round": 2, "arrays": Exploit()})  # in the caller, before any write
    missing = tmp_path / "gone"
    writer.save(missing, payload(1))  # handed over: the error comes from the writer's thread
    with pytest.raises(FileNotFoundError, match="gone"):
        writer.wait()
    writer.wait()  # raised once
    writer.save(missing, payload(1))
    with pytest.raises(FileNotFoundError):
        writer.save(tmp_path, payload(2))  # the next save raises the error before it, and saves nothing
    assert not (tmp_path / CHECKPOINT).exists()
    writer.save(tmp_path, payload(3), then=lambda: (tmp_path / "then").write_text("3"))
    writer.wait()
    assert_same(load_checkpoint(tmp_path / CHECKPOINT), payload(3))
    assert (tmp_path / "then").read_text() == "3"


def test_the_default_writer_saves_before_save_returns(tmp_path):
    CheckpointWriter().save(tmp_path, payload(1), then=lambda: (tmp_path / "then").write_text("1"))
    assert_same(load_checkpoint(tmp_path / CHECKPOINT), payload(1))
    assert (tmp_path / "then").read_text() == "1"


def test_resume_latest_only_considers_flmnist_run_directories(tmp_path):
    run = tmp_path / "2026-11-22" / "10-00-00_default"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(compose_config(["num_nodes=3"])))
    save_checkpoint(run, payload(2))
    time.sleep(0.01)
    foreign = tmp_path / "other-project"  # a newer checkpoint.pt, from someone else
    foreign.mkdir()
    (foreign / "config.yaml").write_text("model: resnet50\nepochs: 90\n")
    torch.save({"flmnist-checkpoint": 1, "payload": {"round": 1, "arrays": Exploit()}}, foreign / CHECKPOINT)
    bare = tmp_path / "bare"
    bare.mkdir()
    save_checkpoint(bare, payload(5))  # a checkpoint without its run's config.yaml
    os.utime(run / CHECKPOINT, (1, 1))  # the flmnist run is the oldest of the three
    assert find_checkpoint("latest", str(tmp_path)) == (run / CHECKPOINT).resolve()
    for resume, directory in ((foreign, foreign), (bare / CHECKPOINT, bare)):
        with pytest.raises(ConfigError, match=f"{directory} is not a flmnist run directory"):
            find_checkpoint(str(resume), str(tmp_path))
    assert CODE_RAN == []
    # another file of the run (tab completion gives config.yaml or model.pt): refused before anything
    # reads or rewrites the run (the resume had rewritten config.yaml, moved summary.json aside, and
    # only the ServerApp then refused the file, after Flower's start)
    for name in ("config.yaml", "model.pt", "summary.json"):
        (run / name).touch()
        with pytest.raises(ConfigError, match=rf"resume={run / name}: {name} is not a checkpoint; give the run "
                                              rf"directory, its {CHECKPOINT} \(or {PREVIOUS}, the one before\)"):
            find_checkpoint(str(run / name), str(tmp_path))
    assert find_checkpoint(str(run / CHECKPOINT), str(tmp_path)) == (run / CHECKPOINT).resolve()


def test_a_checkpoint_of_another_layout_is_refused_on_resume_saying_so(tmp_path):
    """The run payload's "format" is checked when a run is resumed: an older layout is one clear
    error naming the file and both layouts, not a KeyError deep in an engine."""
    from flmnist.observers.checkpoint import PAYLOAD_FORMAT
    from flmnist.runtime.run_setup import resume_config

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(compose_config(["num_nodes=3"])))
    save_checkpoint(run, {**payload(2), "format": PAYLOAD_FORMAT - 1})
    cfg = compose_config([f"resume={run}"])
    with pytest.raises(ConfigError, match=rf"{run / CHECKPOINT} holds a run checkpoint of layout "
                                          rf"{PAYLOAD_FORMAT - 1}; this flmnist reads layout {PAYLOAD_FORMAT}"):
        resume_config(cfg)
    from flmnist.ml.models import LeNet

    lenet = {k: v.numpy() for k, v in LeNet().state_dict().items()}  # the config's model
    save_checkpoint(run, {**payload(2), "format": PAYLOAD_FORMAT, "arrays": lenet})
    saved, checkpoint = resume_config(cfg)
    assert checkpoint["round"] == 2 and saved.run_dir == str(run)


def test_a_run_resumed_on_another_models_checkpoint_is_refused_before_anything_is_written(tmp_path):
    """A LeNet's arrays in a logreg run's checkpoint: the nodes failed to load them, after the
    ServerApp had started the rounds; now a ConfigError naming both files, before the run starts."""
    from flmnist.ml.models import LeNet, LogReg
    from flmnist.runtime.run_setup import check_arrays

    lenet = {k: v.numpy() for k, v in LeNet().state_dict().items()}
    with pytest.raises(ConfigError, match=r"checkpoint.pt holds another model than .*config.yaml names \(LogReg; "
                                          r"differing: conv1.bias, conv1.weight, conv2.bias, conv2.weight \.\.\.\)"):
        check_arrays(lenet, LogReg(), tmp_path / "checkpoint.pt")
    wider = {k: v.numpy() for k, v in LogReg().state_dict().items()}
    wider["linear.weight" if "linear.weight" in wider else next(iter(wider))] = np.zeros((11, 784), np.float32)
    with pytest.raises(ConfigError, match="differing: "):
        check_arrays(wider, LogReg(), tmp_path / "checkpoint.pt")
    check_arrays({k: v.numpy() for k, v in LogReg().state_dict().items()}, LogReg(), tmp_path / "checkpoint.pt")


def test_an_export_that_cannot_load_the_model_is_logged_not_raised(tmp_path):
    """export_model runs in the ServerApp's finally: its load raised there and hid the run's own error."""
    from flmnist.ml.export import export_model
    from flmnist.ml.models import LeNet, LogReg

    torch.save(LeNet().state_dict(), tmp_path / "model.pt")
    assert export_model(LogReg(), tmp_path) == []
    assert not (tmp_path / "model.onnx").exists()


def test_a_config_yaml_edited_by_hand_is_refused_on_resume_naming_the_setting(tmp_path):
    """num_nodes 2 -> 3 in a run's config.yaml resumed silently on another split (a review). The
    checkpoint holds the settings that make the run (not its length, budget or where it runs)."""
    from flmnist.config.resume import check_fingerprint, fingerprint

    cfg = compose_config(["num_nodes=2", "model=logreg"])
    recorded = fingerprint(cfg)
    assert "num_nodes" in recorded and "client.lr" in recorded
    assert not {"num_rounds", "privacy.max_epsilon", "data.root", "resume", "run_dir"} & set(recorded)
    extended = compose_config(["num_nodes=2", "model=logreg", "num_rounds=9", "simulation.backend=inprocess"])
    check_fingerprint(extended, recorded, tmp_path / "config.yaml")  # what a resume may change
    check_fingerprint(compose_config(["num_nodes=3"]), None, tmp_path / "config.yaml")  # an older checkpoint
    edited = compose_config(["num_nodes=3", "model=logreg"])
    with pytest.raises(ConfigError, match=rf"resume: {tmp_path}/config.yaml is not the config its checkpoint was "
                                          r"saved under: num_nodes=3 \(the checkpoint's: 2\), .*Put it back; a changed run is a new run"):
        check_fingerprint(edited, recorded, tmp_path / "config.yaml")
    loaded = OmegaConf.load(_written(tmp_path, cfg))
    assert fingerprint(loaded) == recorded  # what is written is what is read back


def _written(folder, cfg):
    path = folder / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg))
    return path
