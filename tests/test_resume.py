"""Checkpoint and resume through real `flwr run`s: a run killed after round k and resumed
ends with the same model and metrics as an uninterrupted run with the same seed; the
exported TorchScript and ONNX models predict like the state dict."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from flmnist.core.constants import BACKEND_ENV
from flmnist.core.errors import ConfigError
from flmnist.core.run_files import find_checkpoint
from flmnist.launch.flwr_local import (
    flwr_env,
    flwr_run_command,
    run_flwr,
    stop_flwr_home,
    write_run_config,
)
from flmnist.ml.data import load_mnist
from flmnist.ml.models import LeNet
from flmnist.observers.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # real Flower runs

REPO = Path(__file__).resolve().parents[1]
# ClientApps in Flower's simulation process, as `flmnist` runs these on 2 cores (simulation=auto):
# Ray's start would add about 17 s to each of the runs here. Ray runs in tests/test_integration.py.
BACKEND = "inprocess"
# FedAvgM: the server momentum buffer must survive the resume too.
SETTINGS = ["strategy=fedavgm", "strategy.server_momentum=0.5", "num_rounds=4", "client.local_steps=15",
            "data.holdout_fraction=0.02"]


def comparable(run_dir: Path) -> list[dict]:
    rows = json.loads((run_dir / "metrics.json").read_text())
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def full_killed_resumed(tmp: Path, settings: list[str], kill_at: int, num_nodes: int = 2) -> dict:
    """An uninterrupted run, then the same run killed (SuperLink, SuperNodes and all) once
    step ``kill_at`` and its checkpoint are on disk, then resumed to the end."""
    full = tmp / "full"
    # One run after the other: side by side, two runs' PyTorch threads on 2 cores take twice as long.
    run_flwr(REPO, [*settings, f"run_dir={full}"], num_nodes, tempfile.mkdtemp(prefix="flmnist-test-home-"),
             log_path=tmp / "full.log", timeout=1500, backend=BACKEND)
    killed = tmp / "killed"
    home = Path(tempfile.mkdtemp(prefix="flmnist-test-home-"))
    cfg = write_run_config(tmp / "killed.toml", [*settings, f"run_dir={killed}"])
    proc = subprocess.Popen(flwr_run_command(REPO, cfg, num_nodes), env={**flwr_env(home), BACKEND_ENV: BACKEND},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_after = None
    try:
        deadline = time.monotonic() + 900  # generous: a loaded 2-core machine runs several times slower
        while time.monotonic() < deadline and killed_after is None:
            time.sleep(0.2)
            try:
                if json.loads((killed / "metrics.json").read_text())[-1]["round"] < kill_at:
                    continue
                # the checkpoint follows the metrics: read it only once they are far enough
                saved = load_checkpoint(killed / "checkpoint.pt")["round"]
            except (OSError, ValueError, ConfigError):
                continue
            if saved >= kill_at:
                killed_after = saved
    finally:
        # SIGKILL at once, a crash or a power cut: with SIGTERM, Flower's in-process simulation
        # winds down for seconds while the ServerApp finishes its round and writes a summary
        stop_flwr_home(home, grace=0)
        proc.kill()
        proc.wait()
    assert (full / "summary.json").is_file(), (tmp / "full.log").read_text()[-3000:]
    summary_before = (killed / "summary.json").is_file()
    rows_before = comparable(killed) if killed_after is not None else []
    run_flwr(REPO, [f"resume={killed}"], num_nodes, tempfile.mkdtemp(prefix="flmnist-test-home-"),
             log_path=tmp / "resumed.log", timeout=1500, backend=BACKEND)
    return {"full": full, "killed": killed, "killed_after": killed_after, "summary_before": summary_before,
            "rows_before": rows_before, "log": (tmp / "resumed.log").read_text()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_root):
    return full_killed_resumed(tmp_path_factory.mktemp("resume"), SETTINGS, kill_at=2)


def test_the_run_was_really_killed_midway(runs):
    assert runs["killed_after"] is not None and runs["killed_after"] < 4
    assert not runs["summary_before"], "the killed run must not have finished"
    assert "Resuming" in runs["log"]


def test_resumed_run_equals_the_uninterrupted_run(runs):
    full, resumed = runs["full"], runs["killed"]
    assert json.loads((resumed / "summary.json").read_text())["status"] == "finished"
    assert [r["round"] for r in comparable(resumed)] == [0, 1, 2, 3, 4]  # earlier rows kept, later added
    assert comparable(resumed) == comparable(full)
    a = torch.load(full / "model.pt", weights_only=True)
    b = torch.load(resumed / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


# FedBuff on a simulated fleet, checkpointed at every evaluation (every 2 server updates).
# (Attribution off: its resume is the sync test's; here it would only add a probe pass per update.)
ASYNC_SETTINGS = ["num_nodes=3", "strategy=fedbuff", "strategy.buffer_size=3", "fleet=homogeneous", "client.local_steps=30",
                  "client.batch_size=128", "eval.attribution=false",
                  "async_loop.max_server_updates=8", "async_loop.eval_every=2", "checkpoint_every=2",
                  "data.holdout_fraction=0.02"]
LAST = 8
KILL_AT = 4


@pytest.fixture(scope="module")
def async_runs(tmp_path_factory, mnist_root):
    return full_killed_resumed(tmp_path_factory.mktemp("resume-async"), ASYNC_SETTINGS, kill_at=KILL_AT, num_nodes=3)


def test_resumed_async_run_ends_within_0_3_points_of_the_uninterrupted_run(async_runs):
    """Not bit-identical, by design: the updates in flight when the run was killed are lost, and
    after the resume every node starts fresh work on the checkpointed model, so later updates
    are computed from other model versions than in the uninterrupted run."""
    full, resumed = async_runs["full"], async_runs["killed"]
    k = async_runs["killed_after"]
    assert k is not None and KILL_AT <= k < LAST, f"the async run must be killed between server updates {KILL_AT} and {LAST}"
    assert not async_runs["summary_before"]
    assert json.loads((resumed / "summary.json").read_text())["status"] == "finished"
    rows = comparable(resumed)
    # rows up to the checkpoint are kept as they were, later rows continue the version count
    kept = [r for r in async_runs["rows_before"] if r["round"] <= k]
    assert rows[:len(kept)] == kept
    assert [r["round"] for r in rows] == list(range(LAST + 1))   # a row per server update
    assert rows[: k + 1] == comparable(full)[: k + 1]   # identical up to the checkpoint
    assert json.loads((resumed / "async_stats.json").read_text())["server_updates"] == LAST
    a, b = comparable(full)[-1]["test_accuracy"], rows[-1]["test_accuracy"]
    assert a > 0.9 and abs(a - b) <= 0.003, f"uninterrupted {a:.4f}, resumed {b:.4f}"


def test_exports_predict_like_the_state_dict(runs, mnist_root):
    """TorchScript and ONNX loaded without flmnist (ONNX through onnx's reference evaluator,
    any runtime would do) give the state dict's predictions on 64 test images."""
    from onnx.reference import ReferenceEvaluator

    run_dir = runs["full"]
    model = LeNet()
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    model.eval()
    x, _ = load_mnist(str(mnist_root), False)
    x = x[:64]
    scripted = torch.jit.load(str(run_dir / "model_scripted.pt"))
    onnx_logits = ReferenceEvaluator(str(run_dir / "model.onnx")).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(scripted(x).argmax(1), expected.argmax(1))
        torch.testing.assert_close(scripted(x), expected)
    assert onnx_logits.shape == (64, 10)
    assert torch.equal(torch.from_numpy(onnx_logits).argmax(1), expected.argmax(1))
    torch.testing.assert_close(torch.from_numpy(onnx_logits), expected, rtol=1e-4, atol=1e-4)


def test_resume_errors_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match=f"no checkpoint at {tmp_path}/checkpoint.pt"):
        find_checkpoint(str(tmp_path), "outputs")
    with pytest.raises(ConfigError, match="resume=latest: no checkpoint.pt under"):
        find_checkpoint("latest", str(tmp_path))


def test_a_finished_run_is_extended_by_the_readmes_command_and_other_overrides_are_refused(tmp_path, mnist_root):
    """`flmnist resume=DIR num_rounds=N` (the README's line) continues a finished 1-round run to 2
    rounds in the same directory; `strategy=fedprox` beside resume= is one line, exit 2, nothing run."""
    import os
    import sys

    flmnist = [str(Path(sys.executable).parent / "flmnist")]
    env = dict(os.environ, FLMNIST_DATA_DIR=str(mnist_root))

    def run(*args):
        return subprocess.run([*flmnist, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600, check=False)

    first = run("model=logreg", "num_rounds=1")
    assert first.returncode == 0, first.stderr[-2000:]
    [run_dir] = (tmp_path / "outputs").glob("*/*")
    # Output to a pipe and the log file carry no colour codes; the run's last line is there.
    assert "\x1b[" not in first.stdout + first.stderr and "\x1b[" not in (run_dir / "flwr_run.log").read_text()
    assert "Run finished: final test accuracy" in first.stdout
    finished = run(f"resume={run_dir}")
    assert finished.returncode == 2 and (f"resume: {run_dir} finished all its 1 rounds; to train on, extend it: "
                                         f"flmnist resume={run_dir} num_rounds=2") in finished.stderr
    refused = run(f"resume={run_dir}", "strategy=fedprox")
    assert refused.returncode == 2 and "resume: strategy=fedprox would change the run being resumed" in refused.stderr
    extended = run(f"resume={run_dir}", "num_rounds=2")
    assert extended.returncode == 0, extended.stderr[-2000:]
    assert f"flmnist: extending {run_dir}: num_rounds=2" in extended.stdout
    assert "[round 2/2]" in extended.stdout and "[ROUND" not in extended.stdout  # one round count, flmnist's
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    assert [r["round"] for r in json.loads((run_dir / "metrics.json").read_text())] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "outputs").glob("*/*")) == [run_dir.name]  # no new directory
    # A resume while the run's directory is held by another command (the run, or a resume of it, still
    # going: resume=latest picks it, as it checkpoints every round) is refused before it writes anything.
    import fcntl

    held = os.open(run_dir, os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    kept = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "summary.json")}
    try:
        busy = run(f"resume={run_dir}", "num_rounds=3")
    finally:
        os.close(held)
    assert busy.returncode == 2 and busy.stderr.strip() == (
        f"flmnist: error: resume: {run_dir} is in use by another flmnist command: the run (or a resume of it) is "
        "still going; wait for it to end, or stop it, then resume it"), busy.stderr[-2000:]
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept
    # A checkpoint of another model (a LeNet's arrays in this logreg run): the nodes failed to load it,
    # config.yaml said 3 rounds after and model.pt held the LeNet; now one line, and the run as it was.
    from flmnist.observers.checkpoint import save_checkpoint

    payload = load_checkpoint(run_dir / "checkpoint.pt")
    payload["arrays"] = {k: v.numpy() for k, v in LeNet().state_dict().items()}
    save_checkpoint(run_dir, payload)
    kept = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "model.pt", "metrics.json")}
    other = run(f"resume={run_dir}", "num_rounds=3")
    assert other.returncode == 2, other.stderr[-2000:]
    assert other.stderr.strip().startswith(f"flmnist: error: resume: {run_dir}/checkpoint.pt holds another model "
                                           f"than {run_dir}/config.yaml names (LogReg; differing: "), other.stderr
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept


def test_plain_flwr_run_extends_a_run_with_resume_and_a_length_and_refuses_a_change(tmp_path, mnist_root):
    """docs/running.md's plain `flwr run` with resume=DIR num_rounds=N: extended as the flmnist
    command does (num_rounds was ignored: the resumed run stopped at its old length); a change of
    the run is refused, its config.yaml untouched."""
    import os

    env = {**os.environ, "FLMNIST_DATA_DIR": str(mnist_root)}
    run_dir = tmp_path / "run"

    def direct(*overrides: str, log: str) -> str:
        run_flwr(REPO, list(overrides), 2, tempfile.mkdtemp(prefix="flmnist-test-home-"), log_path=tmp_path / log,
                 env=env, timeout=600, backend="inprocess")
        return (tmp_path / log).read_text()

    direct("model=logreg", "num_rounds=1", f"run_dir={run_dir}", log="first.log")
    assert json.loads((run_dir / "summary.json").read_text())["rounds_completed"] == 1
    config = (run_dir / "config.yaml").read_text()
    refused = direct(f"resume={run_dir}", "strategy=fedprox", log="refused.log")
    assert "resume: strategy=fedprox would change the run being resumed" in refused
    assert (run_dir / "config.yaml").read_text() == config
    extended = direct(f"resume={run_dir}", "num_rounds=2", log="extended.log")
    assert "flmnist: extending the run: num_rounds=2" in extended, extended[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    assert [r["round"] for r in json.loads((run_dir / "metrics.json").read_text())] == [0, 1, 2]
