"""Benchmark: McMahan et al. 2017 ("Communication-Efficient Learning of Deep Networks from
Decentralized Data"), Table 2, side by side with flmnist.

Each row is one of the paper's settings: 100 nodes of 600 MNIST images, C = 0.1 (10 nodes
trained per round), plain local SGD, rounds until the global model first reaches the
target test accuracy, evaluated after every round (``eval.every=1``):

    row         preset                        model          E   B   target  paper rounds (FedAvg)
    cnn-iid     experiment=mcmahan_iid        cnn_mcmahan    5  10   99%     20
    cnn-noniid  experiment=mcmahan_noniid     cnn_mcmahan    5  10   99%     229
    2nn-iid     experiment=mcmahan_2nn_iid    mlp (2NN)     10  10   97%     34
    2nn-noniid  experiment=mcmahan_2nn_noniid mlp (2NN)     10  10   97%     497

The 2NN figures are Table 2's E = 10, B = 10 row (FedSGD: 1468 IID, 1817 non-IID). The paper
had only FedAvg (and FedSGD); FedAvgM and FedAdam (``conf/strategy/``, server settings as
there) are run on the same rows for comparison.

Learning rate, as the paper does it (the best rate of a grid, per setting), cut to fit 2 CPU
cores: every lr of the grid gets a short run of ``--grid-rounds`` rounds (default 3); the lr
that reached the target in the fewest rounds wins, else the one with the highest test
accuracy after the last short round (ties: the smaller lr). Then one full run with that lr,
up to ``--max-rounds`` rounds. The full run starts from scratch (same seed; its first rounds
need not repeat the short run's exactly, the sampled nodes can differ). With one lr given
there is no grid.

Every run is a separate ``flmnist`` command in its own directory under
``benchmarks/results/mcmahan/runs/`` (git-ignored), with ``stop_at_target=true`` when this
flmnist has that setting (the run ends at the first evaluation at or above the target),
else it runs its ``num_rounds`` and ``rounds_to_target`` is read from the summary. Per-node
digit attribution is turned off (``eval.attribution=false``, when present) unless
``--attribution``: it is a diagnostic the paper's runs did not pay for.

The floor: the plain-PyTorch work of one round (10 nodes of the row's split x E epochs of their
600 images at batch B, from the same initial model, then the example-weighted average), in
this process, no Flower; and, separately, one evaluation on the 10,000 test images (flmnist
does one per round here).

CPU: each heavy run (every flmnist command, the plain-PyTorch timing) takes an exclusive
``flock`` on ``/tmp/flmnist-cpu.lock`` for its duration, so runs of other people's
benchmarks interleave between ours instead of sharing the cores.

    python benchmarks/mcmahan.py                                   # cnn-iid, FedAvg, default grid
    python benchmarks/mcmahan.py --rows cnn-iid,2nn-iid --strategies fedavg,fedavgm,fedadam
    python benchmarks/mcmahan.py --rows cnn-noniid --lrs 0.05      # one lr: no grid
    python benchmarks/mcmahan.py --dry-run                          # print the commands only

Writes ``benchmarks/results/mcmahan/mcmahan.json`` and ``mcmahan.md`` (after every run, so an
interrupted benchmark keeps what it measured). Finished runs found in their directories with
the same command are reused unless ``--fresh``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "mcmahan"
LOCK = "/tmp/flmnist-cpu.lock"

ROWS = {
    "cnn-iid": {"experiment": "mcmahan_iid", "model": "CNN", "split": "IID", "E": 5, "B": 10, "target": 0.99,
                "paper": 20, "max_rounds": 60, "lrs": [0.02, 0.05, 0.1]},
    "cnn-noniid": {"experiment": "mcmahan_noniid", "model": "CNN", "split": "non-IID", "E": 5, "B": 10,
                   "target": 0.99, "paper": 229, "max_rounds": 300, "lrs": [0.02, 0.05, 0.1]},
    "2nn-iid": {"experiment": "mcmahan_2nn_iid", "model": "2NN", "split": "IID", "E": 10, "B": 10, "target": 0.97,
                "paper": 34, "max_rounds": 100, "lrs": [0.05, 0.1, 0.2]},
    "2nn-noniid": {"experiment": "mcmahan_2nn_noniid", "model": "2NN", "split": "non-IID", "E": 10, "B": 10,
                   "target": 0.97, "paper": 497, "max_rounds": 600, "lrs": [0.05, 0.1, 0.2]},
}
STRATEGIES = {"fedavg": "FedAvg", "fedavgm": "FedAvgM", "fedadam": "FedAdam"}


def log(msg: str) -> None:
    print(f"[mcmahan {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextlib.contextmanager
def cpu_lock():
    """Hold the shared CPU lock (exclusive flock) for one heavy run; return the seconds waited."""
    waited = {"s": 0.0}
    with open(LOCK, "a+") as fh:
        start = time.perf_counter()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for {LOCK} (another heavy run holds it)")
            fcntl.flock(fh, fcntl.LOCK_EX)
        waited["s"] = time.perf_counter() - start
        try:
            yield waited
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def flmnist_command() -> list[str]:
    exe = Path(sys.executable).parent / "flmnist"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "flmnist"]


def supported(overrides: list[str]) -> bool:
    """Does this flmnist's config accept these overrides (settings other engineers are adding)?"""
    from flmnist.config.compose import compose_config
    from flmnist.core.errors import ConfigError

    try:
        compose_config(overrides)
    except ConfigError:
        return False
    return True


def fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def run_overrides(row: dict, strategy: str, lr: float, rounds: int, extra: list[str]) -> list[str]:
    return [f"experiment={row['experiment']}", f"strategy={strategy}", f"client.lr={fmt_lr(lr)}",
            f"num_rounds={rounds}", "eval.every=1", *extra]


def read_run(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else []
    acc = {r["round"]: r["test_accuracy"] for r in rows if r.get("test_accuracy") is not None}
    walls = {r["round"]: r["wall_time"] for r in rows if r.get("wall_time") is not None}
    done = summary.get("rounds_completed") or 0
    start = walls.get(0, 0.0)
    per_round = (walls[done] - start) / done if done and done in walls else None
    # rounds 2..done: without round 1, which also pays for loading data and starting the Ray workers
    steady = (walls[done] - walls[1]) / (done - 1) if done > 1 and done in walls and 1 in walls else None
    return {
        "status": summary.get("status"),
        "rounds_completed": done,
        "rounds_to_target": summary.get("rounds_to_target"),
        "stopped_early": summary.get("stopped_early"),
        "final_accuracy": summary.get("final_accuracy"),
        "best_accuracy": summary.get("best_accuracy"),
        "server_wall_time_s": summary.get("wall_time"),
        "seconds_per_round": None if per_round is None else round(per_round, 2),
        "seconds_per_round_after_first": None if steady is None else round(steady, 2),
        "accuracy": {int(k): round(v, 4) for k, v in sorted(acc.items()) if k > 0},
    }


def run_flmnist(name: str, overrides: list[str], args) -> dict:
    """One flmnist run in its own directory, under the CPU lock; reuse a finished identical one."""
    run_dir = OUT / "runs" / name
    cmd_text = "flmnist " + " ".join(overrides)
    cmd = [*flmnist_command(), *overrides, f"hydra.run.dir={run_dir}"]
    record = {"name": name, "command": cmd_text, "run_dir": str(run_dir.relative_to(REPO))}
    saved = run_dir / "bench_run.json"
    if not args.fresh and saved.exists():
        old = json.loads(saved.read_text())
        if old.get("command") == cmd_text and old.get("status") == "finished":
            log(f"{name}: reusing the finished run in {run_dir}")
            return old
    if args.dry_run:
        log(f"{name}: {cmd_text}")
        return {**record, "status": "dry-run"}
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    with cpu_lock() as waited:
        log(f"{name}: {cmd_text}")
        start = time.perf_counter()
        with open(run_dir / "bench_stdout.log", "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if args.verbose or any(k in line for k in ("[round ", "Target accuracy", "rror", "Run finished")):
                    sys.stdout.write(f"  {line}")
                    sys.stdout.flush()
            code = proc.wait()
        wall = time.perf_counter() - start
    record.update({"exit_code": code, "wall_time_s": round(wall, 1), "lock_wait_s": round(waited["s"], 1)})
    if (run_dir / "summary.json").exists():
        record.update(read_run(run_dir))
    else:
        record["status"] = "no summary"
    if code != 0 and record.get("status") == "finished":
        record["status"] = f"exit {code}"
    saved.write_text(json.dumps(record, indent=1))
    reached = record.get("rounds_to_target")
    log(f"{name}: {record.get('status')}, rounds to target {reached or 'not reached'}, "
        f"final accuracy {record.get('final_accuracy')}, {record['wall_time_s']} s")
    return record


def grid_key(run: dict) -> tuple:
    """Selection rule: fewest rounds to target, then highest accuracy after the last round, then smaller lr."""
    reached = run.get("rounds_to_target")
    acc = run.get("final_accuracy")
    return (reached if reached else math.inf, -(acc if acc is not None else -1.0), run["lr"])


def plain_round(row: dict, lr: float) -> dict:
    """Plain PyTorch, no Flower: one round's work of the row (10 sampled nodes x E epochs at batch B
    from the global model, example-weighted average) and one test-set evaluation, timed."""
    import torch

    from flmnist.client.node_data import node_seed
    from flmnist.config.compose import compose_config
    from flmnist.core.build import build
    from flmnist.ml.data import load_mnist
    from flmnist.ml.mnist_files import resolve_root
    from flmnist.ml.partition import holdout_split
    from flmnist.ml.training import evaluate, train

    cfg = compose_config([f"experiment={row['experiment']}", f"client.lr={fmt_lr(lr)}"])
    root = str(resolve_root(cfg.data.root))
    images, labels = load_mnist(root, True)
    test_x, test_y = load_mnist(root, False)
    parts = build(cfg.partition, "partition")(labels.numpy(), cfg.num_nodes, cfg.seed)
    sampled = max(1, round(cfg.sampling.fraction_train * cfg.num_nodes))
    nodes = []
    for i in range(sampled):
        tr, _ = holdout_split(parts[i], cfg.data.holdout_fraction, node_seed(cfg.seed, i))
        tr = torch.from_numpy(tr)
        nodes.append((images[tr], labels[tr]))
    torch.manual_seed(cfg.seed)
    model = build(cfg.model, "model")
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    c = cfg.client
    start = time.perf_counter()
    states, weights = [], []
    for i, (x, y) in enumerate(nodes):
        model.load_state_dict(global_state)
        train(model, x, y, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
              epochs=c.local_epochs, steps=c.local_steps, generator=torch.Generator().manual_seed(node_seed(cfg.seed, i, 1)))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        weights.append(len(y))
    total = sum(weights)
    model.load_state_dict({k: sum(s[k] * (w / total) for s, w in zip(states, weights)) for k in global_state})
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate(model, test_x, test_y, cfg.eval.batch_size)
    eval_s = time.perf_counter() - start
    return {"nodes": sampled, "examples": total, "epochs": c.local_epochs, "batch_size": c.batch_size, "lr": c.lr,
            "train_and_average_s": round(train_s, 2), "test_eval_s": round(eval_s, 2),
            "round_s": round(train_s + eval_s, 2), "accuracy_after_one_round": round(result.accuracy, 4),
            "torch_threads": torch.get_num_threads()}


def floor_for(row_name: str, row: dict, lr: float, args, cache: dict) -> dict | None:
    if args.no_floor or args.dry_run:
        return None
    if row_name not in cache:
        with cpu_lock():
            log(f"{row_name}: timing one round of plain-PyTorch work (lr {fmt_lr(lr)})")
            try:
                cache[row_name] = plain_round(row, lr)
            except Exception as err:  # noqa: BLE001 (the floor is context: its failure must not cost the runs)
                cache[row_name] = {"error": f"{type(err).__name__}: {err}"}
        log(f"{row_name}: plain PyTorch {cache[row_name]}")
    return cache[row_name]


def rounds_text(run: dict | None, max_rounds: int) -> str:
    if not run or run.get("status") in (None, "dry-run"):
        return "-"
    if run.get("rounds_to_target"):
        return str(run["rounds_to_target"])
    if run.get("status") != "finished":
        return f"failed ({run.get('status')}) after {run.get('rounds_completed', 0)}"
    best = run.get("best_accuracy")
    return f"not reached in {run.get('rounds_completed', max_rounds)}" + (
        f" (best {100 * best:.2f}%)" if best is not None else "")


def markdown(results: dict) -> str:
    lines = [
        ("| row | strategy | lr (grid -> chosen) | paper rounds | flmnist rounds | wall time, full run (grid) "
         "| s per round (after round 1) | plain-PyTorch s per round (train / + test eval) | command |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in results["entries"]:
        row = ROWS[e["row"]]
        full = e.get("full") or {}
        grid = e.get("grid") or []
        lr_text = (" / ".join(fmt_lr(g["lr"]) for g in grid) + f" -> **{fmt_lr(e['lr'])}**") if grid \
            else fmt_lr(e["lr"])
        paper = str(row["paper"]) if e["strategy"] == "fedavg" else f"n/a (FedAvg: {row['paper']})"
        wall = f"{full['wall_time_s']:.0f} s" if full.get("wall_time_s") is not None else "-"
        grid_wall = sum(g.get("wall_time_s") or 0 for g in grid)
        if grid:
            wall += f" ({grid_wall:.0f} s)"
        spr, steady = full.get("seconds_per_round"), full.get("seconds_per_round_after_first")
        spr_text = "-" if spr is None else f"{spr:.1f}" + ("" if steady is None else f" ({steady:.1f})")
        floor = e.get("floor")
        floor_text = f"{floor['train_and_average_s']:.1f} / {floor['round_s']:.1f}" if floor and "round_s" in floor else "-"
        label = f"{row['model']} {row['split']}, E={row['E']} B={row['B']}, {100 * row['target']:.0f}%"
        lines.append(
            f"| {label} | {STRATEGIES[e['strategy']]} | {lr_text} | {paper} | "
            f"{rounds_text(full, e['max_rounds'])} | {wall} | {spr_text} | "
            f"{floor_text} | `{full.get('command', '-')}` |")
    grid_lines = ["", f"Learning-rate grid: test accuracy after {results['grid_rounds']} rounds (eval every round).", "",
                  "| row | strategy | lr | accuracy per round | rounds to target | wall time |", "|---|---|---|---|---|---|"]
    any_grid = False
    for e in results["entries"]:
        for g in e.get("grid") or []:
            any_grid = True
            accs = ", ".join(f"{100 * a:.2f}%" for a in (g.get("accuracy") or {}).values()) or "-"
            chosen = " (chosen)" if g["lr"] == e["lr"] else ""
            grid_lines.append(f"| {e['row']} | {STRATEGIES[e['strategy']]} | {fmt_lr(g['lr'])}{chosen} | {accs} | "
                              f"{g.get('rounds_to_target') or '-'} | {g.get('wall_time_s', '-')} s |")
    return "\n".join(lines + (grid_lines if any_grid else [])) + "\n"


def save(results: dict, args) -> None:
    """Write the JSON and Markdown, keeping entries (row, strategy) of earlier invocations that this
    one did not run (so rows measured one at a time end up in one table)."""
    if args.dry_run:
        return
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "mcmahan.json"
    ours = {(e["row"], e["strategy"]) for e in results["entries"]}
    kept = []
    if path.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            kept = [e for e in json.loads(path.read_text())["entries"] if (e["row"], e["strategy"]) not in ours]
    merged = {**results, "entries": sorted(kept + results["entries"],
                                           key=lambda e: (list(ROWS).index(e["row"]), list(STRATEGIES).index(e["strategy"])))}
    path.write_text(json.dumps(merged, indent=1))
    (OUT / "mcmahan.md").write_text(markdown(merged))


def report() -> None:
    """Rebuild the JSON and Markdown from the run directories the JSON lists."""
    path = OUT / "mcmahan.json"
    results = json.loads(path.read_text())
    for e in results["entries"]:
        for run in [*(e.get("grid") or []), e.get("full") or {}]:
            run_dir = REPO / run.get("run_dir", "-")
            if (run_dir / "summary.json").exists():
                run.update(read_run(run_dir))
    path.write_text(json.dumps(results, indent=1))
    (OUT / "mcmahan.md").write_text(markdown(results))
    print(markdown(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="cnn-iid", help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--strategies", default="fedavg", help=f"comma-separated, of {', '.join(STRATEGIES)}")
    parser.add_argument("--lrs", default=None,
                        help="client lr grid for every row (comma-separated; one value: no grid). "
                             "Default per row: CNN 0.02,0.05,0.1; 2NN 0.05,0.1,0.2")
    parser.add_argument("--grid-rounds", type=int, default=3, help="rounds of each short grid run (default 3)")
    parser.add_argument("--max-rounds", type=int, default=None,
                        help="rounds of the full run at most (default per row: CNN IID 60, CNN non-IID 300, "
                             "2NN IID 100, 2NN non-IID 600)")
    parser.add_argument("--attribution", action="store_true", help="keep per-node digit attribution on")
    parser.add_argument("--no-floor", action="store_true", help="skip the plain-PyTorch timing")
    parser.add_argument("--fresh", action="store_true", help="rerun finished runs found in their directories")
    parser.add_argument("--dry-run", action="store_true", help="print the flmnist commands, run nothing")
    parser.add_argument("--verbose", action="store_true", help="echo every line flmnist prints")
    parser.add_argument("--report", action="store_true",
                        help="run nothing: reread the runs listed in mcmahan.json and rewrite mcmahan.json/.md")
    args = parser.parse_args()
    if args.report:
        report()
        return

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for r in rows:
        if r not in ROWS:
            parser.error(f"unknown row {r!r}; choose from {', '.join(ROWS)}")
    for s in strategies:
        if s not in STRATEGIES:
            parser.error(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
    lrs_arg = [float(x) for x in args.lrs.split(",")] if args.lrs else None
    if args.grid_rounds < 1:
        parser.error("--grid-rounds must be at least 1")
    os.environ.setdefault("FLMNIST_DATA_DIR", str(REPO.parent / "shared" / "data" / "mnist"))

    extra: list[str] = []
    stop = supported(["stop_at_target=true"])
    if stop:
        extra.append("stop_at_target=true")
    if not args.attribution and supported(["eval.attribution=false"]):
        extra.append("eval.attribution=false")
    log(f"stop_at_target {'available: runs end at the target' if stop else 'not in this flmnist: runs go to num_rounds'}")

    results = {"paper": "McMahan et al. 2017, Table 2", "grid_rounds": args.grid_rounds,
               "selection_rule": "fewest rounds to target in the short runs, else highest test accuracy after "
                                 "the last short round, ties to the smaller lr; then one full run with that lr",
               "stop_at_target": stop, "extra_overrides": extra, "lock": LOCK,
               "data_dir": os.environ["FLMNIST_DATA_DIR"], "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "entries": []}
    floors: dict = {}
    for row_name in rows:
        row = ROWS[row_name]
        lrs = lrs_arg or row["lrs"]
        max_rounds = args.max_rounds or row["max_rounds"]
        for strategy in strategies:
            entry = {"row": row_name, **{k: row[k] for k in ("experiment", "model", "split", "E", "B", "target")},
                     "paper_rounds": row["paper"] if strategy == "fedavg" else None,
                     "paper_rounds_fedavg": row["paper"], "strategy": strategy, "lr_grid": lrs,
                     "max_rounds": max_rounds, "grid": [], "full": None, "lr": lrs[0]}
            results["entries"].append(entry)
            if len(lrs) > 1:
                for lr in lrs:
                    name = f"{row_name}_{strategy}_lr{fmt_lr(lr)}_grid{args.grid_rounds}"
                    run = run_flmnist(name, run_overrides(row, strategy, lr, args.grid_rounds, extra), args)
                    entry["grid"].append({"lr": lr, **run})
                    save(results, args)
                usable = [g for g in entry["grid"] if g.get("status") == "finished"]
                if args.dry_run:
                    usable = entry["grid"]
                    entry["lr"] = lrs[0]
                elif not usable:
                    log(f"{row_name} {strategy}: no grid run finished; skipping the full run")
                    save(results, args)
                    continue
                else:
                    entry["lr"] = min(usable, key=grid_key)["lr"]
                log(f"{row_name} {strategy}: chosen lr {fmt_lr(entry['lr'])}")
            entry["floor"] = floor_for(row_name, row, entry["lr"], args, floors)
            name = f"{row_name}_{strategy}_lr{fmt_lr(entry['lr'])}_full{max_rounds}"
            entry["full"] = run_flmnist(name, run_overrides(row, strategy, entry["lr"], max_rounds, extra), args)
            save(results, args)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save(results, args)
    print()
    print(markdown(results))
    log(f"wrote {OUT / 'mcmahan.json'} and {OUT / 'mcmahan.md'}")


if __name__ == "__main__":
    main()
