"""Benchmark: FedAvg, FedAvgM, FedAsync and FedBuff on one simulated Jetson fleet.

20 nodes, Dirichlet(0.5) label skew, `jetson_mixed` fleet, LeNet; every client update is
the same local work (20 SGD steps of batch 32). Each strategy gets the same budget of
client updates. Reports virtual time and client updates to 97% and 98% test accuracy, final
accuracy, mean and maximum staleness, real wall time, and the share of wall time spent on
virtual-clock bookkeeping. Writes benchmarks/results/async_fleet.{json,md,png}.

    python benchmarks/async_fleet.py [--updates 1200]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from runs import finished, fresh

from flmnist.launch.flwr_local import run_flwr

NODES = 20
COMMON = ["partition=dirichlet", "partition.alpha=0.5", "fleet=jetson_mixed", "model=lenet",
          f"num_nodes={NODES}", "client.local_steps=20", "client.batch_size=32", "data.holdout_fraction=0.02",
          "target_accuracy=0.98"]


def strategies(updates: int) -> dict[str, list[str]]:
    rounds = updates // NODES
    sync = [f"num_rounds={rounds}", "sampling.fraction_evaluate=0.0"]
    return {
        "FedAvg": ["strategy=fedavg", *sync],
        "FedAvgM": ["strategy=fedavgm", "strategy.server_momentum=0.5", *sync],
        "FedAsync": ["strategy=fedasync", f"async_loop.max_client_updates={updates}",
                     "async_loop.max_server_updates=null", "async_loop.eval_every=20"],
        "FedBuff": ["strategy=fedbuff", "strategy.buffer_size=10", f"async_loop.max_client_updates={updates}",
                    "async_loop.max_server_updates=null", "async_loop.eval_every=2"],
    }


def first(rows: list[dict], target: float, key: str):
    for r in rows:
        if r.get("test_accuracy") is not None and r["test_accuracy"] >= target and r.get(key) is not None:
            return r[key]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, default=1200, help="client updates per strategy")
    parser.add_argument("--only", nargs="*", help="run only these strategies")
    args = parser.parse_args()
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "async_fleet.json"
    results = json.loads(results_path.read_text()) if results_path.exists() and args.only else {}
    for name, overrides in strategies(args.updates).items():
        if args.only and name not in args.only:
            continue
        run_dir = fresh(out / f"async_fleet_{name.lower()}")
        start = time.perf_counter()
        code = run_flwr(REPO, [*COMMON, *overrides, f"run_dir={run_dir}"], NODES,
                        tempfile.mkdtemp(prefix="flmnist-bench-"), log_path=out / f"async_fleet_{name.lower()}.log")
        wall = time.perf_counter() - start
        summary = finished(run_dir, code, out / f"async_fleet_{name.lower()}.log")
        rows = [r for r in json.loads((run_dir / "metrics.json").read_text())]
        stats = summary.get("async") or {}
        staleness = [s for r in rows for s in (r.get("staleness") or [])]
        evaluated = [r for r in rows if r.get("test_accuracy") is not None]
        results[name] = {
            "virtual_time_to_97": first(rows, 0.97, "virtual_time"),
            "client_updates_to_97": first(rows, 0.97, "client_updates"),
            "virtual_time_to_98": first(rows, 0.98, "virtual_time"),
            "client_updates_to_98": first(rows, 0.98, "client_updates"),
            "final_accuracy": summary["final_accuracy"],
            "best_accuracy": summary["best_accuracy"],
            "final_virtual_time": evaluated[-1].get("virtual_time"),
            "client_updates": evaluated[-1].get("client_updates"),
            "mean_staleness": (sum(staleness) / len(staleness)) if staleness else 0.0,
            "max_staleness": max(staleness) if staleness else 0,
            "wall_time_s": round(wall, 1),
            "bookkeeping_share": (stats.get("bookkeeping_seconds", 0.0) / wall) if stats else None,
            "curve": [(r.get("virtual_time"), r.get("client_updates"), r["test_accuracy"]) for r in evaluated],
        }
        results_path.write_text(json.dumps(results, indent=1))
        print(json.dumps({k: v for k, v in results[name].items() if k != "curve"}, indent=1), flush=True)

    def fmt(v, pct=False, digits=1):
        if v is None:
            return "not reached"
        return f"{100 * v:.2f}%" if pct else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

    lines = [("| strategy | virtual s to 97% | updates to 97% | virtual s to 98% | updates to 98% | final acc | "
              "mean / max staleness | wall s |"), "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {fmt(r['virtual_time_to_97'])} | {fmt(r['client_updates_to_97'])} | "
                     f"{fmt(r['virtual_time_to_98'])} | {fmt(r['client_updates_to_98'])} | "
                     f"{fmt(r['final_accuracy'], pct=True)} | {r['mean_staleness']:.2f} / {r['max_staleness']} | "
                     f"{r['wall_time_s']:.0f} |")
    (out / "async_fleet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        curve = [c for c in r["curve"] if c[0] is not None]
        ax1.plot([c[0] for c in curve], [100 * c[2] for c in curve], label=name)
        ax2.plot([c[1] for c in r["curve"]], [100 * c[2] for c in r["curve"]], label=name)
    ax1.set(xlabel="virtual time (s)", ylabel="test accuracy (%)", ylim=(90, 100), title="Accuracy against virtual time")
    ax2.set(xlabel="client updates", ylabel="test accuracy (%)", ylim=(90, 100), title="Accuracy against client updates")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "async_fleet.png", dpi=100)


if __name__ == "__main__":
    main()
