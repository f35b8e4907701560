"""The asynchronous loop's messages, on Flower's ``Grid.push_messages`` / ``pull_messages``.

:class:`Transport` knows the nodes (asked who they are by a
:class:`~flmnist.engine.node_directory.NodeDirectory`), pushes train messages, tracks the jobs
in flight and pulls their replies, and hands the loop the next finished job:

- simulation: the job that completes first on the virtual clock, waiting (really) for its
  reply, whatever order replies really arrive in;
- deployment: the first reply to arrive, or the first job to time out or lose its node.

Every 5 s it asks Flower which nodes are connected: a job whose node is gone ends at once
(not after its timeout) and, in deployment, nodes that come back or join are handed to the
loop (``on_available``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from logging import WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.logger import log

from flmnist.engine.async_jobs import Job, Node, VirtualQueue
from flmnist.engine.base import UpdateLiveness
from flmnist.engine.node_directory import NodeDirectory
from flmnist.engine.reply_path import ReplyPath
from flmnist.protocol import messages as p
from flmnist.protocol.replies import NodeInfo


def superlink_says(reply: Message | None) -> str | None:
    """What an error reply Flower's SuperLink wrote itself says of the update (a node's own reply
    with the same code is its failure, screened as any other): "unavailable" (NODE_UNAVAILABLE: the
    node is gone), "timed out" (MESSAGE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE: the task or its
    reply outlived its time to live); else None."""
    if reply is None or not reply.has_error() or reply.metadata.src_node_id != SUPERLINK_NODE_ID:
        return None
    return {ErrorCode.NODE_UNAVAILABLE: "unavailable", ErrorCode.MESSAGE_UNAVAILABLE: "timed out",
            ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "timed out"}.get(reply.error.code)


class Transport:
    """Nodes, messages and jobs in flight of the asynchronous loop (see the module docstring)."""

    def __init__(self, grid, path: ReplyPath, liveness: UpdateLiveness, update_timeout: float,
                 poll_interval: float, simulated: bool) -> None:
        self.grid, self.liveness = grid, liveness
        self.update_timeout, self.poll_interval, self.simulated = update_timeout, poll_interval, simulated
        self.directory = NodeDirectory(grid, path, poll_interval)  # who each node is (query replies)
        self.nodes: dict[int, Node] = {}         # the directory's accepted nodes, with their work count
        self.partition_updates: dict[int, int] = {}  # partition -> updates dispatched, over node ids and resumes
        self.queue = VirtualQueue()              # jobs in flight, by virtual completion
        self.in_flight: dict[str, Job] = {}      # message id -> job, until the loop has its outcome
        self.arrived: OrderedDict[str, Message] = OrderedDict()
        self.away: list[Node] = []               # nodes Flower reported gone (deployment)
        self.connected: set[int] | None = None   # node ids Flower lists, refreshed every 5 s
        self.last_discovery = time.monotonic()
        self.on_available: Callable[[list[Node]], None] = lambda nodes: None
        self.deadline: float | None = None  # deployment: when async_loop.time_budget runs out (monotonic)

    # ----------------------------------------------------------------- nodes
    @property
    def refused(self) -> set[int]:
        """Node ids whose query reply was refused: they never get work."""
        return set(self.directory.refused)

    def discover(self, timeout: float) -> list[Node]:
        """Ask every newly connected node who it is (a malformed answer keeps the node out, a
        silent one is asked again after a minute); the newly accepted nodes."""
        return self._admitted(self.directory.discover(timeout))

    def _admitted(self, found: list[NodeInfo]) -> list[Node]:
        """Nodes for newly accepted node-infos (a partition's update count goes on under a new node id)."""
        for info in found:
            self.nodes[info.node_id] = Node(info, self.partition_updates.get(info.partition, 0))
            if self.connected is not None:
                self.connected.add(info.node_id)  # Flower listed it when it was asked who it is
        return [self.nodes[info.node_id] for info in found]

    def ordered_nodes(self) -> list[Node]:
        """Nodes in a run-independent order (partition id), so dispatch order is reproducible."""
        return [self.nodes[info.node_id] for info in self.directory.ordered()]

    def unavailable(self, job: Job) -> bool:
        """Whether Flower no longer lists the job's node as connected (checked every 5 s)."""
        return self.connected is not None and job.node_id not in self.connected

    def present(self, idle: list[Node]) -> list[Node]:
        """Deployment: the idle nodes Flower still lists (at its last refresh); the others wait
        among the ``away`` until they are back, instead of getting work that waits out its TTL."""
        if self.simulated or self.connected is None:
            return idle
        self.away += [n for n in idle if n.node_id not in self.connected]
        return [n for n in idle if n.node_id in self.connected]

    def refresh_connected(self) -> None:
        """Every 5 s: which nodes Flower lists; in deployment, returning and new nodes get work."""
        now = time.monotonic()
        if self.connected is not None and now - self.last_discovery <= 5.0:
            if not self.simulated and self.directory.pending:  # answers to earlier questions, as they come
                self.on_available(self._admitted(self.directory.collect()))
            return
        self.last_discovery = now
        self.connected = set(self.grid.get_node_ids())
        if not self.simulated:
            back = [n for n in self.away if n.node_id in self.connected]
            self.away = [n for n in self.away if n.node_id not in self.connected]
            self.on_available(back + self.discover(timeout=0.0))  # answers come in at later refreshes

    # -------------------------------------------------------------- messages
    def send_train(self, node: Node, arrays: ArrayRecord, config: ConfigRecord) -> str | None:
        """Push one train message; its message id. Its TTL: the update timeout, once more for each
        task of the node's queued ahead of it (prefetch), which it waits behind. None: Flower stored
        no message (its id "" or None, or no id: the node is no longer registered, the message too
        large); the node, unless it still has a task, waits among the ``away``."""
        ahead = sum(1 for j in self.in_flight.values() if j.node_id == node.node_id)
        msg = Message(RecordDict({p.ARRAYS: arrays, p.CONFIG: config}), dst_node_id=node.node_id,
                      message_type=MessageType.TRAIN, ttl=self.update_timeout * (1 + ahead))
        ids = list(self.grid.push_messages([msg]))
        if len(ids) == 1 and isinstance(ids[0], str) and ids[0]:
            return ids[0]
        log(WARNING, "Flower stored no task for node id %s (push_messages returned %s): it waits until Flower lists "
            "it again", node.node_id, ids)
        if not ahead and node not in self.away:
            self.away.append(node)
        return None

    def track(self, job: Job) -> None:
        self.in_flight[job.message_id] = job
        self.queue.push(job)

    def __len__(self) -> int:
        """Jobs in flight."""
        return len(self.queue)

    def jobs(self) -> list[Job]:
        """The jobs in flight whose outcome the loop has not had."""
        return list(self.in_flight.values())

    def pull(self) -> None:
        waiting = [m for m in self.in_flight if m not in self.arrived]
        if waiting:
            for reply in self.grid.pull_messages(waiting):
                self.arrived[reply.metadata.reply_to_message_id] = reply

    def next(self, budget: float | None = None) -> tuple[Job, Message | None] | None:
        """The next finished job and its reply (None: it timed out, its node left or, in
        simulation, its device dropped the update); it is no longer in flight. None: the time
        budget ran out first (the jobs in flight stay unanswered): in deployment while waiting, in
        simulation when the next job completes after ``budget`` virtual seconds (not waited for)."""
        if self.simulated:
            if budget and self.queue.peek().vdone > budget:
                return None
            job = self.queue.pop()
            reply = self.await_reply(job)
        elif (got := self.next_real()) is None:
            return None
        else:
            job, reply = got
        self.in_flight.pop(job.message_id, None)
        queued = [j for j in self.in_flight.values() if j.node_id == job.node_id]
        if queued:  # the node's next task starts now: so does its update timeout
            min(queued, key=lambda j: j.seq).sent = time.monotonic()
        return job, reply

    def await_reply(self, job: Job) -> Message | None:
        """Simulation: wait (really) for the reply of the job that completes first virtually."""
        while job.message_id not in self.arrived:
            if job.timing is not None and job.timing.dropped:
                return None  # this update never arrives; its real reply is ignored
            self.pull()
            if job.message_id in self.arrived:
                break
            self.refresh_connected()
            if time.monotonic() - job.sent > self.update_timeout or self.unavailable(job):
                return None
            self.liveness.check_progress()
            time.sleep(self.poll_interval)
        return self.arrived.pop(job.message_id, None)

    def next_real(self) -> tuple[Job, Message | None] | None:
        """Deployment: the first reply to arrive, or the first job to time out or lose its node;
        None once the deadline (the time budget) has passed."""
        while True:
            self.pull()
            if self.deadline is not None and time.monotonic() >= self.deadline:
                return None  # (a reply that came after it is not applied, as in simulation)
            if self.arrived:
                message_id, reply = self.arrived.popitem(last=False)
                job = self.in_flight.get(message_id)
                if job is not None:
                    self.queue.remove(job)
                    return job, reply
            self.refresh_connected()
            now = time.monotonic()
            for job in self.queue.jobs():
                if now - job.sent > self.update_timeout or self.unavailable(job):
                    self.queue.remove(job)
                    return job, None
            self.liveness.check_progress()
            time.sleep(self.poll_interval)
