"""How fast this machine trains flmnist's LeNet: training samples per second, per thread count.

    python jetson/device/benchmark.py                  # about 10 s per thread count
    python jetson/device/benchmark.py --threads 4 --seconds 30 --batch-size 32

It runs the ClientApp's own training loop (``flmnist.ml.training.train``: SGD, batch 32 by default,
as seed 002's nodes train) on random 28x28 images (speed does not depend on the pixels), after a
short warm-up, for each thread count (default: 1, 2, 4 and all cores, those this machine has),
and prints samples/s, the best thread count (set it as ``OMP_NUM_THREADS`` for the SuperNode:
``jetson/supernode.env.example``) and the matching ``fleet`` lines: ``base_throughput`` is the
Nano's LeNet rate in ``conf/fleet/jetson_mixed.yaml``, a device's ``speed`` is its rate divided by
that base. Needs only torch and flmnist's ``models``/``training`` modules (the SuperNode image
and the device venv have them; from a checkout it finds them in the repository). ``--device``
picks ``cpu`` or ``cuda`` (default: what the ClientApp would use).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

try:
    import flmnist  # noqa: F401
except ImportError:  # a checkout without flmnist installed (the device venv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from flmnist.ml.models import LeNet
from flmnist.ml.training import device as default_device
from flmnist.ml.training import train

FLEET_BASE_THROUGHPUT = 400.0  # conf/fleet/jetson_mixed.yaml: the Nano's assumed LeNet samples/s


def thread_counts(cores: int) -> list[int]:
    return sorted({t for t in (1, 2, 4, cores) if t <= cores})


def measure(threads: int, seconds: float, batch_size: int, dev: torch.device, warmup_steps: int = 3) -> dict:
    """Training samples/s of LeNet with ``threads`` intra-op threads, over at least ``seconds``."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(1024, 1, 28, 28, generator=gen)
    labels = torch.randint(0, 10, (1024,), generator=gen)
    model = LeNet()
    train(model, images, labels, batch_size=batch_size, lr=0.01, steps=warmup_steps, dev=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    steps, start, chunk = 0, time.perf_counter(), 1
    while True:
        train(model, images, labels, batch_size=batch_size, lr=0.01, steps=chunk, dev=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        steps += chunk
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
        # the steps that fit in the time left (at least 1, at most 64 per call)
        chunk = max(1, min(64, int((seconds - elapsed) / (elapsed / steps)) + 1))
    return {"threads": threads, "steps": steps, "seconds": round(elapsed, 2),
            "samples_per_s": round(steps * batch_size / elapsed, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="time per thread count (default 10)")
    parser.add_argument("--batch-size", type=int, default=32, help="SGD batch size (default 32, seed 002's)")
    parser.add_argument("--threads", help="comma-separated thread counts (default: 1,2,4 and all cores)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: CUDA if torch sees a GPU, else CPU")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.batch_size < 1:
        parser.error("--seconds must be > 0 and --batch-size >= 1")
    cores = os.cpu_count() or 1
    try:
        counts = [int(t) for t in args.threads.split(",")] if args.threads else thread_counts(cores)
    except ValueError:
        parser.error(f"--threads {args.threads!r}: give numbers separated by commas, e.g. 1,2,4")
    if any(t < 1 for t in counts):
        parser.error("--threads: every count must be >= 1")
    dev = torch.device(args.device) if args.device else default_device()
    info = {"machine": platform.machine(), "cores": cores, "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": str(dev), "batch_size": args.batch_size,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    if not args.json:
        print(f"flmnist LeNet training benchmark: {info['machine']}, {cores} cores, torch {info['torch']}, "
              f"device {dev}, batch {args.batch_size}", flush=True)
    results = []
    for threads in counts:
        results.append(measure(threads, args.seconds, args.batch_size, dev))
        if not args.json:
            r = results[-1]
            print(f"  {threads:>2} threads: {r['samples_per_s']:8.1f} samples/s ({r['steps']} steps in "
                  f"{r['seconds']:.1f} s)", flush=True)
    best = max(results, key=lambda r: r["samples_per_s"])
    speed = best["samples_per_s"] / FLEET_BASE_THROUGHPUT
    info.update(results=results, best_threads=best["threads"], samples_per_s=best["samples_per_s"],
                fleet_speed=round(speed, 3))
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"best: {best['samples_per_s']:.1f} samples/s with {best['threads']} threads "
          f"(set OMP_NUM_THREADS={best['threads']} for the SuperNode)")
    print("fleet YAML (conf/fleet/): this board as the reference device, or as one device type:")
    print(f"  base_throughput: {best['samples_per_s']:.1f}")
    print(f"  devices: {{this_board: {{share: ..., speed: {speed:.3g}}}}}  "
          f"# speed relative to base_throughput {FLEET_BASE_THROUGHPUT:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
