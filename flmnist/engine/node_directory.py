"""Who each connected node is, asked with a QUERY message, for both engines.

Flower gives SuperNodes new random node ids every run, and ``Grid.get_node_ids()`` lists
them in no fixed order, so "the third node" means a different partition each run. The
:class:`NodeDirectory` asks every node it has not met who it is (the ClientApp's
``query_handler`` answers with its partition id, name and numbers of examples), screens each
answer (:meth:`flmnist.protocol.screen.ReplyScreen.query`) and remembers the outcome:

- an accepted answer: the node's :class:`~flmnist.protocol.replies.NodeInfo` (``nodes``);
- a malformed one: the node is *refused* (``refused``, with the reason, logged) and never
  asked again; one whose identity another node id claims too (:mod:`flmnist.engine.identity`)
  is asked again after ``reask_after`` seconds, when the conflict may be over;
- an error reply or no reply within the timeout: the node is asked again when it is seen
  after ``reask_after`` seconds.

:meth:`NodeDirectory.order` sorts node ids by partition id, a run-independent order. The
asynchronous loop (:mod:`flmnist.engine.async_loop`) dispatches in that order and takes only nodes that
answered. (The synchronous engine needs no answers: :mod:`flmnist.flower_patches.node_order`.)
"""

from __future__ import annotations

import time
from logging import WARNING

from flwr.app import Message, MessageType, RecordDict
from flwr.common.logger import log

from flmnist.engine.reply_path import ReplyPath
from flmnist.protocol import messages as p
from flmnist.protocol.replies import NodeInfo, Rejection

QUERY_TTL = 120.0  # seconds a "who are you" message waits for its node


class NodeDirectory:
    """Node id -> who that node is, from screened query replies (see the module docstring)."""

    def __init__(self, grid, path: ReplyPath, poll_interval: float = 0.05, reask_after: float = 60.0) -> None:
        self.grid, self.path = grid, path
        self.poll_interval, self.reask_after = poll_interval, reask_after
        self.nodes: dict[int, NodeInfo] = {}     # node id -> accepted node-info
        self.refused: dict[int, str] = {}        # node id -> why its query reply was refused
        self.asked: dict[int, float] = {}        # node id -> when it was last asked who it is
        self.pending: dict[str, tuple[int, float]] = {}  # query message id -> (node id, when its TTL ends)

    def discover(self, timeout: float) -> list[NodeInfo]:
        """Ask every node Flower lists that is not known, not refused and not asked in the last
        ``reask_after`` s who it is, and wait up to ``timeout`` s (0: one look) for the answers to
        these and to earlier questions still within their TTL (an idle SuperNode picks a message up
        within 3 s, and a stock executor takes seconds more to start: an answer later than the wait
        was dropped, and the node not asked again for a minute); return the newly accepted nodes. A
        malformed answer refuses the node (logged with the reason)."""
        now = time.monotonic()
        new = [n for n in self.grid.get_node_ids() if n not in self.nodes and n not in self.refused
               and now - self.asked.get(n, -1e9) > self.reask_after]
        if new:
            self.asked.update({n: now for n in new})
            self.pending = {m: q for m, q in self.pending.items() if q[0] not in new}  # one question a node
            ttl = max(timeout, QUERY_TTL)
            msgs = [Message(RecordDict({p.CONFIG: self.path.sent.to_record()}), dst_node_id=n,
                            message_type=MessageType.QUERY, ttl=ttl) for n in new]
            pushed = zip(self.grid.push_messages(msgs), new, strict=False)  # one id a message ("": not pushed)
            self.pending.update({m: (n, now + ttl) for m, n in pushed if m})
        return self.collect(timeout)

    def collect(self, timeout: float = 0.0) -> list[NodeInfo]:
        """The answers to the open questions, waiting up to ``timeout`` s (0: one look); the newly
        accepted nodes."""
        known = set(self.nodes)
        deadline = time.monotonic() + timeout
        while self.pending:
            now = time.monotonic()
            self.pending = {m: q for m, q in self.pending.items() if q[1] > now}  # within their TTL
            for reply in self.grid.pull_messages(list(self.pending)):
                asked = self.pending.pop(reply.metadata.reply_to_message_id, None)
                if asked is None or asked[0] in self.nodes or asked[0] in self.refused:
                    continue  # (a question already answered: the node's judgement stands)
                out = self.path.query_reply(reply)
                if isinstance(out, Rejection):
                    # Refused for good, but not for an identity conflict: that ends when one of
                    # the two node ids leaves (a restarted board's old one), then it is asked again.
                    if not out.failed and self.path.identities.trusted(out.node_id):
                        self.refused[reply.metadata.src_node_id] = out.reason
                    log(WARNING, "Node %s was not added: %s", out.name, out.reason)
                else:
                    self.nodes[out.node_id] = out
            if not self.pending or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_interval)
        return [info for n, info in self.nodes.items() if n not in known]

    def ordered(self) -> list[NodeInfo]:
        """Every accepted node, in a run-independent order (partition id)."""
        return sorted(self.nodes.values(), key=lambda n: (n.partition, n.node_id))
