"""A Grid whose ``send_and_receive`` polls for replies every ``poll_interval`` seconds and, on real
SuperNodes, keeps the nodes that have replied busy until the round's last reply.

Flower 1.41's deployment Grid sleeps 3 s between pulls, which adds up to 3 s to every
message exchange of a round. This wrapper keeps Flower's own round loop
(``Strategy.start``) and only replaces how long it waits between pulls, using the
Grid's ``push_messages`` / ``pull_messages``.

The other 3 s are the SuperNode's: having sent a reply it asks for its next message at once and,
finding none, sleeps 3 s (hard-coded in Flower 1.41). In a synchronous round the next message
cannot exist yet (it carries the model the round's last reply completes), so every node sleeps
before every round. With ``keep_warm`` seconds, each node gets a hold message (``query.hold``: its
ClientApp replies at once, with nothing) queued behind its task; whenever a node's reply (its
task's or a hold's) arrives while the round still waits for others, another hold is pushed, so
one is always queued behind the one it runs: the node keeps asking and finds the next round's
task within a hold's time (well under a second) instead of 3 s. After ``keep_warm`` seconds of a round no more holds
are pushed (a long round pays the sleep once, as without them). Hold replies are pulled and
dropped, never read; a hold expires in the SuperLink after ``HOLD_TTL`` seconds if no node took it.
Holds help only where a message costs little: a node whose holds take more than ``SLOW_HOLD``
seconds twice (Flower's own executor starts a new process per message) gets no more.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from logging import WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log

HOLD = "query.hold"  # the message type of a hold (flmnist's ClientApp: ``hold_handler``)
HOLD_TTL = 5.0  # seconds a queued hold stays deliverable (one is taken within about a second)
SLOW_HOLD = 2.0  # seconds: a node whose holds take longer twice (Flower's own executor: a new process each) gets none


class PollingGrid:
    """Wraps a Flower Grid; everything but ``send_and_receive`` is passed through."""

    def __init__(self, grid, poll_interval: float = 0.05, keep_warm: float = 0.0,
                 slow_hold: float = SLOW_HOLD) -> None:
        self._grid = grid
        self.slow_hold = slow_hold
        self.poll_interval = poll_interval
        self.keep_warm = keep_warm
        self.holds: dict[str, int] = {}  # hold message id -> node id, until its reply is pulled
        self.holds_sent = 0
        self.slow: Counter = Counter()  # node id -> holds that took longer than SLOW_HOLD

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def _hold(self, node_ids: Iterable[int]) -> None:
        messages = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=HOLD, ttl=HOLD_TTL)
                    for n in node_ids]
        if messages:
            for message_id, message in zip(self._grid.push_messages(messages), messages):
                self.holds[message_id] = message.metadata.dst_node_id
            self.holds_sent += len(messages)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push ``messages``; pull replies every ``poll_interval`` s until all arrived or ``timeout``
        (with ``keep_warm``: a hold queued behind each message, renewed while the round waits)."""
        messages = list(messages)
        start = time.monotonic()
        pending = set(self._grid.push_messages(messages))
        if self.keep_warm and pending:  # one hold behind each task (none if one from before is still out)
            self._hold({m.metadata.dst_node_id for m in messages} - set(self.holds.values())
                       - {n for n, k in self.slow.items() if k >= 2})
        deadline = None if timeout is None else start + timeout
        replies: list[Message] = []
        last: dict[int, float] = {}  # node id -> when its last reply of this round arrived
        while pending:
            got = list(self._grid.pull_messages([*pending, *self.holds]))
            now = time.monotonic()
            # A hold's node is the one it was sent to (an error reply, e.g. a hold that expired, comes from
            # the SuperLink); only a hold the node answered keeps it held.
            held = {node for m in got if (node := self.holds.pop(m.metadata.reply_to_message_id, None)) is not None
                    and not m.has_error()}
            for node in held:  # a hold queued behind a reply took this long on the node
                if node in last and now - last[node] > self.slow_hold:
                    self.slow[node] += 1
                    if self.slow[node] == 2:
                        log(WARNING, "keep_warm: holds take %.1f s on node id %d (Flower's own executor starts a "
                            "process per message?); it gets no more holds", now - last[node], node)
            got = [m for m in got if m.metadata.reply_to_message_id in pending]
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and now >= deadline):
                break
            answered = {m.metadata.src_node_id for m in got} | held
            last.update(dict.fromkeys(answered, now))
            if self.keep_warm and now - start < self.keep_warm:
                # A node that replied now runs the hold queued behind that reply: queue the next one
                # (two out per node: the one it runs, the one it takes next).
                out = Counter(self.holds.values())
                self._hold(n for n in answered if out[n] < 2 and self.slow[n] < 2)
            time.sleep(self.poll_interval)
        return replies
