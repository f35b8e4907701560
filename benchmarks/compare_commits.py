"""Alternating A/B timing of one flmnist command on two commits, same machine, same Python.

    python benchmarks/compare_commits.py 82a2e4f [--pairs 4] [-- experiment=seed002 'eval.update_rounds=[]' eval.attribution=false]

The other commit is checked out into a temporary git worktree and put first on ``PYTHONPATH``
(with the working directory outside both trees, it wins over the editable install); this
checkout is the "new" side. Each pair runs ``python -m flmnist OVERRIDES`` on the new tree, then
on the old one, in fresh temporary directories; the wall times, the final accuracies and the
medians are printed and written to benchmarks/results/compare_commits.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = ["experiment=seed002", "eval.update_rounds=[]", "eval.attribution=false"]


def timed(tree: Path, overrides: list[str]) -> tuple[float, float | None]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(tree))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flmnist", *overrides, f"hydra.run.dir={tmp}/run"], cwd=tmp,
                       env=env, capture_output=True, check=True)
        wall = time.perf_counter() - start
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
        return wall, summary.get("final_accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="the commit to compare this checkout against")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("overrides", nargs="*", default=DEFAULT)
    args = parser.parse_intermixed_args()
    old = Path(tempfile.mkdtemp(prefix="flmnist-old-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(old), args.old], cwd=REPO, check=True,
                   capture_output=True)
    times: dict[str, list[float]] = {"new": [], "old": []}
    try:
        for i in range(args.pairs):
            for side, tree in (("new", REPO), ("old", old)):
                wall, accuracy = timed(tree, args.overrides)
                times[side].append(round(wall, 2))
                print(f"pair {i + 1} {side}: {wall:.1f} s, accuracy {accuracy}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=False)
    result = {"old": args.old, "overrides": args.overrides, "wall_s": times,
              "median_s": {k: statistics.median(v) for k, v in times.items()}}
    print(json.dumps(result["median_s"]))
    out = REPO / "benchmarks" / "results" / "compare_commits.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
