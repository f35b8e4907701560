"""What a run leaves for a person to read: plots titled with the run, labelled in the engine's
units, the virtual-time panel only with a fleet; a summary table and statistics that fit the
engine. The recorder writes them from rows as both engines record them."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from flmnist.engine.async_stats import stats_lines
from flmnist.ml.export import save_state_dict
from flmnist.observers.recorder import FINAL_LINE, RunRecorder
from flmnist.observers.stopped import summarize_stopped

LABEL = "demo: FedProx, Dirichlet split, LeNet, 3 nodes"


def sync_rows(recorder: RunRecorder, fleet: bool) -> None:
    for r in range(4):
        fields = {"test_accuracy": 0.5 + 0.1 * r, "test_loss": 1.0 / (r + 1), "client_updates": 3 * r,
                  **{f"test_acc_digit_{d}": 0.4 + 0.05 * d for d in range(10)}}
        if r:
            fields["train_loss"] = 0.5 / r
        if fleet:
            fields["virtual_time"] = 12.5 * r
        recorder.add(r, **fields)
        for node in range(3):
            if r:
                recorder.add_loss_trace(f"node {node}", [1.0 / r, 0.8 / r, 0.6 / r], r)
        recorder.end_round(r, quiet=True)


def title(path: Path) -> str:
    return Image.open(path).text["Title"]


def test_sync_plots_name_the_run_and_show_no_empty_virtual_time_panel(tmp_path):
    recorder = RunRecorder(tmp_path, 3, 0.99, printer=lambda line: None)
    recorder.label = LABEL
    sync_rows(recorder, fleet=False)
    summary = recorder.finish()
    for name in ("accuracy_loss.png", "per_digit_accuracy.png", "client_loss.png"):
        assert LABEL in title(tmp_path / name), name
    assert title(tmp_path / "client_loss.png").startswith("Training loss per client (mean of each round)")
    # no fleet and the same 3 updates every round: accuracy against updates would repeat accuracy_loss.png
    assert not (tmp_path / "accuracy_time.png").exists()
    assert summary["status"] == "finished"
    table = (tmp_path / "summary.md").read_text().splitlines()
    assert table[0] == "| round | client updates | train loss | test loss | test acc | wall time (s) |"
    assert len(table) == 2 + 3  # rounds 1-3, round 0 is the initial model


def test_a_stopped_run_gets_a_summary_of_what_it_recorded(tmp_path):
    """A run killed after round 2 of 5 (its server gone): the summary says stopped, why, and the
    rounds and accuracy it reached; the plots are drawn from its metrics files."""
    recorder = RunRecorder(tmp_path, 5, 0.65, printer=lambda line: None)
    sync_rows(recorder, fleet=False)
    recorder.rows.pop(3)
    screen = {"replies_screened": 6, "replies_rejected": 1, "rejected_by_node": {"node 1": 1}}
    recorder.set_section("screen", screen)  # as the reply path reports it after each round
    privacy = {"mechanism": "central", "epsilon": 1.25, "delta": 1e-5}
    recorder.set_section("privacy", privacy)  # as the guard reports it after each round
    recorder.set_section("node_devices", {"node 0": "cpu", "node 1": "cuda:0"})  # as updates come
    recorder.write_metrics()  # what end_round had written when the run was killed
    (tmp_path / "attribution.csv").write_text(  # attribution's snapshots after rounds 1 and 2
        "step,node,updates," + ",".join(f"digit_{d}" for d in range(10)) + ",total\n"
        + "".join(f"{step},node {n},{step}," + ",".join(["1.00"] * 10) + ",10.00\n" for step in (1, 2) for n in (0, 1)))
    assert not (tmp_path / "summary.json").exists()
    summary = summarize_stopped(tmp_path, 5, 0.65, "round", "stopped by SIGTERM")
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert (summary["status"], summary["error"], summary["rounds_completed"]) == ("stopped", "stopped by SIGTERM", 2)
    assert (summary["final_accuracy"], summary["best_round"], summary["rounds_to_target"]) == (0.7, 2, 2)
    assert summary["screen"] == screen  # what the screen had rejected by then, not null
    # the other sections reported by then, and the attribution's totals after its last snapshot
    assert summary["privacy"] == privacy and summary["node_devices"] == {"node 0": "cpu", "node 1": "cuda:0"}
    assert summary["attribution"]["totals"] == {"node 0": [1.0] * 10, "node 1": [1.0] * 10}
    assert summary["attribution"]["updates"] == {"node 0": 2, "node 1": 2}
    assert summary["attribution"]["helped_most"]["3"] == "node 1"  # (a tie: the last in node order, as a live run ranks)
    assert summary["attribution"]["hurt_most"]["3"] is None
    assert "after step 2" in summary["attribution"]["from"]
    assert (tmp_path / "accuracy_loss.png").is_file() and len((tmp_path / "summary.md").read_text().splitlines()) == 4
    assert (tmp_path / "client_loss.png").is_file() and (tmp_path / "attribution.png").is_file()
    assert not (tmp_path / "model.pt").exists()  # nothing invented: there is no model to save here
    assert summarize_stopped(tmp_path / "empty", 5, 0.65, "round", "x") is None  # stopped before round 0


def test_a_stopped_summary_takes_no_section_from_an_earlier_attempt_and_the_ledgers_epsilon(tmp_path):
    """A run that stopped at its privacy budget, resumed with a larger one and stopped from outside
    before its first new step: the stopped summary does not say it stopped at the budget (the
    earlier attempt's early stop is dropped at restore; what it spent stays). Then a step's privacy section and a ledger
    ahead of it (DP-SGD charges each task as it is sent): the summary takes the ledger's epsilon."""
    first = RunRecorder(tmp_path, 5, 0.65, printer=lambda line: None)
    sync_rows(first, fleet=False)
    first.set_section("stopped_early", {"reason": "privacy budget", "step": 3})
    first.set_section("privacy", {"mechanism": "dpsgd", "epsilon": 1.0})
    first.write_metrics()
    resumed = RunRecorder(tmp_path, 8, 0.65, printer=lambda line: None)
    resumed.restore(first.state(3))
    summary = summarize_stopped(tmp_path, 8, 0.65, "round", "stopped by SIGTERM")
    assert summary["stopped_early"] is None and summary["privacy"] == {"mechanism": "dpsgd", "epsilon": 1.0}
    resumed.set_section("privacy", {"mechanism": "dpsgd", "epsilon": 1.0})
    resumed.write_metrics()
    (tmp_path / "privacy_ledger.json").write_text(json.dumps({"epsilon": 1.5, "state": {}}))
    privacy = summarize_stopped(tmp_path, 8, 0.65, "round", "stopped by SIGTERM")["privacy"]
    assert privacy["epsilon"] == 1.5 and privacy["epsilon_from"].startswith("privacy_ledger.json")
    # stopped before its first step's report: the section from the ledger alone
    fresh = tmp_path / "fresh"
    sync_rows(RunRecorder(fresh, 5, 0.65, printer=lambda line: None), fleet=False)
    (fresh / "privacy_ledger.json").write_text(json.dumps({"epsilon": 0.7, "state": {}}))
    assert summarize_stopped(fresh, 5, 0.65, "round", "stopped by SIGTERM")["privacy"]["epsilon"] == 0.7


def test_a_stopped_asynchronous_run_keeps_its_loop_statistics(tmp_path):
    recorder = RunRecorder(tmp_path, 6, 0.65, printer=lambda line: None, unit="update")
    sync_rows(recorder, fleet=True)
    recorder.async_stats = {"server_updates": 3, "client_updates": 9, "virtual_time": 37.5}
    recorder.write_metrics()
    summary = summarize_stopped(tmp_path, 6, 0.65, "update", "stopped by SIGTERM")
    assert summary["async"] == recorder.async_stats and summary["unit"] == "update"
    assert summary["rounds_completed"] == 3 and summary["final_virtual_time"] == 37.5


def test_a_fleet_adds_the_virtual_time_panel_and_column(tmp_path):
    recorder = RunRecorder(tmp_path, 3, 0.99, printer=lambda line: None)
    recorder.label = LABEL
    sync_rows(recorder, fleet=True)
    recorder.finish()
    assert Image.open(tmp_path / "accuracy_time.png").size[0] > 1000  # two panels
    assert "| virtual time (s) |" in (tmp_path / "summary.md").read_text().splitlines()[0]


def test_async_outputs_speak_of_server_updates_and_devices(tmp_path):
    recorder = RunRecorder(tmp_path, 6, 0.99, printer=lambda line: None, unit="update")
    recorder.label = LABEL
    sync_rows(recorder, fleet=True)
    stats = {"server_updates": 3, "client_updates": 9, "outcomes": {"applied": 8, "rejected": 1},
             "updates_per_node": {"node 0": 5, "node 1": 3}, "staleness_histogram": {0: 5, 1: 3},
             "mean_staleness": 0.375, "max_staleness": 1, "virtual_time": 37.5, "bookkeeping_seconds": 0.01,
             "devices": {"node 0": "orin", "node 1": "nano"}}
    recorder.async_stats = stats
    recorder.finish()
    assert title(tmp_path / "staleness_nodes.png") == f"Asynchronous run: {LABEL}"
    assert title(tmp_path / "client_loss.png").startswith("Training loss per client (mean of each client update)")
    header = (tmp_path / "summary.md").read_text().splitlines()[0]
    assert header.startswith("| server update | client updates | virtual time (s) |") and "client acc" not in header
    lines = stats_lines(stats)
    assert "node 0          5 applied updates (orin)" in lines and "virtual time    37.5 s" in lines
    assert lines[1] == "client updates  9 (applied 8, rejected 1)"


def test_tensorboard_and_mlflow_get_the_config_every_rounds_metrics_and_the_model(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flmnist.observers.tracker_backends import MLflowTracker, TensorBoardTracker
    from flmnist.observers.trackers import Trackers

    out = tmp_path / "outputs"
    run_dir = out / "2026-11-30" / "12-00-00_demo"
    recorder = RunRecorder(run_dir, 3, 0.99, printer=lambda line: None)
    recorder.label = LABEL
    config = {"output_dir": str(out), "client": {"lr": 0.1}, "eval": {"rounds": [1, 2]}}
    recorder.trackers = Trackers([TensorBoardTracker(), MLflowTracker()])
    recorder.trackers.call("start", run_dir, run_dir.name, config)
    sync_rows(recorder, fleet=False)
    # eval.digit_groups=[[0,2,4,6,8],[1,3,5,7,9]]: MLflow refused the name, and the tracker was turned off
    recorder.trackers.call("log_metrics", 3, {"test_pred_share_0,2,4,6,8": 0.5})
    (run_dir / "model.pt").write_bytes(b"model")  # finish() saves the real one when a state was recorded
    recorder.finish()
    assert len(recorder.trackers.trackers) == 2, "a tracker failed"

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("test_accuracy")] == [0, 1, 2, 3]
    assert events.Scalars("test_acc_digit_9")[-1].value == pytest.approx(0.85)

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("flmnist").experiment_id])
    assert run.info.run_name == "12-00-00_demo" and run.info.status == "FINISHED"
    assert run.data.params["client.lr"] == "0.1" and run.data.params["eval.rounds"] == "[1, 2]"
    history = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert [m.step for m in history] == [0, 1, 2, 3] and history[-1].value == pytest.approx(0.8)
    assert client.get_metric_history(run.info.run_id, "test_pred_share_0_2_4_6_8")[-1].value == 0.5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    plots = {p.name for p in run_dir.glob("*.png")}  # every plot (only three of them reached MLflow)
    assert {"accuracy_loss.png", "client_loss.png"} <= plots and {"model.pt", "summary.json", *plots} <= artifacts

    # Extended (flmnist resume=RUN_DIR num_rounds=5): the same MLflow run goes on; the changed
    # parameter, which MLflow refuses to overwrite, is a tag; the restored rows' late client
    # metrics reach it too (they were dropped: the recorder had handed no row to this tracker)
    # From another working directory, with the run's relative output_dir (the default "outputs"):
    # the store the run's MLflow run is in (RUN_DIR/mlflow_run_id), not a new one there
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    extended = RunRecorder(run_dir, 5, 0.99, printer=lambda line: None)
    extended.trackers = Trackers([MLflowTracker()])
    extended.trackers.call("start", run_dir, run_dir.name, {**config, "output_dir": "outputs", "num_rounds": 5,
                                                             "client": {"lr": 0.05}})
    assert not list((tmp_path / "elsewhere").rglob("mlflow.db")) and not (run_dir.parent / "mlflow.db").exists()
    copied = tmp_path / "copy" / "outputs" / run_dir.relative_to(out)  # copied to another machine: its own store
    shutil.copytree(run_dir, copied)
    MLflowTracker().start(copied, run_dir.name, {**config, "output_dir": str(tmp_path / "copy" / "outputs")})
    assert (tmp_path / "copy" / "outputs" / "mlflow.db").is_file()
    from flmnist.observers.tracker_backends import reachable
    assert reachable(f"sqlite:///{tmp_path / 'gone' / 'mlflow.db'}") is None  # another machine's store
    assert reachable(f"sqlite:///{out / 'mlflow.db'}") and reachable("http://mlflow:5000") == "http://mlflow:5000"
    extended.restore(recorder.state(3), step=3)
    extended.add(3, client_accuracy=0.7)
    extended.add(4, test_accuracy=0.9, test_loss=0.3)
    extended.end_round(4)
    extended.finish()
    assert len(extended.trackers.trackers) == 1, "the tracker failed"
    (run,) = client.search_runs([client.get_experiment_by_name("flmnist").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["client.lr"] == "0.1"
    assert run.data.tags["resumed.client.lr"] == "0.05" and run.data.params["num_rounds"] == "5"
    history = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert [m.step for m in history] == [0, 1, 2, 3, 4] and history[-1].value == pytest.approx(0.9)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "client_accuracy")][-1] == (3, 0.7)


def test_client_metrics_a_round_later_still_reach_the_trackers(tmp_path):
    """sampling.client_evaluation=in_train (the deployment default): round 1's client evaluation
    arrives with round 2's train replies, after round 1's row went to the trackers; the trackers
    get it then, at step 1 (they only ever saw the last round's)."""
    from flmnist.observers.trackers import Tracker, Trackers

    class Seen(Tracker):
        def __init__(self):
            self.logged = []

        def log_metrics(self, step, metrics):
            self.logged.append((step, metrics))

    seen = Seen()
    recorder = RunRecorder(tmp_path, 3, 0.99, printer=lambda line: None)
    recorder.trackers = Trackers([seen])
    recorder.add(1, test_accuracy=0.9)
    recorder.end_round(1)
    recorder.add(1, client_accuracy=0.85, client_loss=0.4)
    assert seen.logged[-1] == (1, {"client_accuracy": 0.85, "client_loss": 0.4})
    assert recorder.rows[1]["client_accuracy"] == 0.85
    # a step recorded again (the asynchronous loop's wind-down): only what is new, once
    seen.logged.clear()
    recorder.add(1, num_updates=3)
    recorder.end_round(1)
    assert [step for step, _ in seen.logged] == [1, 1] and "test_accuracy" not in str(seen.logged), seen.logged


def test_a_failing_tracker_is_dropped_and_the_run_goes_on(tmp_path):
    from flmnist.observers.trackers import Tracker, Trackers

    class Broken(Tracker):
        def log_metrics(self, step, metrics):
            raise OSError("disk full")

    recorder = RunRecorder(tmp_path, 3, 0.99, printer=lambda line: None)
    recorder.trackers = Trackers([Broken()])
    sync_rows(recorder, fleet=False)
    assert recorder.trackers.trackers == [] and recorder.finish()["status"] == "finished"


def test_an_unreachable_tracking_server_is_dropped_after_logger_timeout_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    """A tracking server that accepts connections and never answers (MLflow's client waits 120 s a
    request and retries for minutes): with the real MLflow client, the tracker is off after
    ``logger.timeout`` and the run finishes with its own files, without waiting for MLflow."""
    import socket
    import time

    from flmnist.observers.tracker_backends import MLflowTracker
    from flmnist.observers.trackers import Trackers

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # (the abandoned call ends once the server closes)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepted by the kernel, never answered
    try:
        recorder = RunRecorder(tmp_path, 3, 0.99, printer=lambda line: None)
        tracker = MLflowTracker(tracking_uri=f"http://127.0.0.1:{server.getsockname()[1]}", timeout=1)
        recorder.trackers = Trackers([tracker])
        started = time.perf_counter()
        with caplog.at_level("WARNING", logger="flwr"):
            recorder.trackers.call("start", tmp_path, tmp_path.name, {"client": {"lr": 0.1}})
        waited = time.perf_counter() - started
        assert recorder.trackers.trackers == []
        assert "MLflowTracker did not finish start within 1 s (logger.timeout" in caplog.text
        assert 1 <= waited < 10
        sync_rows(recorder, fleet=False)
        assert recorder.finish()["status"] == "finished" and (tmp_path / "summary.json").is_file()
    finally:
        server.close()


def test_an_mlflow_upload_cut_short_by_the_timeout_leaves_the_run_finished_not_running(tmp_path, monkeypatch):
    """MLflow's finish uploads the model and every plot; on a slow server logger.timeout can end it
    part way. The status is set first, so the MLflow run is FINISHED, not RUNNING for good."""
    import time

    from mlflow.tracking import MlflowClient

    from flmnist.observers.tracker_backends import MLflowTracker
    from flmnist.observers.trackers import Trackers

    out = tmp_path / "outputs"
    run_dir = out / "2026-12-07" / "12-00-00_slow"
    recorder = RunRecorder(run_dir, 3, 0.99, printer=lambda line: None)
    tracker = MLflowTracker()
    recorder.trackers = Trackers([tracker])
    recorder.trackers.call("start", run_dir, run_dir.name, {"output_dir": str(out)})  # (a new store: seconds)
    sync_rows(recorder, fleet=False)
    tracker.timeout = 4  # (setting the status takes milliseconds; on a loaded machine, more)
    upload = MlflowClient.log_artifact

    def slow(self, run_id, local_path, *args, **kwargs):  # a slow server: every upload takes long (the summary's too)
        time.sleep(10)
        return upload(self, run_id, local_path, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_artifact", slow)
    assert recorder.finish()["status"] == "finished"
    assert recorder.trackers.trackers == []  # cut short by logger.timeout
    run = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}").get_run(tracker.run_id)
    assert run.info.status == "FINISHED"


def test_a_stopped_runs_mlflow_mark_waits_at_most_the_runs_logger_timeout(tmp_path, monkeypatch, caplog):
    """The command marks a stopped run's MLflow run KILLED; an unreachable tracking server held it
    for minutes. It waits at most the run's own logger.timeout (its config.yaml), then says so."""
    import socket
    import time

    from flmnist.observers.mlflow_run import RUN_ID_FILE, mark_stopped
    from flmnist.observers.stopped import logger_timeout

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepted by the kernel, never answered
    try:
        (tmp_path / RUN_ID_FILE).write_text(f"abc123\nhttp://127.0.0.1:{server.getsockname()[1]}\n")
        (tmp_path / "config.yaml").write_text("strategy: {}\nnum_nodes: 2\nlogger:\n  timeout: 1\n")
        from flmnist.core.run_files import run_config

        assert logger_timeout(run_config(tmp_path)) == 1.0 and logger_timeout(None) == 30.0
        started = time.perf_counter()
        with caplog.at_level("WARNING", logger="flwr"):
            mark_stopped(tmp_path, logger_timeout(run_config(tmp_path)))
        assert time.perf_counter() - started < 10
        assert "could not be marked KILLED (TrackerTimeout: no answer within 1 s)" in caplog.text
    finally:
        server.close()


def test_a_tracker_call_that_ends_within_the_timeout_returns_its_value_or_raises_its_error(caplog):
    from flmnist.observers.trackers import Tracker, Trackers, within

    assert within(5, lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(OSError, match="disk full"):
        within(5, lambda: (_ for _ in ()).throw(OSError("disk full")))

    class Raising(Tracker):
        def __init__(self, error):
            self.error = error

        def log_metrics(self, step, metrics):
            raise self.error

    # a tracker's own TimeoutError (a hung NFS folder) is its failure, not logger.timeout's
    trackers = Trackers([Raising(TimeoutError("nfs"))])
    with caplog.at_level("WARNING", logger="flwr"):
        trackers.call("log_metrics", 1, {})
    assert trackers.trackers == [] and "failed in log_metrics (TimeoutError: nfs)" in caplog.text
    trackers = Trackers([Raising(SystemExit(3))])  # a SystemExit in a tracker's library: its failure, not the run's
    with caplog.at_level("WARNING", logger="flwr"):
        trackers.call("log_metrics", 1, {})
    assert trackers.trackers == [] and "failed in log_metrics (RuntimeError: SystemExit 3)" in caplog.text


def test_ctrl_c_while_waiting_for_a_tracker_stops_the_run_and_the_tracker_is_not_called_again():
    """A real SIGINT to this process while the run waits for a slow tracker call: KeyboardInterrupt
    in the waiting thread, and the tracker, whose call may still run, is off (the run's finally
    calls the trackers' finish at once)."""
    import signal
    import time

    from flmnist.observers.trackers import Tracker, Trackers

    class Slow(Tracker):
        def log_metrics(self, step, metrics):
            time.sleep(3)

    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    trackers = Trackers([Slow()])
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            trackers.call("log_metrics", 1, {})
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert trackers.trackers == []


def test_logger_timeout_is_capped_where_waiting_can_count():
    from flmnist.observers.trackers import check_timeout

    assert check_timeout(1e10) == threading.TIMEOUT_MAX and check_timeout(30) == 30.0


def test_summary_json_is_written_last_and_the_final_line_printed_after_it(tmp_path):
    """The flmnist command ends Flower at the final line once summary.json is there: every other
    output must be complete by then."""
    seen_at_final_line = []

    def printer(line: str) -> None:
        if line.startswith(FINAL_LINE.format(status="finished")):
            seen_at_final_line.append(sorted(p.name for p in tmp_path.iterdir()))

    recorder = RunRecorder(tmp_path, 3, 0.99, printer=printer, save_tensors=save_state_dict)
    sync_rows(recorder, fleet=False)
    recorder.final_state = {"w": torch.zeros(2)}
    recorder.finish()
    assert len(seen_at_final_line) == 1 and "summary.json" in seen_at_final_line[0]
    assert {"model.pt", "metrics.csv", "summary.md", "accuracy_loss.png"} <= set(seen_at_final_line[0])
    newest = max((p for p in tmp_path.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == "summary.json"


def test_a_run_that_failed_as_flower_shut_down_under_a_sigterm_is_reported_stopped(tmp_path):
    """The ServerApp may write a "failed" summary while Flower's simulation shuts down under it
    (seen in CI: "RuntimeError: cannot schedule new futures after shutdown"); the command that
    stopped it says stopped, with its results so far, and how to continue. A run that had
    finished keeps its own summary."""
    from omegaconf import OmegaConf

    from flmnist.config.compose import compose_config
    from flmnist.launch.cli import Stop, stopped_message

    recorder = RunRecorder(tmp_path, 5, 0.65, printer=lambda line: None)
    sync_rows(recorder, fleet=False)
    recorder.rows.pop(3)
    recorder.write_metrics()
    cfg = compose_config(["num_rounds=5", "target_accuracy=0.65"])
    OmegaConf.set_struct(cfg, False)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed",
                                                       "error": "RuntimeError: cannot schedule new futures after shutdown"}))
    message = stopped_message(Stop("flmnist: stopped by SIGTERM", 143), cfg, tmp_path, None)
    assert "results after round 2 in" in message, message
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "stopped" and "SIGTERM" in summary["error"], summary
    (tmp_path / "summary.json").write_text(json.dumps({"status": "finished"}))
    assert "the run had finished" in stopped_message(Stop("flmnist: stopped by SIGTERM", 143), cfg, tmp_path, None)
    # a failure of the run's own, then a stop while Flower wound down: the failure and its error are kept
    # (they were rewritten "stopped | interrupted", the error gone: a review)
    failed = {"status": "failed", "error": "RunFailed: 3 rounds in a row without a usable update"}
    (tmp_path / "summary.json").write_text(json.dumps(failed))
    message = stopped_message(Stop("flmnist: stopped by SIGTERM", 143), cfg, tmp_path, None)
    assert message == f"flmnist: stopped by SIGTERM; the run had failed: {failed['error']}: results in {tmp_path}"
    assert json.loads((tmp_path / "summary.json").read_text()) == failed


STOPPED_SERVERAPP = """
import concurrent.futures, json, sys, threading, time
from flmnist.server_app import outcome
pool = concurrent.futures.ThreadPoolExecutor(1)

def serverapp():  # the run, in a thread of its own, as Flower's simulation runs it
    for _ in range(500):  # its next background step, once the main thread has exited
        try:
            pool.submit(print).result()
        except RuntimeError as err:
            print(json.dumps(outcome(err, sys.argv[1])), flush=True)
            return
        time.sleep(0.01)

threading.Thread(target=serverapp).start()
time.sleep(0.1)
"""


def test_a_plain_flwr_run_stopped_from_outside_is_summarized_stopped_not_failed(tmp_path):
    """Plain `flwr run`, stopped (Ctrl-C, SIGTERM, `flwr stop`): Flower's signal handler exits the
    process's main thread while the run goes on in another, whose next step then fails with
    "cannot schedule new futures after interpreter shutdown"; the ServerApp's summary said
    ``failed`` with that error. It says ``stopped``, and how to continue when there is a
    checkpoint; an error of the run itself stays ``failed``."""
    import subprocess
    import sys

    from flmnist.server_app import outcome

    (tmp_path / "checkpoint.pt").write_bytes(b"")
    done = subprocess.run([sys.executable, "-c", STOPPED_SERVERAPP, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, check=False)
    status, error = json.loads(done.stdout.strip().splitlines()[-1])
    assert status == "stopped", (status, error)
    assert "cannot schedule new futures" in error and error.endswith(f"continue it with resume={tmp_path}")
    from flwr.supercore.run import RunNotRunningException

    # Python's shutdown sets the executors' flag before it marks the main thread ended: a run thread
    # meeting the error in between (the main thread still alive) was summarized "failed" (a flaky CI run)
    seen = []
    during = threading.Thread(target=lambda: seen.append(outcome(
        RuntimeError("cannot schedule new futures after interpreter shutdown"), tmp_path)))
    during.start()
    during.join()
    assert seen[0][0] == "stopped" and threading.main_thread().is_alive()
    other = threading.Thread(target=lambda: seen.append(outcome(RuntimeError("a bug of the run's own"), tmp_path)))
    other.start()
    other.join()
    assert seen[1] == ("failed", "RuntimeError: a bug of the run's own")
    assert outcome(KeyboardInterrupt(), tmp_path / "none")[0] == "stopped"
    assert outcome(RunNotRunningException(), tmp_path)[0] == "stopped"  # flwr stop, seen by the SuperLink
    assert outcome(ValueError("bad"), tmp_path) == ("failed", "ValueError: bad")


def test_the_best_model_is_never_the_untrained_initial_one(tmp_path):
    """A run that never beats its initial model (a diverging learning rate, an attack with the
    guard off): best accuracy and model_best.pt come from round 1 on, as every other figure does
    (they were round 0's: "best 11.30% (round 0)", model_best.pt the untrained model)."""
    saved = []
    recorder = RunRecorder(tmp_path, 3, 0.99, printer=lambda line: None,
                           save_tensors=lambda state, path: saved.append((state["w"], path.name)))
    for r, acc in enumerate((0.113, 0.098, 0.101, 0.099)):
        recorder.add(r, test_accuracy=acc, test_loss=2.3)
        recorder.end_round(r, state_dict={"w": r}, quiet=True)
    summary = recorder.finish()
    assert (summary["best_accuracy"], summary["best_round"]) == (0.101, 2)
    assert [w for w, name in saved if name == "model_best.pt"][-1] == 2
    assert summarize_stopped(tmp_path, 3, 0.99, "round", "x")["best_round"] == summary["best_round"]


def test_a_resumed_run_keeps_the_model_best_of_its_checkpoint_not_a_crashed_attempts(tmp_path):
    """A run checkpointed every 2 rounds found its best at round 1, crashed after saving a better
    model_best.pt at round 3 (a round the resumed run does again, not necessarily alike: async,
    nondeterministic kernels). Resumed from the round-2 checkpoint, model_best.pt is round 1's
    again, as best_round says (it stayed the crashed attempt's round 3); the best weights travel
    in the checkpoint through its real packing."""
    from flmnist.observers.checkpoint import load_checkpoint, save_checkpoint

    def model(r: int) -> dict:
        return {"w": torch.full((3,), float(r))}

    def best_on_disk() -> float:
        return float(torch.load(tmp_path / "model_best.pt", weights_only=True)["w"][0])

    first = RunRecorder(tmp_path, 4, 0.99, printer=lambda line: None, save_tensors=save_state_dict)
    for r, acc in enumerate((0.1, 0.8, 0.7)):
        first.add(r, test_accuracy=acc, test_loss=1.0)
        first.end_round(r, state_dict=model(r), quiet=True)
    save_checkpoint(tmp_path, {"recorder": first.state(2), "arrays": model(2)})
    first.add(3, test_accuracy=0.95, test_loss=1.0)
    first.end_round(3, state_dict=model(3), quiet=True)
    assert best_on_disk() == 3.0  # then the crash

    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    resumed = RunRecorder(tmp_path, 4, 0.99, printer=lambda line: None, save_tensors=save_state_dict)
    resumed.restore(checkpoint["recorder"], final_state=checkpoint["arrays"], step=2)
    assert resumed.best_round == 1 and best_on_disk() == 1.0
    resumed.add(3, test_accuracy=0.75, test_loss=1.0)  # the redone round 3 is not better
    resumed.end_round(3, state_dict=model(3), quiet=True)
    assert resumed.finish()["best_round"] == 1 and best_on_disk() == 1.0

    # the checkpoint's own model is the best: it is not stored twice, and model_best.pt is it
    state = resumed.state(1)
    assert state["best_state"] is None
    again = RunRecorder(tmp_path, 4, 0.99, printer=lambda line: None, save_tensors=save_state_dict)
    again.restore(state, final_state=model(7), step=1)
    assert best_on_disk() == 7.0
    # no best yet at the checkpoint: a later attempt's model_best.pt is removed
    none_yet = RunRecorder(tmp_path, 4, 0.99, printer=lambda line: None, save_tensors=save_state_dict)
    none_yet.restore({**state, "best_round": None, "best_accuracy": None}, final_state=model(0), step=0)
    assert not (tmp_path / "model_best.pt").exists()


def test_plots_take_any_run_name_and_a_long_runs_heatmap_stays_readable(tmp_path):
    """A name with Matplotlib's maths markup ($) is drawn as written (it raised, and no plot was
    drawn); 3,000 evaluations give a heatmap of 60 evenly picked rows (it was 90,000 px tall)."""
    from flmnist.observers.plots import HEATMAP_ROWS, plot_run

    rows = [{"round": r, "test_accuracy": 0.5, "test_loss": 1.0, **{f"test_acc_digit_{d}": 0.5 for d in range(10)}}
            for r in range(3000)]
    plot_run(tmp_path, rows, {}, label="a$b_{$c")
    assert title(tmp_path / "accuracy_loss.png") == "Accuracy and loss: a$b_{$c"
    heatmap = Image.open(tmp_path / "per_digit_accuracy.png")
    assert heatmap.size[1] <= 100 * (0.3 * HEATMAP_ROWS + 1.8) + 1
    # each plot is drawn to a temporary file renamed over the old one: a kill never leaves half a plot
    assert not list(tmp_path.glob("*.tmp*"))
    before = (tmp_path / "accuracy_loss.png").read_bytes()

    def half_then_full_disk(fig, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError), patch("matplotlib.figure.Figure.savefig", half_then_full_disk):
        plot_run(tmp_path, rows[:5], {}, label="x")
    assert (tmp_path / "accuracy_loss.png").read_bytes() == before and not list(tmp_path.glob("*.tmp*"))


def test_a_stopped_runs_plots_are_titled_with_the_run_as_its_own_were(tmp_path):
    """The plots redrawn for a stopped run name it from its config.yaml (they said "Accuracy and
    loss: " and nothing more, also over a finished run's plots when its extension was stopped)."""
    import yaml

    from flmnist.config.compose import compose_config
    from flmnist.observers.recorder import run_label

    cfg = compose_config(["experiment=seed002"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(OmegaConf.to_container(cfg)))
    recorder = RunRecorder(tmp_path, 5, 0.65, printer=lambda line: None)
    sync_rows(recorder, fleet=False)
    (tmp_path / "attribution.csv").write_text("step,node,updates," + ",".join(f"digit_{d}" for d in range(10))
                                              + ",total\n3,node 0,3," + ",".join(["1.0"] * 10) + ",10.0\n")
    summarize_stopped(tmp_path, 5, 0.65, "round", "stopped by SIGTERM")
    assert run_label(cfg) == "seed002: FedAvg, DigitGroup split, LeNet, 3 nodes"
    assert title(tmp_path / "accuracy_loss.png") == f"Accuracy and loss: {run_label(cfg)}"
    assert run_label(cfg) in title(tmp_path / "attribution.png")  # it had no run label (a review)


def test_a_full_disk_at_the_metrics_or_the_model_still_writes_the_summary_and_leaves_no_stale_files(tmp_path,
                                                                                                      monkeypatch):
    """A full disk at metrics.json raised out of finish(): no summary.json (the command said only
    'the run wrote no summary', the run's own error hidden behind the OSError) and a half-written
    metrics.json.tmp taking the last space; a model.pt that could not be saved left an earlier
    attempt's model.pt and exports in place under a "finished" run, and the message pointed at a
    checkpoint.pt that was not there (a review)."""
    from flmnist.core.run_files import atomic_write

    with pytest.raises(TypeError):
        atomic_write(tmp_path / "half.json", None)  # fails inside the write: the temporary file goes too
    assert not (tmp_path / "half.json.tmp").exists() and not (tmp_path / "half.json").exists()
    for name in ("model.pt", "model_scripted.pt", "model.onnx"):
        (tmp_path / name).write_text("an earlier attempt's")
    lines = []

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    recorder = RunRecorder(tmp_path, 3, 0.99, printer=lines.append, save_tensors=full_disk)
    sync_rows(recorder, fleet=False)
    recorder.final_state = {"w": torch.zeros(2)}
    monkeypatch.setattr(recorder, "write_metrics", full_disk)
    recorder.finish("failed", "RunFailed: 3 rounds in a row without a usable update")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RunFailed: 3 rounds in a row without a usable update"
    assert f"Could not save {tmp_path / 'model.pt'} (OSError: [Errno 28] No space left on device); no file holds " \
           "the final model" in lines
    assert any(line.startswith(f"Could not write the metrics files in {tmp_path} (OSError") for line in lines)
    assert not any((tmp_path / name).exists() for name in ("model.pt", "model_scripted.pt", "model.onnx"))


def test_a_model_that_cannot_be_saved_loses_no_summary_and_failed_rounds_are_not_completed(tmp_path):
    """A full disk at model.pt raised out of finish() before summary.json (the command then said only
    'the run wrote no summary'); a round that failed before the run stopped left a partial row that
    rounds_completed counted; non-finite values went into metrics.csv as 'nan' and 'inf' (metrics.json:
    null), and a NumPy scalar or a tuple holding NaN into no strict JSON at all."""
    import numpy as np

    lines = []

    def full_disk(state, path):
        raise OSError(28, "No space left on device")

    recorder = RunRecorder(tmp_path, 3, 0.99, printer=lines.append, save_tensors=full_disk)
    sync_rows(recorder, fleet=False)
    recorder.final_state = {"w": torch.zeros(2)}
    recorder.add(4, client_updates=2, rejected_updates=2, train_loss=float("nan"))  # failed, then the run stopped
    recorder.add(3, test_loss=float("inf"), numpy_metric=np.float32(0.5), pair=(1.0, float("nan")))
    summary = recorder.finish("failed", "RunFailed: 1 round in a row without a usable update")
    assert any(line.startswith(f"Could not save {tmp_path / 'model.pt'} (OSError: [Errno 28]") for line in lines)
    assert json.loads((tmp_path / "summary.json").read_text(), parse_constant=pytest.fail)["status"] == "failed"
    assert summary["rounds_completed"] == 3
    rows = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=pytest.fail)
    assert rows[3]["numpy_metric"] == 0.5 and rows[3]["pair"] == [1.0, None]
    csv_text = (tmp_path / "metrics.csv").read_text()
    assert "nan" not in csv_text and "inf" not in csv_text


def test_log_axes_are_labelled_in_plain_numbers(tmp_path, monkeypatch):
    """The titles' plain text turned Matplotlib's maths off for the tick labels too: every loss axis
    read $\\mathdefault{10^{0}}$ (a review). Each figure is drawn as it is saved and its labels read."""
    from flmnist.observers import plots

    labels = []

    def close(fig):
        fig.canvas.draw()
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                if axis.get_scale() == "log":
                    labels.extend(t.get_text() for t in [*axis.get_ticklabels(), *axis.get_minorticklabels()])

    monkeypatch.setattr(plots.plt, "close", close)
    rows = [{"round": r, "test_accuracy": 0.5, "test_loss": 2.2 / r, "train_loss": 1.4 / r} for r in range(1, 6)]
    plots.plot_run(tmp_path, rows, {"node 0": [2.0, 1.0, 0.3], "node 1": [1.5, 0.2]}, label="x")
    shown = [label for label in labels if label]
    assert shown and not any("$" in label for label in shown), shown
    assert "1" in shown


def test_a_stopped_runs_mlflow_run_is_killed_and_a_resumed_runs_redone_steps_replace_the_crashed_ones(tmp_path):
    """A run stopped from outside left its MLflow run RUNNING for good (its server, which ends it,
    was gone); a resume drew the crashed attempt's steps after the checkpoint beside the redone ones
    in TensorBoard (a review)."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flmnist.observers.tracker_backends import MLflowTracker, TensorBoardTracker
    from flmnist.observers.trackers import Trackers

    out = tmp_path / "outputs"
    run_dir = out / "2026-12-05" / "12-00-00_demo"
    config = {"output_dir": str(out)}
    crashed = RunRecorder(run_dir, 5, 0.99, printer=lambda line: None)
    crashed.trackers = Trackers([TensorBoardTracker(), MLflowTracker()])
    crashed.trackers.call("start", run_dir, run_dir.name, config)
    sync_rows(crashed, fleet=False)  # steps 0-3, then the process dies: no finish
    state = crashed.state(1)  # its checkpoint was at step 1
    crashed.trackers.trackers[0].writer.flush()

    summarize_stopped(run_dir, 5, 0.99, "round", "stopped by SIGTERM")
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("flmnist").experiment_id])
    assert run.info.status == "KILLED"

    resumed = RunRecorder(run_dir, 5, 0.99, printer=lambda line: None)
    resumed.trackers = Trackers([TensorBoardTracker()])
    resumed.trackers.call("start", run_dir, run_dir.name, config)
    resumed.restore({**state, "rows": {k: v for k, v in state["rows"].items() if int(k) <= 1}}, step=1)
    for r in (2, 3):
        resumed.add(r, test_accuracy=0.9, test_loss=0.1)
        resumed.end_round(r, quiet=True)
    resumed.finish()
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 2)) for e in events.Scalars("test_accuracy")] == [(0, 0.5), (1, 0.6), (2, 0.9),
                                                                                       (3, 0.9)]


def test_a_tracker_added_on_resume_gets_the_runs_steps_before_the_checkpoint_too(tmp_path):
    """``flmnist resume=DIR num_rounds=5 logger=tensorboard`` (or mlflow) on a run that had no
    tracker: the recorder counted the restored rows as tracked, so the new tracker drew only the
    steps after the checkpoint (a review). It gets every step, in order, once; the config too."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flmnist.observers.tracker_backends import MLflowTracker, TensorBoardTracker
    from flmnist.observers.trackers import Trackers

    out = tmp_path / "outputs"
    run_dir = out / "2026-12-05" / "12-00-00_demo"
    first = RunRecorder(run_dir, 3, 0.99, printer=lambda line: None)
    sync_rows(first, fleet=False)  # steps 0-3, no tracker
    resumed = RunRecorder(run_dir, 5, 0.99, printer=lambda line: None)
    resumed.trackers = Trackers([TensorBoardTracker(), MLflowTracker()])
    resumed.restore(first.state(3), step=3)  # as run_setup: restore, then the trackers start
    resumed.trackers.call("start", run_dir, run_dir.name, {"output_dir": str(out)})
    resumed.add(4, test_accuracy=0.95, test_loss=0.1)
    resumed.end_round(4, quiet=True)
    resumed.finish()
    assert len(resumed.trackers.trackers) == 2, "a tracker failed"
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 2)) for e in events.Scalars("test_accuracy")] == [
        (0, 0.5), (1, 0.6), (2, 0.7), (3, 0.8), (4, 0.95)]
    assert "config" in events.Tags()["tensors"] or "config/text_summary" in events.Tags()["tensors"]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("flmnist").experiment_id])
    assert [(m.step, round(m.value, 2)) for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [
        (0, 0.5), (1, 0.6), (2, 0.7), (3, 0.8), (4, 0.95)]


def test_a_finishing_step_that_fails_is_summarized_and_never_hides_the_runs_own_error(tmp_path, monkeypatch):
    """An observer's or the engine's finishing step that raised left no summary.json (the command
    said only 'the run wrote no summary') and, after a failed run, replaced the run's own error
    (a review). Now the summary is written either way: a run that had finished is failed with the
    finishing error (and raises it), one that had failed keeps its own error."""
    from types import SimpleNamespace

    from flmnist import server_app

    class Engine:
        def run(self, initial, checkpoint):
            pass

        def finish(self):
            raise ValueError("an observer's section")

    class FailingEngine(Engine):
        def run(self, initial, checkpoint):
            raise RuntimeError("the run's own failure")

    for engine, raised, error in ((Engine(), ValueError, "finishing the run: ValueError: an observer's section"),
                                  (FailingEngine(), RuntimeError, "RuntimeError: the run's own failure")):
        recorder = RunRecorder(tmp_path, 3, 0.99, printer=lambda line: None)
        sync_rows(recorder, fleet=False)
        run = SimpleNamespace(engine=engine, recorder=recorder, run_dir=tmp_path, initial=None, checkpoint=None,
                              checkpoints_written=lambda: None)
        monkeypatch.setattr(server_app, "build_run", lambda grid, cfg, run=run: run)
        with pytest.raises(raised):
            server_app.run(None, None)
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["status"] == "failed" and summary["error"] == error, summary


def test_a_checkpoint_that_could_not_be_written_fails_the_run_unless_the_run_failed_first(tmp_path, monkeypatch):
    """Checkpoints are written on a thread of their own (CheckpointWriter(background=True)); the
    error of one that failed is raised when the engine's run ends (Run.checkpoints_written): a run
    that had finished is then failed with it, one that had failed keeps its own error; and a run
    stopped while its checkpoint is still being written says how to resume from it."""
    import time
    from types import SimpleNamespace

    from flmnist import server_app
    from flmnist.observers import checkpoint
    from flmnist.observers.checkpoint import CheckpointWriter

    write = checkpoint._write

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    class Engine:
        def __init__(self, writer, ends) -> None:
            self.writer, self.ends = writer, ends

        def run(self, initial, checkpoint):
            self.writer.save(tmp_path, {"round": 1})
            if self.ends is not None:
                raise self.ends

        def finish(self):
            pass

    cases = ((full_disk, None, OSError, "failed", "OSError: [Errno 28] No space left on device"),
             (full_disk, RuntimeError("the run's own failure"), RuntimeError, "failed",
              "RuntimeError: the run's own failure"),
             (lambda *args: (time.sleep(0.5), write(*args)), KeyboardInterrupt(), KeyboardInterrupt, "stopped",
              "continue it with resume="))
    for slow_or_failing, ends, raised, status, error in cases:
        (tmp_path / "checkpoint.pt").unlink(missing_ok=True)
        monkeypatch.setattr(checkpoint, "_write", slow_or_failing)
        writer = CheckpointWriter(background=True)
        recorder = RunRecorder(tmp_path, 3, 0.99, printer=lambda line: None)
        sync_rows(recorder, fleet=False)
        run = SimpleNamespace(engine=Engine(writer, ends), recorder=recorder, run_dir=tmp_path, initial=None,
                              checkpoint=None, checkpoints_written=writer.wait)
        monkeypatch.setattr(server_app, "build_run", lambda grid, cfg, run=run: run)
        with pytest.raises(raised):
            server_app.run(None, None)
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["status"] == status and error in summary["error"], summary
    assert (tmp_path / "checkpoint.pt").is_file()
