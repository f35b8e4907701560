"""The asynchronous strategies through a real `flwr run` (local SuperLink, simulated
SuperNodes): bit-for-bit reproducibility. Bad nodes: tests/test_adversarial.py;
dropped device updates: tests/test_engines.py."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from flmnist.launch.flwr_local import run_flwr

pytestmark = pytest.mark.slow  # real Flower runs

REPO = Path(__file__).resolve().parents[1]


def flwr_run(tmp_path: Path, name: str, overrides: list[str], num_nodes: int) -> Path:
    run_dir = tmp_path / name
    home = tempfile.mkdtemp(prefix="flmnist-test-home-")
    run_flwr(REPO, [*overrides, f"num_nodes={num_nodes}", f"run_dir={run_dir}"], num_nodes, home,
             log_path=tmp_path / f"{name}.log", timeout=600, backend="inprocess")
    assert (run_dir / "summary.json").is_file(), (tmp_path / f"{name}.log").read_text()[-3000:]
    return run_dir


def test_fedbuff_same_seed_same_metrics_bit_for_bit(tmp_path):
    overrides = ["strategy=fedbuff", "strategy.buffer_size=2", "fleet=jetson_mixed", "partition=dirichlet",
                 "client.local_steps=8", "async_loop.max_server_updates=6", "async_loop.eval_every=3",
                 "data.holdout_fraction=0.02"]
    # one after the other (side by side, two runs' PyTorch threads on 2 cores take twice as long)
    a, b = (flwr_run(tmp_path, name, overrides, num_nodes=4) for name in "ab")
    rows_a, rows_b = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    strip = ("wall_time",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in rows_a] == \
           [{k: v for k, v in r.items() if k not in strip} for r in rows_b]
    assert any(r.get("staleness") for r in rows_a) and rows_a[-1]["virtual_time"] > 0
    sa, sb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
