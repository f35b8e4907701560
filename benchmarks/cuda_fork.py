"""Benchmark: what CUDA adds to each task of the warm executor on a GPU board.

The warm executor (``flmnist/flower_patches/warm_executor.py``) imports Flower and PyTorch once
and forks a child per task; no CUDA context survives a fork, so a child that trains on the GPU
starts CUDA itself. This measures, on the machine it runs on (a CUDA GPU needed):

- ``parent_import_torch_s``: the parent's ``import torch`` (paid once per executor);
- per forked child (``--children``, one after another): ``cuda_init_s``, its first CUDA
  operation (context creation), and ``first_step_s``, one LeNet training step at batch 32 on the
  GPU after it (kernels loaded on first use); ``cpu_children``, the same step in children that
  stay on the CPU (the only ones without a GPU);
- ``cuda_fresh_process_s`` / ``cpu_fresh_process_s``: a new Python process doing the import, the
  CUDA start and the step (what a task costs with Flower's own executor, before Flower's imports).

    python benchmarks/cuda_fork.py --children 5

Writes ``benchmarks/results/cuda_fork.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "cuda_fork.json"
STEP = """
import time, torch
t0 = time.perf_counter()
dev = torch.device("{device}")
if dev.type == "cuda":
    torch.zeros(1, device=dev); torch.cuda.synchronize()
t1 = time.perf_counter()
from flmnist.ml.models import LeNet
model = LeNet().to(dev)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(32, 1, 28, 28, device=dev), torch.randint(0, 10, (32,), device=dev)
torch.nn.functional.nll_loss(model(x), y).backward(); opt.step()
if dev.type == "cuda":
    torch.cuda.synchronize()
t2 = time.perf_counter()
RESULT = {{"cuda_init_s": round(t1 - t0, 4), "first_step_s": round(t2 - t1, 4)}}
"""


def in_child(device: str) -> dict:
    """Fork; the child runs STEP and writes its figures to a pipe."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: as the warm executor's child, PyTorch already imported
        os.close(read)
        scope: dict = {}
        exec(STEP.format(device=device), scope)  # noqa: S102 - this file's own snippet
        os.write(write, json.dumps(scope["RESULT"]).encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 4096):
        data += chunk
    os.waitpid(pid, 0)
    return json.loads(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--children", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    t0 = time.perf_counter()
    import torch

    out: dict = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                 "parent_import_torch_s": round(time.perf_counter() - t0, 3)}
    import flmnist.ml.models  # noqa: F401 - as the warm executor's parent has it (no CUDA touched)

    assert not torch.cuda.is_initialized()
    # asked in a child: the parent must not start CUDA's driver before it forks, as the executor does not
    probe = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    out["gpu"] = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    devices = ["cuda", "cpu"] if out["gpu"] else ["cpu"]
    if not out["gpu"]:
        print("PyTorch sees no CUDA GPU: the CPU children alone", file=sys.stderr)
    for device in devices:
        out[f"{device}_children"] = [in_child(device) for _ in range(args.children)]
        fresh = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", STEP.format(device=device)], cwd=REPO, check=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
            fresh.append(round(time.perf_counter() - start, 3))
        out[f"{device}_fresh_process_s"] = fresh
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
