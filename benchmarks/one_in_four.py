"""Benchmark (issue 24): one hostile node of four, every other setting at its default.

Runs the `flmnist` command as a user types it: ``model=MODEL num_nodes=4`` (IID, FedAvg,
3 rounds), clean and with node 0 committing each attack every round:

- ``replace``: its weights times -5 (model replacement);
- ``sign-flip``: its update times -5;
- ``boost``: its update times 10;
- ``impersonate``: ``replace`` while claiming node 1's name and partition id in every reply.

``--strategies`` runs the same table for other strategy families: synchronous ones as above,
asynchronous ones (``fedbuff``, ``fedasync``) on a homogeneous simulated fleet for 12 client
updates (as many as 3 rounds of 4 nodes; FedBuff with a buffer of 4). ``--guard-off`` adds the
same runs with the defences off (``screen.guard_max_harm=null screen.clip_to_median=null``, the
defaults before issue 24), for the before/after table. For each run: final test accuracy, exit
status, the summary's status and ``degraded`` verdict, rejections by reason, and which node
names attribution credited. Writes benchmarks/results/one_in_four.{json,md}.

    python benchmarks/one_in_four.py [--models logreg lenet] [--strategies fedavg fedmedian fedbuff fedasync]
                                     [--attacks clean replace] [--guard-off]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ATTACKS = ["clean", "replace", "sign-flip", "boost", "impersonate"]
ASYNC = {"fedbuff": ["strategy.buffer_size=4"], "fedasync": []}
LABELS = {"clean": "clean", "replace": "weights x -5 (model replacement)", "sign-flip": "update x -5 (sign flip)",
          "boost": "update x 10 (boost)", "impersonate": "weights x -5, claiming node 1's name and partition"}


def title(model: str, strategy: str) -> str:
    """The results' key: the model alone for FedAvg (as first published), else model and strategy."""
    return model if strategy == "fedavg" else f"{model}, {strategy}"


def run(model: str, attack: str, guard: bool, out: Path, strategy: str = "fedavg") -> dict:
    key = f"{title(model, strategy).replace(', ', '_')}_{attack}{'' if guard else '_guard_off'}"
    run_dir = out / key
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str(REPO / ".venv" / "bin" / "flmnist"), f"model={model}", "num_nodes=4", f"hydra.run.dir={run_dir}"]
    if strategy != "fedavg":
        cmd += [f"strategy={strategy}"]
    if strategy in ASYNC:
        cmd += ["fleet=homogeneous", "async_loop.max_server_updates=null", "async_loop.max_client_updates=12",
                "async_loop.eval_every=1", *ASYNC[strategy]]
    if attack != "clean":
        cmd += [f"client.fault={attack}", "client.fault_nodes=[0]"]
    if not guard:
        cmd += ["screen.guard_max_harm=null", "screen.clip_to_median=null"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    (out / f"{key}.log").write_text(proc.stdout + proc.stderr)
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    screen = summary.get("screen") or {}
    attribution = summary.get("attribution") or {}
    return {
        "command": " ".join(["flmnist", *cmd[1:]]),
        "exit_code": proc.returncode,
        "status": summary.get("status", "no summary.json"),
        "degraded": summary.get("degraded"),
        "final_accuracy": summary.get("final_accuracy"),
        "rejection_reasons": screen.get("rejection_reasons"),
        "rejected_per_node": screen.get("rejected_per_node"),
        "guard": screen.get("guard"),
        "attributed_updates": attribution.get("updates"),
        "wall_time_s": round(wall, 1),
    }


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def cell(r: dict, clean: float | None) -> str:
    text = pct(r["final_accuracy"])
    if clean is not None and r["final_accuracy"] is not None:
        text += f" ({100 * (r['final_accuracy'] - clean):+.2f})"
    text += f", exit {r['exit_code']}"
    if r.get("degraded"):
        text += ", **degraded**"
    rejected = sum((r.get("rejected_per_node") or {}).values())
    if rejected:
        text += f", {rejected} rejected"
    credited = r.get("attributed_updates") or {}
    if credited:
        text += "; credited: " + ", ".join(f"{n} {c}" for n, c in sorted(credited.items()))
    return text


def table(results: dict) -> str:
    lines = []
    for key, by_setting in results.items():
        model, _, strategy = key.partition(", ")
        strategy = strategy or "fedavg"
        length = "12 client updates, homogeneous fleet" if strategy in ASYNC else "3 rounds"
        settings = [s for s in ("defaults", "guard off") if s in by_setting]
        lines += [f"**{model}, {strategy}** (IID, 4 nodes, {length}; node 0 hostile)", "",
                  "| what node 0 sends | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
        for attack in ATTACKS:
            cells = []
            for s in settings:
                r = by_setting[s].get(attack)
                clean = by_setting[s].get("clean", {}).get("final_accuracy")
                cells.append("not run" if r is None else cell(r, None if attack == "clean" else clean))
            lines.append(f"| {LABELS[attack]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("Final test accuracy (points against the clean run of the same column), the command's exit status, "
                 "updates rejected, and the node names attribution credited applied updates to.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["logreg", "lenet"])
    parser.add_argument("--strategies", nargs="*", default=["fedavg"])
    parser.add_argument("--attacks", nargs="*", default=ATTACKS, choices=ATTACKS)
    parser.add_argument("--guard-off", action="store_true", help="also run each with the defences off")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("FLMNIST_DATA_DIR", str(REPO.parent / "shared" / "data" / "mnist"))
    out = REPO / "benchmarks" / "results"
    runs = out / "one_in_four"
    runs.mkdir(parents=True, exist_ok=True)
    path = out / "one_in_four.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if not args.table_only:
        for strategy, model in [(s, m) for s in args.strategies for m in args.models]:
            for guard in ([True, False] if args.guard_off else [True]):
                setting = "defaults" if guard else "guard off"
                for attack in args.attacks:
                    r = run(model, attack, guard, runs, strategy)
                    results.setdefault(title(model, strategy), {}).setdefault(setting, {})[attack] = r
                    path.write_text(json.dumps(results, indent=1))
                    print(json.dumps({"model": model, "strategy": strategy, "setting": setting, "attack": attack,
                                      **{k: r[k] for k in ("exit_code", "final_accuracy", "degraded", "wall_time_s",
                                                           "rejected_per_node", "attributed_updates")}}), flush=True)
    md = table(results)
    (out / "one_in_four.md").write_text(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
