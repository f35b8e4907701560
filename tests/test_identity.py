"""Identity bound to the node id Flower authenticates (flmnist/engine/identity.py), through the
reply path of both engines, with real Flower messages on the fake Grid of test_engines."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Message, MessageType, RecordDict

from flmnist.core.arrays import to_weights
from flmnist.core.errors import ConfigError
from flmnist.engine.async_loop import AsyncLoop
from flmnist.engine.guard import Guarded
from flmnist.engine.identity import Identity, IdentityBook, read_registry
from flmnist.engine.reply_path import ReplyPath
from flmnist.protocol import messages as p
from flmnist.protocol.screen import ReplyScreen, ScreenSettings
from flmnist.protocol.settings import AsyncLoopSettings
from flmnist.strategies import FedAsync, FedAvg
from tests.test_engines import (
    LIMITS,
    SENT,
    START,
    FakeGrid,
    FakeNode,
    assert_weights,
    record,
    shifted,
    sync_round,
)


class Impostor(FakeNode):
    """Partition ``partition``'s node that, from its ``from_train``-th train reply on, names itself
    ``victim``'s node and claims its partition (node-info name and metrics partition-id)."""

    def __init__(self, partition: int, victim: int, offset: float, from_train: int = 1,
                 lie_on_query: bool = True, **kw) -> None:
        super().__init__(partition, offset, **kw)
        self.victim, self.from_train, self.lie_on_query = victim, from_train, lie_on_query

    def answer(self, msg):
        reply = super().answer(msg)
        query = msg.metadata.message_type == MessageType.QUERY
        lying = self.lie_on_query if query else self.trained >= self.from_train
        if reply is not None and lying and reply.has_content():
            content = reply.content
            content[p.NODE_INFO][p.NODE_NAME] = p.simulated_node_name(self.victim)
            for record in (content.metric_records.get(p.METRICS), content.config_records.get(p.NODE_INFO)):
                if record is not None and p.PARTITION_ID in record:
                    record[p.PARTITION_ID] = self.victim
        return reply


def make_path(**kw) -> ReplyPath:
    return ReplyPath(ReplyScreen(ScreenSettings(), LIMITS), SENT, **kw)


def test_a_node_claiming_another_after_its_first_reply_is_rejected_and_counted_as_itself(task_identity):
    """Round 1 binds node id 11 to node 0; in round 2 it claims node 1's name and partition:
    rejected with the reason, counted against node 0; node 1's own update is the round's average."""
    nodes = {11: Impostor(0, victim=1, offset=0.5, from_train=2), 12: FakeNode(1, 0.02), 13: FakeNode(2, 0.01)}
    strategy = Guarded(FedAvg(min_available_nodes=3), make_path())
    w1 = to_weights(sync_round(strategy, nodes, START, 1)[0])
    arrays, _ = sync_round(strategy, nodes, w1, 2)
    assert_weights(arrays, shifted(w1, (20 * 0.02 + 30 * 0.01) / 50))
    path = strategy.path
    assert dict(path.rejected) == {"node 0": 1}
    assert dict(path.reasons) == {"claims another node's identity": 1}
    assert path.identities.judge(11, "node 1", 1) == (
        "claims another node's identity (node 1, partition 1; node id 11 is node 0, partition 0, since its "
        "first reply)")


def test_two_node_ids_claiming_one_partition_are_both_refused_it(task_identity):
    """From the first reply on node id 11 (really partition 0) claims partition 1, as node id 12
    does honestly: neither is trusted with it; the round averages node 2 alone, nobody's update
    is credited to node 1, and both stay refused later."""
    nodes = {11: Impostor(0, victim=1, offset=0.5), 12: FakeNode(1, 0.02), 13: FakeNode(2, 0.01)}
    strategy = Guarded(FedAvg(min_available_nodes=3), make_path())
    arrays, _ = sync_round(strategy, nodes, START, 1)
    assert_weights(arrays, shifted(START, 0.01))
    arrays, _ = sync_round(strategy, nodes, to_weights(arrays), 2)
    assert_weights(arrays, shifted(START, 0.02))
    path = strategy.path
    assert set(path.rejected) == {"node id 11", "node id 12"} and "node 1" not in path.devices
    assert path.identities.flagged[11] == path.identities.flagged[12]
    assert "node ids 11 and 12 both claim node 1, partition 1: neither is trusted" in path.identities.flagged[11]
    assert path.stats()["identities"]["bound"] == {"13": {"name": "node 2", "partition": 2}}


def test_the_binding_passes_on_when_the_first_node_id_is_gone(task_identity):
    """A board that restarts without node authentication comes back with a new node id."""
    connected = {11, 12}
    book = IdentityBook(connected=lambda: connected)
    assert book.judge(11, "node 0", 0) is None and book.judge(12, "node 1", 1) is None
    assert "neither is trusted" in book.judge(13, "node 0", 0)  # 11 still connected: a conflict
    book2 = IdentityBook(connected=lambda: connected)
    book2.judge(11, "node 0", 0)
    connected.discard(11)
    assert book2.judge(13, "node 0", 0) is None and book2.bound[13].name == "node 0" and 11 not in book2.bound


def test_a_conflict_ends_when_one_of_the_two_node_ids_is_gone(task_identity):
    """A board restarts and its new node id replies before Flower drops the old one: both are
    flagged while both are listed; once the old one is gone, the new one binds the identity
    (it stayed refused for the rest of the run)."""
    connected = {11, 22}
    book = IdentityBook(connected=lambda: connected)
    assert book.judge(11, "jetson-a", 0) is None
    assert "neither is trusted" in book.judge(22, "jetson-a", 0)
    assert "neither is trusted" in book.judge(22, "jetson-a", 0)  # both still listed
    connected.discard(11)
    assert book.judge(22, "jetson-a", 0) is None
    assert book.trusted(22) and book.bound[22] == Identity("jetson-a", 0) and not book.flagged


def test_a_third_node_id_cannot_take_an_identity_two_others_contest(task_identity):
    """An attacker with two node ids shut the honest node out and then took its identity: the
    conflict unbound it, and a third node id claiming it bound at once (a review). While both
    rivals are connected nobody binds it; once one is gone, the other does, and the third stays refused."""
    connected = {1, 2, 3}
    book = IdentityBook(connected=lambda: connected)
    assert book.judge(1, "node 0", 0) is None
    assert "neither is trusted" in book.judge(2, "node 0", 0)
    assert book.judge(3, "node 0", 0) == ("claims an identity two other node ids contest (node 0, partition 0: "
                                          "node ids 1 and 2; nobody is trusted with it while they are connected)")
    assert "claims an identity two other node ids contest" in book.judge(3, "node 7", 0)  # the partition alone
    assert 3 not in book.bound and book.trusted(3)
    assert book.judge(3, "node 3", 3) is None  # its own identity: bound as before
    connected.discard(2)
    assert book.judge(1, "node 0", 0) is None and book.bound[1] == Identity("node 0", 0)
    connected.add(4)
    assert "node ids 1 and 4 both claim node 0" in book.judge(4, "node 0", 0)  # a new rival: a conflict again


def test_the_registry_names_each_node_id(tmp_path, task_identity):
    tsv = tmp_path / "registered_nodes.tsv"
    tsv.write_text("11\tjetson-orin\tkeys/orin.pub\n12\tjetson-nano\tkeys/nano.pub\n")
    registry = read_registry(tsv)
    assert registry == {11: ("jetson-orin", None), 12: ("jetson-nano", None)}
    book = IdentityBook(registry)
    assert book.judge(11, "jetson-orin", 0) is None
    assert book.judge(12, "jetson-orin", 1) == ("claims a name it is not registered under ('jetson-orin'; "
                                                "node id 12 is registered as 'jetson-nano')")
    assert book.name_of(12, "jetson-orin") == "jetson-nano"  # counted against the registered board
    assert "not in the registry" in book.judge(99, "jetson-x", 2)
    bad = tmp_path / "bad.tsv"
    bad.write_text("eleven\tjetson\n")
    with pytest.raises(ConfigError, match=r"screen.registry=.*bad.tsv, line 1: expected NODE_ID<TAB>NAME"):
        read_registry(bad)
    with pytest.raises(ConfigError, match=r"screen.registry=.*missing.tsv: cannot read it"):
        read_registry(tmp_path / "missing.tsv")


def test_a_registered_board_cannot_take_another_boards_partition(tmp_path, task_identity):
    """register_node.sh --partition K: jetson-1, registered for partition 1, replying first as
    partition 0 (a wrong copy of jetson-0's data, or a compromised board) took partition 0 and
    shut the real jetson-0 out as a rival; now it is refused, and jetson-0 binds its own."""
    tsv = tmp_path / "registered_nodes.tsv"
    tsv.write_text("11\tjetson-0\tkeys/0.pub\t0\n22\tjetson-1\tkeys/1.pub\t1\n")
    book = IdentityBook(read_registry(tsv))
    assert book.judge(22, "jetson-1", 0) == ("claims a partition it is not registered for (partition 0; node id 22 "
                                             "is registered as 'jetson-1', partition 1)")
    assert book.judge(11, "jetson-0", 0) is None and book.judge(22, "jetson-1", 1) is None
    # a board registered without --partition (an older row) takes no partition another row holds
    tsv.write_text("11\tjetson-0\tkeys/0.pub\t0\n33\tjetson-old\tkeys/old.pub\n")
    book = IdentityBook(read_registry(tsv))
    assert book.judge(33, "jetson-old", 0) == "claims partition 0, registered to 'jetson-0'"
    assert book.judge(33, "jetson-old", 2) is None and book.judge(11, "jetson-0", 0) is None
    tsv.write_text("11\tjetson-0\tk0\t0\n22\tjetson-1\tk1\t0\n")
    with pytest.raises(ConfigError, match=r"line 2: partition 0 is registered twice"):
        read_registry(tsv)
    tsv.write_text("11\tjetson-0\tk0\tzero\n")
    with pytest.raises(ConfigError, match=r"line 1: expected NODE_ID<TAB>NAME\[<TAB>KEY\[<TAB>PARTITION\]\]"):
        read_registry(tsv)


def test_async_discovery_binds_and_an_impostor_never_trains_as_its_victim(task_identity):
    """FedAsync: node id 11 (partition 0) answers discovery as itself, then its train replies
    claim node 1: each is rejected (counted as node 0) and only honest updates move the model."""
    nodes = {11: Impostor(0, victim=1, offset=0.5, lie_on_query=False), 12: FakeNode(1, 0.02),
             13: FakeNode(2, 0.01)}
    settings = AsyncLoopSettings(max_client_updates=12, eval_every=100, update_timeout=5,
                                 max_consecutive_failures=50)
    path = make_path()
    loop = AsyncLoop(FakeGrid(nodes), FedAsync(alpha=0.5), path, settings, poll_interval=0.001)
    final = to_weights(loop.run(record(START)))
    assert set(path.rejected) == {"node 0"} and path.rejected["node 0"] >= 3
    assert path.identities.bound[11].name == "node 0"
    assert set(loop.node_counts) == {"node 1", "node 2"}  # no update applied as node 1 but node 0's
    assert all(np.all(final[k] - START[k] < 0.1) for k in START)  # the +0.5 offsets never got in



class PerfectImpostor(FakeNode):
    """Partition ``partition``'s node whose evaluate replies are ``victim``'s node's, with every
    example right."""

    def __init__(self, partition: int, victim: int) -> None:
        super().__init__(partition)
        self.victim = FakeNode(victim)

    def answer_evaluate(self, msg):
        reply = self.victim.answer_evaluate(msg)
        metrics = reply.content[p.METRICS]
        metrics[p.CORRECT] = metrics[p.correct_key(0)] = metrics[p.NUM_EXAMPLES]
        return reply


def test_an_evaluate_reply_whose_claim_a_later_reply_doubts_is_taken_out(task_identity):
    """Node id 99 answers first as node 0, every example right; the real node 0 (node id 11)
    answers next: both are flagged, and the impostor's counts, accepted before the conflict
    showed, are taken out of the sum again (they stayed in: accuracy 1.0), as train replies are."""
    nodes = {99: PerfectImpostor(2, victim=0), 11: FakeNode(0), 12: FakeNode(1)}
    grid = FakeGrid(nodes)
    path = make_path()
    msgs = [Message(RecordDict({p.ARRAYS: record(START)}), dst_node_id=n, message_type=MessageType.EVALUATE)
            for n in nodes]
    metrics, rejections = path.evaluate_replies(grid.send_and_receive(msgs))
    assert {r.node_id for r in rejections} == {99, 11}
    assert metrics[p.NUM_EXAMPLES] == LIMITS.holdout_examples[1]  # node 1's alone
    assert metrics["accuracy"] == pytest.approx(1 - 1 / LIMITS.holdout_examples[1])  # not 1.0
    assert set(path.rejected) == {"node id 99", "node id 11"}


def test_rejections_are_never_counted_against_a_node_the_reply_only_names(tmp_path, task_identity):
    """An unbound node id naming itself as a bound node, or as a registered board, is counted
    as its node id (its malformed replies were counted against the node it named)."""
    book = IdentityBook()
    assert book.judge(12, "node 1", 1) is None
    assert book.name_of(99, "node 1") == "node id 99" and book.name_of(98, "node 5") == "node 5"
    registered = IdentityBook({11: ("jetson-orin", None)})
    assert registered.name_of(99, "jetson-orin") == "node id 99"
    assert registered.name_of(11, "anything") == "jetson-orin"


def test_a_node_cannot_pin_its_malformed_replies_on_a_board_that_binds_later(task_identity):
    """Node id 99 sends malformed replies naming node 1, which replies in the same round, then
    node 2, which first replies a round later: both count as node id 99's (they were counted as
    node 1's and node 2's, and the run's end blamed those boards). A malformed reply under a name
    nobody else binds still counts under that name (a broken board's own)."""
    path = make_path()

    def round_of(step, nodes):
        sync_round(Guarded(FedAvg(min_available_nodes=len(nodes), min_train_nodes=len(nodes)), path), nodes, START, step)

    round_of(1, {10: FakeNode(0), 99: FakeNode(1, behave="nan"), 11: FakeNode(1)})
    round_of(2, {10: FakeNode(0), 99: FakeNode(2, behave="nan")})
    assert path.rejected == {"node id 99": 2}  # a second name claimed: believed under neither
    round_of(3, {10: FakeNode(0), 12: FakeNode(2), 98: FakeNode(3, behave="nan")})
    assert path.rejected == {"node id 99": 2, "node 3": 1}
    assert path.state()["rejected"] == {"node id 99": 2, "node 3": 1}


def test_a_node_id_naming_itself_anew_in_each_reply_or_after_a_contested_name_is_counted_as_its_node_id():
    """(a) A node id never bound sent each malformed reply under a new name: each became an entry
    of the summary's rejected_per_node (300 replies, 300 names). (b) Node 0's identity contested by
    two node ids, a third's malformed replies named node 0 were counted as node 0's (a review)."""
    book = IdentityBook(connected=lambda: {1, 2, 3, 7})
    for k in range(300):
        book.count_rejection(7, book.name_of(7, f"board-{k}"))
    assert book.rejections() == {"node id 7": 300}
    book.count_rejection(8, book.name_of(8, "jetson-9"))  # one name throughout: a broken board's own
    book.count_rejection(8, book.name_of(8, "jetson-9"))
    assert book.rejections()["jetson-9"] == 2
    assert book.judge(5, "node 5", 5) is None  # node id 9 names bound node 5 first, then a free name:
    book.count_rejection(9, book.name_of(9, "node 5"))  # (the order the replies of a round came in
    book.count_rejection(9, book.name_of(9, "node 6"))  # decided whether it counted as node 6's)
    assert book.rejections()["node id 9"] == 2 and "node 6" not in book.rejections()
    assert book.judge(1, "node 0", 0) is None
    assert "neither is trusted" in book.judge(2, "node 0", 0)
    for _ in range(5):
        book.count_rejection(3, book.name_of(3, "node 0"))
    assert book.rejections() == {"node id 7": 300, "jetson-9": 2, "node id 9": 2, "node id 3": 5}


def test_a_node_refused_over_an_identity_conflict_is_asked_again_once_it_is_over(task_identity):
    """A board restarts with a new node id (13) while Flower still lists its old one (11): the
    new one's answer is refused as a conflict, not for good; when 11 is gone, 13 is asked again
    and gets the board's identity (it was refused for the rest of the run)."""
    from flmnist.engine.node_directory import NodeDirectory

    nodes = {11: FakeNode(0), 12: FakeNode(1), 13: FakeNode(0)}
    grid = FakeGrid(nodes)
    path = make_path()
    path.identities.connected = grid.get_node_ids
    directory = NodeDirectory(grid, path, poll_interval=0.001, reask_after=0.0)
    grid.connected.discard(13)
    assert [n.node_id for n in directory.discover(1.0)] == [11, 12]
    grid.connected.add(13)
    assert directory.discover(1.0) == [] and not directory.refused
    grid.connected.discard(11)
    assert [(n.node_id, n.name) for n in directory.discover(1.0)] == [(13, "node 0")]
    directory.refused.clear()
    bad = NodeDirectory(FakeGrid({14: FakeNode(2, query="bad-node-info")}), make_path(), poll_interval=0.001)
    assert bad.discover(1.0) == [] and set(bad.refused) == {14}  # a malformed answer: refused for good


def test_summed_evaluations_that_overflow_or_hold_no_examples_report_no_figure():
    """Two replies each with a finite loss-sum near the float maximum: no client loss (it was
    inf, recorded as an empty value); replies with no examples: no evaluation (NaN figures)."""
    from flwr.app import MetricRecord

    from flmnist.protocol.aggregation import aggregate_evaluate_counts

    def reply(n: int, loss_sum: float) -> RecordDict:
        return RecordDict({"m": MetricRecord({"num-examples": n, "loss-sum": loss_sum, "correct": n // 2})})

    out = aggregate_evaluate_counts([reply(10, 1.7e308), reply(10, 1.7e308)], "num-examples")
    assert "loss" not in out and out["accuracy"] == 0.5
    assert aggregate_evaluate_counts([reply(0, 0.0), reply(0, 0.0)], "num-examples") is None
    assert aggregate_evaluate_counts([reply(10, 5.0)], "num-examples")["loss"] == 0.5


def test_a_node_whose_answer_comes_after_the_wait_is_admitted_at_the_next_look(task_identity):
    """An idle SuperNode picks a message up within 3 s and a stock executor takes seconds to
    start: the asynchronous loop waited 2 s, dropped the question, and asked again only after a
    minute, so a board back with a new node id hardly ever got work (a review). The question stays
    open for its TTL and the answer is read at the next look."""
    from flmnist.engine.node_directory import NodeDirectory

    directory = NodeDirectory(FakeGrid({11: FakeNode(0, delay=0.3)}), make_path(), poll_interval=0.001)
    assert directory.discover(0.0) == []
    time.sleep(0.35)
    assert [n.node_id for n in directory.discover(0.0)] == [11] and not directory.pending


def test_a_node_asked_twice_is_judged_once(task_identity):
    """Asked again after reask_after while its first question was still open, a node's two answers
    were both judged: a refused node could be added, an accepted one refused (a review)."""
    from flmnist.engine.node_directory import NodeDirectory

    directory = NodeDirectory(FakeGrid({11: FakeNode(0, delay=0.2)}), make_path(), poll_interval=0.001,
                              reask_after=0.0)
    assert directory.discover(0.0) == [] and len(directory.pending) == 1
    assert directory.discover(0.0) == [] and len(directory.pending) == 1  # the old question dropped
    time.sleep(0.25)
    assert [n.node_id for n in directory.collect()] == [11] and not directory.pending
