"""The asynchronous server loop, on Flower's ``Grid.push_messages`` / ``pull_messages``.

Flower's ``Strategy.start`` waits for every sampled node each round; here ``concurrency``
nodes train at once and, as soon as a reply is processed, its node gets new work carrying
the newest model and its version number. Each reply is validated like a synchronous one,
then handed to an :class:`~flmnist.strategies.asynchronous.AsyncStrategy`.

Two clocks:

- simulation (a ``fleet`` is given): time is virtual. Each update's duration comes from the
  node's device profile and workload (:mod:`flmnist.engine.fleet`), and replies are processed in
  order of virtual completion, whatever order they really arrive in; the same seed gives
  the same metrics bit for bit.
- deployment (no fleet): replies are processed in real arrival order.

In both, a message has a TTL and every update a timeout, so a node that vanishes (or
replies with an error) costs one slot for one timeout, not the run. Every reply takes the
run's :class:`~flmnist.engine.reply_path.ReplyPath` (the same screen, hooks, recording and
checkpoint layout as the synchronous engine). The loop ends with a clear error after
``max_consecutive_failures`` failed or rejected updates in a row while every node in flight
has failed its last update (one bad node cannot end a run others advance), or when no server
version was made for ``progress_timeout`` seconds; a node Flower reports unavailable frees its slot at
once.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from flmnist.core.arrays import to_record, to_weights
from flmnist.core.checks import check_integer, check_number
from flmnist.core.errors import ConfigError, RunFailed
from flmnist.engine.fleet import Fleet, UpdateTiming
from flmnist.engine.node_directory import NodeDirectory
from flmnist.engine.reply_path import ReplyPath
from flmnist.observers.checkpoint import set_rng_state
from flmnist.protocol import messages as p
from flmnist.protocol.screen import NodeInfo
from flmnist.strategies.asynchronous import AsyncStrategy


@dataclass(frozen=True)
class AsyncLoopSettings:
    """``conf/config.yaml``'s ``async_loop`` section; the constructor checks every value."""

    concurrency: int | None = None          # nodes training at once (None: all)
    max_server_updates: int | None = 100    # stop after this many server versions ...
    max_client_updates: int | None = None   # ... or client updates processed ...
    time_budget: float | None = None        # ... or seconds (virtual in simulation)
    eval_every: int = 10
    update_timeout: float = 600.0
    max_consecutive_failures: int = 50      # liveness: failed or rejected updates in a row
    progress_timeout: float = 3600.0        # liveness: seconds without a new server version

    def __post_init__(self) -> None:
        for key in ("concurrency", "max_server_updates", "max_client_updates"):
            check_integer(f"async_loop.{key}", getattr(self, key), 1, allow_none=True)
        check_number("async_loop.time_budget", self.time_budget, 0.0, low_open=True, allow_none=True)
        check_integer("async_loop.eval_every", self.eval_every, 1)
        check_integer("async_loop.max_consecutive_failures", self.max_consecutive_failures, 1)
        for key in ("update_timeout", "progress_timeout"):
            check_number(f"async_loop.{key}", getattr(self, key), 0.0, low_open=True)
        if not (self.max_server_updates or self.max_client_updates or self.time_budget):
            raise ConfigError("async_loop needs a stop: set max_server_updates, max_client_updates or time_budget")


@dataclass(order=True)
class Job:
    """One dispatched client update."""

    vdone: float                      # virtual completion time (simulation), else dispatch order
    seq: int
    node_id: int = field(compare=False)
    message_id: str = field(compare=False)
    version: int = field(compare=False)
    sent: float = field(compare=False)             # real time of dispatch
    vstart: float = field(compare=False, default=0.0)
    timing: UpdateTiming | None = field(compare=False, default=None)


class VirtualQueue:
    """Jobs in flight, released in order of virtual completion time (ties: dispatch order)."""

    def __init__(self) -> None:
        self._heap: list[Job] = []

    def push(self, job: Job) -> None:
        heapq.heappush(self._heap, job)

    def pop(self) -> Job:
        return heapq.heappop(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def jobs(self) -> list[Job]:
        return list(self._heap)

    def remove(self, job: Job) -> None:
        self._heap.remove(job)
        heapq.heapify(self._heap)


@dataclass
class Node:
    info: NodeInfo
    updates: int = 0      # updates dispatched to this node so far

    @property
    def node_id(self) -> int:
        return self.info.node_id

    @property
    def partition(self) -> int:
        return self.info.partition


class AsyncLoop:
    """Keep ``concurrency`` nodes busy; apply each accepted update with the strategy."""

    kind = "async"
    unit = "update"

    def __init__(
        self,
        grid,
        strategy: AsyncStrategy,
        path: ReplyPath,
        settings: AsyncLoopSettings,
        fleet: Fleet | None = None,
        poll_interval: float = 0.05,
    ) -> None:
        self.grid, self.strategy, self.path, self.settings = grid, strategy, path, settings
        self.fleet, self.poll_interval = fleet, poll_interval
        self.sent = path.sent
        self.version = 0
        self.client_updates = 0       # replies processed (applied or not)
        self.applied = 0
        self.failures_in_row = 0
        self.last_problem = ""
        self.counts = Counter()       # outcome -> number
        self.node_counts = Counter()  # node name -> applied updates
        self.staleness: list[int] = []
        self.pending_staleness: list[int] = []
        self.pending_nodes: list[str] = []
        self.pending_loss: list[float] = []
        self.model_bytes = 0
        self.vnow = 0.0
        self.t0 = time.perf_counter()
        self.last_progress = time.monotonic()
        self.seq = 0
        self.arrived: OrderedDict[str, Message] = OrderedDict()
        self.in_flight: dict[str, Job] = {}
        self.sent_models: dict[int, dict] = {}   # version -> weights, while an update trained on it is out
        self.directory = NodeDirectory(grid, path, poll_interval)  # who each node is (query replies)
        self.nodes: dict[int, Node] = {}         # the directory's accepted nodes, with their work count
        self.failing: set[int] = set()           # node ids whose last update failed or was rejected
        self.idle: list[Node] = []               # nodes waiting for work, first served first
        self.away: list[Node] = []               # nodes Flower reported gone (deployment)
        self.connected: set[int] | None = None   # node ids Flower lists, refreshed every 5 s
        self.concurrency = 0
        self.last_discovery = time.monotonic()
        self.bookkeeping = 0.0        # real seconds spent on virtual-clock bookkeeping

    # ----------------------------------------------------------------- nodes
    @property
    def refused(self) -> set[int]:
        """Node ids whose query reply was refused: they never get work."""
        return set(self.directory.refused)

    def discover(self, timeout: float) -> list[Node]:
        """Ask every newly connected node who it is (:class:`~flmnist.engine.node_directory.NodeDirectory`:
        a malformed answer keeps the node out, a silent one is asked again after a minute)."""
        for info in (found := self.directory.discover(timeout)):
            self.nodes[info.node_id] = Node(info)
        return [self.nodes[info.node_id] for info in found]

    def ordered_nodes(self) -> list[Node]:
        """Nodes in a run-independent order (partition id), so dispatch order is reproducible."""
        return [self.nodes[info.node_id] for info in self.directory.ordered()]

    # -------------------------------------------------------------- dispatch
    def dispatch(self, node: Node, arrays: ArrayRecord, weights: dict) -> Job:
        node.updates += 1
        config = self.sent.to_record(**{p.SERVER_ROUND: node.updates, p.SERVER_VERSION: self.version})
        msg = Message(RecordDict({p.ARRAYS: arrays, p.CONFIG: config}), dst_node_id=node.node_id,
                      message_type=MessageType.TRAIN, ttl=self.settings.update_timeout)
        (message_id,) = list(self.grid.push_messages([msg]))
        self.sent_models.setdefault(self.version, weights)
        self.seq += 1
        timing, vdone = None, float(self.seq)
        if self.fleet is not None:
            t = time.perf_counter()
            timing = self.fleet.timing(node.partition, node.updates,
                                       self.sent.examples_per_update(node.info.train_examples), self.model_bytes)
            vdone = self.vnow + (self.settings.update_timeout if timing.dropped else timing.duration)
            self.bookkeeping += time.perf_counter() - t
        job = Job(vdone, self.seq, node.node_id, message_id, self.version, time.monotonic(), self.vnow, timing)
        self.in_flight[message_id] = job
        return job

    def pull(self) -> None:
        waiting = [m for m in self.in_flight if m not in self.arrived]
        if waiting:
            for reply in self.grid.pull_messages(waiting):
                self.arrived[reply.metadata.reply_to_message_id] = reply

    # --------------------------------------------------------------- process
    def failure(self, outcome: str, problem: str, node_id: int) -> None:
        """Count a failed, rejected or timed-out update; too many in a row end the run, unless a
        node that has not failed its last update is still training (one bad node cannot end it)."""
        self.counts[outcome] += 1
        self.failures_in_row += 1
        self.failing.add(node_id)
        self.last_problem = problem
        limit = self.settings.max_consecutive_failures
        if self.failures_in_row >= limit and all(j.node_id in self.failing for j in self.in_flight.values()):
            raise RunFailed(f"{self.failures_in_row} client updates in a row failed or were rejected "
                            f"(async_loop.max_consecutive_failures={limit}); last: {problem}")

    def process(self, job: Job, reply: Message | None, weights: dict) -> dict | None:
        """Screen and apply one reply; return new global weights if the strategy changed them."""
        self.in_flight.pop(job.message_id, None)
        reference = self.sent_models.get(job.version, weights)
        if not any(j.version == job.version for j in self.in_flight.values()) and job.version != self.version:
            self.sent_models.pop(job.version, None)
        self.client_updates += 1
        if job.timing is not None and job.timing.dropped:
            self.counts["dropped (device)"] += 1
            return None
        if reply is None:
            if self.connected is not None and job.node_id not in self.connected:
                log(WARNING, "Node id %s is no longer connected; its update is lost", job.node_id)
                self.failure("unavailable", f"node id {job.node_id} became unavailable", job.node_id)
            else:
                log(WARNING, "Update from node id %s timed out after %.0f s", job.node_id, self.settings.update_timeout)
                self.failure("timed out", f"node id {job.node_id} timed out", job.node_id)
            return None
        updates, rejections = self.path.train_replies(self.client_updates, [reply], reference,
                                                      delta=self.strategy.reply_delta)
        if rejections:
            r = rejections[0]
            self.failure("failed" if r.failed else "rejected", f"{r.name}: {r.reason}", job.node_id)
            return None
        update = updates[0]
        self.failing.discard(job.node_id)
        staleness = self.version - job.version
        if not self.strategy.accepts(staleness):
            self.counts["too stale"] += 1
            return None
        self.failures_in_row = 0
        self.applied += 1
        self.counts["applied"] += 1
        self.node_counts[update.name] += 1
        self.staleness.append(staleness)
        self.pending_staleness.append(staleness)
        self.pending_nodes.append(update.name)
        self.pending_loss.append(update.metrics[p.TRAIN_LOSS])
        self.path.applied(self.version + 1, weights, [update], reference, delta=self.strategy.reply_delta,
                          key=("version", self.version))
        new = self.strategy.apply(weights, update.weights, update.num_examples, staleness)
        if new is None:
            return None
        return self.path.aggregate(new, weights)

    # ------------------------------------------------------------------ stop
    def clock(self) -> float:
        return self.vnow if self.fleet is not None else time.perf_counter() - self.t0

    def should_stop(self) -> bool:
        s = self.settings
        return bool(
            self.path.stop_wish is not None
            or (s.max_server_updates and self.version >= s.max_server_updates)
            or (s.max_client_updates and self.client_updates >= s.max_client_updates)
            or (s.time_budget and self.clock() >= s.time_budget)
        )

    def check_progress(self) -> None:
        waited = time.monotonic() - self.last_progress
        if waited > self.settings.progress_timeout:
            raise RunFailed(f"no new server version for {waited:.0f} s (async_loop.progress_timeout="
                            f"{self.settings.progress_timeout:g}); last problem: {self.last_problem or 'none'}")

    # ------------------------------------------------------------------ main
    def record(self, arrays: ArrayRecord, weights: dict, evaluate: bool) -> None:
        fields = {
            "virtual_time": round(self.vnow, 4) if self.fleet is not None else None,
            "client_updates": self.client_updates,
            "applied_updates": self.applied,
            "staleness": self.pending_staleness,
            "nodes": self.pending_nodes,
            "train_loss": float(np.mean(self.pending_loss)) if self.pending_loss else None,
            "mean_staleness": float(np.mean(self.pending_staleness)) if self.pending_staleness else None,
        }
        self.pending_staleness, self.pending_nodes, self.pending_loss = [], [], []
        if self.path.recorder is not None:
            self.path.recorder.async_stats = self.stats_dict()
        self.path.global_model(self.version, arrays, evaluate=evaluate, **fields)
        if evaluate and self.version > 0 and self.path.checkpoint_due(self.version):
            self.path.save_checkpoint(self.kind, self.version, weights, self.state_dict())

    def state_dict(self) -> dict:
        """Strategy state (buffer, momentum), version and counters; in-flight updates are not
        kept: after a resume every node gets fresh work on the checkpointed model."""
        return {"strategy": self.strategy.state_dict(),
                "loop": {"version": self.version, "client_updates": self.client_updates, "applied": self.applied,
                         "counts": dict(self.counts), "node_counts": dict(self.node_counts),
                         "staleness": self.staleness, "vnow": self.vnow, "bookkeeping": self.bookkeeping,
                         "node_updates": {n.partition: n.updates for n in self.nodes.values()}}}

    def restore(self, checkpoint: dict) -> None:
        loop = checkpoint["engine"]["loop"]
        self.version, self.client_updates, self.applied = loop["version"], loop["client_updates"], loop["applied"]
        self.counts, self.node_counts = Counter(loop["counts"]), Counter(loop["node_counts"])
        self.staleness, self.vnow, self.bookkeeping = list(loop["staleness"]), loop["vnow"], loop["bookkeeping"]
        self.strategy.load_state_dict(checkpoint["engine"]["strategy"])
        self.path.load_state(checkpoint.get("screen", {}))
        set_rng_state(checkpoint["rng"])
        for node in self.nodes.values():
            node.updates = loop["node_updates"].get(node.partition, 0)
        log(INFO, "Resumed the asynchronous loop at server update %d (%d client updates)",
            self.version, self.client_updates)

    def run(self, initial: ArrayRecord, checkpoint: dict | None = None) -> ArrayRecord:
        self.arrays, self.weights = initial, to_weights(initial)
        self.model_bytes = sum(v.nbytes for v in self.weights.values())
        self.discover(self.settings.update_timeout)
        if checkpoint is not None:
            self.restore(checkpoint)
        nodes = self.ordered_nodes()
        if not nodes:
            raise RunFailed("no node answered the query with a valid node-info; nothing to train on")
        self.concurrency = min(self.settings.concurrency or len(nodes), len(nodes))
        self.strategy.limit_concurrency(self.concurrency)
        log(INFO, "Asynchronous loop: %d nodes, %d training at once, %s clock", len(nodes), self.concurrency,
            "virtual" if self.fleet is not None else "real")
        if checkpoint is None:
            self.record(self.arrays, self.weights, evaluate=True)
        queue = VirtualQueue()
        self.idle = list(nodes)
        self.last_discovery = self.last_progress = time.monotonic()
        self.refill(queue)
        last_eval = self.version
        while not self.should_stop():
            if self.fleet is not None:
                job = queue.pop()
                reply = self.await_reply(job)
                t = time.perf_counter()
                self.vnow = job.vdone
                self.bookkeeping += time.perf_counter() - t
            else:
                job, reply = self.next_real(queue)
            new = self.process(job, reply, self.weights)
            if new is not None:
                self.weights, self.arrays = new, to_record(new)
                self.version += 1
                self.last_progress = time.monotonic()
                evaluate = self.version % self.settings.eval_every == 0 or self.should_stop()
                self.record(self.arrays, self.weights, evaluate)
                if evaluate:
                    last_eval = self.version
            self.check_progress()
            node = self.nodes[job.node_id]
            if self.fleet is None and self.connected is not None and job.node_id not in self.connected:
                self.away.append(node)  # Flower says it is gone: no work until it is back
            elif self.fleet is None and (reply is None or reply.has_error()):
                self.idle.append(node)  # timed out or failed: give its slot to another node first
            else:
                self.idle.insert(0, node)  # the same node trains again (reproducible in simulation)
            self.refill(queue)
        if last_eval != self.version:
            self.record(self.arrays, self.weights, evaluate=True)
        self.finish_stats()
        return self.arrays

    def refill(self, queue: VirtualQueue) -> None:
        """Dispatch work to idle nodes until ``concurrency`` updates are in flight."""
        while len(queue) < self.concurrency and self.idle and not self.should_stop():
            queue.push(self.dispatch(self.idle.pop(0), self.arrays, self.weights))

    def unavailable(self, job: Job) -> bool:
        """Whether Flower no longer lists the job's node as connected (checked every 5 s)."""
        return self.connected is not None and job.node_id not in self.connected

    def refresh_connected(self, queue: VirtualQueue) -> None:
        """Every 5 s: which nodes Flower lists; in deployment, returning and new nodes get work."""
        now = time.monotonic()
        if self.connected is not None and now - self.last_discovery <= 5.0:
            return
        self.last_discovery = now
        self.connected = set(self.grid.get_node_ids())
        if self.fleet is None:
            back = [n for n in self.away if n.node_id in self.connected]
            self.away = [n for n in self.away if n.node_id not in self.connected]
            self.idle.extend(back + self.discover(timeout=2.0))
            self.refill(queue)

    def await_reply(self, job: Job) -> Message | None:
        """Simulation: wait (really) for the reply of the job that completes first virtually."""
        while job.message_id not in self.arrived:
            if job.timing is not None and job.timing.dropped:
                return None  # this update never arrives; its real reply is ignored
            self.pull()
            if job.message_id in self.arrived:
                break
            self.refresh_connected(queue=None)
            if time.monotonic() - job.sent > self.settings.update_timeout or self.unavailable(job):
                return None
            self.check_progress()
            time.sleep(self.poll_interval)
        return self.arrived.pop(job.message_id, None)

    def next_real(self, queue: VirtualQueue) -> tuple[Job, Message | None]:
        """Deployment: the first reply to arrive, or the first job to time out or lose its node."""
        while True:
            self.pull()
            if self.arrived:
                message_id, reply = self.arrived.popitem(last=False)
                job = self.in_flight.get(message_id)
                if job is not None:
                    queue.remove(job)
                    return job, reply
            self.refresh_connected(queue)
            now = time.monotonic()
            for job in queue.jobs():
                if now - job.sent > self.settings.update_timeout or self.unavailable(job):
                    queue.remove(job)
                    return job, None
            self.check_progress()
            time.sleep(self.poll_interval)

    def finish_stats(self) -> None:
        self.stats = self.stats_dict()
        if self.path.recorder is not None:
            self.path.recorder.async_stats = self.stats
        log(INFO, "Asynchronous loop finished:")
        for line in stats_lines(self.stats):
            log(INFO, "  %s", line)

    def stats_dict(self) -> dict:
        return {
            "server_updates": self.version,
            "client_updates": self.client_updates,
            "outcomes": dict(self.counts),
            "updates_per_node": dict(sorted(self.node_counts.items())),
            "staleness_histogram": {int(k): int(v) for k, v in sorted(Counter(self.staleness).items())},
            "mean_staleness": float(np.mean(self.staleness)) if self.staleness else None,
            "max_staleness": int(max(self.staleness)) if self.staleness else None,
            "virtual_time": self.vnow if self.fleet is not None else None,
            "bookkeeping_seconds": self.bookkeeping,
            "devices": {n.info.name: self.fleet.profile(n.partition).name for n in self.ordered_nodes()}
            if self.fleet is not None else None,
        }


def stats_lines(stats: dict) -> list[str]:
    """The loop's statistics as a few aligned lines (updates per node with their device)."""
    outcomes = ", ".join(f"{k} {v}" for k, v in stats["outcomes"].items()) or "none"
    lines = [f"{'server updates':<16}{stats['server_updates']}",
             f"{'client updates':<16}{stats['client_updates']} ({outcomes})"]
    if stats.get("mean_staleness") is not None:
        lines.append(f"{'staleness':<16}mean {stats['mean_staleness']:.2f}, max {stats['max_staleness']}")
    if stats.get("virtual_time") is not None:
        lines.append(f"{'virtual time':<16}{stats['virtual_time']:.1f} s")
    devices = stats.get("devices") or {}
    for name, n in stats["updates_per_node"].items():
        lines.append(f"{name:<16}{n} applied updates" + (f" ({devices[name]})" if name in devices else ""))
    return lines
