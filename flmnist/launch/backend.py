"""Where the simulation's ClientApps run: the GPU share each gets and the backend that runs them
(``simulation.*``), resolved on the machine the ``flmnist`` command runs on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from flmnist.core.errors import ConfigError


def client_gpus(cfg: DictConfig) -> float:
    """``simulation.client_gpus``, with ``auto`` resolved: 0.5 when PyTorch sees a CUDA GPU, else 0."""
    value = cfg.simulation.client_gpus
    if value != "auto":
        return float(value)
    if not gpu_device_nodes():
        return 0.0  # PyTorch cannot see a GPU the kernel does not show: its import (about 1 s) is spared
    return 0.5 if torch_sees_cuda() else 0.0


def check_gpu_share(cfg: DictConfig, gpus: float) -> None:
    """A GPU share asked for (``simulation=gpu``, ``simulation.client_gpus=N``) on a machine whose
    PyTorch sees no GPU would leave Ray waiting for a GPU forever: refuse it, naming the setting;
    so is a Ray worker's ``simulation.client_cpus`` beyond this machine's cores (Flower's actor
    pool came out empty, an error in flwr_run.log after the start). With ``simulation.ray_address``
    the GPUs and cores may be on the cluster's other machines: not checked."""
    cores = machine_cores()
    wanted = float(cfg.simulation.client_cpus)
    if simulation_backend(cfg, gpus, cores) == "ray" and not cfg.simulation.ray_address and wanted > cores:
        raise ConfigError(f"simulation.client_cpus={wanted:g} asks for more cores per ClientApp than this machine "
                          f"has ({cores}): give simulation.client_cpus={cores} or less")
    if gpus > 0 and not cfg.simulation.ray_address and not (gpu_device_nodes() and torch_sees_cuda()):
        raise ConfigError(f"simulation.client_gpus={gpus:g} asks for a GPU share per ClientApp, but PyTorch sees "
                          f"no CUDA GPU on this machine: use simulation=auto (or simulation.client_gpus=0), or join "
                          f"a Ray cluster with GPUs (simulation=ray_cluster simulation.ray_address=HEAD:6379)")


def torch_sees_cuda() -> bool:
    """Whether PyTorch sees a CUDA GPU, asked in a child process: the command itself never imports
    PyTorch (the ClientApps that train do)."""
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=300, check=False).returncode == 0


def simulation_backend(cfg: DictConfig, gpus: float, cores: int | None = None) -> str:
    """``simulation.backend``, with ``auto`` resolved (``gpus``: the resolved GPU share per ClientApp):
    ``inprocess`` when only one ClientApp could train at a time anyway (fewer than 2 x
    ``simulation.client_cpus`` cores), on no GPU share and no Ray cluster; else ``ray``."""
    sim = cfg.simulation
    if sim.backend != "auto":
        return str(sim.backend)
    alone = one_at_a_time(machine_cores() if cores is None else cores, float(sim.client_cpus))
    return "inprocess" if alone and not gpus and not sim.ray_address else "ray"


def one_at_a_time(cores: int, client_cpus: float) -> bool:
    """Whether only one ClientApp could train at a time on ``cores`` (fewer than two of
    ``client_cpus``): where ``simulation.backend=auto`` runs them in process (no GPU, no Ray cluster)."""
    return cores < 2 * client_cpus


def machine_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def gpu_device_nodes() -> bool:
    """Whether the machine shows a GPU to programs: NVIDIA's device nodes or driver, a Jetson's
    GPU nodes, AMD's ROCm node (PyTorch's CUDA API serves ROCm too). True off Linux: unknown."""
    if not sys.platform.startswith("linux"):
        return True
    dev = Path("/dev")
    return (Path("/proc/driver/nvidia").exists() or (dev / "kfd").exists()
            or any(dev.glob("nvidia[0-9]*")) or any(dev.glob("nvhost-*")))


BACKEND_NOTES = {
    "inprocess": "inprocess (one ClientApp at a time, in Flower's simulation process; simulation.backend=ray for "
                 "Ray workers)",
    "ray": "ray (Ray workers, simulation.client_cpus cores each)",
}
