"""The simulation engine's feeder (flmnist/flower_patches/vce_feeder.py) delivers what Flower 1.41's own loop
delivers, on Flower's real in-memory link state, in one pass instead of one per node."""

from __future__ import annotations

import functools
import random
import threading
import time
from queue import Queue

import pytest
from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.federation.noop_federation_manager import NOOP_FEDERATION_ID
from flwr.superlink.grid import InMemoryGrid

from flmnist.flower_patches import vce_feeder


def engine(nodes: int):
    """A link state, nodes and a grid set up as Flower's simulation sets them up."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = Run.create_empty(1234)
    run.primary_task_id, run.federation_id = 77, NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[77] = Task(task_id=77, run_id=run.run_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 77, run.run_id, SUPERLINK_NODE_ID
    mapping = vce_api._register_nodes(nodes, factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, mapping, grid


def one_tick(feeder, state, mapping) -> list[Message]:
    queue, stop = Queue(), threading.Event()
    thread = threading.Thread(target=feeder, args=(state, queue, mapping, stop))
    thread.start()
    time.sleep(0.05)  # the first tick runs at once; the next comes after 0.1 s
    stop.set()
    thread.join()
    return [queue.get() for _ in range(queue.qsize())]


@pytest.fixture(autouse=True)
def _restore_flower_feeder():
    original = vce_api.add_messages_to_queue
    yield
    vce_api.add_messages_to_queue = original


def test_one_pass_delivers_what_flowers_loop_delivers():
    flower_feeder = vce_api.add_messages_to_queue
    delivered = []
    for feeder in (flower_feeder, functools.partial(vce_feeder.feed, tick=0.1)):  # one tick each in 50 ms
        state, mapping, grid = engine(200)
        targets = random.Random(0).sample(sorted(mapping), 20)
        messages = [Message(RecordDict(), dst, "train") for dst in targets]
        messages.append(Message(RecordDict(), targets[0], "train"))  # a second message for one node
        expired = Message(RecordDict(), targets[1], "train", ttl=1.0)
        ids = dict(zip(grid.push_messages([*messages, expired]), [*targets, targets[0], targets[1]]))
        time.sleep(1.1)  # the expired message's ttl runs out; the others have Flower's default ttl
        got = one_tick(feeder, state, mapping)
        order = list(ids)  # push order: the first message to each node is the one due first
        delivered.append(sorted((targets.index(m.metadata.dst_node_id), order.index(m.metadata.message_id))
                                for m in got))
        assert all(m.metadata.delivered_at for m in got)
        assert len(got) == 20  # one message per node per tick; the expired one never
    assert delivered[0] == delivered[1]


def test_install_replaces_flowers_loop_once_for_the_pinned_flower_only(monkeypatch):
    assert vce_feeder.install()
    assert vce_api.add_messages_to_queue.flmnist
    assert not vce_feeder.install()  # already in place
    import flwr

    monkeypatch.setattr(vce_api, "add_messages_to_queue", lambda *args: None)
    monkeypatch.setattr(flwr, "__version__", "1.42.0")
    assert not vce_feeder.install()


def test_a_simulation_polls_its_own_link_state_often_and_a_deployment_as_configured():
    """The synchronous engine's pulls (PollingGrid): Flower's in-memory grid, the simulation's,
    at most every 5 ms (a pull reads the process's own link state; at poll_interval's 0.02 a
    seed002 round waited about 10 ms more for its last reply); any other grid as configured."""
    from flmnist.flower_patches.polling_grid import SIMULATION_POLL, poll_every

    _, _, grid = engine(3)
    assert SIMULATION_POLL == 0.005
    assert poll_every(grid, 0.02) == 0.005 and poll_every(grid, 0.001) == 0.001 and poll_every(grid, None) is None
    deployed = object()  # (a deployment's grid is a gRPC client of the SuperLink: not an InMemoryGrid)
    assert poll_every(deployed, 0.02) == 0.02 and poll_every(deployed, None) is None


def test_after_a_long_pass_the_feeder_and_the_pulls_pause_four_times_its_length():
    """pause_after: the feeder's and the pulls' one rule; a quick pass waits the tick, a pass of
    10 ms (thousands of messages in flight) at least 40 ms, so polling takes at most a fifth of a core."""
    from flmnist.flower_patches.polling_grid import pause_after

    assert pause_after(time.perf_counter(), 0.005) == 0.005
    assert 0.04 <= pause_after(time.perf_counter() - 0.01, 0.005) < 0.1
