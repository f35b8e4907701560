"""The asynchronous server loop, on Flower's ``Grid.push_messages`` / ``pull_messages``.

Flower's ``Strategy.start`` waits for every sampled node each round; here ``concurrency``
nodes train at once and, as soon as a reply is processed, its node gets new work carrying
the newest model and its version number. Each reply is validated like a synchronous one,
then handed to an :class:`~flmnist.strategies.asynchronous.AsyncStrategy`.

Two clocks:

- simulation (a ``fleet`` is given): time is virtual. Each update's duration comes from the
  node's device profile and workload (:mod:`flmnist.fleet`), and replies are processed in
  order of virtual completion, whatever order they really arrive in; the same seed gives
  the same metrics bit for bit.
- deployment (no fleet): replies are processed in real arrival order.

In both, a message has a TTL and every update a timeout, so a node that vanishes (or
replies with an error) costs one slot for one timeout, not the run.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log

from flmnist.checkpoint import rng_state, save_checkpoint
from flmnist.evaluation import ClientUpdate, EvaluationHook
from flmnist.fleet import Fleet, UpdateTiming
from flmnist.recorder import RunRecorder
from flmnist.strategies.asynchronous import AsyncStrategy
from flmnist.strategies.base import node_name
from flmnist.strategies.validation import reply_problem


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


def to_numpy(arrays: ArrayRecord) -> dict:
    return {k: v.numpy() for k, v in arrays.items()}


def to_record(weights: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


@dataclass
class NodeInfo:
    node_id: int
    partition: int        # partition id, or -1 for a device with its own data
    train_examples: int
    updates: int = 0      # updates dispatched to this node so far


class AsyncLoop:
    """Keep ``concurrency`` nodes busy; apply each arriving update with the strategy."""

    def __init__(
        self,
        grid,
        strategy: AsyncStrategy,
        train_config: ConfigRecord,
        recorder: RunRecorder | None = None,
        hooks: list[EvaluationHook] = (),
        fleet: Fleet | None = None,
        concurrency: int | None = None,
        max_server_updates: int | None = 100,
        max_client_updates: int | None = None,
        time_budget: float | None = None,
        eval_every: int = 10,
        update_timeout: float = 600.0,
        poll_interval: float = 0.05,
        checkpoint_every: int = 0,
    ) -> None:
        if not (max_server_updates or max_client_updates or time_budget):
            from flmnist.errors import ConfigError

            raise ConfigError("async_loop needs a stop: max_server_updates, max_client_updates or time_budget")
        self.grid, self.strategy, self.config = grid, strategy, train_config
        self.recorder, self.hooks, self.fleet = recorder, list(hooks), fleet
        self.concurrency = concurrency
        self.max_server_updates, self.max_client_updates = max_server_updates, max_client_updates
        self.time_budget, self.eval_every = time_budget, eval_every
        self.update_timeout, self.poll_interval = update_timeout, poll_interval
        self.checkpoint_every = checkpoint_every
        self.version = 0
        self.client_updates = 0       # replies processed (applied or not)
        self.applied = 0
        self.counts = Counter()       # outcome -> number
        self.node_counts = Counter()  # node name -> applied updates
        self.staleness: list[int] = []
        self.pending_staleness: list[int] = []
        self.pending_nodes: list[str] = []
        self.pending_loss: list[float] = []
        self.model_bytes = 0
        self.vnow = 0.0
        self.t0 = time.perf_counter()
        self.seq = 0
        self.arrived: OrderedDict[str, Message] = OrderedDict()
        self.in_flight: dict[str, Job] = {}
        self.nodes: dict[int, NodeInfo] = {}
        self.bookkeeping = 0.0        # real seconds spent on virtual-clock bookkeeping

    # ----------------------------------------------------------------- nodes
    def discover(self, timeout: float) -> list[NodeInfo]:
        """Ask every newly connected node who it is (partition id, training examples)."""
        new = [n for n in self.grid.get_node_ids() if n not in self.nodes]
        if not new:
            return []
        msgs = [Message(RecordDict({"config": self.config}), dst_node_id=n, message_type=MessageType.QUERY,
                        ttl=timeout) for n in new]
        ids = set(self.grid.push_messages(msgs))
        deadline = time.monotonic() + timeout
        while ids and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(ids)):
                ids.discard(reply.metadata.reply_to_message_id)
                if reply.has_error():
                    log(WARNING, "Node %s did not answer the query: %s", reply.metadata.src_node_id, reply.error.reason)
                    continue
                info = reply.content["node-info"]
                self.nodes[reply.metadata.src_node_id] = NodeInfo(
                    reply.metadata.src_node_id, int(info.get("partition-id", -1)), int(info.get("train-examples", 0)))
            time.sleep(self.poll_interval)
        return [self.nodes[n] for n in new if n in self.nodes]

    def ordered_nodes(self) -> list[NodeInfo]:
        """Nodes in a run-independent order (partition id), so dispatch order is reproducible."""
        return sorted(self.nodes.values(), key=lambda n: (n.partition, n.node_id))

    def examples_per_update(self, node: NodeInfo) -> int:
        steps = int(self.config.get("local-steps", 0))
        if steps:
            return steps * int(self.config["batch-size"])
        return int(self.config["local-epochs"]) * node.train_examples

    # -------------------------------------------------------------- dispatch
    def dispatch(self, node: NodeInfo, arrays: ArrayRecord) -> Job:
        node.updates += 1
        config = ConfigRecord(dict(self.config))
        config["server-round"] = node.updates          # seeds the node's batches for this update
        config["server-version"] = self.version
        config["reply-delta"] = self.strategy.reply_delta
        if self.strategy.proximal_mu:
            config["proximal-mu"] = self.strategy.proximal_mu
        msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=node.node_id,
                      message_type=MessageType.TRAIN, ttl=self.update_timeout)
        (message_id,) = list(self.grid.push_messages([msg]))
        self.seq += 1
        timing, vdone = None, float(self.seq)
        if self.fleet is not None:
            t = time.perf_counter()
            timing = self.fleet.timing(max(node.partition, 0), node.updates, self.examples_per_update(node),
                                       self.model_bytes)
            vdone = self.vnow + (self.update_timeout if timing.dropped else timing.duration)
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
    def process(self, job: Job, reply: Message | None, global_arrays: ArrayRecord, weights: dict) -> dict | None:
        """Validate and apply one reply; return new global weights if the strategy changed them."""
        self.in_flight.pop(job.message_id, None)
        self.client_updates += 1
        if job.timing is not None and job.timing.dropped:
            self.counts["dropped (device)"] += 1
            return None
        if reply is None:
            self.counts["timed out"] += 1
            log(WARNING, "Update from node %s timed out after %.0f s", job.node_id, self.update_timeout)
            return None
        name = node_name(reply)
        if reply.has_error():
            self.counts["failed"] += 1
            log(WARNING, "Update from %s failed: %s", name, reply.error.reason)
            return None
        problem = reply_problem(reply.content, global_arrays)  # a delta has the model's shapes too
        if problem:
            self.counts["rejected"] += 1
            log(WARNING, "Rejected update from %s (node id %s): %s", name, job.node_id, problem)
            return None
        staleness = self.version - job.version
        if not self.strategy.accepts(staleness):
            self.counts["too stale"] += 1
            return None
        metrics = next(iter(reply.content.metric_records.values()))
        update = ClientUpdate(job.node_id, name, reply.content["arrays"], metrics)
        if not self.strategy.reply_delta:  # a delta is not a model to evaluate
            for hook in self.hooks:
                out = hook.evaluate_updates(self.client_updates, [update])
                if out and self.recorder is not None:
                    self.recorder.add(self.version + 1, **out)
        if self.recorder is not None:
            self.recorder.add_loss_trace(name, list(metrics.get("loss-trace", [])))
        self.applied += 1
        self.counts["applied"] += 1
        self.node_counts[name] += 1
        self.staleness.append(staleness)
        self.pending_staleness.append(staleness)
        self.pending_nodes.append(name)
        self.pending_loss.append(float(metrics.get("train-loss", float("nan"))))
        return self.strategy.apply(weights, to_numpy(update.arrays), int(metrics["num-examples"]), staleness)

    # ------------------------------------------------------------------ stop
    def clock(self) -> float:
        return self.vnow if self.fleet is not None else time.perf_counter() - self.t0

    def should_stop(self) -> bool:
        return bool(
            (self.max_server_updates and self.version >= self.max_server_updates)
            or (self.max_client_updates and self.client_updates >= self.max_client_updates)
            or (self.time_budget and self.clock() >= self.time_budget)
        )

    # ------------------------------------------------------------------ main
    def record(self, arrays: ArrayRecord, evaluate: bool) -> None:
        fields = {
            "virtual_time": round(self.vnow, 4) if self.fleet is not None else None,
            "client_updates": self.client_updates,
            "applied_updates": self.applied,
            "staleness": self.pending_staleness,
            "nodes": self.pending_nodes,
            "train_loss": float(np.nanmean(self.pending_loss)) if self.pending_loss else None,
            "mean_staleness": float(np.mean(self.pending_staleness)) if self.pending_staleness else None,
        }
        self.pending_staleness, self.pending_nodes, self.pending_loss = [], [], []
        if evaluate:
            for hook in self.hooks:
                fields.update(hook.evaluate_global(self.version, arrays) or {})
        if self.recorder is not None:
            self.recorder.add(self.version, **fields)
            self.recorder.end_round(self.version, arrays.to_torch_state_dict() if evaluate else None, quiet=not evaluate)
            if evaluate and self.checkpoint_every and self.version % self.checkpoint_every == 0:
                self.save_checkpoint(arrays)

    def save_checkpoint(self, arrays: ArrayRecord) -> None:
        """Model, strategy state (buffer, momentum), version and counters; in-flight updates
        are not kept: after a resume every node gets fresh work on the checkpointed model."""
        self.recorder.async_stats = self.stats_dict()
        save_checkpoint(self.recorder.run_dir, {
            "kind": "async",
            "round": self.version,
            "arrays": to_numpy(arrays),
            "strategy": self.strategy.state_dict(),
            "loop": {"version": self.version, "client_updates": self.client_updates, "applied": self.applied,
                     "counts": dict(self.counts), "node_counts": dict(self.node_counts),
                     "staleness": self.staleness, "vnow": self.vnow, "bookkeeping": self.bookkeeping,
                     "node_updates": {n.partition: n.updates for n in self.nodes.values()}},
            "recorder": self.recorder.state(),
            "rng": rng_state(),
        })

    def restore(self, checkpoint: dict) -> None:
        loop = checkpoint["loop"]
        self.version, self.client_updates, self.applied = loop["version"], loop["client_updates"], loop["applied"]
        self.counts, self.node_counts = Counter(loop["counts"]), Counter(loop["node_counts"])
        self.staleness, self.vnow, self.bookkeeping = list(loop["staleness"]), loop["vnow"], loop["bookkeeping"]
        self.strategy.load_state_dict(checkpoint["strategy"])
        for node in self.nodes.values():
            node.updates = loop["node_updates"].get(node.partition, 0)
        log(INFO, "Resumed the asynchronous loop at server update %d (%d client updates)",
            self.version, self.client_updates)

    def run(self, initial: ArrayRecord, checkpoint: dict | None = None) -> ArrayRecord:
        arrays, weights = initial, to_numpy(initial)
        self.model_bytes = sum(v.nbytes for v in weights.values())
        self.discover(self.update_timeout)
        if checkpoint is not None:
            self.restore(checkpoint)
        nodes = self.ordered_nodes()
        if not nodes:
            raise RuntimeError("No node answered the query; nothing to train on")
        concurrency = min(self.concurrency or len(nodes), len(nodes))
        self.strategy.limit_concurrency(concurrency)
        log(INFO, "Asynchronous loop: %d nodes, %d training at once, %s clock", len(nodes), concurrency,
            "virtual" if self.fleet is not None else "real")
        if checkpoint is None:
            self.record(arrays, evaluate=True)
        queue = VirtualQueue()
        idle = self.idle = list(nodes[concurrency:])
        self.last_discovery = time.monotonic()
        for node in nodes[:concurrency]:
            queue.push(self.dispatch(node, arrays))
        last_eval = 0
        while not self.should_stop():
            if self.fleet is not None:
                job = queue.pop()
                reply = self.await_reply(job)
                t = time.perf_counter()
                self.vnow = job.vdone
                self.bookkeeping += time.perf_counter() - t
            else:
                job, reply = self.next_real(queue)
            new = self.process(job, reply, arrays, weights)
            if new is not None:
                weights = new
                arrays = to_record(weights)
                self.version += 1
                evaluate = self.version % self.eval_every == 0 or self.should_stop()
                self.record(arrays, evaluate)
                if evaluate:
                    last_eval = self.version
            node = self.nodes[job.node_id]
            if self.fleet is None and (reply is None or reply.has_error()):
                idle.append(node)  # timed out or failed: give its slot to another node first
                node = idle.pop(0)
            if not self.should_stop():
                queue.push(self.dispatch(node, arrays))
        if last_eval != self.version:
            self.record(arrays, evaluate=True)
        self.finish_stats()
        return arrays

    def await_reply(self, job: Job) -> Message | None:
        """Simulation: wait (really) for the reply of the job that completes first virtually."""
        while job.message_id not in self.arrived:
            if job.timing is not None and job.timing.dropped:
                return None  # this update never arrives; its real reply is ignored
            self.pull()
            if job.message_id in self.arrived:
                break
            if time.monotonic() - job.sent > self.update_timeout:
                return None
            time.sleep(self.poll_interval)
        return self.arrived.pop(job.message_id, None)

    def next_real(self, queue: VirtualQueue) -> tuple[Job, Message | None]:
        """Deployment: the first reply to arrive, or the first job to time out."""
        while True:
            self.pull()
            if self.arrived:
                message_id, reply = self.arrived.popitem(last=False)
                job = self.in_flight.get(message_id)
                if job is not None:
                    queue.remove(job)
                    return job, reply
            now = time.monotonic()
            for job in queue.jobs():
                if now - job.sent > self.update_timeout:
                    queue.remove(job)
                    return job, None
            if now - self.last_discovery > 5.0:  # a restarted or new node joins the idle pool
                self.last_discovery = now
                self.idle.extend(self.discover(timeout=2.0))
            time.sleep(self.poll_interval)

    def finish_stats(self) -> None:
        self.stats = self.stats_dict()
        if self.recorder is not None:
            self.recorder.async_stats = self.stats
        log(INFO, "Asynchronous loop finished: %s", self.stats)

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
        }
