"""Benchmark (issue 8): one bad node of four commits every attack class; does the run survive?

For each strategy (FedAvg, FedAvgM, FedMedian, FedBuff, FedAsync): one clean run and one run
where node 3 of 4 uses ``client.fault=rotate`` (flmnist/client/faults.py): its k-th train reply
carries ``TRAIN_ATTACKS[k % len(TRAIN_ATTACKS)]`` and (synchronous strategies, which evaluate
on the nodes) its evaluation reply of round r ``EVALUATE_ATTACKS[r % len(EVALUATE_ATTACKS)]``.
Logistic regression, IID split, 20 local steps; synchronous strategies run
``len(TRAIN_ATTACKS)`` rounds, asynchronous ones ``4 * (len(TRAIN_ATTACKS) + 1)`` client updates
on a homogeneous simulated fleet (virtual clock, so node 3 gets every 4th update), so every
attack class occurs at least once.

Per attack class: was node 3's reply rejected and why (synchronous: the round's ``rejections``
in metrics.json; asynchronous: node 3's ``Rejected update`` log lines in order, aligned with
its attack sequence; evaluation attacks: ``Rejected evaluation`` log lines per round), or was it
accepted, and what the test accuracy did around it. Per run: survived (exit 0 and status
finished), updates rejected, final accuracy attacked against clean.
Writes benchmarks/results/adversarial.{json,md} (runs under benchmarks/results/adversarial/).

    python benchmarks/adversarial.py [--only FedAvg FedBuff] [--variant NAME]
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

from flmnist.client.faults import EVALUATE_ATTACKS, TRAIN_ATTACKS
from flmnist.launch.flwr_local import run_flwr


def code_fingerprint() -> str:
    """A hash of flmnist/ and conf/ as they are now: runs made on different code show it."""
    h = hashlib.sha1()
    for f in sorted([*(REPO / "flmnist").rglob("*.py"), *(REPO / "conf").rglob("*.yaml")]):
        h.update(str(f.relative_to(REPO)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]

BAD = 3
NODES = 4
ROUNDS = len(TRAIN_ATTACKS)                 # sync: round r commits TRAIN_ATTACKS[r % 14], r = 1..14
ASYNC_UPDATES = NODES * (len(TRAIN_ATTACKS) + 1)   # node 3's updates 1..15 cover all 14 classes
COMMON = ["model=logreg", "partition=iid", f"num_nodes={NODES}", "client.local_steps=20", "checkpoint_every=0"]
ASYNC = ["fleet=homogeneous", f"async_loop.concurrency={NODES}", "async_loop.max_server_updates=null",
         f"async_loop.max_client_updates={ASYNC_UPDATES}", "async_loop.eval_every=5"]
STRATEGIES = {
    "FedAvg": ["strategy=fedavg", f"num_rounds={ROUNDS}"],
    "FedAvgM": ["strategy=fedavgm", f"num_rounds={ROUNDS}"],
    "FedMedian": ["strategy=fedmedian", f"num_rounds={ROUNDS}"],
    "FedBuff": ["strategy=fedbuff", "strategy.buffer_size=3", *ASYNC],
    "FedAsync": ["strategy=fedasync", *ASYNC],
}
ATTACK = ["client.fault=rotate", f"client.fault_nodes=[{BAD}]"]
# Optional extra screen settings for a second pass (--variant), e.g. flmnist's own norm defences.
VARIANTS = {
    "default": [],
    "clip3": ["screen.clip_to_median=3"],
}

# What the screen says for each attack class (flmnist/protocol/screen.py), to align async rejections.
TRAIN_REASON = {
    "nan": r"non-finite",
    "complex-nan": r"complex",
    "dtype": r"float64",
    "shape": r"\(1,\)|cannot be decoded",
    "scale": r"norm",
    "sign-flip": r"norm",
    "huge-examples": r"num-examples",
    "extra-metric": r"unexpected \['accuracy'\]",
    "missing-metric": r"missing \['train-loss'\]",
    "loss-trace-number": r"'loss-trace' must be a list",
    "train-loss-list": r"'train-loss' must be a number",
    "partition-inf": r"'partition-id'",
    "long-trace": r"loss trace has",
    "bad-node-info": r"node-info",
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")
REJECTED_UPDATE = re.compile(r"Rejected update from (node \d+) \(node id (\d+)\): (.*)$|"
                             r"Rejected update from node id (\d+): (.*)$")
REJECTED_EVAL = re.compile(r"Rejected evaluation from (?:(node \d+) \(node id (\d+)\)|node id (\d+)): (.*)$")
FLOWER_ROUND = re.compile(r"\[ROUND (\d+)/\d+\]")


def clean_log(path: Path) -> list[str]:
    return [ANSI.sub("", ln).rstrip("\n") for ln in path.read_text(errors="replace").splitlines()]


def bad_node_ids(lines: list[str]) -> set[str]:
    """Flower node ids of node 3 (from the rejections that name it): 'node id N' lines are its too."""
    ids = set()
    for ln in lines:
        m = REJECTED_UPDATE.search(ln) or REJECTED_EVAL.search(ln)
        if m and m.group(1) == f"node {BAD}":
            ids.add(m.group(2))
    return ids


def update_rejections(lines: list[str]) -> list[tuple[str, str]]:
    """(node, reason) of every rejected train reply, in processing order; node ids of node 3 resolved."""
    ids = bad_node_ids(lines)
    out = []
    for ln in lines:
        m = REJECTED_UPDATE.search(ln)
        if not m:
            continue
        if m.group(1):
            out.append((m.group(1), m.group(3)))
        else:
            out.append((f"node {BAD}" if m.group(4) in ids else f"node id {m.group(4)}", m.group(5)))
    return out


def eval_rejections(lines: list[str]) -> dict[int, list[tuple[str, str]]]:
    """Synchronous: round -> (node, reason) of rejected evaluation replies (after Flower's [ROUND r])."""
    ids = bad_node_ids(lines)
    out: dict[int, list] = {}
    rnd = 0
    for ln in lines:
        m = FLOWER_ROUND.search(ln)
        if m:
            rnd = int(m.group(1))
            continue
        m = REJECTED_EVAL.search(ln)
        if m:
            node = m.group(1) or (f"node {BAD}" if m.group(3) in ids else f"node id {m.group(3)}")
            out.setdefault(rnd, []).append((node, m.group(4)))
    return out


def acc_at(rows: list[dict], step: int, before: bool) -> float | None:
    """Test accuracy of the last evaluation before ``step`` (or the first at/after it)."""
    ev = [r for r in rows if r.get("test_accuracy") is not None]
    if before:
        prior = [r for r in ev if r["round"] < step]
        return prior[-1]["test_accuracy"] if prior else None
    after = [r for r in ev if r["round"] >= step]
    return after[0]["test_accuracy"] if after else None


def analyse_sync(run_dir: Path, lines: list[str], attacks: tuple[str, ...]) -> tuple[dict, dict]:
    rows = json.loads((run_dir / "metrics.json").read_text())
    by_round = {r["round"]: r for r in rows}
    train: dict[str, list] = {}
    for rnd in range(1, ROUNDS + 1):
        attack = attacks[rnd % len(attacks)]
        row = by_round.get(rnd)
        if row is None or "num_updates" not in row:
            train.setdefault(attack, []).append({"round": rnd, "outcome": "not reached"})
            continue
        mine = [x.split(": ", 1)[1] for x in row.get("rejections", [])
                if x.startswith((f"node {BAD}: ", "node id "))]
        entry = {"round": rnd, "num_updates": row["num_updates"], "rejected_updates": row["rejected_updates"],
                 "acc_before": acc_at(rows, rnd, True), "acc_after": acc_at(rows, rnd, False)}
        if mine:
            entry.update(outcome="rejected", reason=mine[0])
        elif row.get("failed_replies"):
            entry.update(outcome="failed reply")
        else:
            entry.update(outcome="accepted")
        train.setdefault(attack, []).append(entry)
    evals = eval_rejections(lines)
    evaluate: dict[str, list] = {}
    for rnd in range(1, ROUNDS + 1):
        attack = EVALUATE_ATTACKS[rnd % len(EVALUATE_ATTACKS)]
        mine = [reason for node, reason in evals.get(rnd, []) if node == f"node {BAD}"]
        reached = rnd in by_round and by_round[rnd].get("num_updates") is not None
        entry = {"round": rnd, "outcome": ("rejected" if mine else "accepted") if reached else "not reached"}
        if mine:
            entry["reason"] = mine[0]
        client_acc = by_round.get(rnd, {}).get("client_accuracy")
        entry["client_accuracy"] = client_acc
        evaluate.setdefault(attack, []).append(entry)
    return train, evaluate


def analyse_async(run_dir: Path, lines: list[str], summary: dict, attacks: tuple[str, ...]) -> tuple[dict, dict]:
    rows = json.loads((run_dir / "metrics.json").read_text())
    mine = [reason for node, reason in update_rejections(lines) if node == f"node {BAD}"]
    stats = summary.get("async") or {}
    applied_bad = (stats.get("updates_per_node") or {}).get(f"node {BAD}", 0)
    # server versions whose update list holds node 3 (one entry per applied node-3 update)
    applied_versions = [r["round"] for r in rows for n in (r.get("nodes") or []) if n == f"node {BAD}"]
    sent = len(mine) + applied_bad
    train: dict[str, list] = {}
    queue = list(mine)
    av = list(applied_versions)
    for k in range(1, sent + 1):
        attack = attacks[k % len(attacks)]
        entry: dict = {"update_of_node": k}
        if queue and re.search(TRAIN_REASON[attack], queue[0]):
            entry.update(outcome="rejected", reason=queue.pop(0))
        else:
            entry["outcome"] = "accepted"
            if av:
                v = av.pop(0)
                entry.update(server_version=v, acc_before=acc_at(rows, v, True), acc_after=acc_at(rows, v, False))
        train.setdefault(attack, []).append(entry)
    if queue:  # rejections that matched no attack in sequence: keep them visible
        train.setdefault("(unaligned rejections)", []).extend({"outcome": "rejected", "reason": r} for r in queue)
    return train, {a: [{"outcome": "n/a (async: no client evaluation)"}] for a in EVALUATE_ATTACKS}


NO_RUN = "no run: the local SuperLink did not start"


def superlink_failed(log_path: Path, run_dir: Path) -> bool:
    """Flower's local SuperLink did not come up in its 15 s (a loaded machine), so nothing ran."""
    return not (run_dir / "summary.json").exists() and "Failed to start local SuperLink" in log_path.read_text(
        errors="replace")


def run(name: str, overrides: list[str], out: Path, data_root: str, timeout: float) -> dict:
    run_dir = out / name
    log_path = out / f"{name}.log"
    code = code_fingerprint()
    shutil.rmtree(run_dir, ignore_errors=True)  # no stale summary.json from an earlier invocation
    for attempt in range(1, 4):
        start = time.perf_counter()
        rc = run_flwr(REPO, [*COMMON, *overrides, f"run_dir={run_dir}", f"data.root={data_root}"], NODES,
                      tempfile.mkdtemp(prefix="flmnist-bench-"), log_path=log_path, timeout=timeout)
        wall = time.perf_counter() - start
        if not superlink_failed(log_path, run_dir):
            break
        print(f"{name}: the local SuperLink did not start (machine busy); attempt {attempt + 1}", flush=True)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if not summary and superlink_failed(log_path, run_dir):
        summary = {"status": NO_RUN}
    return {"run_dir": str(run_dir), "log": str(log_path), "code": code,
            "mean_accuracy_last_3": last3(run_dir), "exit_code": rc, "attempts": attempt,
            "wall_time_s": round(wall, 1),
            "status": summary.get("status", "no summary.json"), "error": summary.get("error"),
            "final_accuracy": summary.get("final_accuracy"), "summary": summary}


def last3(run_dir: Path) -> float | None:
    """Mean test accuracy of the last three evaluations (single evaluations of logreg swing by 1-2 points)."""
    path = run_dir / "metrics.json"
    if not path.exists():
        return None
    acc = [r["test_accuracy"] for r in json.loads(path.read_text()) if r.get("test_accuracy") is not None
           and r["round"] > 0][-3:]
    return round(sum(acc) / len(acc), 4) if acc else None


def reload(previous: dict) -> dict:
    """A run's record from an earlier invocation, with its summary read again."""
    summary_path = Path(previous["run_dir"]) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {**{k: v for k, v in previous.items() if k != "summary"}, "summary": summary,
            "mean_accuracy_last_3": last3(Path(previous["run_dir"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run only these strategies (results merged into the JSON)")
    parser.add_argument("--variant", default="default", choices=sorted(VARIANTS),
                        help="extra screen settings for both runs (default: none)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a run counts as frozen")
    parser.add_argument("--reanalyse", action="store_true",
                        help="run nothing: re-derive the tables from the run directories and logs already there")
    args = parser.parse_args()
    data_root = os.environ.get("FLMNIST_DATA_DIR") or str(REPO.parent / "shared" / "data" / "mnist")
    suffix = "" if args.variant == "default" else f"_{args.variant}"
    out = REPO / "benchmarks" / "results"
    runs_dir = out / f"adversarial{suffix}"
    runs_dir.mkdir(parents=True, exist_ok=True)
    results_path = out / f"adversarial{suffix}.json"
    previous = json.loads(results_path.read_text()) if results_path.exists() else {}
    results = previous if args.only or args.reanalyse else {}
    extra = VARIANTS[args.variant]
    for name, overrides in STRATEGIES.items():
        if args.only and name not in args.only:
            continue
        if args.reanalyse:
            if name not in previous:
                continue
            attacked, clean = (reload(previous[name][k]) for k in ("attacked", "clean"))
            # the rotation order the runs were made with (faults.TRAIN_ATTACKS may have changed since)
            attacks = tuple(previous[name].get("train_attacks_order") or TRAIN_ATTACKS)
        else:
            attacked = run(f"{name.lower()}_attacked", [*overrides, *extra, *ATTACK], runs_dir, data_root,
                           args.timeout)
            clean = run(f"{name.lower()}_clean", [*overrides, *extra], runs_dir, data_root, args.timeout)
            attacks = TRAIN_ATTACKS
        lines = clean_log(Path(attacked["log"]))
        summary = attacked.pop("summary")
        clean.pop("summary")
        is_async = name in ("FedBuff", "FedAsync")
        if summary and summary.get("status") != NO_RUN:
            train, evaluate = (analyse_async(Path(attacked["run_dir"]), lines, summary, attacks) if is_async
                               else analyse_sync(Path(attacked["run_dir"]), lines, attacks))
        else:
            train, evaluate = {}, {}
        screen = summary.get("screen") or {}
        rejected_updates = sum(1 for n, _ in update_rejections(lines) if n == f"node {BAD}")
        rejected_other = sorted({n for n, _ in update_rejections(lines) if n != f"node {BAD}"})
        sent = (sum(len(v) for k, v in train.items() if not k.startswith("(")) if train else None)
        results[name] = {
            "overrides": [*COMMON, *overrides, *extra],
            "train_attacks_order": list(attacks),
            "attacked": attacked,
            "clean": clean,
            "survived": attacked["exit_code"] == 0 and attacked["status"] == "finished",
            "bad_updates_sent": sent,
            "bad_updates_rejected": rejected_updates,
            "other_nodes_rejected": rejected_other,
            "bad_evaluations_rejected": sum(1 for v in evaluate.values() for e in v if e["outcome"] == "rejected"),
            "accuracy_drop": (None if attacked["final_accuracy"] is None or clean["final_accuracy"] is None
                              else round(clean["final_accuracy"] - attacked["final_accuracy"], 4)),
            "train_attacks": train,
            "evaluate_attacks": evaluate,
            "screen": screen,
            "async": summary.get("async"),
        }
        results_path.write_text(json.dumps(results, indent=1))
        print(json.dumps({k: v for k, v in results[name].items() if k not in ("train_attacks", "evaluate_attacks")},
                         indent=1), flush=True)
    md = table(results)
    (out / f"adversarial{suffix}.md").write_text(md)
    print(md)


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def cell(entries: list[dict]) -> str:
    if not entries:
        return "not committed"
    parts = []
    for e in entries:
        o = e["outcome"]
        if o == "accepted" and e.get("acc_before") is not None and e.get("acc_after") is not None:
            o = f"**accepted** (acc {pct(e['acc_before'])} -> {pct(e['acc_after'])})"
        elif o == "accepted":
            o = "**accepted**"
        parts.append(o)
    return ", ".join(dict.fromkeys(parts))


def short_reason(results: dict, attack: str, key: str) -> str:
    for r in results.values():
        for e in r[key].get(attack, []):
            if e.get("reason"):
                return re.sub(r"node id \d+", "node id N", e["reason"]).replace("|", "/")[:90]
    return "-"


def table(results: dict) -> str:
    names = [n for n in STRATEGIES if n in results]
    head = "| attack class | " + " | ".join(names) + " | screen's reason |"
    sep = "|---" * (len(names) + 2) + "|"
    lines = [head, sep]
    def cells(key: str, attack: str) -> str:
        return " | ".join(cell(results[n][key].get(attack, [])) if results[n]["attacked"]["status"] != NO_RUN
                          else "no run" for n in names)

    for a in TRAIN_ATTACKS:
        lines.append(f"| train: `{a}` | " + cells("train_attacks", a)
                     + f" | {short_reason(results, a, 'train_attacks')} |")
    for a in EVALUATE_ATTACKS:
        lines.append(f"| evaluate: `{a}` | " + cells("evaluate_attacks", a)
                     + f" | {short_reason(results, a, 'evaluate_attacks')} |")

    def row(label, fn):
        lines.append(f"| **{label}** | " + " | ".join(fn(results[n]) for n in names) + " | |")

    row("survived (exit 0, status finished)", lambda r: "yes" if r["survived"] else "not run (SuperLink did not "
        "start)" if r["attacked"]["status"] == NO_RUN else f"**no** ({r['attacked']['status']}, "
        f"exit {r['attacked']['exit_code']})")
    row("node 3 updates rejected / sent", lambda r: f"{r['bad_updates_rejected']} / {r['bad_updates_sent']}")
    row("node 3 evaluations rejected", lambda r: str(r["bad_evaluations_rejected"]) if r["async"] is None else "n/a")
    row("final acc attacked / clean", lambda r: f"{pct(r['attacked']['final_accuracy'])} / "
        f"{pct(r['clean']['final_accuracy'])}")
    row("mean acc of the last 3 evaluations, attacked / clean", lambda r: f"{pct(r['attacked']['mean_accuracy_last_3'])}"
        f" / {pct(r['clean']['mean_accuracy_last_3'])}")
    row("wall s attacked / clean", lambda r: f"{r['attacked']['wall_time_s']:.0f} / {r['clean']['wall_time_s']:.0f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
