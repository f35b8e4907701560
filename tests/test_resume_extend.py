"""`flmnist resume=DIR` beside other overrides: a longer run length extends the run; anything
that would change the run is refused in one line naming it; a finished run given no new length
says how to extend it (config/resume.py)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from flmnist.config.compose import compose_config
from flmnist.config.resume import extend_in_place, resumed_config
from flmnist.core.errors import ConfigError, DataError
from flmnist.core.run_files import CHECKPOINT_INFO


def finished_run(tmp_path, overrides, done=2, status="finished"):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    saved = compose_config(overrides)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    (run / "summary.json").write_text(json.dumps({"status": status}))
    (run / CHECKPOINT_INFO).write_text(json.dumps({"kind": "sync", "round": done}))
    return run, saved


def test_num_rounds_extends_a_finished_run_and_nothing_else_changes(tmp_path):
    run, saved = finished_run(tmp_path, ["model=logreg", "num_rounds=2", "strategy=fedprox"])
    out = resumed_config(["num_rounds=4", "model=logreg", "strategy=fedprox", "simulation.backend=ray"], saved, run)
    assert out.num_rounds == 4
    assert OmegaConf.to_container(out) == {**OmegaConf.to_container(saved), "num_rounds": 4}


@pytest.mark.parametrize("override, message", [
    ("strategy=fedavg", (r"resume: strategy=fedavg would change the run being resumed \(its strategy: "
                         r"flwr.serverapp.strategy.FedProx\); a changed strategy, split, model or setting is a new "
                         r"run: start it without resume=, or give only num_rounds to extend this one")),
    ("model=lenet", r"resume: model=lenet would change the run being resumed"),
    ("client.lr=0.5", r"resume: client.lr=0.5 would change the run being resumed \(a setting of the run: 0.05\)"),
])
def test_an_override_that_would_change_the_run_is_refused_naming_it(tmp_path, override, message):
    run, saved = finished_run(tmp_path, ["model=logreg", "num_rounds=2", "strategy=fedprox"])
    with pytest.raises(ConfigError, match=message):
        resumed_config([override], saved, run)


def test_a_length_at_or_below_the_steps_done_is_refused(tmp_path):
    run, saved = finished_run(tmp_path, ["model=logreg", "num_rounds=5"], done=3, status="failed")
    with pytest.raises(ConfigError, match=r"resume: num_rounds=3 would not extend the run: it has done 3 rounds "
                                          r"\(give more than 3\)"):
        resumed_config(["num_rounds=3"], saved, run)
    assert resumed_config(["num_rounds=4"], saved, run).num_rounds == 4


def test_a_finished_run_without_a_new_length_says_how_to_extend_it(tmp_path):
    run, saved = finished_run(tmp_path, ["model=logreg", "num_rounds=2"])
    with pytest.raises(ConfigError, match=rf"resume: {run} finished all its 2 rounds; to train on, extend it: "
                                          rf"flmnist resume={run} num_rounds=4"):
        resumed_config([], saved, run)
    # resumed from the checkpoint before the last (checkpoint.pt corrupt, as its error suggests): the way on
    # names that one again (it named the directory, whose checkpoint.pt is the corrupt one)
    with pytest.raises(ConfigError, match=rf"extend it: flmnist resume={run}/checkpoint.prev.pt num_rounds=4"):
        resumed_config([], saved, run, run / "checkpoint.prev.pt")


def test_a_stopped_run_resumes_with_its_own_config(tmp_path):
    run, saved = finished_run(tmp_path, ["model=logreg", "num_rounds=5"], done=2, status="failed")
    assert resumed_config([], saved, run) == saved


def test_an_asynchronous_run_is_extended_by_its_server_updates(tmp_path):
    run, saved = finished_run(tmp_path, ["strategy=fedasync", "async_loop.max_server_updates=20"], done=20)
    assert resumed_config(["async_loop.max_server_updates=40"], saved, run).async_loop.max_server_updates == 40
    with pytest.raises(ConfigError, match="async_loop.max_server_updates=40"):
        resumed_config([], saved, run)


def test_an_asynchronous_run_that_ended_on_its_time_budget_or_client_updates_says_to_raise_that(tmp_path):
    """A FedAsync run that ended on its time budget: a plain resume trained on past the end of a
    finished run (simulated), and raising max_server_updates alone trained nothing (the budget still
    held); the same for max_client_updates (a review)."""
    run, saved = finished_run(tmp_path, ["strategy=fedasync", "async_loop.max_server_updates=null",
                                         "async_loop.time_budget=30"], done=7)
    for given in ([], ["async_loop.max_server_updates=40"]):
        with pytest.raises(ConfigError, match=r"finished on its async_loop.time_budget=30(\.0)?; to train on, raise it"):
            resumed_config(given, saved, run)
    assert resumed_config(["async_loop.time_budget=60"], saved, run).async_loop.time_budget == 60
    (run / "summary.json").write_text(json.dumps({"status": "finished", "stopped_early": {"reason": "privacy budget"}}))
    assert resumed_config(["async_loop.max_server_updates=40"], saved, run).async_loop.max_server_updates == 40
    clients = tmp_path / "clients"
    clients.mkdir()
    run, saved = finished_run(clients, ["strategy=fedasync", "async_loop.max_server_updates=50",
                                        "async_loop.max_client_updates=12"], done=7)
    # the rows stop at the last server version (10 updates); the summary counts the 2 after it
    (run / "metrics.json").write_text(json.dumps([{"round": 7, "client_updates": 10}]))
    (run / "summary.json").write_text(json.dumps({"status": "finished", "async": {"client_updates": 12}}))
    with pytest.raises(ConfigError, match="finished on its async_loop.max_client_updates=12"):
        resumed_config(["async_loop.max_server_updates=60"], saved, run)
    assert resumed_config(["async_loop.max_client_updates=30"], saved, run).async_loop.max_client_updates == 30


def test_a_larger_privacy_budget_alone_extends_an_asynchronous_run_without_a_server_update_cap(tmp_path):
    """FedAsync with async_loop.max_server_updates=null (ended by max_client_updates or the time
    budget) stopped at its privacy budget: a larger budget alone was refused as "finished all its 7
    updates ... give async_loop.max_server_updates=N" (the null cap read as 0; a review)."""
    run, saved = finished_run(tmp_path, ["strategy=fedasync", "async_loop.max_server_updates=null",
                                         "async_loop.max_client_updates=100", "privacy=central",
                                         "privacy.max_epsilon=8"], done=7)
    (run / "summary.json").write_text(json.dumps({"status": "finished", "stopped_early": {"reason": "privacy budget"}}))
    assert resumed_config(["privacy.max_epsilon=16"], saved, run).privacy.max_epsilon == 16
    run, saved = finished_run(tmp_path / "capped", ["strategy=fedasync", "async_loop.max_server_updates=7",
                                                    "privacy=central", "privacy.max_epsilon=8"], done=7)
    with pytest.raises(ConfigError, match=r"finished all its 7 updates; a larger budget alone trains no further"):
        resumed_config(["privacy.max_epsilon=16"], saved, run)


def test_an_extension_killed_before_its_summary_can_be_resumed_as_it_is(tmp_path, mnist_root):
    """A run finished on its time budget (or stopped at its privacy budget) is extended, and the
    extension is killed (SIGKILL, power loss) before it writes a summary: the old "finished"
    summary made the next plain resume refuse ("finished on its async_loop.time_budget=60"), leaving
    only a larger budget. The extension moves it to summary.prev.json; a failed start puts it back."""
    from flmnist.core.run_files import ConfigBackup

    run, _ = finished_run(tmp_path, ["strategy=fedasync", "async_loop.max_server_updates=null",
                                         "async_loop.time_budget=30"], done=7)
    checkpoint = run / "checkpoint.pt"
    checkpoint.write_bytes(b"a checkpoint")
    backup = ConfigBackup(checkpoint)
    assert extend_in_place(["async_loop.time_budget=60"], checkpoint, backup) == "async_loop.time_budget=60"
    assert not (run / "summary.json").exists() and (run / "summary.prev.json").is_file()
    extended = OmegaConf.load(run / "config.yaml")  # ... and the run is killed here
    assert resumed_config([], extended, run) == extended
    backup.put_back_unless_stepped()  # a start that failed before its first step: the run as it was
    assert json.loads((run / "summary.json").read_text()) == {"status": "finished"}
    assert OmegaConf.load(run / "config.yaml").async_loop.time_budget == 30
    # a later start whose data only moved retires nothing, and if it fails puts back no old summary
    (run / "summary.prev.json").write_text(json.dumps({"status": "finished", "rounds_completed": 1}))
    backup = ConfigBackup(checkpoint)
    assert extend_in_place([f"data.root={mnist_root}", "data.download=false"], checkpoint, backup).endswith(
        "data.download=False")
    assert json.loads((run / "summary.json").read_text()) == {"status": "finished"}
    backup.put_back_unless_stepped()
    assert json.loads((run / "summary.json").read_text()) == {"status": "finished"}
    run, _saved = finished_run(tmp_path / "dp", ["model=logreg", "num_rounds=4", "privacy=central",
                                                "privacy.max_epsilon=8"], done=2)
    (run / "summary.json").write_text(json.dumps({"status": "finished", "stopped_early": {"reason": "privacy budget"}}))
    backup = ConfigBackup(run / "checkpoint.pt")
    extend_in_place(["privacy.max_epsilon=16"], run / "checkpoint.pt", backup)
    extended = OmegaConf.load(run / "config.yaml")
    assert resumed_config([], extended, run) == extended


def test_an_extension_that_trained_between_checkpoints_is_not_rolled_back(tmp_path):
    """An asynchronous run checkpointed at update 20, extended to 40, fails at update 25 (its next
    checkpoint due at 30): the config went back to 20 (the checkpoint had not changed), and the
    next resume reported it finished at 20, updates 21-25 dropped. A start that failed before its
    first step is still put back, also over rows an earlier crashed attempt left past the checkpoint."""
    from flmnist.core.run_files import ConfigBackup, atomic_write

    def rows(last):  # as the recorder writes them
        atomic_write(run / "metrics.json", json.dumps([{"round": r, "wall_time": 1.0} for r in range(last + 1)]))

    run, _ = finished_run(tmp_path, ["strategy=fedasync", "async_loop.max_server_updates=20"], done=20)
    checkpoint = run / "checkpoint.pt"
    checkpoint.write_bytes(b"a checkpoint")
    for trained_to, put_back in ((25, False), (20, True)):
        rows(23)  # an earlier attempt crashed at 23
        backup = ConfigBackup(checkpoint)
        extend_in_place(["async_loop.max_server_updates=40"], checkpoint)
        rows(trained_to)  # the failed attempt's last metrics (its recorder's finish)
        backup.put_back_unless_stepped()
        assert OmegaConf.load(run / "config.yaml").async_loop.max_server_updates == (20 if put_back else 40)
        (run / "config.yaml").write_text(backup.text)
    rows(23)
    backup = ConfigBackup(checkpoint)
    extend_in_place(["async_loop.max_server_updates=40"], checkpoint)
    backup.put_back_unless_stepped()  # failed before its recorder existed: metrics.json untouched
    assert OmegaConf.load(run / "config.yaml").async_loop.max_server_updates == 20
    backup = ConfigBackup(checkpoint)
    extend_in_place(["async_loop.max_server_updates=40"], checkpoint)
    atomic_write(run / "metrics.json", json.dumps([{"round": 20, "wall_time": 1.0}, {"round": 21}]))
    backup.put_back_unless_stepped()  # its first step started and failed (a row without wall_time)
    assert OmegaConf.load(run / "config.yaml").async_loop.max_server_updates == 20


def test_a_run_stopped_at_its_privacy_budget_goes_on_with_a_larger_one(tmp_path):
    """`flmnist resume=DIR privacy.max_epsilon=X`: a larger budget (or null) is taken, the run's
    own passes, a smaller one is refused (its releases are spent), and so is a budget for a run
    without privacy."""
    run, saved = finished_run(tmp_path, ["model=logreg", "num_rounds=4", "privacy=central",
                                         "privacy.max_epsilon=8"], done=2)
    assert resumed_config(["privacy.max_epsilon=16"], saved, run).privacy.max_epsilon == 16
    assert resumed_config(["privacy.max_epsilon=null"], saved, run).privacy.max_epsilon is None
    assert resumed_config(["privacy.max_epsilon=8"], saved, run) == saved
    with pytest.raises(ConfigError, match=r"privacy.max_epsilon=4 would lower the run's privacy budget"):
        resumed_config(["privacy.max_epsilon=4"], saved, run)
    with pytest.raises(ConfigError, match=r"must be a positive number or null"):
        resumed_config(["privacy.max_epsilon=lots"], saved, run)
    # stopped at the budget: a longer run alone would stop again before its first round
    (run / "summary.json").write_text(json.dumps({"status": "finished", "stopped_early": {"reason": "privacy budget"}}))
    with pytest.raises(ConfigError, match=r"stopped at its privacy budget \(privacy.max_epsilon=8(\.0)?, round 2\); a "
                                          r"longer run alone trains no further: raise privacy.max_epsilon"):
        resumed_config(["num_rounds=8"], saved, run)
    assert resumed_config(["num_rounds=8", "privacy.max_epsilon=16"], saved, run).num_rounds == 8
    (tmp_path / "plain").mkdir()
    plain, plain_saved = finished_run(tmp_path / "plain", ["model=logreg", "num_rounds=4"], done=2)
    with pytest.raises(ConfigError, match=r"has no differential privacy"):
        resumed_config(["privacy.max_epsilon=16"], plain_saved, plain)


def test_extending_a_shortened_preset_evaluates_its_later_rounds(tmp_path):
    """`flmnist experiment=seed002 num_rounds=5`, then `resume=DIR num_rounds=60`: the extension
    evaluates the preset's rounds 11, 21, 31 and 40, so its rounds-to-96% is measured as in the
    full preset (with them dropped from the first run's config.yaml, the extension evaluated only
    round 60)."""
    from flmnist.config.validate import validate

    run, saved = finished_run(tmp_path, ["experiment=seed002", "num_rounds=5"], done=5)
    out = resumed_config(["num_rounds=60"], saved, run)
    validate(out)
    assert out.num_rounds == 60
    assert list(out.eval.rounds) == [1, 11, 21, 31, 40] and list(out.observers.digits.rounds) == [1, 11, 21, 31, 40]


def test_another_experiment_on_resume_is_refused_in_one_line(tmp_path):
    """experiment=X beside resume= for a run of another experiment: one ConfigError naming both
    (it raised OmegaConf's ConfigKeyError, a traceback, looking up a key saved configs lack)."""
    run, saved = finished_run(tmp_path, ["experiment=seed002", "num_rounds=5"], done=5)
    with pytest.raises(ConfigError, match=r"resume: experiment=seed000 is not the run being resumed \(named 'seed002'\)"):
        resumed_config(["experiment=seed000", "num_rounds=60"], saved, run)
    assert resumed_config(["experiment=seed002", "num_rounds=60"], saved, run).num_rounds == 60


def test_a_run_past_its_last_checkpoint_cannot_be_shortened_to_lose_steps(tmp_path):
    """num_rounds=12 checkpointed at round 10 (checkpoint_every=5, before the last round was
    checkpointed too), metrics up to 12: num_rounds=11 would redo round 11 and lose 12: refused."""
    run, saved = finished_run(tmp_path, ["num_rounds=12", "checkpoint_every=5"], done=10)
    (run / "metrics.json").write_text(json.dumps([{"round": r} for r in range(13)]))
    with pytest.raises(ConfigError, match=r"num_rounds=11 would not extend the run: it has done 12 rounds"):
        resumed_config(["num_rounds=11"], saved, run)
    assert resumed_config(["num_rounds=13"], saved, run).num_rounds == 13


def test_max_client_updates_extends_only_past_the_client_updates_done(tmp_path):
    """FedBuff (K=10) stopped at 20 server updates, 200 client updates: max_client_updates=150 is
    below what was done (it was compared with the 20 server updates, accepted, and trained
    nothing); 250 extends, and the extension says which setting it changed."""
    from flmnist.config.resume import extension

    run, saved = finished_run(tmp_path, ["strategy=fedbuff", "async_loop.max_server_updates=null",
                                         "async_loop.max_client_updates=200"], done=20)
    (run / "metrics.json").write_text(json.dumps([{"round": v, "client_updates": 10 * v} for v in range(21)]))
    with pytest.raises(ConfigError, match=r"max_client_updates=150 would not extend the run: it has done 200 "
                                          r"client updates \(give more than 200\)"):
        resumed_config(["async_loop.max_client_updates=150"], saved, run)
    out = resumed_config(["async_loop.max_client_updates=250"], saved, run)
    assert extension(saved, out) == "async_loop.max_client_updates=250"


def test_a_run_stopped_at_its_target_says_how_to_train_on_and_stop_at_target_false_does(tmp_path):
    """seed002 with stop_at_target stopped at round 31 of 40: resuming it as it is would stop
    again after one more round (it did), so it is refused saying what to give; stop_at_target=false
    is taken (with or without a longer num_rounds)."""
    run, saved = finished_run(tmp_path, ["experiment=seed002", "stop_at_target=true"], done=31)
    (run / "summary.json").write_text(json.dumps({"status": "finished", "stopped_early": {
        "reason": "target accuracy reached", "step": 31, "accuracy": 0.9601}}))
    with pytest.raises(ConfigError, match=r"stopped when it reached its target accuracy \(round 31, stop_at_target\); "
                                          r"to train on, give stop_at_target=false"):
        resumed_config([], saved, run)
    with pytest.raises(ConfigError, match=r"stopped when it reached its target accuracy"):
        resumed_config(["num_rounds=60"], saved, run)  # (it trained round 32, reached the target again, stopped)
    out = resumed_config(["stop_at_target=false"], saved, run)
    assert out.stop_at_target is False and out.num_rounds == 40
    assert resumed_config(["stop_at_target=false", "num_rounds=60"], saved, run).num_rounds == 60


def test_a_run_that_reached_its_target_at_its_last_round_is_not_extended_past_it_with_stop_at_target(tmp_path):
    """stop_at_target run of 3 rounds reaching the target at round 3, where the run ends anyway (no
    stop asked, summary stopped_early null): num_rounds=6 trained rounds 4 and on, where an
    uninterrupted 6-round run stops at 3 (a review). Refused; stop_at_target=false with it, taken."""
    run, saved = finished_run(tmp_path, ["model=logreg", "num_rounds=3", "stop_at_target=true"], done=3)
    (run / "summary.json").write_text(json.dumps({"status": "finished", "stopped_early": None, "rounds_to_target": 3}))
    with pytest.raises(ConfigError, match=r"reached its target accuracy at its last round \(3\) with stop_at_target on"
                                          r".*give stop_at_target=false beside resume= and num_rounds=N"):
        resumed_config(["num_rounds=6"], saved, run)
    assert resumed_config(["stop_at_target=false", "num_rounds=6"], saved, run).num_rounds == 6
    (run / "summary.json").write_text(json.dumps({"status": "finished", "stopped_early": None, "rounds_to_target": None}))
    assert resumed_config(["num_rounds=6"], saved, run).num_rounds == 6  # not reached: extended


def test_stop_at_target_false_does_not_extend_a_run_that_ran_all_its_rounds(tmp_path):
    """A stop_at_target run that ran all its 3 rounds without reaching the target: stop_at_target=false
    was taken as an extension, and the resume rewrote its config and summary training nothing (a
    review). Refused as any finished run given no new length; with one, taken."""
    run, saved = finished_run(tmp_path, ["model=logreg", "num_rounds=3", "stop_at_target=true"], done=3)
    with pytest.raises(ConfigError, match=r"finished all its 3 rounds; to train on, extend it: flmnist resume=\S+ "
                                          r"num_rounds=6"):
        resumed_config(["stop_at_target=false"], saved, run)
    out = resumed_config(["stop_at_target=false", "num_rounds=6"], saved, run)
    assert out.stop_at_target is False and out.num_rounds == 6


def test_resuming_from_moved_data_reads_it_there(tmp_path):
    """data.root beside resume= (the docs allow it): the resumed run reads MNIST there; it was
    dropped, and the run looked where its config.yaml said the data had been."""
    run, saved = finished_run(tmp_path, ["model=logreg", "num_rounds=2", "data.root=/old/mnist"])
    out = resumed_config(["num_rounds=4", "data.root=/new/mnist", "data.download=false"], saved, run)
    assert (out.num_rounds, out.data.root, out.data.download) == (4, "/new/mnist", False)


def test_plain_flwr_run_writes_a_moved_data_root_alone_and_leaves_the_same_folder_alone(tmp_path, monkeypatch,
                                                                                          mnist_root):
    """The ServerApp's extend_in_place: resume=DIR data.root=/new (plain flwr run) goes into config.yaml
    (it was ignored), once MNIST is found there; the same folder written otherwise changes nothing."""
    run, _ = finished_run(tmp_path, ["model=logreg", "num_rounds=2", "data.root=null", "data.download=false"],
                          status="failed")
    before = (run / "config.yaml").read_text()
    monkeypatch.setenv("FLMNIST_DATA_DIR", str(tmp_path / "mnist"))
    assert extend_in_place([f"resume={run}", f"data.root={tmp_path / 'mnist'}"], run / "checkpoint.pt") == ""
    assert (run / "config.yaml").read_text() == before
    # a length where MNIST is missing: refused before config.yaml changes (a retry would extend silently)
    with pytest.raises(DataError, match="MNIST not found"):
        extend_in_place(["num_rounds=3"], run / "checkpoint.pt")
    assert (run / "config.yaml").read_text() == before
    assert extend_in_place([f"data.root={mnist_root}"], run / "checkpoint.pt") == f"data.root={mnist_root}"
    assert OmegaConf.load(run / "config.yaml").data.root == str(mnist_root)
    assert extend_in_place(["num_rounds=3"], run / "checkpoint.pt") == "num_rounds=3"


def test_a_resume_that_fails_its_checks_leaves_the_runs_config_as_it_was(tmp_path):
    """`flmnist resume=RUN num_rounds=6` where the run's MNIST is gone: exit 2 naming data.root, and
    config.yaml still says 2 rounds (it said 6: a retry with no length then extended silently)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    run, _ = finished_run(tmp_path, ["model=logreg", "num_rounds=2", f"data.root={tmp_path / 'gone'}",
                                         "data.download=false", f"output_dir={tmp_path}"])
    (run / "checkpoint.pt").write_bytes(b"x")
    before = (run / "config.yaml").read_text()
    proc = subprocess.run([str(Path(sys.executable).parent / "flmnist"), f"resume={run}", "num_rounds=6"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
                          env={k: v for k, v in os.environ.items() if k != "FLMNIST_DATA_DIR"})
    assert proc.returncode == 2 and "data.root" in proc.stderr, proc.stderr
    assert (run / "config.yaml").read_text() == before


def test_how_the_run_is_waited_for_checkpointed_and_tracked_may_change_on_resume(tmp_path):
    """wait_for_nodes, poll_interval, checkpoint_every and the logger change none of a run's
    figures: a resume takes them (they were refused as changes to the run), writes them into the
    run's config, says so, and the checkpoint's fingerprint still matches the run's config. Not
    round_timeout (a reply later than it is dropped, in simulation too), nor checkpoint_every=0
    (the extension would end without a checkpoint, and the next resume would train it again);
    logger=X naming the run's own tracker keeps its settings (a review)."""
    from flmnist.config.resume import check_fingerprint, extension, fingerprint

    run, saved = finished_run(tmp_path, ["model=logreg", "num_rounds=2"], status="failed")
    given = ["wait_for_nodes=600", "poll_interval=0.5", "checkpoint_every=5", "logger=tensorboard"]
    out = resumed_config(given, saved, run)
    assert (out.wait_for_nodes, out.poll_interval, out.checkpoint_every) == (600, 0.5, 5)
    assert out.logger._target_ == "flmnist.observers.tracker_backends.TensorBoardTracker"
    assert out.logger.log_dir is None
    assert {k: v for k, v in OmegaConf.to_container(out).items() if k not in (*given_keys(given), "logger")} == \
        {k: v for k, v in OmegaConf.to_container(saved).items() if k not in (*given_keys(given), "logger")}
    assert extension(saved, out) == ("wait_for_nodes=600, poll_interval=0.5, checkpoint_every=5, "
                                     "logger=flmnist.observers.tracker_backends.TensorBoardTracker")
    check_fingerprint(out, fingerprint(saved), run / "config.yaml")  # the checkpoint's fingerprint: no change
    older = {**fingerprint(saved), "checkpoint_every": 1, "logger._target_": "flmnist.observers.trackers.Tracker"}
    check_fingerprint(out, older, run / "config.yaml")  # an older flmnist's checkpoint recorded them: still the run
    for refused, message in [("client.lr=0.5", r"client.lr=0.5 would change the run being resumed"),
                             ("round_timeout=30", r"round_timeout=30 would change the run being resumed"),
                             ("checkpoint_every=0", (r"resume: checkpoint_every=0 would leave what the resume trains "
                                                    r"without a checkpoint .*: give 1 or more"))]:
        with pytest.raises(ConfigError, match=message):
            resumed_config([refused], saved, run)
    done, _ = finished_run(tmp_path / "done", ["model=logreg", "num_rounds=2"])
    with pytest.raises(ConfigError, match=r"finished all its 2 rounds; to train on, extend it"):
        resumed_config(["checkpoint_every=5"], saved, done)  # a finished run: trains no further without a length
    mine, saved = finished_run(tmp_path / "mine", ["model=logreg", "num_rounds=2", "logger=mlflow",
                                                   "logger.experiment=mine"], status="failed")
    assert resumed_config(["logger=mlflow"], saved, mine).logger.experiment == "mine"
    assert resumed_config(["logger=mlflow", "logger.experiment=other"], saved, mine).logger.experiment == "other"


def test_a_deployed_asynchronous_runs_time_used_is_its_loops_not_its_wall_time(tmp_path):
    """async_loop.time_budget counts the loop's own seconds; the run's wall time adds its start and
    the wait for nodes. A deployed run whose loop used 25 s of 30, 40 s of wall time, was judged to
    have used 40: a budget of 35 was refused as 'would not extend the run'."""
    run, saved = finished_run(tmp_path, ["strategy=fedasync", "async_loop.max_server_updates=20"], done=20)
    (run / "summary.json").write_text(json.dumps({"status": "finished", "wall_time": 40.0, "async": {
        "client_updates": 20, "virtual_time": None, "loop_seconds": 25.0}}))
    overrides = ["async_loop.max_server_updates=40", "async_loop.time_budget=35"]
    assert resumed_config(overrides, saved, run).async_loop.time_budget == 35
    with pytest.raises(ConfigError, match=r"async_loop.time_budget=20 would not extend the run: it has used 25.0 s"):
        resumed_config(["async_loop.max_server_updates=40", "async_loop.time_budget=20"], saved, run)


def given_keys(overrides):
    return [o.partition("=")[0] for o in overrides]


def test_an_asynchronous_extension_that_another_reached_limit_would_stop_at_once_is_refused(tmp_path):
    """A FedAsync run that finished at its 20 server updates, extended by max_client_updates alone,
    stopped at once (its 20 server updates still reached), trained nothing and said it finished: the
    resume now says which limit to raise too; raising both extends it."""
    run, saved = finished_run(tmp_path, ["strategy=fedasync", "async_loop.max_server_updates=20"], done=20)
    (run / "summary.json").write_text(json.dumps({"status": "finished", "async": {"client_updates": 20}}))
    with pytest.raises(ConfigError, match=rf"resume: async_loop.max_client_updates=50 would train nothing: {run} has "
                                          r"done 20 server updates, its async_loop.max_server_updates=20 too; raise "
                                          r"that as well \(for example async_loop.max_server_updates=40, or null\)"):
        resumed_config(["async_loop.max_client_updates=50"], saved, run)
    with pytest.raises(ConfigError, match=r"async_loop.time_budget=60 would train nothing"):
        resumed_config(["async_loop.time_budget=60"], saved, run)
    # a time budget the run has used already (its summary's virtual time): stops at once too
    (run / "summary.json").write_text(json.dumps({"status": "finished", "async": {"client_updates": 20,
                                                                                 "virtual_time": 29.5}}))
    with pytest.raises(ConfigError, match=r"async_loop.time_budget=20 would not extend the run: it has used 29.5 s "
                                          r"\(give more than 29.5\)"):
        resumed_config(["async_loop.max_server_updates=40", "async_loop.time_budget=20"], saved, run)
    assert resumed_config(["async_loop.max_server_updates=40", "async_loop.time_budget=60"],
                          saved, run).async_loop.time_budget == 60
    out = resumed_config(["async_loop.max_client_updates=50", "async_loop.max_server_updates=null"], saved, run)
    assert (out.async_loop.max_client_updates, out.async_loop.max_server_updates) == (50, None)
    run2, saved2 = finished_run(tmp_path / "b", ["strategy=fedbuff", "async_loop.max_server_updates=50",
                                 "async_loop.max_client_updates=40"], done=4)
    (run2 / "summary.json").write_text(json.dumps({"status": "finished", "async": {"client_updates": 40}}))
    with pytest.raises(ConfigError, match=r"finished on its async_loop.max_client_updates=40"):
        resumed_config(["async_loop.max_server_updates=60"], saved2, run2)  # (the limit it ended on, said before)


def test_the_files_a_resume_needs_are_synced_to_disk(tmp_path, monkeypatch):
    """config.yaml (written at the start and by each extension) and checkpoint.json are fsynced,
    the file and then its folder, as checkpoint.pt is: after a power loss a rename alone may leave
    an empty config.yaml, and find_checkpoint then refuses the run (a review)."""
    import os

    from flmnist.core.run_files import atomic_write

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    atomic_write(tmp_path / "config.yaml", "a: 1\n", durable=True)
    assert synced == [str(tmp_path / "config.yaml.tmp"), str(tmp_path)]
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n" and not (tmp_path / "config.yaml.tmp").exists()
    atomic_write(tmp_path / "metrics.json", "[]")  # rewritten every round: not synced
    assert len(synced) == 2


@pytest.mark.parametrize("override, message", [
    ("async_loop.max_server_updates=abc", (r"resume: async_loop.max_server_updates=abc: async_loop.max_server_updates "
                                          r"must be a number \(or null\), got 'abc'")),
    ("async_loop.time_budget=abc", r"resume: .*async_loop.time_budget"),
])
def test_a_resumes_new_length_or_budget_of_the_wrong_type_is_refused_in_one_line(tmp_path, override, message):
    """It raised TypeError ('<=' between str and int: a traceback) or was written to config.yaml and
    refused only by the ServerApp, after Flower had started (a review)."""
    run, saved = finished_run(tmp_path, ["strategy=fedbuff", "async_loop.max_server_updates=20"], done=20,
                              status="failed")
    with pytest.raises(ConfigError, match=message):
        resumed_config([override], saved, run)


@pytest.mark.parametrize("run_overrides, override, message", [
    (["num_rounds=2"], "model=logreg", (r"resume: model=logreg would change the run being resumed \(its model: "
                                       r"flmnist.ml.models.LeNet\)")),
    (["num_rounds=2"], "privacy=central", (r"resume: privacy=central would change the run being resumed \(its "
                                          r"privacy: none\)")),
    (["num_rounds=2", "privacy=central"], "privacy=dpsgd", r"\(its privacy: central\)"),
    (["num_rounds=2", "privacy=central"], "privacy=none", r"\(its privacy: central\)"),
])
def test_an_option_that_brings_settings_of_other_sections_is_judged_by_its_own(tmp_path, run_overrides, override,
                                                                               message):
    """model=logreg and the privacy options are files of the global package (model:, client:;
    privacy:, screen:): a resume looked their keys up under model.model and privacy.privacy, found
    None on both sides and went on with the run's LeNet or no privacy, in silence (a review)."""
    run, saved = finished_run(tmp_path, run_overrides, status="failed")
    with pytest.raises(ConfigError, match=message):
        resumed_config([override, "num_rounds=6"], saved, run)
    run, saved = finished_run(tmp_path / "same", ["num_rounds=2", override], status="failed")
    assert resumed_config([override], saved, run) == saved  # the run's own choice: judged the same


def test_a_local_dp_run_from_before_node_metrics_resumes_with_its_option_repeated_and_sends_as_it_did(tmp_path):
    """privacy.node_metrics came later: a run whose config.yaml lacks it was refused with its own
    privacy=local repeated ("would change the run", a review); it resumes as it ran (plain)."""
    saved = compose_config(["num_rounds=2", "privacy=local"])
    OmegaConf.set_struct(saved, False)
    saved.privacy.pop("node_metrics")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    (run / "summary.json").write_text(json.dumps({"status": "failed"}))
    (run / CHECKPOINT_INFO).write_text(json.dumps({"kind": "sync", "round": 2}))
    resumed = resumed_config(["privacy=local"], saved, run)
    assert resumed == saved and "node_metrics" not in resumed.privacy
    with pytest.raises(ConfigError, match=r"privacy=central would change the run being resumed \(its privacy: local\)"):
        resumed_config(["privacy=central"], saved, run)
    saved.pop("privacy")  # a run from before config.yaml had a privacy section: adding DP is refused, not ignored
    (run / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    with pytest.raises(ConfigError, match=r"privacy=central would change the run being resumed \(its privacy: its defaults\)"):
        resumed_config(["privacy=central"], saved, run)


def test_a_quoted_group_option_on_resume_is_judged_as_the_plain_one(tmp_path):
    """strategy='fedprox' (quoted, as a shell user may write it) opened conf/strategy/'fedprox'.yaml: FileNotFoundError."""
    run, saved = finished_run(tmp_path, ["model=logreg", "num_rounds=2", "strategy=fedprox"], status="failed")
    assert resumed_config(["strategy='fedprox'"], saved, run) == saved


def test_putting_the_config_back_on_a_full_disk_does_not_hide_the_failure_that_led_there(tmp_path, monkeypatch,
                                                                                          caplog):
    """An extension that failed to start puts config.yaml back; on a full disk that raised OSError
    over the run's own failure, and the command said "a bad setting" (exit 2) (a review)."""
    import errno

    from flmnist.core import run_files
    from flmnist.core.run_files import ConfigBackup

    run, _ = finished_run(tmp_path, ["model=logreg", "num_rounds=2"])
    (run / "checkpoint.pt").write_bytes(b"a checkpoint")
    backup = ConfigBackup(run / "checkpoint.pt")
    extend_in_place(["num_rounds=4"], run / "checkpoint.pt", backup)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_files, "atomic_write", full)
    with caplog.at_level("WARNING", logger="flwr"):
        backup.put_back_unless_stepped()
    assert "Could not put" in caplog.text and "No space left on device" in caplog.text
    assert OmegaConf.load(run / "config.yaml").num_rounds == 4
