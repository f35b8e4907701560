"""Benchmark (issue 8): robust aggregators against 2 poisoning nodes of 20 on a label-skewed split.

``partition=dirichlet`` (alpha 0.5), 20 nodes, nodes 0 and 1 poisoning every round with
``client.fault=boost`` (update x10, a model-replacement attempt) or ``client.fault=sign-flip``
(update reversed and x5). Strategies: FedAvg, FedMedian, FedTrimmedAvg (beta 0.2), Krum
(f = 2), each with flmnist's default defences off; then FedAvg with each of flmnist's own
defences alone (``screen.clip_to_median=3``; the effect guard, ``screen.guard_max_harm=2``) and
with both as the defaults have them; each also clean, and against ``client.fault=replace``
(weights x-5, model replacement). The guard's cost per judged update is in its own table.
Logistic regression, 20 local SGD steps, 12 rounds, no client evaluation (the server
evaluates the global model on the 10,000 test images every round).
Writes benchmarks/results/robust.{json,md} (runs under benchmarks/results/robust/).

    python benchmarks/robust.py [--rounds 12] [--only FedAvg Krum] [--attacks clean boost]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flmnist.launch.flwr_local import run_flwr


def code_fingerprint() -> str:
    """A hash of flmnist/ and conf/ as they are now: runs made on different code show it."""
    h = hashlib.sha1()
    for f in sorted([*(REPO / "flmnist").rglob("*.py"), *(REPO / "conf").rglob("*.yaml")]):
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]

NODES = 20
BAD = [0, 1]
COMMON = ["partition=dirichlet", "partition.alpha=0.5", f"num_nodes={NODES}", "model=logreg",
          "client.local_steps=20", "sampling.fraction_evaluate=0", "checkpoint_every=0"]
OFF = ["screen.guard_max_harm=null", "screen.clip_to_median=null"]  # flmnist's default defences off
STRATEGIES = {
    "FedAvg": ["strategy=fedavg", *OFF],
    "FedMedian": ["strategy=fedmedian", *OFF],
    "FedTrimmedAvg": ["strategy=fedtrimmedavg", "strategy.beta=0.2", *OFF],
    "Krum": ["strategy=krum", "strategy.num_malicious_nodes=2", *OFF],
    "FedAvg + clip_to_median=3": ["strategy=fedavg", "screen.guard_max_harm=null", "screen.clip_to_median=3"],
    "FedAvg + effect guard": ["strategy=fedavg", "screen.guard_max_harm=2", "screen.clip_to_median=null"],
    "FedAvg, defaults (guard, then clip 3)": ["strategy=fedavg"],
}
ATTACKS = {
    "clean": [],
    "boost": ["client.fault=boost", f"client.fault_nodes=[{','.join(map(str, BAD))}]"],
    "sign-flip": ["client.fault=sign-flip", f"client.fault_nodes=[{','.join(map(str, BAD))}]"],
    "replace": ["client.fault=replace", f"client.fault_nodes=[{','.join(map(str, BAD))}]"],
}
LABELS = {"clean": "clean", "boost": "boost (update x10)", "sign-flip": "sign-flip (update x-5)",
          "replace": "replacement (weights x-5)"}


def slug(*parts: str) -> str:
    """A run directory name: lowercase letters, digits and underscores only (a comma or a
    bracket in a Hydra override value would be read as a list or a function)."""
    return re.sub(r"[^a-z0-9]+", "_", "_".join(parts).lower()).strip("_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--only", nargs="*", help="run only these strategies (results merged into the JSON)")
    parser.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--table-only", action="store_true", help="run nothing: rewrite robust.md from robust.json")
    args = parser.parse_args()
    data_root = os.environ.get("FLMNIST_DATA_DIR") or str(REPO.parent / "shared" / "data" / "mnist")
    out = REPO / "benchmarks" / "results"
    runs = out / "robust"
    runs.mkdir(parents=True, exist_ok=True)
    results_path = out / "robust.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name, strategy in STRATEGIES.items():
        if args.table_only or (args.only and name not in args.only):
            continue
        for attack in args.attacks:
            key = slug(name, attack)
            run_dir = runs / key
            overrides = [*COMMON, f"num_rounds={args.rounds}", *strategy, *ATTACKS[attack]]
            code = code_fingerprint()
            log_path = runs / f"{key}.log"
            shutil.rmtree(run_dir, ignore_errors=True)  # no stale summary.json from an earlier invocation
            for attempt in range(1, 4):
                start = time.perf_counter()
                rc = run_flwr(REPO, [*overrides, f"run_dir={run_dir}", f"data.root={data_root}"], NODES,
                              tempfile.mkdtemp(prefix="flmnist-bench-"), log_path=log_path, timeout=args.timeout)
                wall = time.perf_counter() - start
                if (run_dir / "summary.json").exists() or "Failed to start local SuperLink" not in log_path.read_text(
                        errors="replace"):
                    break
                print(f"{key}: the local SuperLink did not start (machine busy); attempt {attempt + 1}", flush=True)
            summary_path = run_dir / "summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
            rows = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else []
            screen = summary.get("screen") or {}
            results.setdefault(name, {})[attack] = {
                "overrides": overrides,
                "code": code,
                "exit_code": rc,
                "attempts": attempt,
                "status": summary.get("status", "no summary.json"),
                "error": summary.get("error"),
                "final_accuracy": summary.get("final_accuracy"),
                "best_accuracy": summary.get("best_accuracy"),
                "accuracy_per_round": [r.get("test_accuracy") for r in rows if r.get("test_accuracy") is not None],
                "partition_md5": (hashlib.md5((run_dir / "partition_report.json").read_bytes()).hexdigest()
                                  if (run_dir / "partition_report.json").exists() else None),
                "rejected_updates": sum(r.get("rejected_updates") or 0 for r in rows),
                "updates_clipped": screen.get("updates_clipped"),
                "screen_ms_per_reply": screen.get("screen_ms_per_reply"),
                "guard": screen.get("guard"),
                "wall_time_s": round(wall, 1),
                "run_dir": str(run_dir),
            }
            results_path.write_text(json.dumps(results, indent=1))
            print(json.dumps({k: v for k, v in results[name][attack].items() if k != "overrides"}), flush=True)
    partition_report = runs / slug("FedAvg", "clean") / "partition_report.json"
    md = table(results, partition_report)
    (out / "robust.md").write_text(md)
    print(md)


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def last3(r: dict) -> float | None:
    acc = r.get("accuracy_per_round", [])[1:][-3:]
    return sum(acc) / len(acc) if acc else None


def table(results: dict, partition_report: Path) -> str:
    clean = results.get("FedAvg", {}).get("clean", {}).get("final_accuracy")
    lines = ["| strategy | " + " | ".join(LABELS[a] for a in ATTACKS) + " |", "|---" * (len(ATTACKS) + 1) + "|"]
    names = [n for n in STRATEGIES if n in results]
    for name in names:
        by_attack = results[name]
        cells = []
        for a in ATTACKS:
            r = by_attack.get(a)
            if r is None:
                cells.append("not run")
                continue
            if r["status"] != "finished" or r["exit_code"] != 0:
                cells.append(f"**{r['status']}** (exit {r['exit_code']})")
                continue
            c = pct(r["final_accuracy"])
            if clean is not None and r["final_accuracy"] is not None and not (name == "FedAvg" and a == "clean"):
                c += f" ({100 * (r['final_accuracy'] - clean):+.2f})"
            if r.get("updates_clipped"):
                c += f", {r['updates_clipped']} clipped"
            if r.get("rejected_updates"):
                c += f", {r['rejected_updates']} rejected"
            cells.append(c)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Final test accuracy (points against clean FedAvg in brackets).")
    lines.append("")
    lines.append("| strategy | " + " | ".join(LABELS[a] for a in ATTACKS) + " |")
    lines.append("|---" * (len(ATTACKS) + 1) + "|")
    for name in names:
        lines.append(f"| {name} | " + " | ".join(pct(last3(results[name][a])) if a in results[name] else "not run"
                                                 for a in ATTACKS) + " |")
    lines.append("")
    lines.append("Mean test accuracy of the last 3 rounds (a single evaluation swings by 1-2 points).")
    guarded = [(n, a, results[n][a]["guard"]) for n in names for a in ATTACKS
               if a in results[n] and results[n][a].get("guard")]
    if guarded:
        lines += ["", "| effect guard's cost | updates judged | probed | evaluations | rejected | seconds | ms per judged update | share of the run |",
                  "|---|---|---|---|---|---|---|---|"]
        for n, a, g in guarded:
            wall = results[n][a].get("wall_time_s")
            share = f"{100 * g['seconds'] / wall:.1f}%" if wall else "-"
            lines.append(f"| {n}, {a} | {g['updates_judged']} | {g['probed']} | {g['evaluations']} | {g['rejected']} | "
                         f"{g['seconds']:.1f} | {g['ms_per_update']:.1f} | {share} |")
        lines.append("")
    splits = {r.get("partition_md5") for by_attack in results.values() for r in by_attack.values()} - {None}
    if len(splits) > 1:
        lines.append(f"**Warning: the runs did not all get the same partitions ({len(splits)} different reports).**")
    if partition_report.exists():
        try:
            report = json.loads(partition_report.read_text())
            sizes = report_sizes(report, BAD)
            total = sum(row["examples"] for row in report)
            lines.append(f"Poisoning nodes' partitions: {json.dumps(sizes)} examples, "
                         f"{100 * sum(sizes.values()) / total:.1f}% of the {total} on the 20 nodes (FedAvg's weight).")
        except (ValueError, KeyError, TypeError):
            pass
    return "\n".join(lines) + "\n"


def report_sizes(report: list[dict], nodes: list[int]) -> dict:
    """Examples of the given nodes, from partition_report.json (one row per node)."""
    return {f"node {row['node']}": row["examples"] for row in report if row["node"] in nodes}


if __name__ == "__main__":
    main()
