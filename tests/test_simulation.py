"""The simulation settings' path to Flower: the backend choice, Ray resources per ClientApp on the
`flwr run` command line, the GPU default, and joining an existing Ray cluster (a head started with `ray start` on
loopback, as a user's cluster would be), with an MLflow tracker on the server side."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from flmnist.config.compose import compose_config
from flmnist.config.help import help_text
from flmnist.core.errors import ConfigError
from flmnist.launch.backend import client_gpus, gpu_device_nodes, simulation_backend
from flmnist.launch.flwr_local import flwr_run_command, free_port, stop_env

BIN = Path(sys.executable).parent


def test_client_resources_reach_the_flwr_run_command():
    cmd = flwr_run_command(".", "rc.toml", 3, client_cpus=1, client_gpus=0.5)
    assert cmd[cmd.index("--federation-config") + 1] == \
        "num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=0.5"
    plain = flwr_run_command(".", "rc.toml", 3)
    assert plain[plain.index("--federation-config") + 1] == "num-supernodes=3"


def test_gpu_share_defaults_to_the_gpu_when_there_is_one(monkeypatch):
    assert client_gpus(compose_config([])) == (0.5 if torch.cuda.is_available() else 0.0)  # this machine
    # the shortcut that spares the command PyTorch's import holds: no device nodes, no GPU
    assert gpu_device_nodes() or not torch.cuda.is_available()
    assert client_gpus(compose_config(["simulation.client_gpus=0.25"])) == 0.25
    # each branch of auto, whatever this machine has
    from flmnist.launch import backend

    auto = compose_config([])
    for nodes, cuda, share in [(True, True, 0.5), (True, False, 0.0)]:
        monkeypatch.setattr(backend, "gpu_device_nodes", lambda nodes=nodes: nodes)
        monkeypatch.setattr(backend, "torch_sees_cuda", lambda cuda=cuda: cuda)
        assert backend.client_gpus(auto) == share, (nodes, cuda)

    def not_asked() -> bool:
        raise AssertionError("PyTorch asked although the machine shows no GPU device")

    monkeypatch.setattr(backend, "gpu_device_nodes", lambda: False)
    monkeypatch.setattr(backend, "torch_sees_cuda", not_asked)
    assert backend.client_gpus(auto) == 0.0


def test_auto_backend_runs_clientapps_in_process_only_where_one_fills_the_machine():
    auto = compose_config([])
    assert simulation_backend(auto, 0.0, cores=2) == "inprocess"  # 2 cores / 2 per ClientApp: one at a time
    assert simulation_backend(auto, 0.0, cores=3) == "inprocess"
    assert simulation_backend(auto, 0.0, cores=4) == "ray"  # two at once
    assert simulation_backend(auto, 0.5, cores=2) == "ray"  # GPU shares are Ray's
    assert simulation_backend(compose_config(["simulation.client_cpus=1"]), 0.0, cores=2) == "ray"
    assert simulation_backend(compose_config(["simulation.ray_address=127.0.0.1:6379"]), 0.0, cores=2) == "ray"
    assert simulation_backend(compose_config(["simulation.backend=ray"]), 0.0, cores=2) == "ray"
    assert simulation_backend(compose_config(["simulation.backend=inprocess"]), 0.5, cores=64) == "inprocess"


@pytest.mark.parametrize("option, backend, gpus, ray_address", [
    ("auto", "auto", "auto", None), ("inprocess", "inprocess", 0, None), ("ray", "ray", "auto", None),
    ("gpu", "ray", 0.5, None), ("ray_cluster", "ray", "auto", "10.0.0.5:6379"),
])
def test_the_simulation_group_picks_where_clientapps_run_in_one_override(option, backend, gpus, ray_address):
    extra = [f"simulation.ray_address={ray_address}"] if ray_address else []
    sim = compose_config([f"simulation={option}", *extra]).simulation
    assert (sim.backend, sim.client_gpus, sim.ray_address) == (backend, gpus, ray_address)
    assert compose_config([]).simulation == compose_config(["simulation=auto"]).simulation  # the default
    assert option in help_text([]) and "simulation.client_cpus" in help_text([f"simulation={option}"])


def test_a_ray_cluster_without_its_address_and_a_gpu_share_without_a_gpu_are_refused(monkeypatch):
    with pytest.raises(ConfigError, match=r"simulation=ray_cluster needs the cluster's address: add "
                                          r"simulation.ray_address=HEAD:6379"):
        compose_config(["simulation=ray_cluster"])
    from flmnist.launch import backend

    monkeypatch.setattr(backend, "gpu_device_nodes", lambda: False)  # a machine without a GPU, as CI's
    cfg = compose_config(["simulation=gpu"])
    with pytest.raises(ConfigError, match=r"simulation.client_gpus=0.5 asks for a GPU share per ClientApp, but "
                                          r"PyTorch sees no CUDA GPU on this machine: use simulation=auto"):
        backend.check_gpu_share(cfg, client_gpus(cfg))
    backend.check_gpu_share(compose_config(["simulation=gpu", "simulation.ray_address=10.0.0.5:6379"]), 0.5)
    backend.check_gpu_share(compose_config([]), 0.0)


@pytest.mark.parametrize("override, message", [
    (["simulation.backend=threads"], "simulation.backend must be one of auto, inprocess, ray, got 'threads'"),
    (["simulation.backend=inprocess", "simulation.ray_address=127.0.0.1:6379"],
     "simulation.backend=inprocess .* cannot join the Ray cluster"),
])
def test_bad_backend_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config(override)


@pytest.mark.parametrize("override, message", [
    ("simulation.client_cpus=0", "simulation.client_cpus must be a finite number > 0"),
    ("simulation.client_gpus=-1", "simulation.client_gpus must be a finite number >= 0"),
    ("simulation.ray_address=6379", "simulation.ray_address must be a Ray address"),
])
def test_bad_simulation_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config([override])


@pytest.fixture
def ray_head(tmp_path):
    """A one-machine Ray cluster on loopback; stopped afterwards by process id (every process it
    started carries a marker in its environment)."""
    marker = f"FLMNIST_RAY_TEST={uuid.uuid4().hex}"
    port = free_port()
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1], "RAY_USAGE_STATS_ENABLED": "0"}
    temp = Path(f"/tmp/ray-{uuid.uuid4().hex[:8]}")  # short: Ray's socket paths have a length limit
    try:
        subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                        "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}"],
                       env=env, check=True, capture_output=True, text=True, timeout=180)
        yield f"127.0.0.1:{port}"
    finally:
        stop_env(marker, grace=10)  # (Ray's gcs_server outlives SIGTERM: SIGKILL after 10 s)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_a_run_joins_an_existing_ray_cluster(ray_head, tmp_path, mnist_root):
    env = {**os.environ, "FLMNIST_DATA_DIR": str(mnist_root)}
    out = subprocess.run([str(BIN / "flmnist"), "model=logreg", "num_rounds=1", "client.local_steps=5",
                          f"simulation.ray_address={ray_head}", "simulation.client_cpus=1", "logger=mlflow",
                          "hydra.run.dir=job"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    log = (tmp_path / "job" / "flwr_run.log").read_text()
    # the cluster ran the simulation's driver: its job list holds Flower's simulation process
    ask = (f"import json, ray; ray.init(address='{ray_head}', logging_level='ERROR'); "
           "print(json.dumps([j.get('Entrypoint', '') for j in ray._private.state.jobs()]))")
    jobs = subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True, timeout=120, check=True)
    entrypoints = json.loads(jobs.stdout.strip().splitlines()[-1])
    assert any("flwr-simulation" in e for e in entrypoints), entrypoints
    summary = json.loads((tmp_path / "job" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["node_devices"] == {"node 0": "cpu", "node 1": "cpu"}
    assert "Nodes trained on: cpu (2 nodes)" in log
    # logger=mlflow from the server side: the run is in the local store beside the run directory
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("flmnist").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["test_accuracy"] == summary["final_accuracy"]


@pytest.mark.slow
def test_a_run_without_an_address_starts_its_own_ray_whatever_ray_start_left_behind(tmp_path, mnist_root):
    """`ray start` records its cluster in Ray's temp dir (ray/ray_current_cluster), and Ray's
    default address joins that cluster, even once it is gone. simulation.ray_address=null means a
    private Ray (with simulation.backend=ray; auto may not start Ray at all): here the record names
    an address where nothing listens, and the run must finish."""
    ray_tmp = Path(f"/tmp/rt-{uuid.uuid4().hex[:8]}")  # short: Ray's socket paths have a length limit
    (ray_tmp / "ray").mkdir(parents=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    marker = f"FLMNIST_RAY_TEST={uuid.uuid4().hex}"
    env = {**os.environ, "FLMNIST_DATA_DIR": str(mnist_root), "RAY_TMPDIR": str(ray_tmp),
           marker.split("=")[0]: marker.split("=")[1]}
    try:
        out = subprocess.run([str(BIN / "flmnist"), "model=logreg", "num_nodes=2", "num_rounds=1",
                              "client.local_steps=5", "eval.attribution=false", "simulation.backend=ray",
                              "hydra.run.dir=job"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    finally:
        stop_env(marker, grace=5)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert json.loads((tmp_path / "job" / "summary.json").read_text())["status"] == "finished"
