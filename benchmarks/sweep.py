"""Benchmark: a sweep's jobs share one local SuperLink (issue 23).

Wall time of one sweep of four seeds against the same four runs as separate commands, one after
the other, in one invocation (seeds 1 and 2 separately, the sweep, seeds 3 and 4 separately, so
that other work on the machine weighs on both sides alike):

    flmnist -m experiment=seed002 'eval.update_rounds=[]' eval.attribution=false seed=1,2,3,4
    flmnist experiment=seed002 'eval.update_rounds=[]' eval.attribution=false seed=N    # N = 1 .. 4

Target: the sweep takes at most 0.75 x the sum of the four. Each job's start is timed from its
output lines as they arrive: from the job's start (the command's start; in the sweep, Hydra's
``#N :`` line) to the command handing over to Flower (``flmnist: simulation backend``), to
``flwr run``'s first line, to its ``Using SuperLink`` (after starting one, if it did), to the
ServerApp's first line (``flmnist run directory``), to the first round's line, to ``Run finished``.
The sweep runs its jobs in two lanes (``flmnist/launch/lanes.py``: four jobs, ClientApps in
process); a lane's lines start with ``[job N]``. ``--one-lane`` also times the sweep with
``hydra.launcher.lanes=1`` (one job after the other, as before the lanes), after the first half
of the separate commands.

    FLMNIST_DATA_DIR=/path/to/mnist python benchmarks/sweep.py [--one-lane]   # prints, writes benchmarks/results/sweep.json
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

REPO = Path(__file__).resolve().parents[1]
FLMNIST = str(Path(sys.executable).parent / "flmnist")
SETTINGS = ["experiment=seed002", "eval.update_rounds=[]", "eval.attribution=false"]
SEEDS = [1, 2, 3, 4]
MARKS = {  # phase -> the line that ends it
    "to_flower": "flmnist: simulation backend",
    "to_flwr_run_up": re.compile(r"Starting local SuperLink|Using SuperLink"),  # flwr run's own first line
    "to_superlink_ready": "Using SuperLink",  # (a fresh SuperLink: after its start)
    "to_server_app": "flmnist run directory",
    "to_round_1": re.compile(r"\[round 1/\d+\]"),
    "to_finished": "Run finished",
}
JOB_LINE = re.compile(r"\[HYDRA\]\s+#(\d+) : ")
LANE_LINE = re.compile(r"^\[job (\d+)\] ")  # a lane's line
LANES_SAID = "jobs in 2 lanes"  # the sweep's first line when it runs two jobs at a time
said: list[str] = []  # the sweep's lines before its first job


def timed(args: list[str], cwd: Path) -> tuple[float, int, list[dict]]:
    """Run ``flmnist ARGS``; return its wall time, exit code and each job's phase times (s from the job's start)."""
    said.clear()
    start = time.perf_counter()  # MNIST: wherever flmnist finds it (data.root, $FLMNIST_DATA_DIR), as for a user
    proc = subprocess.Popen([FLMNIST, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    jobs: dict[int, dict] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter()
        if not jobs:
            said.append(line)
        lane, started = LANE_LINE.match(line), JOB_LINE.search(line)
        if started or not jobs:
            number = int(started.group(1)) if started else 0
            jobs[number] = {"superlink_started": False, "starts_at": round((now if started else start) - start, 2)}
        number = int(lane.group(1)) if lane else max(jobs)  # (one lane: the latest job's)
        job = jobs.setdefault(number, {"superlink_started": False, "starts_at": round(now - start, 2)})
        job["superlink_started"] |= "Starting local SuperLink" in line
        for phase, mark in MARKS.items():
            hit = mark.search(line) if isinstance(mark, re.Pattern) else mark in line
            if hit and phase not in job:
                job[phase] = round(now - start - job["starts_at"], 2)
    code = proc.wait()
    return time.perf_counter() - start, code, [jobs[n] for n in sorted(jobs)]


def main() -> None:
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="flmnist-sweep-bench-"))
    load_before = os.getloadavg()  # other work on the machine shows here
    separate = []

    def run_separately(seeds: list[int]) -> None:
        for seed in seeds:
            wall, code, jobs = timed([*SETTINGS, f"seed={seed}"], work)
            separate.append({"seed": seed, "wall_time_s": round(wall, 1), "exit_code": code, **jobs[0]})
            print(f"separate seed={seed}: {wall:.1f} s (exit {code}) {jobs[0]}", flush=True)

    half = len(SEEDS) // 2
    sweep = ["-m", *SETTINGS, "seed=" + ",".join(map(str, SEEDS))]
    run_separately(SEEDS[:half])  # half before the sweep, half after: a load that drifts weighs on both sides
    one_lane = None
    if "--one-lane" in sys.argv[1:]:
        one_wall, one_code, _ = timed([*sweep, "hydra.launcher.lanes=1"], work)
        one_lane = {"wall_time_s": round(one_wall, 1), "exit_code": one_code}
        print(f"sweep, one lane: {one_wall:.1f} s (exit {one_code})", flush=True)
    wall, code, jobs = timed(sweep, work)
    in_lanes = LANES_SAID in "".join(said)  # (said: this sweep's lines before its first job)
    run_separately(SEEDS[half:])
    jobs = [j for j in jobs if "to_flower" in j]  # (lines before the first job: Hydra's own)
    print(f"sweep: {wall:.1f} s (exit {code})", flush=True)
    for seed, job in zip(SEEDS, jobs, strict=False):
        print(f"  job seed={seed}: {job}", flush=True)
    total = sum(s["wall_time_s"] for s in separate)
    # a run that failed early is fast: the ratio counts only when every command and job finished
    complete = (code == 0 and all(s["exit_code"] == 0 for s in separate) and len(jobs) == len(SEEDS)
                and all("to_finished" in j for j in jobs))
    result = {
        "command": "flmnist -m " + " ".join(SETTINGS) + " seed=" + ",".join(map(str, SEEDS)),
        "sweep_wall_time_s": round(wall, 1),
        "sweep_exit_code": code,
        "sweep_jobs": jobs,
        "separate": separate,
        "separate_sum_s": round(total, 1),
        "ratio": round(wall / total, 3),
        "one_lane": one_lane and {**one_lane, "ratio": round(one_lane["wall_time_s"] / total, 3)},
        "target": "sweep <= 0.75 x the sum of the separate commands",
        "complete": complete,
        "met": bool(complete and wall <= 0.75 * total),
        "cores": len(os.sched_getaffinity(0)),  # (what flmnist's lane count reads)
        "lanes": in_lanes,  # the sweep said it ran its jobs in two lanes
        "load_average_before_after": [[round(x, 2) for x in load_before], [round(x, 2) for x in os.getloadavg()]],
        "work_dir": str(work),
    }
    (out_dir / "sweep.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("sweep_jobs", "separate")}, indent=1))


if __name__ == "__main__":
    main()
