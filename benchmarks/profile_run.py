"""Where a run's wall time goes, from command start to exit: each line of the `flmnist` command's
output is stamped as it arrives, and the phases between landmark lines are reported.

    python benchmarks/profile_run.py                       # experiment=seed002 eval.update_rounds=[]
    python benchmarks/profile_run.py experiment=seed002    # any flmnist overrides

Writes benchmarks/results/profile_run.json and prints a table. Run with FLMNIST_DATA_DIR set.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
RESULTS = Path(__file__).resolve().parent / "results"
# (phase, the line that ends it); the first line matching each pattern in order
LANDMARKS = [  # the lines flmnist prints since 2026-12-04 (Flower's own round lines are no longer shown)
    ("CLI: Hydra composition and checks (and the SuperLink's start)", r"Using SuperLink|Starting local SuperLink"),
    ("run submission", r"Successfully started run"),
    ("simulation start, app install", r"Successfully installed flmnist"),
    ("ServerApp start (imports, config)", r"flmnist run directory"),
    ("MNIST loading and partitioning (server)", r"Partition report"),
    ("hooks, screen, engine; waiting for nodes (the backend's start)", r"Strategy .+?, round|Asynchronous loop:"),
    ("initial evaluation and round 1 (the first ClientApps: imports, MNIST, partition)", r"\[(round|update) 1/"),
    ("the remaining rounds", r"Summary of evaluated"),
    ("outputs (summary, plots)", r"Run finished"),
    ("exports, stopping SuperLink (and Ray), exit", None),
]


def profile(overrides: list[str]) -> dict:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.Popen([str(BIN / "flmnist"), *overrides, f"hydra.run.dir={tmp}/run"], cwd=tmp, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        stamped = []
        assert proc.stdout is not None
        for line in proc.stdout:
            stamped.append((time.perf_counter() - start, line.rstrip("\n")))
        code = proc.wait()
        end = time.perf_counter() - start
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text()) if code == 0 else {}
    phases, last, i = [], 0.0, 0
    for name, pattern in LANDMARKS:
        if pattern is None:
            phases.append({"phase": name, "seconds": round(end - last, 2)})
            break
        hit = next(((t, k) for k, (t, line) in enumerate(stamped[i:], i) if re.search(pattern, line)), None)
        if hit is None:
            phases.append({"phase": name, "seconds": None})
            continue
        t, i = hit
        phases.append({"phase": name, "seconds": round(t - last, 2)})
        last = t
    rounds = [t for t, line in stamped if re.search(r"\[(round|update) \d+/", line)]
    steady = (rounds[-1] - rounds[0]) / (len(rounds) - 1) if len(rounds) > 1 else None
    return {"overrides": overrides, "exit_code": code, "total_seconds": round(end, 2), "phases": phases,
            "steady_seconds_per_round": None if steady is None else round(steady, 3),
            "final_accuracy": summary.get("final_accuracy")}


def main() -> None:
    overrides = sys.argv[1:] or ["experiment=seed002", "eval.update_rounds=[]"]
    result = profile(overrides)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "profile_run.json").write_text(json.dumps(result, indent=1))
    print(f"flmnist {' '.join(overrides)}: {result['total_seconds']} s, exit {result['exit_code']}, "
          f"final accuracy {result['final_accuracy']}")
    print("| phase | seconds |\n|---|---|")
    for p in result["phases"]:
        print(f"| {p['phase']} | {p['seconds'] if p['seconds'] is not None else '-'} |")
    print(f"steady state: {result['steady_seconds_per_round']} s per round")


if __name__ == "__main__":
    main()
