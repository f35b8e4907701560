"""``PollingGrid``'s keep-warm holds against SuperNodes that behave as Flower 1.41's do: one message
at a time, in push order, and, having replied, a node asks for its next message at once and sleeps
(here ``SLEEP`` s, 3 s in Flower) when none is queued. Real Flower messages throughout."""

from __future__ import annotations

import time
from collections import Counter
from uuid import uuid4

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from flmnist.flower_patches.polling_grid import HOLD, PollingGrid

SLEEP = 0.6  # the SuperNode's idle sleep, scaled down (a hold takes 0.1 s, the server polls every 5 ms)


@pytest.fixture(autouse=True)
def _identity(task_identity):
    """Flower builds a reply's metadata from the task's identity, as a ClientApp process has it."""


class SleepyNodes:
    """A fake Grid of SuperNodes; ``work``: node id -> seconds a train message takes."""

    def __init__(self, work: dict[int, float], hold_s: float = 0.1) -> None:
        self.work, self.hold_s = work, hold_s
        self.queue: dict[int, list[tuple[float, Message]]] = {n: [] for n in work}
        self.asks = {n: time.monotonic() for n in work}  # when each node next asks for a message
        self.ready: dict[str, tuple[float, Message]] = {}
        self.delayed = Counter()  # node id -> messages that waited for the node's idle sleep
        self.asleep: dict[int, float | None] = {n: None for n in work}  # since when a node sleeps
        self.taken = Counter()  # (node id, message type) -> messages taken

    def advance(self, now: float) -> None:
        for n, queue in self.queue.items():
            while self.asks[n] <= now:
                queued = [q for q in queue if q[0] <= self.asks[n]]
                if queued:
                    pushed, msg = queued[0]
                    queue.remove(queued[0])
                    if self.asleep[n] is not None and pushed > self.asleep[n]:
                        self.delayed[n] += 1  # it arrived while the node slept
                    self.asleep[n] = None
                    kind = msg.metadata.message_type
                    self.taken[n, kind] += 1
                    done = self.asks[n] + (self.hold_s if kind == HOLD else self.work[n])
                    self.ready[msg.metadata.message_id] = (done, Message(RecordDict(), reply_to=msg))
                    self.asks[n] = done
                else:  # nothing queued: sleep; a message pushed meanwhile waits for the wake-up
                    if self.asleep[n] is None:
                        self.asleep[n] = self.asks[n]
                    self.asks[n] += SLEEP

    def push_messages(self, messages):
        now = time.monotonic()
        self.advance(now)
        ids = []
        for msg in messages:
            message_id = uuid4().hex
            msg.metadata.__dict__["_message_id"] = message_id
            self.queue[msg.metadata.dst_node_id].append((now, msg))
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):
        now = time.monotonic()
        self.advance(now)
        out = [m for m in message_ids if m in self.ready and self.ready[m][0] <= now]
        return [self.ready.pop(m)[1] for m in out]


def tasks(nodes) -> list[Message]:
    return [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.TRAIN)
            for n in nodes]


def rounds(keep_warm: float, count: int = 4) -> tuple[SleepyNodes, PollingGrid, list[float]]:
    """``count`` synchronous rounds: node 1 trains 0.05 s, node 2 0.5 s."""
    nodes = SleepyNodes({1: 0.05, 2: 0.5})
    grid = PollingGrid(nodes, poll_interval=0.005, keep_warm=keep_warm)
    times, outstanding = [], []
    for k in range(count):
        if k == 1:  # the first task finds every node asleep, as after any pause: count from round 2
            nodes.delayed.clear()
        start = time.monotonic()
        replies = grid.send_and_receive(tasks([1, 2]), timeout=10)
        assert len(replies) == 2 and all(r.metadata.message_type == MessageType.TRAIN for r in replies)
        times.append(time.monotonic() - start)
        outstanding.append(max(Counter(grid.holds.values()).values(), default=0))
    assert max(outstanding) <= 2, outstanding  # never more than two holds out per node
    return nodes, grid, times


def test_without_holds_every_round_waits_for_the_idle_sleep():
    nodes, grid, times = rounds(keep_warm=0)
    assert grid.holds_sent == 0
    assert nodes.delayed[1] == 3 and nodes.delayed[2] == 3  # rounds 2-4: each node had slept
    assert min(times[1:]) >= 0.5 + SLEEP * 0.5


def test_holds_keep_every_node_asking_so_no_round_waits_for_the_idle_sleep():
    nodes, _, times = rounds(keep_warm=30)
    assert nodes.delayed[1] + nodes.delayed[2] == 0, nodes.delayed
    assert nodes.taken[1, HOLD] > nodes.taken[2, HOLD] >= 3  # the fast node waits longer for the round
    assert max(times[1:]) < 0.5 + SLEEP * 0.5, times


def test_holds_stop_after_keep_warm_seconds_of_a_round():
    """Node 1 waits 0.45 s a round for node 2; holds for its first 0.05 s only, then the sleep."""
    short, short_grid, _ = rounds(keep_warm=0.05)
    _, long_grid, _ = rounds(keep_warm=30)
    assert short_grid.holds_sent < long_grid.holds_sent / 2, (short_grid.holds_sent, long_grid.holds_sent)
    assert short.delayed[1] >= 2  # after its holds, node 1 sleeps, and the next round's task waits


@pytest.mark.parametrize("keep_warm", [0, 30])
def test_an_empty_round_sends_nothing(keep_warm):
    grid = PollingGrid(SleepyNodes({1: 0.05}), poll_interval=0.005, keep_warm=keep_warm)
    assert grid.send_and_receive([]) == [] and grid.holds_sent == 0


def test_a_node_whose_holds_are_slow_gets_no_more(caplog):
    """Behind Flower's own executor a hold costs a new process (seconds): after two slow ones the
    node gets none, and the rounds go on as without holds."""
    nodes = SleepyNodes({1: 0.05, 2: 0.8}, hold_s=0.25)
    grid = PollingGrid(nodes, poll_interval=0.005, keep_warm=30, slow_hold=0.2)
    for _ in range(3):
        assert len(grid.send_and_receive(tasks([1, 2]), timeout=10)) == 2
    assert grid.slow[1] >= 2
    taken = nodes.taken[1, HOLD]
    grid.send_and_receive(tasks([1, 2]), timeout=10)
    assert nodes.taken[1, HOLD] <= taken + 2  # at most what was already out
    assert "holds take" in caplog.text and "gets no more holds" in caplog.text
