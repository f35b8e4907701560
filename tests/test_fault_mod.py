"""Fault injection as a Flower ClientApp mod (``fault_mod`` in flmnist/client/faults.py), through
flmnist's real ClientApp (``flmnist.client_app.app``) on real Flower Messages and real MNIST: a
fault node's reply is its honest reply corrupted as its ``client.fault`` mode says, every other
node's reply is untouched, an error reply passes through, and the handlers in client_app.py hold
no fault code at all. (That the server rejects every mode is tests/test_screen.py's.)"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.client_app import ClientAppException

from flmnist.client import faults
from flmnist.core.constants import BACKEND_ENV
from flmnist.ml.models import LogReg
from flmnist.protocol import messages as p

REPO = Path(__file__).resolve().parents[1]
BAD = 1  # the fault node's partition id; partitions 0 and 2 are honest
TRAIN, EVALUATE, QUERY = MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY


@pytest.fixture(scope="module")
def app():
    """The real ClientApp. Importing client_app installs flmnist's Flower patches (the simulation
    feeder; the in-process backend only when asked): Flower's own feeder is put back afterwards, so
    the test files that run after this one see Flower as it ships."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(BACKEND_ENV, raising=False)
        from flmnist import client_app

        yield client_app.app
    vce_api.add_messages_to_queue = original


@pytest.fixture(scope="module")
def initial() -> dict[str, torch.Tensor]:
    """The model the server sends (fixed weights, so every call trains from the same start)."""
    torch.manual_seed(0)
    return LogReg().state_dict()


def node_context(partition: int) -> Context:
    return Context(run_id=1, node_id=100 + partition, node_config={"partition-id": partition},
                   state=RecordDict(), run_config={})


@pytest.fixture
def ask(app, initial, mnist_root, task_identity):
    """``ask(kind, partition, server_round, fault=..., **settings)``: the ClientApp's reply to a
    real message of ``kind`` for node ``partition``, and the message it answered (``settings``
    may override the defaults below, e.g. ``num_partitions`` and ``fault_nodes``)."""

    def ask(kind: str, partition: int, server_round: int = 1, **settings) -> tuple[Message, ...]:
        defaults = {"model": {"_target_": "flmnist.ml.models.LogReg"},
                    "partition": {"_target_": "flmnist.ml.partition.IidPartition"},
                    "num_partitions": 3, "seed": 0, "holdout_fraction": 0.1,
                    "data_root": str(mnist_root), "local_steps": 2, "batch_size": 16, "lr": 0.1,
                    "fault_nodes": (BAD,)}
        sent = p.TrainSettings(**{**defaults, **settings})
        content = RecordDict({p.CONFIG: sent.to_record(**{p.SERVER_ROUND: server_round})})
        if kind != QUERY:
            content[p.ARRAYS] = ArrayRecord(initial)
        msg = Message(content, dst_node_id=100 + partition, message_type=kind)
        reply = app(msg, node_context(partition))
        assert not reply.has_error()
        return reply, msg

    return ask


def snapshot(content: RecordDict) -> dict:
    """Everything a reply carries, comparable with ==: arrays as their raw metadata and bytes
    (a corrupted array may not decode), records as dicts; the train time is wall clock, left out."""
    out = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            out[name] = {k: (a.dtype, tuple(a.shape), a.stype, a.data) for k, a in record.items()}
        else:
            out[name] = {k: v for k, v in record.items() if k != p.TRAIN_TIME}
    return out


def weights(content: RecordDict) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in content[p.ARRAYS].items()}


def honest(ask, kind: str, partition: int = BAD, server_round: int = 1, **settings) -> Message:
    return ask(kind, partition, server_round, **settings)[0]


# ------------------------------------------------------------------ nodes not listed: untouched
@pytest.mark.parametrize("kind", [TRAIN, EVALUATE, QUERY])
@pytest.mark.parametrize("fault", ["bad-node-info", "rotate", "error", "sign-flip", "eval-list",
                                   "replace", "impersonate"])
def test_a_node_not_listed_replies_exactly_as_without_faults(ask, kind, fault):
    for partition in (0, 2):
        reply, _ = ask(kind, partition, fault=fault)
        expected = honest(ask, kind, partition).content
        assert snapshot(reply.content) == snapshot(expected), (kind, fault, partition)


def test_without_a_fault_mode_the_listed_node_is_honest_too(ask):
    for kind in (TRAIN, EVALUATE, QUERY):
        reply, _ = ask(kind, BAD)
        assert reply.content[p.NODE_INFO][p.NODE_NAME] == p.simulated_node_name(BAD)
        assert snapshot(reply.content) == snapshot(honest(ask, kind).content)


# ------------------------------------------------------------------------- the fault node: train
@pytest.mark.parametrize("reply_delta", [False, True])
@pytest.mark.parametrize("fault", [*faults.TRAIN_ATTACKS, "boost"])
def test_a_fault_node_corrupts_its_honest_train_reply_as_the_mode_says(ask, fault, reply_delta):
    reply, msg = ask(TRAIN, BAD, fault=fault, reply_delta=reply_delta)
    expected = honest(ask, TRAIN, reply_delta=reply_delta).content
    sent = msg.content[p.ARRAYS].to_torch_state_dict()
    zeros = ArrayRecord({k: torch.zeros_like(v) for k, v in sent.items()})  # what a delta is from
    faults.corrupt_train(fault, expected, zeros if reply_delta else msg.content[p.ARRAYS])
    assert snapshot(reply.content) == snapshot(expected)


def test_train_modes_do_what_their_names_say(ask, initial):
    sent = {k: v.numpy() for k, v in initial.items()}
    trained = weights(honest(ask, TRAIN).content)
    delta = weights(honest(ask, TRAIN, reply_delta=True).content)
    assert not all(np.array_equal(trained[k], sent[k]) for k in sent)  # the node did train
    for k, w in sent.items():
        np.testing.assert_allclose(delta[k], trained[k] - w, atol=1e-6)

    assert all(np.isnan(v).all() for v in weights(ask(TRAIN, BAD, fault="nan")[0].content).values())
    flipped = weights(ask(TRAIN, BAD, fault="sign-flip")[0].content)
    boosted = weights(ask(TRAIN, BAD, fault="boost")[0].content)
    flipped_delta = weights(ask(TRAIN, BAD, fault="sign-flip", reply_delta=True)[0].content)
    boosted_delta = weights(ask(TRAIN, BAD, fault="boost", reply_delta=True)[0].content)
    for k, w in sent.items():
        update = trained[k] - w
        np.testing.assert_allclose(flipped[k], w - 5 * update, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(boosted[k], w + 10 * update, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(flipped_delta[k], -5 * delta[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(boosted_delta[k], 10 * delta[k], rtol=1e-5, atol=1e-6)

    metrics = ask(TRAIN, BAD, fault="huge-examples")[0].content[p.METRICS]
    assert metrics[p.NUM_EXAMPLES] == 2**62 and metrics[p.PARTITION_ID] == BAD
    assert ask(TRAIN, BAD, fault="bad-node-info")[0].content[p.NODE_INFO][p.NODE_NAME] == 12345
    assert p.TRAIN_LOSS not in ask(TRAIN, BAD, fault="missing-metric")[0].content[p.METRICS]


def test_rotate_commits_the_rounds_train_attack(ask):
    for server_round in range(1, len(faults.TRAIN_ATTACKS) + 1):
        reply, msg = ask(TRAIN, BAD, server_round, fault="rotate")
        expected = honest(ask, TRAIN, server_round=server_round).content
        attack = faults.TRAIN_ATTACKS[server_round % len(faults.TRAIN_ATTACKS)]
        faults.corrupt_train(attack, expected, msg.content[p.ARRAYS])
        assert snapshot(reply.content) == snapshot(expected), attack
        clean = honest(ask, TRAIN, server_round=server_round).content
        assert snapshot(reply.content) != snapshot(clean), attack


# ---------------------------------------------------------------------- the fault node: evaluate
@pytest.mark.parametrize("fault", faults.EVALUATE_ATTACKS)
def test_a_fault_node_corrupts_its_honest_evaluate_reply_as_the_mode_says(ask, fault):
    reply, _ = ask(EVALUATE, BAD, fault=fault)
    expected = honest(ask, EVALUATE).content
    faults.corrupt_evaluate(fault, expected)
    assert snapshot(reply.content) == snapshot(expected)


def test_evaluate_modes_do_what_their_names_say_and_rotate_goes_round(ask):
    n = honest(ask, EVALUATE).content[p.METRICS][p.NUM_EXAMPLES]
    assert ask(EVALUATE, BAD, fault="eval-inconsistent")[0].content[p.METRICS][p.CORRECT] == n + 5
    assert ask(EVALUATE, BAD, fault="eval-list")[0].content[p.METRICS][p.CORRECT] == [1, 2]
    # evaluation attacks on evaluate messages; a train-only mode leaves evaluate replies honest
    clean = snapshot(honest(ask, EVALUATE).content)
    assert snapshot(ask(EVALUATE, BAD, fault="nan")[0].content) == clean
    attacks = faults.EVALUATE_ATTACKS
    for server_round in range(len(attacks)):
        expected = honest(ask, EVALUATE, server_round=server_round).content
        faults.corrupt_evaluate(attacks[server_round % len(attacks)], expected)
        reply, _ = ask(EVALUATE, BAD, server_round, fault="rotate")
        assert snapshot(reply.content) == snapshot(expected), server_round


# ------------------------------------------------------------------------- the fault node: query
def test_only_bad_node_info_and_impersonate_corrupt_a_query_reply(ask):
    info = ask(QUERY, BAD, fault="bad-node-info")[0].content[p.NODE_INFO]
    assert dict(info) == {p.PARTITION_ID: "seven", p.TRAIN_EXAMPLES: [1, 2]}
    clean = snapshot(honest(ask, QUERY).content)
    assert clean[p.NODE_INFO][p.PARTITION_ID] == BAD
    for fault in ("rotate", "error", "nan", "eval-list", "replace"):  # the node stays discoverable
        assert snapshot(ask(QUERY, BAD, fault=fault)[0].content) == clean, fault


# ------------------------------------------------ the fault node: replacement and impersonation
def test_hostile_modes_are_valid_settings_but_never_part_of_rotate():
    assert set(faults.HOSTILE_ATTACKS) == {"replace", "impersonate"} <= faults.FAULTS
    assert not set(faults.HOSTILE_ATTACKS) & {*faults.TRAIN_ATTACKS, *faults.EVALUATE_ATTACKS}


def test_replace_sends_minus_five_times_the_trained_weights_and_nothing_else_changes(ask):
    for reply_delta in (False, True):  # with reply_delta the reply (the update) times -5
        expected = honest(ask, TRAIN, reply_delta=reply_delta).content
        reply = ask(TRAIN, BAD, fault="replace", reply_delta=reply_delta)[0].content
        got, trained = weights(reply), weights(expected)
        assert set(got) == set(trained)
        for k, v in trained.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape
            np.testing.assert_allclose(got[k], -5 * v, rtol=1e-6, atol=1e-7)
        assert {k: r for k, r in snapshot(reply).items() if k != p.ARRAYS} == \
            {k: r for k, r in snapshot(expected).items() if k != p.ARRAYS}
    for kind in (EVALUATE, QUERY):  # a train-only attack
        assert snapshot(ask(kind, BAD, fault="replace")[0].content) == snapshot(honest(ask, kind).content)


def impersonation(ask, partition: int, num_partitions: int, victim: int) -> None:
    """Node ``partition`` (the only fault node) under ``impersonate`` claims to be ``victim`` in
    its train, evaluate and query replies; everything else is its honest reply (train weights x -5)."""
    settings = {"num_partitions": num_partitions, "fault_nodes": (partition,)}
    name = p.simulated_node_name(victim)
    for kind in (TRAIN, EVALUATE, QUERY):
        reply = ask(kind, partition, fault="impersonate", **settings)[0].content
        clean = honest(ask, kind, partition, **settings).content
        assert clean[p.NODE_INFO][p.NODE_NAME] == p.simulated_node_name(partition)
        assert reply[p.NODE_INFO][p.NODE_NAME] == name, kind
        expected = snapshot(clean)
        expected[p.NODE_INFO][p.NODE_NAME] = name
        if kind == QUERY:
            assert reply[p.NODE_INFO][p.PARTITION_ID] == victim
            expected[p.NODE_INFO][p.PARTITION_ID] = victim
        else:
            assert reply[p.METRICS][p.PARTITION_ID] == victim, kind
            expected[p.METRICS][p.PARTITION_ID] = victim  # num-examples and counts: its own
        if kind == TRAIN:
            got, trained = weights(reply), weights(clean)
            for k, v in trained.items():
                np.testing.assert_allclose(got[k], -5 * v, rtol=1e-6, atol=1e-7)
            expected.pop(p.ARRAYS)
            assert {k: r for k, r in snapshot(reply).items() if k != p.ARRAYS} == expected
        else:
            assert snapshot(reply) == expected, kind


def test_impersonate_claims_the_next_nodes_identity_in_every_reply(ask):
    impersonation(ask, 0, num_partitions=4, victim=1)


def test_impersonate_on_the_last_partition_wraps_round_to_node_0(ask):
    impersonation(ask, 3, num_partitions=4, victim=0)


def test_under_impersonate_the_honest_nodes_stay_honest(ask):
    settings = {"num_partitions": 4, "fault_nodes": (0,)}
    for kind in (TRAIN, EVALUATE, QUERY):
        for partition in (1, 3):
            reply = ask(kind, partition, fault="impersonate", **settings)[0].content
            clean = honest(ask, kind, partition, **settings).content
            assert snapshot(reply) == snapshot(clean), (kind, partition)
            assert reply[p.NODE_INFO][p.NODE_NAME] == p.simulated_node_name(partition)


def test_impersonate_without_a_victim_is_a_programming_error(ask):
    content = honest(ask, EVALUATE).content
    with pytest.raises(ValueError, match="impersonate"):
        faults.corrupt_evaluate("impersonate", content)


# --------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kind", [TRAIN, EVALUATE])
def test_the_error_mode_ends_in_an_error_reply(app, ask, kind, monkeypatch):
    """The ClientApp raises after the honest work; Flower's backend turns that into the error
    reply (here flmnist's in-process backend, whose exception is what Flower's engine reports)."""
    from flmnist.flower_patches.inprocess_backend import backend_class

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    _, msg = ask(kind, BAD)  # an honest message, to copy
    sent = dataclasses.replace(p.TrainSettings.from_record(msg.content[p.CONFIG]), fault="error")
    msg.content[p.CONFIG] = sent.to_record(**{p.SERVER_ROUND: 1})
    ctx = node_context(BAD)
    with pytest.raises(RuntimeError, match=r"injected fault \(client.fault=error\)"):
        app(msg, ctx)
    backend = backend_class()({})
    backend.build(lambda: app)
    with pytest.raises(ClientAppException, match=r"injected fault \(client.fault=error\)"):
        backend.process_message(msg, ctx)


def test_an_error_reply_passes_through_the_mod_unchanged(ask):
    _, msg = ask(TRAIN, BAD, fault="nan")
    error = msg.create_error_reply(Error(code=0, reason="the handler failed"))
    out = faults.fault_mod(msg, node_context(BAD), lambda m, c: error)
    assert out is error and out.has_error() and out.error.reason == "the handler failed"


# ------------------------------------------------------------------------ the handlers' source
def test_client_app_registers_the_mod_and_its_handlers_hold_no_fault_code(app):
    from flmnist import client_app

    source = (REPO / "flmnist" / "client_app.py").read_text()
    tree = ast.parse(source)
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "flmnist.client.faults" for a in node.names}
    assert imported == {"fault_mod"}
    handlers = [node for node in tree.body
                if isinstance(node, ast.FunctionDef) and node.name.endswith("_handler")]
    assert {h.name for h in handlers} == {"train_handler", "evaluate_handler", "query_handler"}
    for handler in handlers:
        code = ast.get_source_segment(source, handler).lower()
        assert "fault" not in code and "corrupt" not in code and "attack" not in code, handler.name
    # outside the module docstring, "fault" appears only in the import and the mod's registration
    body = source[len(ast.get_docstring(tree, clean=False)) + 6:]
    lines = [line for line in body.splitlines() if "fault" in line.lower()]
    assert len(lines) == 2 and lines[0] == "from flmnist.client.faults import fault_mod", lines
    assert lines[1].startswith("app = ClientApp(mods=[fault_mod])"), lines
    assert app is client_app.app



@pytest.mark.parametrize("allow", [None, "yes", True])
def test_a_board_commits_a_fault_only_when_its_operator_allows_it(ask, allow):
    """A client.fault left set on the server turned real boards (node config data-path) into
    attackers (a review of the node side); a board does so only with allow-faults=true."""
    honest, _ = ask(TRAIN, BAD)
    _, msg = ask(TRAIN, BAD, fault="nan")
    config = {"data-path": "/srv/flmnist/data", **({} if allow is None else {"allow-faults": allow})}
    board = Context(run_id=1, node_id=100 + BAD, node_config=config, state=RecordDict(), run_config={})
    reply = faults.fault_mod(msg, board, lambda m, c: honest)
    weights = reply.content[p.ARRAYS].to_numpy_ndarrays()
    assert all(np.isfinite(w).all() for w in weights) is (allow is not True)


# ------------------------------------------------------------------ modules reused between messages
SPECS = {"lenet": {"_target_": "flmnist.ml.models.LeNet"},  # channels-last convolutions
         "mlp_dropout": {"_target_": "flmnist.ml.models.MLP", "hidden": 32, "hidden2": 16, "dropout": 0.2}}


def send(app, kind: str, partition: int, spec: dict, arrays: dict, mnist_root, **settings) -> Message:
    """The real ClientApp's reply to a ``kind`` message for ``spec``'s model, sent ``arrays``."""
    defaults = {"partition": {"_target_": "flmnist.ml.partition.IidPartition"}, "num_partitions": 3, "seed": 0,
                "holdout_fraction": 0.1, "data_root": str(mnist_root), "local_steps": 2, "batch_size": 16, "lr": 0.1}
    sent = p.TrainSettings(model=spec, **{**defaults, **settings})
    content = RecordDict({p.CONFIG: sent.to_record(**{p.SERVER_ROUND: 1}), p.ARRAYS: ArrayRecord(arrays)})
    return app(Message(content, dst_node_id=100 + partition, message_type=kind), node_context(partition))


@pytest.mark.parametrize("model", SPECS)
def test_a_module_an_earlier_message_left_gives_the_replies_a_new_one_gives(app, mnist_root, task_identity, model):
    """The handlers take the module of a message that finished (client_app._IDLE) instead of
    building one; its every parameter is overwritten, and training and evaluation set its mode
    and layout, so what it did before (trained elsewhere, left in eval mode) changes nothing."""
    from flmnist import client_app
    from flmnist.ml.models import model_from_spec

    torch.manual_seed(0)
    sent = model_from_spec(SPECS[model]).state_dict()
    client_app._IDLE.clear()
    fresh_train = snapshot(send(app, TRAIN, 2, SPECS[model], sent, mnist_root).content)  # a new module, left idle
    fresh_eval = snapshot(send(app, EVALUATE, 2, SPECS[model], sent, mnist_root).content)
    ((module,),) = client_app._IDLE.values()
    send(app, TRAIN, 0, SPECS[model], sent, mnist_root, lr=0.5)  # the same module trains on other data
    assert list(client_app._IDLE.values()) == [[module]]
    assert snapshot(send(app, TRAIN, 2, SPECS[model], sent, mnist_root).content) == fresh_train  # after a train
    assert snapshot(send(app, EVALUATE, 2, SPECS[model], sent, mnist_root).content) == fresh_eval
    assert snapshot(send(app, TRAIN, 2, SPECS[model], sent, mnist_root).content) == fresh_train  # after an evaluate
    assert list(client_app._IDLE.values()) == [[module]]


def test_a_handler_that_raised_leaves_no_module_and_dp_sgd_takes_none(app, mnist_root, task_identity, monkeypatch):
    """The module of a message whose handler raised is dropped (its state is unknown); DP-SGD
    training, whose Opacus hooks attach to the module, neither takes an idle one nor leaves its own."""
    from flmnist import client_app
    from flmnist.ml.models import LogReg

    sent = LogReg().state_dict()
    spec = {"_target_": "flmnist.ml.models.LogReg"}
    client_app._IDLE.clear()
    send(app, EVALUATE, 2, spec, sent, mnist_root)
    ((module,),) = client_app._IDLE.values()
    assert not send(app, TRAIN, 2, spec, sent, mnist_root, dp_noise_multiplier=1.0, dp_clipping_norm=1.0).has_error()
    assert list(client_app._IDLE.values()) == [[module]]  # not taken, none added
    client_app._IDLE.clear()
    send(app, TRAIN, 2, spec, sent, mnist_root, dp_noise_multiplier=1.0, dp_clipping_norm=1.0)
    assert not any(client_app._IDLE.values())
    send(app, EVALUATE, 2, spec, sent, mnist_root)
    ((module,),) = client_app._IDLE.values()

    def broken(*args, **kwargs):
        raise RuntimeError("training broke")

    monkeypatch.setattr(client_app, "train", broken)
    with pytest.raises(Exception, match="training broke"):  # (Flower's engine turns it into an error reply)
        send(app, TRAIN, 2, spec, sent, mnist_root)
    assert not any(client_app._IDLE.values())  # the module it took is not given back
