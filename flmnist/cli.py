"""The ``flmnist`` command: Hydra's command line in front of ``flwr run``.

``flmnist experiment=seed002 strategy=fedprox`` composes the same config as the
ServerApp, checks it, and launches ``flwr run`` on a private local SuperLink with
as many SuperNodes as ``num_nodes``; results go to Hydra's job directory.
``flmnist -m strategy=fedavg,fedprox ...`` runs a sweep and ends with a
comparison table (CSV and Markdown) in the sweep directory.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from flmnist.config import check_group_overrides, conf_dir, validate
from flmnist.data import ensure_mnist, resolve_root
from flmnist.errors import FlmnistError
from flmnist.flwr_local import run_flwr

APP_DIR = Path(__file__).resolve().parents[1]
COLUMNS = ["job", "overrides", "status", "final_accuracy", "best_accuracy", "rounds_to_target", "wall_time", "run_dir"]


def quoted(path: Path) -> str:
    """A path as a quoted Hydra override value (paths may hold '=', ',' or spaces)."""
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def absolute_overrides(overrides: list[str], run_dir: Path) -> list[str]:
    """The job's overrides with relative paths made absolute and the run directory pinned."""
    out = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key in ("data.root", "output_dir") and value not in ("", "null"):
            item = f"{key}={quoted(Path(value.strip(chr(39) + chr(34))).expanduser().resolve())}"
        if key != "run_dir":
            out.append(item)
    return out + [f"run_dir={quoted(run_dir)}"]


def launch(cfg: DictConfig) -> dict:
    """Run one federated training for the composed ``cfg``; return its summary."""
    validate(cfg)
    root = resolve_root(cfg.data.root)
    ensure_mnist(root, cfg.data.download)  # fail here, before starting Flower, if MNIST is missing
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir).resolve()
    overrides = absolute_overrides(list(hc.overrides.task), run_dir)
    if not any(o.startswith("data.root=") for o in overrides):
        overrides.append(f"data.root={quoted(root)}")
    flwr_home = tempfile.mkdtemp(prefix="flmnist-flwr-home-")
    try:
        code = run_flwr(APP_DIR, overrides, cfg.num_nodes, flwr_home, log_path=run_dir / "flwr_run.log")
    finally:
        shutil.rmtree(flwr_home, ignore_errors=True)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FlmnistError(
            f"The run wrote no summary (flwr run exited with {code}); see {run_dir / 'flwr_run.log'}"
        )
    summary = json.loads(summary_path.read_text())
    summary["overrides"] = " ".join(o for o in hc.overrides.task if not o.startswith("run_dir="))
    return summary


def comparison_rows(summaries: list[dict]) -> list[dict]:
    return [{"job": i, **{c: s.get(c) for c in COLUMNS if c != "job"}} for i, s in enumerate(summaries)]


def write_comparison(sweep_dir: Path, summaries: list[dict]) -> str:
    """Write comparison.csv and comparison.md into the sweep directory; return the Markdown."""
    rows = comparison_rows(summaries)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    (sweep_dir / "comparison.csv").write_text(buf.getvalue())

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    lines = [
        "| job | overrides | status | final acc | best acc | rounds to target | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        wall = "-" if r["wall_time"] is None else f"{r['wall_time']:.1f}"
        lines.append(
            f"| {r['job']} | {r['overrides']} | {r['status']} | {pct(r['final_accuracy'])} | "
            f"{pct(r['best_accuracy'])} | {r['rounds_to_target'] or 'not reached'} | "
            f"{wall} |"
        )
    md = "\n".join(lines) + "\n"
    (sweep_dir / "comparison.md").write_text(md)
    return md


class ComparisonTable(Callback):
    """Hydra callback: collect each job's summary and write the comparison table after a sweep."""

    def __init__(self) -> None:
        self.summaries: list[dict] = []

    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        value = getattr(job_return, "_return_value", None)
        if isinstance(value, dict):
            self.summaries.append(value)
        else:
            self.summaries.append({"overrides": " ".join(config.hydra.overrides.task), "status": "failed"})

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        md = write_comparison(sweep_dir, self.summaries)
        print(f"\nComparison ({sweep_dir / 'comparison.md'}):\n{md}")


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def _main(cfg: DictConfig) -> dict:
    return launch(cfg)


def main() -> None:
    """Console entry point; catches our errors so the user sees one clear line."""
    import sys

    try:
        check_group_overrides([a for a in sys.argv[1:] if not a.startswith("-")])
        _main()
    except FlmnistError as err:
        print(f"flmnist: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


__all__ = ["ComparisonTable", "OmegaConf", "launch", "main", "write_comparison"]
