"""A wrecked run says so: the collapse check on the recorder's rows, the per-step attribution that
names its suspects, summary.json's ``degraded``, the final line ``Run finished degraded:`` the
flmnist command waits for, its exit status 3, and the sweep table's ``degraded`` status."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from flmnist.config.compose import compose_config
from flmnist.config.validate import collapse_args
from flmnist.core.errors import ConfigError
from flmnist.launch.cli import EXIT_DEGRADED, write_comparison
from flmnist.launch.outcome import finished_line
from flmnist.ml.models import LogReg
from flmnist.observers.attribution import Attribution
from flmnist.observers.collapse import describe, find_collapse
from flmnist.observers.recorder import FINAL_LINE, RunRecorder, final_line
from flmnist.observers.stopped import summarize_stopped


def rows_of(*accuracies, start: int = 1) -> list[dict]:
    return [{"round": start + i, **({} if a is None else {"test_accuracy": a})} for i, a in enumerate(accuracies)]


# ------------------------------------------------------------------ find_collapse

def test_a_clean_rising_run_is_not_degraded():
    assert find_collapse(rows_of(0.5, 0.7, 0.85, 0.9, 0.92)) is None
    assert find_collapse([]) is None


def test_a_run_that_falls_and_stays_down_is_degraded_with_its_suspects():
    by_step = {"2": {"node 0": -50.0, "node 1": 3.0, "node 2": -1.5},
               3: {"node 0": -130.2, "node 1": -0.5, "node 3": 2.0},
               "5": {"node 1": -900.0},  # after the fall: not counted
               "1": {"node 2": -700.0}}   # before the best: not counted
    out = find_collapse(rows_of(0.6, 0.92, 0.8, 0.08, 0.1, 0.09), by_step=by_step)  # 0.8: within 20 points
    assert out is not None
    assert (out["best_accuracy"], out["best_step"], out["fell_at_step"]) == (0.92, 2, 4)
    assert out["fell_to_accuracy"] == 0.08 and out["final_accuracy"] == 0.09
    assert out["drop"] == pytest.approx(0.83)
    # steps 3 and 4 (best_step < s <= fell_at_step): only step 3 has gains here; "2" is the best step
    assert out["suspects"] == [{"node": "node 0", "gain_pp": -130.2}, {"node": "node 1", "gain_pp": -0.5}]


def test_the_issues_example_fall_from_92_to_8_percent():
    out = find_collapse(rows_of(0.92, 0.08, 0.001), drop=0.2, patience=2,
                        by_step={1: {"node 0": 10.0}, 2: {"node 0": -180.2, "node 1": 4.0}})
    assert (out["best_step"], out["fell_at_step"], out["drop"]) == (1, 2, pytest.approx(0.919))
    assert out["suspects"] == [{"node": "node 0", "gain_pp": -180.2}]
    assert describe(out) == ("test accuracy fell from 92.0% (round 1) to 8.0% at round 2 and stayed there "
                             "(final 0.1%); attribution holds node 0 (-180.2 pp) most responsible")
    assert describe({**out, "suspects": []}, "update").endswith("at update 2 and stayed there (final 0.1%)")


def test_at_most_three_suspects_most_negative_first():
    gains = {f"node {n}": -float(n) for n in range(6)}
    out = find_collapse(rows_of(0.9, 0.1, 0.1), by_step={"2": gains})
    assert [s["node"] for s in out["suspects"]] == ["node 5", "node 4", "node 3"]
    assert find_collapse(rows_of(0.9, 0.1, 0.1))["suspects"] == []  # no attribution


def test_a_temporary_dip_that_recovers_is_not_degraded():
    assert find_collapse(rows_of(0.9, 0.1, 0.1, 0.85, 0.88)) is None
    assert find_collapse(rows_of(0.9, 0.1, 0.1, 0.1, 0.75)) is None  # the last one is back within 20 points


def test_too_few_evaluations_after_the_fall_are_not_degraded():
    assert find_collapse(rows_of(0.5, 0.9, 0.1)) is None  # one evaluation down, patience 2
    assert find_collapse(rows_of(0.5, 0.9, 0.1), patience=1)["fell_at_step"] == 3
    assert find_collapse(rows_of(0.9, 0.1, 0.1), patience=3) is None
    assert find_collapse(rows_of(0.1, 0.1)) is None


def test_the_fall_must_exceed_drop():
    assert find_collapse(rows_of(0.9, 0.75, 0.75)) is None  # 15 points
    assert find_collapse(rows_of(0.9, 0.75, 0.75), drop=0.1)["drop"] == pytest.approx(0.15)


def test_rows_without_test_accuracy_are_skipped():
    rows = rows_of(0.5, None, 0.9, None, 0.2, None, 0.1, float("nan"))
    out = find_collapse(rows)
    assert (out["best_step"], out["fell_at_step"], out["final_accuracy"]) == (3, 5, 0.1)
    assert find_collapse(rows_of(None, None, None)) is None


# ------------------------------------------------------------------ attribution per step

def test_attribution_keeps_each_nodes_summed_gain_per_step(tmp_path):
    hook = Attribution(torch.zeros(20, 1, 28, 28), torch.arange(20) % 10, LogReg, probe_size=20, printer=lambda _: None)
    weights = {k: v.numpy() for k, v in LogReg().state_dict().items()}
    outcomes = iter([np.full(10, 0.5), np.full(10, 0.6), np.full(10, 0.3),   # step 1: base, node 0, node 1
                     np.full(10, 0.5), np.full(10, 0.4)])                      # step 2: base, node 0
    # the base model's accuracy and label shares come from Probe.scores, each update's from Probe.per_digit
    hook.probe.scores = lambda w, delta=None: (next(outcomes), np.full(10, 0.1))
    hook.probe.per_digit = lambda w, delta=None: next(outcomes)
    hook.attribute(1, weights, [("node 0", weights), ("node 1", weights)], key=1)
    hook.attribute(2, weights, [("node 0", weights)], key=2)
    assert hook.by_step[1] == pytest.approx({"node 0": 100.0, "node 1": -200.0})  # 10 digits x +10 / -20 pp
    assert hook.by_step[2] == pytest.approx({"node 0": -100.0})
    again = Attribution(torch.zeros(20, 1, 28, 28), torch.arange(20) % 10, LogReg, probe_size=20,
                        printer=lambda _: None)
    again.load_state(json.loads(json.dumps(hook.state())))  # str keys, as a checkpoint may hold them
    assert again.by_step == hook.by_step
    summary = hook.finish()
    assert summary["by_step"] == {"1": {"node 0": 100.0, "node 1": -200.0}, "2": {"node 0": -100.0}}
    assert summary["totals"]["node 1"] == [-20.0] * 10 and summary["updates"] == {"node 0": 2, "node 1": 1}


# ------------------------------------------------------------------ the recorder and the command

def recorded(tmp_path, accuracies, **settings) -> tuple[dict, list[str]]:
    lines: list[str] = []
    recorder = RunRecorder(tmp_path, len(accuracies), 0.99, printer=lines.append, **settings)
    for step, acc in enumerate([0.1, *accuracies]):
        recorder.add(step, test_accuracy=acc, test_loss=1.0)
        recorder.end_round(step, state_dict={}, quiet=True)  # no model files: no save_tensors
    recorder.set_section("attribution", {"by_step": {"2": {"node 0": -180.2, "node 1": 4.0}}})
    recorder.finish()
    return json.loads((tmp_path / "summary.json").read_text()), lines


def test_a_collapsed_run_says_so_in_summary_json_and_its_last_line(tmp_path):
    summary, lines = recorded(tmp_path, [0.92, 0.08, 0.001])
    degraded = summary["degraded"]
    assert summary["status"] == "finished"
    assert (degraded["best_step"], degraded["fell_at_step"]) == (1, 2)
    assert degraded["suspects"] == [{"node": "node 0", "gain_pp": -180.2}]
    assert lines[-2] == ("Run degraded: test accuracy fell from 92.0% (round 1) to 8.0% at round 2 and stayed there "
                         "(final 0.1%); attribution holds node 0 (-180.2 pp) most responsible")
    assert lines[-1].startswith("Run finished degraded: final test accuracy 0.10%, best 92.00% (round 1)")
    assert lines[-1] == final_line(summary)  # what the command prints if Flower's log stream lost the line
    # the flmnist command ends Flower at this line, as at a healthy run's
    assert finished_line(tmp_path, None)("INFO :      " + lines[-1])
    assert finished_line(tmp_path, None)("INFO :      Run finished: final test accuracy 96.30%")
    assert not finished_line(tmp_path, None)("INFO :      " + lines[-2])


def test_a_healthy_run_has_degraded_null(tmp_path):
    summary, lines = recorded(tmp_path, [0.8, 0.9, 0.92])
    assert "degraded" in summary and summary["degraded"] is None
    assert lines[-1].startswith(FINAL_LINE.format(status="finished") + " final test accuracy 92.00%")
    assert not any(line.startswith("Run degraded") for line in lines)


def test_collapse_drop_null_never_calls_a_run_degraded(tmp_path):
    summary, lines = recorded(tmp_path, [0.92, 0.08, 0.001], collapse_drop=None)
    assert summary["degraded"] is None and lines[-1].startswith("Run finished: ")
    summary, _ = recorded(tmp_path / "patient", [0.92, 0.08, 0.001], collapse_patience=3)
    assert summary["degraded"] is None


def test_a_stopped_runs_summary_tells_of_a_collapse_too(tmp_path):
    recorded(tmp_path, [0.92, 0.08, 0.001])
    summary = summarize_stopped(tmp_path, 3, 0.99, "round", "stopped by SIGTERM")
    assert summary["status"] == "stopped" and summary["degraded"]["fell_at_step"] == 2
    assert summarize_stopped(tmp_path, 3, 0.99, "round", "x", collapse_drop=None)["degraded"] is None


def test_the_sweep_table_marks_a_degraded_job(tmp_path):
    degraded = find_collapse(rows_of(0.92, 0.08, 0.001), by_step={"2": {"node 0": -180.2}})
    summaries = [
        {"overrides": "strategy=fedavg", "status": "finished", "final_accuracy": 0.9612, "best_accuracy": 0.9630,
         "rounds_to_target": 31, "wall_time": 73.04, "run_dir": "a", "degraded": None},
        {"overrides": "client.lr=5", "status": "finished", "final_accuracy": 0.001, "best_accuracy": 0.92,
         "rounds_to_target": None, "wall_time": 10.0, "run_dir": "b", "degraded": degraded, "unit": "round"},
        {"overrides": "strategy=fedprox", "status": "failed", "run_dir": "c"},
    ]
    md = write_comparison(tmp_path, summaries)
    assert "| 0 | strategy=fedavg | finished | 96.12% | 96.30% | 31 | 73.0 |" in md
    assert "| 1 | client.lr=5 | degraded | 0.10% | 92.00% | not reached | 10.0 |" in md
    assert "| 2 | strategy=fedprox | failed |" in md
    assert "Job 1 finished degraded: test accuracy fell from 92.0% (round 1) to 8.0% at round 2" in md
    assert "node 0 (-180.2 pp) most responsible; results in b" in md
    statuses = [line.split(",")[2] for line in (tmp_path / "comparison.csv").read_text().splitlines()[1:]]
    assert statuses == ["finished", "degraded", "failed"]
    assert EXIT_DEGRADED == 3


# ------------------------------------------------------------------ the settings

def test_the_collapse_settings_are_checked_and_passed():
    assert collapse_args(compose_config([])) == {"collapse_drop": 0.2, "collapse_patience": 2}
    cfg = compose_config(["collapse.drop=null", "collapse.patience=4"])
    assert collapse_args(cfg) == {"collapse_drop": None, "collapse_patience": 4}
    for overrides, message in [(["collapse.drop=0"], "collapse.drop must be a finite number in \\(0, 1\\]"),
                               (["collapse.drop=1.5"], "collapse.drop must be"),
                               (["collapse.patience=0"], "collapse.patience must be an integer >= 1"),
                               (["collapse.patience=1.5"], "collapse.patience must be an integer")]:
        with pytest.raises(ConfigError, match=message):
            compose_config(overrides)
