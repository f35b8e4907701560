"""``privacy.node_metrics``: under ``privacy=local`` and ``privacy=dpsgd`` (whose epsilon speaks of
what the server learns) the nodes send no training losses and client evaluation is off, since
both would reach the server un-noised; ``plain`` sends them, outside epsilon. The real ClientApp
on real Flower Messages and MNIST (the fixtures of tests/test_fault_mod.py), real composition."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import MessageType
from test_fault_mod import app, ask, initial  # noqa: F401 - the real ClientApp's fixtures

from flmnist.config.compose import compose_config
from flmnist.core.errors import ConfigError
from flmnist.protocol import messages as p

TRAIN = MessageType.TRAIN


def test_a_node_told_to_withhold_sends_no_losses_and_trains_the_same(ask):  # noqa: F811
    plain, _ = ask(TRAIN, 0)
    withheld, _ = ask(TRAIN, 0, withhold_losses=True)
    sent, kept = plain.content[p.METRICS], withheld.content[p.METRICS]
    assert sent[p.TRAIN_LOSS] > 0 and len(sent[p.LOSS_TRACE]) == 2  # (local_steps=2)
    assert kept[p.TRAIN_LOSS] == 0.0 and list(kept[p.LOSS_TRACE]) == []
    assert kept[p.NUM_EXAMPLES] == sent[p.NUM_EXAMPLES]
    for key, array in plain.content[p.ARRAYS].items():  # the same training, the same model
        np.testing.assert_array_equal(withheld.content[p.ARRAYS][key].numpy(), array.numpy())


def test_a_node_told_to_withhold_does_not_evaluate_in_its_train_reply_nor_answer_an_evaluate(ask):  # noqa: F811
    evaluated, _ = ask(TRAIN, 0, evaluate_received=True)
    assert p.EVALUATION in evaluated.content
    withheld, _ = ask(TRAIN, 0, evaluate_received=True, withhold_losses=True)
    assert p.EVALUATION not in withheld.content
    with pytest.raises(ValueError, match="privacy.node_metrics=withheld: this node sends no evaluation counts"):
        ask(MessageType.EVALUATE, 0, withhold_losses=True)  # (Flower's backend makes it an error reply)


def test_the_recorder_keeps_no_training_loss_when_the_nodes_withhold_it(tmp_path):
    from flmnist.observers.recorder import RunRecorder

    recorder = RunRecorder(tmp_path, 2, 0.99, printer=lambda line: None)
    recorder.losses_withheld = True
    recorder.add(1, train_loss=0.0, test_accuracy=0.5)
    recorder.add_loss_trace("node 0", [0.4, 0.3], 1)  # (a node that sent one all the same)
    assert "train_loss" not in recorder.rows[1] and recorder.rows[1]["test_accuracy"] == 0.5
    assert not recorder.loss_traces and not recorder.loss_points


@pytest.mark.parametrize("mechanism", ["local", "dpsgd"])
def test_local_and_dpsgd_withhold_node_metrics_by_default_and_turn_client_evaluation_off(mechanism):
    cfg = compose_config([f"privacy={mechanism}"])
    assert cfg.privacy.node_metrics == "withheld" and cfg.sampling.fraction_evaluate == 0.0
    assert cfg.data.holdout_fraction == 0.0  # (no images kept out for an evaluation that never comes)
    assert compose_config([f"privacy={mechanism}", "privacy.node_metrics=plain", "sampling.fraction_evaluate=0.5",
                           "data.holdout_fraction=0.1"]).privacy.node_metrics == "plain"
    # what a user types: this error, not the holdout's (the preset holds none out)
    with pytest.raises(ConfigError, match=rf"^privacy.node_metrics=withheld \(privacy={mechanism}'s default\) withholds "
                                          r"what nodes would send un-noised, but sampling.fraction_evaluate=0.5 asks them "
                                          r"for their evaluation counts: set sampling.fraction_evaluate=0, or "
                                          r"privacy.node_metrics=plain"):
        compose_config([f"privacy={mechanism}", "sampling.fraction_evaluate=0.5"])


def test_withheld_by_choice_names_neither_default_nor_a_key_not_written():
    assert compose_config(["privacy=central"]).sampling.fraction_evaluate == 1.0
    assert compose_config(["privacy=central"]).privacy.node_metrics == "plain"
    with pytest.raises(ConfigError, match=r"^privacy.node_metrics=withheld withholds .* sampling.fraction_evaluate=1 "):
        compose_config(["privacy=central", "privacy.node_metrics=withheld"])
    with pytest.raises(ConfigError, match=r"strategy.fraction_evaluate=0.5 asks them .*set strategy.fraction_evaluate=0,"):
        compose_config(["privacy=none", "privacy.node_metrics=withheld", "sampling.fraction_evaluate=0",
                        "strategy.fraction_evaluate=0.5"])
    with pytest.raises(ConfigError, match=r"privacy.node_metrics must be one of plain, withheld, got 'hidden'"):
        compose_config(["privacy=local", "privacy.node_metrics=hidden"])
