"""Benchmark: the default training (`flwr run .`, no overrides) on these cores.

Target (issue 2): final test accuracy >= 98% within 3 minutes, wall time of the whole
`flwr run` (SuperLink start included). Also reports peak memory of all processes.

    python benchmarks/default_run.py            # writes benchmarks/results/default_run.json
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from memory import PeakMemory
from reference import run as run_reference
from runs import finished, fresh

from flmnist.launch.flwr_local import run_flwr


def main() -> None:
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = fresh(out_dir / "default_run")
    flwr_home = tempfile.mkdtemp(prefix="flmnist-bench-")
    start = time.perf_counter()
    with PeakMemory(flwr_home) as mem:
        # run_dir only says where to write; every training setting is the default.
        code = run_flwr(REPO, [f"run_dir={run_dir}"], 2, flwr_home, log_path=out_dir / "default_run.log")
    wall = time.perf_counter() - start
    summary = finished(run_dir, code, out_dir / "default_run.log")
    reference = run_reference([])
    result = {
        "command": "flwr run . (default config, 2 simulated SuperNodes)",
        "exit_code": code,
        "wall_time_s": round(wall, 1),
        "final_accuracy": summary["final_accuracy"],
        "rounds": summary["rounds_completed"],
        "peak_memory_mib": round(mem.peak_mib),
        "reference_wall_time_s": reference["wall_time_s"],
        "reference_final_accuracy": reference["final_accuracy"],
        "ratio": round(wall / reference["wall_time_s"], 2),
        "target": "final accuracy >= 0.98 within 180 s",
        "met": bool(summary["final_accuracy"] >= 0.98 and wall <= 180),
    }
    (out_dir / "default_run.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
