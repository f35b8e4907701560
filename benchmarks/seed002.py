"""Benchmark: `flmnist experiment=seed002` against the plain-PyTorch reference, same invocation.

Targets (issue 2): final federated accuracy >= 96% (the seed reports 95.92%); wall time of the
whole flmnist run (SuperLink start included) at most 3x the reference doing the same work.
Issue 8: the reply screen's cost (summary.json's ``screen``: seconds spent screening train
replies, ms per reply) and its share of the run's wall time, target under 2%.

    python benchmarks/seed002.py                # writes benchmarks/results/seed002.json
    python benchmarks/seed002.py --screen-only  # the flmnist run only: benchmarks/results/seed002_screen.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from memory import PeakMemory
from reference import run as run_reference

from flmnist.flwr_local import run_flwr


def screening(summary: dict, flmnist_wall: float) -> dict:
    """The reply screen's cost in this run (issue 8): per reply, and its share of the wall time."""
    screen = summary.get("screen") or {}
    seconds = screen.get("screen_seconds")
    return {
        "replies_screened": screen.get("replies_screened"),
        "screen_seconds": seconds,
        "screen_ms_per_reply": screen.get("screen_ms_per_reply"),
        "run_wall_time_s": summary.get("wall_time"),  # the ServerApp's run, from its start to the summary
        "share_of_run_wall_time": None if seconds is None else round(seconds / summary["wall_time"], 5),
        "share_of_flwr_run_wall_time": None if seconds is None else round(seconds / flmnist_wall, 5),
        "target": "share < 0.02",
        "met": None if seconds is None else bool(seconds / summary["wall_time"] < 0.02),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--screen-only", action="store_true",
                        help="run flmnist only (no reference) and write seed002_screen.json")
    args = parser.parse_args()
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = out_dir / "seed002"
    flwr_home = tempfile.mkdtemp(prefix="flmnist-bench-")
    start = time.perf_counter()
    with PeakMemory(flwr_home) as mem:
        run_flwr(REPO, ["experiment=seed002", f"run_dir={run_dir}"], 3, flwr_home,
                 log_path=out_dir / "seed002.log")
    flmnist_wall = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    log = (out_dir / "seed002.log").read_text()
    seed_lines = [ln.split(":      ", 1)[-1] for ln in log.splitlines()
                  if "Model update node" in ln or "Federated model:" in ln]
    screen = screening(summary, flmnist_wall)
    if args.screen_only:
        result = {"command": "flmnist experiment=seed002", "wall_time_s": round(flmnist_wall, 1),
                  "final_accuracy": summary["final_accuracy"], "screening": screen}
        (out_dir / "seed002_screen.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return

    with PeakMemory() as ref_mem:
        reference = run_reference(["experiment=seed002"], update_eval=True)
    floor = run_reference(["experiment=seed002"], update_eval=False)
    result = {
        "flmnist": {"command": "flmnist experiment=seed002", "wall_time_s": round(flmnist_wall, 1),
                    "final_accuracy": summary["final_accuracy"], "peak_memory_mib": round(mem.peak_mib)},
        "reference_same_evaluations": {"wall_time_s": reference["wall_time_s"],
                                       "final_accuracy": reference["final_accuracy"],
                                       "peak_memory_mib": round(ref_mem.peak_mib)},
        "reference_global_eval_only": {"wall_time_s": floor["wall_time_s"], "final_accuracy": floor["final_accuracy"]},
        "ratio": round(flmnist_wall / reference["wall_time_s"], 2),
        "ratio_to_global_eval_only_floor": round(flmnist_wall / floor["wall_time_s"], 2),
        "targets": "final accuracy >= 0.96; ratio <= 3",
        "met": bool(summary["final_accuracy"] >= 0.96 and flmnist_wall / reference["wall_time_s"] <= 3),
        "screening": screen,
        "seed_lines_last_round": seed_lines[-8:],
    }
    (out_dir / "seed002.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
