"""Benchmark: `flmnist experiment=seed002` against the plain-PyTorch reference, same invocation.

Targets (issue 2): final federated accuracy >= 96% (the seed reports 95.92%); wall time of the
whole flmnist run (SuperLink start included) at most 3x the reference doing the same work.
Issue 8: the reply screen's cost (summary.json's ``screen``: seconds spent screening train
replies, ms per reply) and its share of the run's wall time, target under 2%.

    python benchmarks/seed002.py                # writes benchmarks/results/seed002.json
    python benchmarks/seed002.py --screen-only  # the flmnist run only: benchmarks/results/seed002_screen.json

Issue 10, `--ratios`: each run timed as a whole command, start to exit (a subprocess, wall
clock), in one invocation, and their ratios:

  floor          python benchmarks/reference.py experiment=seed002 'eval.update_rounds=[]' --no-update-eval
  reference      python benchmarks/reference.py experiment=seed002      (with the update evaluations)
  plain_flower   flwr run benchmarks/plain_flower --stream --federation-config
                 "num-supernodes=3 client-resources-num-cpus=2"      (own FLWR_HOME, Flower's defaults)
  flmnist_no_update_eval  flmnist experiment=seed002 'eval.update_rounds=[]' eval.attribution=false
  flmnist_preset          flmnist experiment=seed002 eval.attribution=false
  flmnist_attribution     flmnist experiment=seed002                 (attribution on: extra work)
  flmnist_no_guard        flmnist_no_update_eval with screen.guard_max_harm=null (information:
                          the effect guard's probe evaluations are work the floor does not do)

Targets: flmnist_no_update_eval <= 2.0x floor and faster than plain_flower; flmnist_preset
<= 2.5x reference. Issue 23: flmnist_no_update_eval <= 1.5x floor, flmnist_attribution <= 1.10x
flmnist_preset. plain_flower is timed to the exit of `flwr run`; stopping the SuperLink it
leaves behind is timed apart (stop_s) and not counted. flmnist runs in a temporary working
directory with hydra.run.dir=<tmp>/run; its accuracy comes from summary.json.

    flock /tmp/flmnist-cpu.lock python benchmarks/seed002.py --ratios [--repeat N]

--repeat N: N alternating repetitions (all runs, then all runs in reverse order, ...), the
median wall time of each. Writes benchmarks/results/seed002_ratios.json (logs of the last
repetition in benchmarks/results/seed002_ratios_logs/) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from memory import PeakMemory
from reference import run as run_reference
from runs import finished, fresh

from flmnist.launch.flwr_local import flwr_env, run_flwr, stop_flwr_home
from flmnist.ml.mnist_files import resolve_root


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
    parser.add_argument("--ratios", action="store_true",
                        help="issue 10: time every run as a whole command, write seed002_ratios.json")
    parser.add_argument("--repeat", type=int, default=1, help="--ratios: median of N alternating repetitions")
    args = parser.parse_args()
    if args.ratios:
        ratios(args.repeat)
        return
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = fresh(out_dir / "seed002")
    flwr_home = tempfile.mkdtemp(prefix="flmnist-bench-")
    start = time.perf_counter()
    with PeakMemory(flwr_home) as mem:
        code = run_flwr(REPO, ["experiment=seed002", f"run_dir={run_dir}"], 3, flwr_home,
                        log_path=out_dir / "seed002.log")
    flmnist_wall = time.perf_counter() - start
    summary = finished(run_dir, code, out_dir / "seed002.log")
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


# ---------------------------------------------------------------- issue 10: the ratio table

BIN = Path(sys.executable).parent
FLMNIST = [str(BIN / "flmnist"), "experiment=seed002"]
REFERENCE = [sys.executable, str(REPO / "benchmarks" / "reference.py"), "experiment=seed002"]
RUNS = {  # name: command
    "floor": [*REFERENCE, "eval.update_rounds=[]", "--no-update-eval"],
    "reference": REFERENCE,
    "plain_flower": [str(BIN / "flwr"), "run", str(REPO / "benchmarks" / "plain_flower"), "--stream",
                     "--federation-config", "num-supernodes=3 client-resources-num-cpus=2"],
    "flmnist_no_update_eval": [*FLMNIST, "eval.update_rounds=[]", "eval.attribution=false"],
    "flmnist_preset": [*FLMNIST, "eval.attribution=false"],
    "flmnist_attribution": FLMNIST,
    "flmnist_no_guard": [*FLMNIST, "eval.update_rounds=[]", "eval.attribution=false", "screen.guard_max_harm=null"],
}
PLAIN_ACCURACY = re.compile(r"\[plain_flower\] round (\d+): accuracy ([0-9.]+)")
PLAIN_ROUNDS = 40  # benchmarks/plain_flower/pyproject.toml's num-server-rounds


def timed_run(name: str, log_path: Path, extra: list[str] = ()) -> dict:
    """Run one command of RUNS (with the overrides ``extra``) from start to exit; its wall time
    and final accuracy."""
    work = Path(tempfile.mkdtemp(prefix=f"seed002-{name}-"))
    env = dict(os.environ, FLMNIST_DATA_DIR=str(resolve_root()))
    cmd = [c for c in RUNS[name] if not c.startswith("--")] + list(extra) + [c for c in RUNS[name] if c.startswith("--")]
    if name.startswith("flmnist"):
        cmd.append(f"hydra.run.dir={work / 'run'}")
    if name == "plain_flower":  # a private FLWR_HOME; Flower's default config (created by flwr run)
        (work / "flwr_home").mkdir()
        env = flwr_env(work / "flwr_home", env)
    out: dict = {}
    try:
        with open(log_path, "w") as log:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            lines = []
            for line in proc.stdout:
                lines.append((time.perf_counter() - start, line))
                log.write(line)
            code = proc.wait()
            wall = time.perf_counter() - start
            if name == "plain_flower":
                stop_start = time.perf_counter()
                stop_flwr_home(work / "flwr_home")
                out["stop_s"] = round(time.perf_counter() - stop_start, 2)
        if code != 0:
            raise SystemExit(f"{name} failed (exit {code}): see {log_path}")
        out = {"wall_time_s": round(wall, 2), **out}
        text = "".join(line for _, line in lines)
        if name in ("floor", "reference"):
            out["final_accuracy"] = json.loads(text[text.index("\n{") :])["final_accuracy"]
        elif name == "plain_flower":
            evaluated = PLAIN_ACCURACY.findall(text)
            if not evaluated or int(evaluated[-1][0]) != PLAIN_ROUNDS:  # flwr run exits 0 whatever its run does
                raise SystemExit(f"plain_flower ended after round {evaluated[-1][0] if evaluated else 0} of "
                                 f"{PLAIN_ROUNDS}: see {log_path}")
            out["final_accuracy"] = float(evaluated[-1][1])
            first = next(t for t, line in lines if "[ROUND 1/" in line)
            last = [t for t, line in lines if PLAIN_ACCURACY.search(line)][-1]
            out["phases_s"] = {"to_round_1": round(first, 1), "rounds": round(last - first, 1),
                               "after_last_evaluation": round(wall - last, 1)}
        else:
            summary = json.loads((work / "run" / "summary.json").read_text())
            out["final_accuracy"] = summary["final_accuracy"]
            out["server_app_wall_time_s"] = summary.get("wall_time")
            guard = (summary.get("screen") or {}).get("guard") or {}
            out["guard_s"] = guard.get("seconds")
            out["attribution_s"] = (summary.get("attribution") or {}).get("seconds")
        return out
    finally:
        if name == "plain_flower":
            stop_flwr_home(work / "flwr_home")  # again, in case the run was interrupted
        shutil.rmtree(work, ignore_errors=True)


def ratios(repeat: int) -> None:
    out_dir = REPO / "benchmarks" / "results"
    logs = out_dir / "seed002_ratios_logs"
    logs.mkdir(parents=True, exist_ok=True)
    trials: dict[str, list[dict]] = {name: [] for name in RUNS}
    for i in range(repeat):
        for name in (list(RUNS) if i % 2 == 0 else list(RUNS)[::-1]):
            print(f"[seed002 ratios] repetition {i + 1}/{repeat}: {name}", flush=True)
            trials[name].append(timed_run(name, logs / f"{name}.log"))
            print(f"[seed002 ratios]   {trials[name][-1]}", flush=True)
    wall = {name: statistics.median(t["wall_time_s"] for t in runs) for name, runs in trials.items()}
    checks = [  # (name, numerator, denominator, target, met)
        ("flmnist_no_update_eval / floor", "flmnist_no_update_eval", "floor", "<= 2.0", lambda r: r <= 2.0),
        ("flmnist_no_update_eval / plain_flower", "flmnist_no_update_eval", "plain_flower", "< 1", lambda r: r < 1),
        ("flmnist_preset / reference", "flmnist_preset", "reference", "<= 2.5", lambda r: r <= 2.5),
        ("flmnist_attribution / reference", "flmnist_attribution", "reference", "none (attribution: extra work)", None),
        ("flmnist_no_update_eval / floor (issue 23)", "flmnist_no_update_eval", "floor", "<= 1.5", lambda r: r <= 1.5),
        ("flmnist_attribution / flmnist_preset (issue 23)", "flmnist_attribution", "flmnist_preset", "<= 1.10",
         lambda r: r <= 1.10),
        ("flmnist_no_guard / floor", "flmnist_no_guard", "floor", "none (information: without the effect guard)", None),
        ("plain_flower / floor", "plain_flower", "floor", "none (information)", None),
    ]
    table = [{"ratio": label, "value": round(wall[a] / wall[b], 2), "target": target,
              "met": None if met is None else bool(met(wall[a] / wall[b]))} for label, a, b, target, met in checks]
    result = {
        "repeat": repeat,
        "runs": {name: {"command": " ".join(RUNS[name]), "median_wall_time_s": wall[name],
                        "final_accuracy": trials[name][-1]["final_accuracy"], "trials": trials[name]}
                 for name in RUNS},
        "ratios": table,
        "notes": ["plain_flower: wall time to the exit of `flwr run`; stopping its SuperLink (stop_s) not counted",
                  "flmnist_attribution does per-node, per-digit attribution, which neither reference does"],
    }
    (out_dir / "seed002_ratios.json").write_text(json.dumps(result, indent=1))
    md = [f"| run | wall time (s, median of {repeat}) | final accuracy |", "|---|---:|---:|"]
    md += [f"| {name} | {wall[name]:.1f} | {trials[name][-1]['final_accuracy']:.4f} |" for name in RUNS]
    md += ["", "| ratio | value | target | met |", "|---|---:|---|---|"]
    md += [f"| {r['ratio']} | {r['value']:.2f} | {r['target']} | {'' if r['met'] is None else r['met']} |" for r in table]
    print("\n".join(md))


if __name__ == "__main__":
    main()
