"""Where flmnist's time beyond the plain-PyTorch floor goes: once per run, or every round.

Each run of ``benchmarks/seed002.py --ratios`` is timed as a whole command at 1 round and at
seed002's 40 rounds (alternating, median of ``--repeat``). Of a run's wall time ``T(R)``,
``per_round = (T(40) - T(1)) / 39`` and ``fixed = T(1) - per_round``: the start and the end
(imports, Flower's SuperLink and simulation, MNIST, outputs, stopping) against the rounds'.
The floor is ``benchmarks/reference.py`` (one process, no Flower), the same work.

    python benchmarks/overhead_split.py [--repeat N]   # writes benchmarks/results/overhead_split.json

It also says what issue 23's target, ``flmnist_no_update_eval <= 1.5 x floor``, leaves: the
floor's 40-round time times 0.5, against flmnist's fixed cost beyond the floor's and the effect
guard's (on by default: ``flmnist_no_update_eval`` minus ``flmnist_no_guard`` at 40 rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from seed002 import RUNS, timed_run

NAMES = ("floor", "flmnist_no_guard", "flmnist_no_update_eval")
ROUNDS = (1, 40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2, help="median of N alternating repetitions")
    args = parser.parse_args()
    out_dir = REPO / "benchmarks" / "results"
    logs = out_dir / "overhead_split_logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs = [(name, rounds) for name in NAMES for rounds in ROUNDS]
    wall: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    for i in range(args.repeat):
        for name, rounds in (runs if i % 2 == 0 else runs[::-1]):
            out = timed_run(name, logs / f"{name}_{rounds}.log", [f"num_rounds={rounds}"])
            wall[(name, rounds)].append(out["wall_time_s"])
            print(f"[overhead split] {i + 1}/{args.repeat} {name} num_rounds={rounds}: {out}", flush=True)
    median = {run: statistics.median(times) for run, times in wall.items()}
    split = {}
    for name in NAMES:
        per_round = (median[(name, 40)] - median[(name, 1)]) / 39
        split[name] = {"command": " ".join(RUNS[name]), "wall_1_round_s": median[(name, 1)],
                       "wall_40_rounds_s": median[(name, 40)], "fixed_s": round(median[(name, 1)] - per_round, 2),
                       "per_round_s": round(per_round, 4), "trials": {str(r): wall[(name, r)] for r in ROUNDS}}
    floor, no_guard, flmnist = (split[n] for n in NAMES)
    budget = {
        "allowed_beyond_floor_s": round(0.5 * floor["wall_40_rounds_s"], 2),
        "fixed_beyond_floor_s": round(no_guard["fixed_s"] - floor["fixed_s"], 2),
        "per_round_beyond_floor_s": round(40 * (no_guard["per_round_s"] - floor["per_round_s"]), 2),
        "guard_s": round(flmnist["wall_40_rounds_s"] - no_guard["wall_40_rounds_s"], 2),
        "ratio": round(flmnist["wall_40_rounds_s"] / floor["wall_40_rounds_s"], 2),
    }
    result = {"repeat": args.repeat, "runs": split, "issue_23_budget": budget}
    (out_dir / "overhead_split.json").write_text(json.dumps(result, indent=1))
    print("| run | 1 round (s) | 40 rounds (s) | fixed (s) | per round (s) |\n|---|---:|---:|---:|---:|")
    for name, row in split.items():
        print(f"| {name} | {row['wall_1_round_s']:.2f} | {row['wall_40_rounds_s']:.2f} | {row['fixed_s']:.2f} "
              f"| {row['per_round_s']:.3f} |")
    print(f"\n1.5x the floor leaves {budget['allowed_beyond_floor_s']} s beyond it; flmnist spends "
          f"{budget['fixed_beyond_floor_s']} s more once, {budget['per_round_beyond_floor_s']} s more over the "
          f"40 rounds, and the effect guard {budget['guard_s']} s (ratio {budget['ratio']}x)")


if __name__ == "__main__":
    main()
