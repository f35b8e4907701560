"""Benchmark (issue 21): what client-level DP costs, in accuracy and per digit.

Runs the ``flmnist`` command as a user types it, ``privacy=central`` with the noise multiplier
that makes the run's last round spend exactly the target epsilon (at delta 1e-5, Flower's RDP
accountant, no sampling amplification), against the same run without privacy (epsilon = inf):

    flmnist model=MODEL num_nodes=20 partition=P num_rounds=R privacy=central
            privacy.noise_multiplier=SIGMA privacy.clipping_norm=C

for each split (IID, Dirichlet 0.5) and target epsilon. For each run: final test accuracy,
per-digit accuracy, the epsilon the run reported, wall time. Writes
benchmarks/results/privacy.{json,md} and privacy.png (accuracy against epsilon, per split).

    python benchmarks/privacy.py [--model logreg] [--rounds 20] [--nodes 20] [--epsilons 1 4 8 clip inf]
                                 [--splits iid dirichlet seed002] [--clip 1.0]
                                 [--mechanisms central dpsgd central_adaptive client local]

``central_adaptive``, ``client`` and ``local`` take the noise multiplier central would (one
Gaussian release a round; ``local``: per node, every node training every round;
``central_adaptive``: the count's noise ``count_stddev`` 4 sigma, its first clip ``--clip``); each row also
says after how many rounds the test accuracy first reached 95% (evaluated rounds only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DELTA = 1e-5


def epsilon(sigma: float, releases: int, delta: float = DELTA) -> float:
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(SelfComposedDpEvent(GaussianDpEvent(sigma), releases))
    return accountant.get_epsilon(delta)


def sigma_for(target: float, releases: int) -> float:
    """The smallest noise multiplier (to 0.1%) whose ``releases`` Gaussian releases spend ``target``."""
    low, high = 0.05, 1000.0
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        low, high = (mid, high) if epsilon(mid, releases) > target else (low, mid)
    return high


CLIP_ONLY_SIGMA = 1e-3  # the "clip" row: clipping and equal weights with next to no noise


def dpsgd_sigma_for(target: float, overrides: list[str], rounds: int) -> float:
    """The noise multiplier at which the node that spends most (fewest images, so the largest
    sampling rate) reaches ``target`` after ``rounds`` tasks, every node training every round,
    counted as flmnist counts it (its partitions, its accountant)."""
    import tempfile

    from flmnist.config.compose import compose_config
    from flmnist.engine.privacy import SampleAccountant
    from flmnist.protocol.messages import TrainSettings
    from flmnist.protocol.settings import PrivacySettings
    from flmnist.runtime.run_setup import partitions

    cfg = compose_config(overrides)
    root = Path(os.environ.get("FLMNIST_DATA_DIR", REPO.parent / "shared" / "data" / "mnist"))
    with tempfile.TemporaryDirectory() as tmp:
        limits = partitions(cfg, root, Path(tmp))
    sent = TrainSettings.from_config(cfg, str(root))
    smallest = min(range(len(limits.train_examples)), key=lambda i: limits.train_examples[i])

    def spent(sigma: float) -> float:
        accountant = SampleAccountant(PrivacySettings("dpsgd", noise_multiplier=sigma), sent, limits.train_examples)
        return accountant.epsilon_of(smallest, rounds)

    low, high = 0.3, 100.0
    while high / low > 1.001:
        mid = math.sqrt(low * high)
        low, high = (mid, high) if spent(mid) > target else (low, mid)
    return high


def run(out: Path, model: str, split: str, nodes: int, rounds: int, target: str, clip: float,
        mechanism: str = "central") -> dict:
    """One run; ``split`` is a partition (iid, dirichlet) or ``seed002`` (the preset as it is,
    its 40 rounds); ``target``: an epsilon, ``inf`` (no privacy) or ``clip`` (next to no noise)."""
    run_dir = out / f"{model}_{split}_{mechanism}_eps{target}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str(REPO / ".venv" / "bin" / "flmnist"), "eval.attribution=false", f"hydra.run.dir={run_dir}"]
    if split == "seed002":
        model, nodes, rounds = "lenet", 3, 40
        cmd += ["experiment=seed002"]
    else:
        cmd += [f"model={model}", f"num_nodes={nodes}", f"partition={split}", f"num_rounds={rounds}"]
    sigma = None
    if target != "inf" and mechanism == "dpsgd":
        sigma = CLIP_ONLY_SIGMA if target == "clip" else dpsgd_sigma_for(float(target), [*cmd[3:], "privacy=dpsgd"], rounds)
        cmd += ["privacy=dpsgd", f"privacy.noise_multiplier={sigma:.6g}", f"privacy.clipping_norm={clip:g}"]
    elif target != "inf":  # central, central_adaptive, client, local: one Gaussian release a round
        sigma = CLIP_ONLY_SIGMA if target == "clip" else sigma_for(float(target), rounds)
        cmd += [f"privacy={mechanism}", f"privacy.noise_multiplier={sigma:.6g}", f"privacy.clipping_norm={clip:g}"]
        if mechanism == "central_adaptive":  # the count's noise above sigma: the model's is then 1.03 sigma
            cmd += [f"privacy.count_stddev={4 * sigma:.6g}"]
    print(" ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=out, env={**os.environ, "FLWR_HOME": str(out / "flwr-home")},
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    result = {"mechanism": mechanism if target != "inf" else "none", "model": model, "split": split, "nodes": nodes, "rounds_asked": rounds, "target_epsilon": target,
              "noise_multiplier": sigma,
              "clipping_norm": clip if sigma else None, "exit": proc.returncode, "seconds": round(seconds, 1)}
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        evaluated = [r for r in json.loads((run_dir / "metrics.json").read_text()) if r.get("test_accuracy") is not None]
        last = evaluated[-1]
    except (OSError, ValueError, IndexError):
        summary = {}
    result["status"] = summary.get("status")
    if proc.returncode != 0 or summary.get("status") != "finished" or summary.get("final_accuracy") is None:
        result["error"] = proc.stderr[-1500:]  # a failed run is no row of the table
        return result
    result.update(accuracy=summary["final_accuracy"], rounds=summary["rounds_completed"],
                  epsilon=(summary.get("privacy") or {}).get("epsilon"), wall_time=summary.get("wall_time"),
                  per_digit=[last.get(f"test_acc_digit_{d}") for d in range(10)],
                  rounds_to_95=next((int(r["round"]) for r in evaluated if r["test_accuracy"] >= 0.95), None))
    print(f"  -> {result['accuracy']:.2%}, epsilon {result['epsilon']}, {seconds:.0f} s", flush=True)
    return result


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def mechanism(r: dict) -> str:
    return r.get("mechanism") or ("none" if r["target_epsilon"] == "inf" else "central")


ORDER = {"none": 0, "central": 1, "central_adaptive": 2, "client": 3, "local": 4, "dpsgd": 5}


def table(results: list[dict]) -> str:
    lines = []
    for split in dict.fromkeys(r["split"] for r in results):
        rows = sorted((r for r in results if r["split"] == split), key=lambda r: ORDER.get(mechanism(r), 3))
        lines += [f"**{rows[0]['model']}, {split}, {rows[0]['nodes']} nodes, {rows[0]['rounds_asked']} rounds**", "",
                  "| privacy | target epsilon | sigma | epsilon reported | accuracy | rounds to 95% | "
                  + " | ".join(f"digit {d}" for d in range(10)) + " | seconds |",
                  "|---" * 17 + "|"]
        for r in rows:
            digits = r.get("per_digit") or [None] * 10
            sigma = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.2f}"
            spent = "-" if r.get("epsilon") is None else f"{r['epsilon']:.2f}"
            reached = "-" if r.get("accuracy") is None else ("not reached" if r.get("rounds_to_95") is None
                                                              else str(r["rounds_to_95"]))
            lines.append(f"| {mechanism(r)} | {r['target_epsilon']} | {sigma} | {spent} | {pct(r.get('accuracy'))} | "
                         f"{reached} | "
                         + " | ".join(pct(v) for v in digits) + f" | {r['seconds']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    styles = {"central": "o-", "central_adaptive": "v-.", "client": "^--", "local": "d-", "dpsgd": "s:"}
    colors = {}
    for split in dict.fromkeys(r["split"] for r in results):
        rows = [r for r in results if r["split"] == split and r.get("accuracy") is not None]
        for mech, style in styles.items():
            finite = sorted((r for r in rows if mechanism(r) == mech and r["target_epsilon"] not in ("inf", "clip")),
                            key=lambda r: float(r["target_epsilon"]))
            if finite:
                line, = ax.plot([float(r["target_epsilon"]) for r in finite], [100 * r["accuracy"] for r in finite],
                                style, color=colors.get(split), label=f"{split}, {mech}")
                colors[split] = line.get_color()
        for r in rows:
            if r["target_epsilon"] == "inf":
                ax.axhline(100 * r["accuracy"], ls="--", color=colors.get(split), lw=0.8, label=f"{split}, no privacy")
    ax.set_xlabel("epsilon at delta 1e-5 (central: per node's data set; dpsgd: per image)")
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title("privacy=central: accuracy against epsilon")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="logreg")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--epsilons", nargs="+", default=["1", "4", "8", "clip", "inf"],
                    help="target epsilons; inf: no privacy; clip: privacy=central with next to no noise")
    ap.add_argument("--splits", nargs="+", default=["iid", "dirichlet", "seed002"])
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--mechanisms", nargs="+", default=["central", "dpsgd"],
                    choices=["central", "central_adaptive", "client", "local", "dpsgd"])
    args = ap.parse_args()
    results_dir = REPO / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)  # (gitignored: absent in a fresh checkout)
    out = REPO / "outputs" / "bench_privacy"
    out.mkdir(parents=True, exist_ok=True)
    path = results_dir / "privacy.json"
    planned = {(m, s, t) for m in args.mechanisms for s in args.splits for t in args.epsilons}
    # rows of earlier invocations are kept unless this one reruns them
    results = [r for r in (json.loads(path.read_text()) if path.is_file() else [])
               if (mechanism(r) if mechanism(r) != "none" else args.mechanisms[0], r["split"], r["target_epsilon"])
               not in planned]
    for mech in args.mechanisms:
        for split in args.splits:
            for target in args.epsilons:
                if target == "inf" and mech != args.mechanisms[0]:
                    continue  # the plain run once
                results.append(run(out, args.model, split, args.nodes, args.rounds, target, args.clip, mech))
                path.write_text(json.dumps(results, indent=1))
    text = (f"privacy=central, clipping_norm {args.clip:g}, "
            f"delta {DELTA:g}; sigma chosen so that the last round spends the target epsilon; clip: sigma {CLIP_ONLY_SIGMA:g} (`{' '.join(sys.argv)}`)\n\n"
            + table(results))
    (results_dir / "privacy.md").write_text(text)
    plot(results, results_dir / "privacy.png")
    print(text)


if __name__ == "__main__":
    main()
