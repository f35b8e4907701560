"""Adding an observer is a class plus a config entry: tests/toy_observer.py is named only on the
command line (as docs/extending.md shows), built by the run's composition
root with the run's context, called by a real engine over the fake Grid of test_engines (real
Flower Messages), and its stop wish ends the run like stop_at_target does."""

from __future__ import annotations

from pathlib import Path

from test_engines import LIMITS, SENT, START, FakeGrid, FakeNode, record
from toy_observer import CountingObserver

from flmnist.config.compose import compose_config
from flmnist.core.build import build
from flmnist.engine.guard import Guarded
from flmnist.engine.reply_path import ReplyPath
from flmnist.engine.sync import SyncEngine
from flmnist.ml.data import load_mnist
from flmnist.ml.mnist_files import resolve_root
from flmnist.observers.attribution import Attribution
from flmnist.observers.base import RunContext
from flmnist.observers.evaluation import DigitEvaluation
from flmnist.protocol.screen import ReplyScreen, ScreenSettings
from flmnist.runtime.run_setup import build_observers
from flmnist.strategies import FedAvg

TOY = ["+observers.toy._target_=toy_observer.CountingObserver", "+observers.toy.stop_after=2"]


def context(cfg, run_dir: Path) -> RunContext:
    images, labels = load_mnist(str(resolve_root(None)), False)
    return RunContext(run_dir, images, labels, lambda: build(cfg.model, "model"), cfg.num_rounds, False, print)


def test_a_toy_observer_named_in_config_is_built_after_the_default_ones(tmp_path):
    cfg = compose_config(TOY)
    observers = build_observers(cfg, context(cfg, tmp_path))
    assert [type(o) for o in observers] == [DigitEvaluation, Attribution, CountingObserver]
    assert observers[-1].stop_after == 2 and observers[-1].run_dir == tmp_path


def test_observers_are_turned_off_by_config(tmp_path):
    cfg = compose_config(["eval.attribution=false", "observers.digits=null", *TOY])
    assert [type(o) for o in build_observers(cfg, context(cfg, tmp_path))] == [CountingObserver]


def test_a_misnamed_observer_entry_is_refused_before_flower_starts():
    import pytest

    from flmnist.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"observers.toy must name its class with _target_"):
        compose_config(["+observers.toy.stop_after=2"])


def test_the_toy_observers_metrics_are_recorded_and_its_stop_wish_ends_a_sync_run(task_identity, tmp_path):
    cfg = compose_config(["eval.attribution=false", "observers.digits=null", *TOY])
    (toy,) = build_observers(cfg, context(cfg, tmp_path))
    from flmnist.observers.recorder import RunRecorder

    recorder = RunRecorder(tmp_path / "run", 10, 0.99, printer=lambda line: None)
    path = ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), SENT, [toy], recorder)
    nodes = {101: FakeNode(0, 0.01), 102: FakeNode(1, 0.04)}
    SyncEngine(FakeGrid(nodes), Guarded(FedAvg(min_available_nodes=2), path), path, SENT.to_record(),
               num_rounds=10, round_timeout=5.0).run(record(START))
    assert toy.seen == [0, 1, 2]  # round 2's evaluation asked to stop: no third round
    assert path.stop_wish == "the toy observer has seen enough"
    # its metric, in each round's row of the run's records
    assert [recorder.rows[r]["toy_models_seen"] for r in (0, 1, 2)] == [1, 2, 3] and 3 not in recorder.rows


def test_an_observers_stop_wish_waits_for_a_step_the_global_evaluation_tests(task_identity, tmp_path):
    """seed002's kind of schedule (rounds 1 and 3 tested here) and an observer asking to stop after
    round 2: the run stopped there, reporting round 1's accuracy as its final one while model.pt
    held round 2's model (a review). The wish is heard at round 3, which the real DigitEvaluation
    tests, so the run's last model is scored."""
    from flwr.app import ArrayRecord

    cfg = compose_config(["eval.attribution=false", "eval.every=null", "eval.rounds=[1,3]", "num_rounds=10", *TOY])
    observers = build_observers(cfg, context(cfg, tmp_path))
    path = ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), SENT, observers)
    arrays = ArrayRecord(build(cfg.model, "model").state_dict())
    for step in (0, 1, 2):
        path.global_model(step, arrays)
    assert path.stopped is None  # round 2: untested, the wish waits
    fields = path.global_model(3, arrays)
    assert path.stopped == (3, "the toy observer has seen enough") and fields["test_accuracy"] is not None


def test_a_target_first_reached_at_the_runs_last_step_is_no_early_stop(task_identity):
    """stop_at_target with the target first reached at round num_rounds (or at an asynchronous run's
    final evaluation): the summary said 'stopped early: target accuracy reached' for a run that ran
    its full length, and a resume then skipped the check of the limit it had really ended on (a
    review). The last step hears no wish; an earlier one does."""
    from flmnist.observers.stop import StopAtTarget

    arrays = record(START)
    path = ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), SENT, [StopAtTarget(0.9)])
    path.global_model(5, arrays, last=True, test_accuracy=0.95)
    assert path.stopped is None
    path = ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), SENT, [StopAtTarget(0.9)])
    path.global_model(4, arrays, test_accuracy=0.95)
    assert path.stopped == (4, "target accuracy reached")
