"""Benchmark: McMahan's CNN preset on a CUDA GPU against the same machine's CPU.

    python benchmarks/gpu.py --rounds 5

Each arm is ``flmnist experiment=mcmahan_iid num_rounds=R`` as a user types it, in its own run
directory under ``benchmarks/results/gpu/`` (git-ignored), with one setting changed per arm:

    gpu_auto      nothing: simulation.client_gpus=auto reserves 0.5 GPU per ClientApp (two at once)
    gpu_eighth    simulation.client_gpus=0.125 (eight ClientApps on the GPU at once)
    cpu           CUDA_VISIBLE_DEVICES= in the environment: PyTorch sees no GPU, auto gives 0,
                  and Ray runs cores / simulation.client_cpus ClientApps at once on the CPU

and the plain-PyTorch floor of one round on each device (``benchmarks/mcmahan.py``'s
``plain_round``: the 10 sampled nodes trained one after another, 5 epochs of 600 images at batch
10, the average, one test-set evaluation; no Flower). Per round: the server's wall time between
rounds 1 and R (round 1 also loads the data and starts the Ray workers). The summary's
``node_devices`` says where the nodes trained (counted per device). Writes ``benchmarks/results/gpu_mcmahan_iid.json``
after every arm, so an interrupted run keeps what it measured. Needs a machine whose PyTorch sees
a CUDA GPU for the GPU arms (they are skipped with a note otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "benchmarks" / "results" / "gpu"
RESULT = REPO / "benchmarks" / "results" / "gpu_mcmahan_iid.json"
ARMS = {"gpu_auto": ([], {}), "gpu_eighth": (["simulation.client_gpus=0.125"], {}),
        "cpu": ([], {"CUDA_VISIBLE_DEVICES": ""})}
FLOOR = ("import json, sys; sys.path.insert(0, 'benchmarks'); import torch, mcmahan; "
         "r = mcmahan.plain_round(mcmahan.ROWS['cnn-iid'], 0.05); "
         "r['device'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'; print(json.dumps(r))")


def log(msg: str) -> None:
    print(f"[gpu] {msg}", flush=True)


def run_arm(name: str, overrides: list[str], env: dict, rounds: int) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from mcmahan import read_run
    from runs import fresh

    run_dir = fresh(RUNS / name)  # (a run directory another run holds is refused)
    cmd = [sys.executable, "-m", "flmnist", "experiment=mcmahan_iid", f"num_rounds={rounds}", *overrides,
           f"hydra.run.dir={run_dir}"]
    log(f"{name}: {' '.join(cmd[2:-1])}" + (f" ({env})" if env else ""))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, check=False)
    record = {"command": " ".join(["flmnist", *cmd[3:-1]]), "env": env, "exit_code": proc.returncode,
              "command_wall_s": round(time.perf_counter() - start, 1)}
    if (run_dir / "summary.json").exists():
        record.update(read_run(run_dir))
        devices = json.loads((run_dir / "summary.json").read_text()).get("node_devices") or {}
        record["nodes_per_device"] = dict(Counter(devices.values()))
    else:
        record["status"] = "no summary"
        record["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
    log(f"{name}: {record.get('status')}, {record.get('seconds_per_round_after_first')} s per round after the "
        f"first, command {record['command_wall_s']} s, devices {record.get('nodes_per_device')}")
    return record


def floor(env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", FLOOR], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        return {"error": (proc.stdout + proc.stderr)[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    results: dict = {"date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "cpu_cores": os.cpu_count(),
                     "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
                     "floor": {}, "runs": {}}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    for device, env in (("cuda", {}), ("cpu", {"CUDA_VISIBLE_DEVICES": ""})):
        if device == "cuda" and not cuda:
            log("PyTorch sees no CUDA GPU: the GPU arms and floor are skipped")
            continue
        results["floor"][device] = floor(env)
        log(f"floor on {device}: {results['floor'][device]}")
        RESULT.write_text(json.dumps(results, indent=1))
    for name in args.arms.split(","):
        overrides, env = ARMS[name]
        if name.startswith("gpu") and not cuda:
            continue
        results["runs"][name] = run_arm(name, overrides, env, args.rounds)
        RESULT.write_text(json.dumps(results, indent=1))
    log(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
