"""The asynchronous server loop, on Flower's ``Grid.push_messages`` / ``pull_messages``.

Flower's ``Strategy.start`` waits for every sampled node each round; here ``concurrency`` nodes
train at once and, as soon as a reply is processed, its node gets new work carrying the newest
model and its version number. Each reply is validated like a synchronous one, then handed to an
:class:`~flmnist.strategies.asynchronous.AsyncStrategy`. Two clocks:

- simulation (a ``fleet`` is given): time is virtual. Each update's duration comes from the node's
  device profile and workload (:mod:`flmnist.engine.fleet`), and replies are processed in order of
  virtual completion, whatever order they really arrive in; the same seed gives the same metrics.
- deployment (no fleet): replies are processed in real arrival order.

In both, a message has a TTL and every update a timeout, so a node that vanishes costs one slot
for one timeout, not the run (an error reply frees it at once). Every reply takes the run's
:class:`~flmnist.engine.reply_path.ReplyPath` (the synchronous engine's screen, hooks, recording and
checkpoints). The loop ends with a clear error after ``max_consecutive_failures`` failed or rejected
updates in a row while every node in flight has failed its last update (one bad node cannot end a
run others advance), or when no server version was made for ``progress_timeout`` seconds; a node
Flower reports unavailable frees its slot at once. Its parts: :mod:`~flmnist.engine.async_transport`
(nodes, messages, waiting for replies), :mod:`~flmnist.engine.async_stats` (counters),
:mod:`~flmnist.engine.async_jobs` (jobs, the virtual queue) and, shared with the synchronous
engine, :mod:`~flmnist.engine.base` (liveness, the virtual clock, restoring).
"""

from __future__ import annotations

import time
from collections import Counter
from logging import INFO, WARNING

from flwr.app import ArrayRecord, Message
from flwr.common.logger import log

from flmnist.core.arrays import to_record, to_weights
from flmnist.core.errors import RunFailed
from flmnist.engine.async_jobs import Job, Node
from flmnist.engine.async_stats import AsyncStats, stats_lines
from flmnist.engine.async_steps import PendingStep
from flmnist.engine.async_transport import Transport, superlink_says
from flmnist.engine.base import NOT_TRAINED, STILL, UpdateLiveness, VirtualClock, restore_common
from flmnist.engine.fleet import Fleet
from flmnist.engine.privacy import AsyncPrivacy, SampleAccountant
from flmnist.engine.privacy_ledger import restore_ledger, save_ledger
from flmnist.engine.reply_path import ReplyPath
from flmnist.protocol import messages as p
from flmnist.protocol.settings import AsyncLoopSettings
from flmnist.strategies.asynchronous import AsyncStrategy


class AsyncLoop:
    """Keep ``concurrency`` nodes busy; apply each accepted update with the strategy."""

    kind = "async"
    unit = "update"

    def __init__(self, grid, strategy: AsyncStrategy, path: ReplyPath, settings: AsyncLoopSettings,
                 fleet: Fleet | None = None, poll_interval: float = 0.05,
                 privacy: AsyncPrivacy | SampleAccountant | None = None) -> None:
        self.grid, self.strategy, self.path, self.settings = grid, strategy, path, settings
        # privacy=central: clip, noise and account each server update; dpsgd: account each task sent
        self.privacy = privacy if isinstance(privacy, AsyncPrivacy) else None
        self.sample_dp = privacy if isinstance(privacy, SampleAccountant) else None
        self.accountant = privacy.accountant if self.privacy is not None else self.sample_dp
        self.fleet, self.sent = fleet, path.sent
        self.version = self.seq = self.model_bytes = self.concurrency = 0
        self.saved: int | None = None  # client updates at the last checkpoint
        self.t0 = time.perf_counter()
        self.sent_models: dict[int, dict] = {}   # version -> weights, while an update trained on it is out
        self.idle: list[Node] = []               # nodes waiting for work, first served first
        self.stats = AsyncStats()
        self.clock = VirtualClock(fleet, settings.update_timeout)
        self.liveness = UpdateLiveness(settings.max_consecutive_failures, settings.progress_timeout)
        self.pending = PendingStep(settings.max_consecutive_failures)  # folded since the strategy's last step
        self.transport = Transport(grid, path, self.liveness, settings.update_timeout, poll_interval,
                                   simulated=fleet is not None)
        self.transport.on_available = self.available
        self.prefetch = 0 if fleet is not None else settings.prefetch  # (deployment: see refill)

    # ------------------------------------------------------- read-only views
    nodes = property(lambda self: self.transport.nodes)
    away = property(lambda self: self.transport.away)
    refused = property(lambda self: self.transport.refused)  # node ids whose query reply was refused: never given work
    counts = property(lambda self: self.stats.counts)
    node_counts = property(lambda self: self.stats.node_counts)
    staleness = property(lambda self: self.stats.staleness)

    # -------------------------------------------------------------- dispatch
    def dispatch(self, node: Node, arrays: ArrayRecord, weights: dict) -> Job | None:
        self._charge(node, 1)  # DP-SGD: before it leaves (a server killed as it goes has counted it)
        config = self.sent.to_record(**{p.SERVER_ROUND: node.updates + 1, p.SERVER_VERSION: self.version})
        if (message_id := self.transport.send_train(node, arrays, config)) is None:  # not sent: not counted
            self._charge(node, -1)
            self.failure("not sent", f"Flower stored no task for node id {node.node_id}", node.node_id)
            return None
        node.updates += 1
        self.transport.partition_updates[node.partition] = node.updates
        self.sent_models.setdefault(self.version, weights)
        self.seq += 1
        timing, vdone = None, float(self.seq)
        if self.clock.simulated:
            examples = self.path.work(node.partition, node.info.train_examples)  # (not what the node claims)
            timing = self.clock.timing(node.partition, node.updates, examples, self.model_bytes)
            vdone = self.clock.completion(timing)
        job = Job(vdone, self.seq, node.node_id, message_id, self.version, time.monotonic(), self.clock.now, timing)
        self.transport.track(job)
        return job

    def _charge(self, node: Node, count: int) -> None:
        if self.sample_dp is not None:
            self.sample_dp.task(node.partition, node.info.name, count)
            save_ledger(self.path.recorder, self.sample_dp, self.sample_dp.epsilon)  # (cached by would_exceed)

    def refill(self) -> None:
        """Dispatch work to idle nodes until ``concurrency`` nodes are training; in deployment, queue up to
        ``prefetch`` more behind each one's current task (a SuperNode that finds none queued sleeps 3 s)."""
        self.idle = self.transport.present(self.idle)  # (an idle node Flower no longer lists waits away)
        while len(self.busy()) < self.concurrency and self.idle and not self.should_stop():
            if not self.budget_for(self.idle[0]):
                return
            self.dispatch(self.idle.pop(0), self.arrays, self.weights)
        if self.prefetch:
            for node_id, jobs in self.busy().items():
                node = self.transport.nodes[node_id]
                # (a node whose last update failed gets nothing queued ahead: it may be gone)
                if jobs <= self.prefetch and node_id not in self.liveness.failing and not self.should_stop() \
                        and self.budget_for(node):
                    self.dispatch(node, self.arrays, self.weights)

    def busy(self) -> dict[int, int]:
        """Jobs in flight per node id."""
        return Counter(job.node_id for job in self.transport.jobs())

    def budget_for(self, node: Node) -> bool:
        """DP-SGD: whether one more task for ``node`` stays within the budget (else the run stops)."""
        if self.sample_dp is not None and self.sample_dp.would_exceed(partitions=[node.partition]):
            self.budget_spent()
            return False
        return True

    def budget_spent(self) -> None:  # privacy.max_epsilon: the run stops after this version
        self.path.request_stop(self.version, "privacy budget", epsilon=round(self.accountant.epsilon, 6),
                               max_epsilon=self.accountant.settings.max_epsilon)

    def available(self, nodes: list[Node]) -> None:
        """Deployment: nodes that came back or joined get work."""
        self.idle.extend(nodes)
        self.refill()

    def requeue(self, job: Job, reply: Message | None) -> None:
        """Where the job's node waits for its next work (nowhere while a queued task is still its own)."""
        node = self.transport.nodes[job.node_id]
        if job.node_id in self.busy() or node in self.transport.away or node in self.idle:
            return
        if not self.clock.simulated and (superlink_says(reply) == "unavailable" or self.transport.unavailable(job)):
            self.transport.away.append(node)  # Flower says it is gone: no work until it is back
        else:
            self.idle.append(node)  # last in line: with fewer slots than nodes, every node gets its turn

    # --------------------------------------------------------------- process
    def failure(self, outcome: str, problem: str, node_id: int) -> None:
        """Count a failed, rejected or timed-out update; too many in a row end the run, unless a
        node that has not failed its last update is still training (one bad node cannot end it)."""
        self.stats.count(outcome)
        self.liveness.update_failed(node_id, problem, (j.node_id for j in self.transport.jobs()))

    def process(self, job: Job, reply: Message | None, weights: dict) -> dict | None:
        """Screen and apply one reply; return new global weights if the strategy changed them."""
        reference = self.sent_models.get(job.version, weights)
        live = {j.version for j in self.transport.jobs()} | {self.version}  # models a later reply may need
        for version in [v for v in self.sent_models if v not in live]:
            del self.sent_models[version]
        step = self.stats.processed()
        if job.timing is not None and job.timing.dropped:
            self.stats.count("dropped (device)")
            return None
        said = superlink_says(reply)  # (Flower's errors are not the node's: not screened)
        if reply is None or said is not None:
            if said == "unavailable" or (reply is None and self.transport.unavailable(job)):
                log(WARNING, "Node id %s is no longer connected; its update is lost", job.node_id)
                self.failure("unavailable", f"node id {job.node_id} became unavailable", job.node_id)
            else:
                log(WARNING, "Update from node id %s timed out after %.0f s", job.node_id,
                    self.settings.update_timeout)
                self.failure("timed out", f"node id {job.node_id} timed out", job.node_id)
            return None
        staleness = self.version - job.version
        if not self.strategy.accepts(staleness):  # dropped unread: it must not shape the screen's windows
            self.stats.count("too stale")
            return None
        updates, rejections = self.path.train_replies(step, [reply], reference, delta=self.strategy.reply_delta,
                                                      current=weights, row=self.version, sent_to={job.message_id: job.node_id})
        if rejections:
            r = rejections[0]
            self.failure("failed" if r.failed else "rejected", f"{r.name}: {r.reason}", job.node_id)
            return None
        update = updates[0]
        if update.norm < STILL:  # the model its node was sent: applied as any update, but no progress
            try:
                self.liveness.update_failed(job.node_id, f"{update.name}: {NOT_TRAINED}",
                                            (j.node_id for j in self.transport.jobs()))
            except RunFailed:  # the streak ends the run before it is applied
                self.stats.count("not applied: run failed")
                raise
        else:
            self.liveness.passed(job.node_id)
            self.liveness.ok()
            self.liveness.trained += 1
        if self.privacy is not None and not self.budget_allows(update.name):
            return None
        self.pending.fold(update, staleness, update.metrics[p.TRAIN_LOSS], reference, self.strategy.reply_delta)
        before = self.strategy.state_dict()  # references: a rejected step's lasting state is rolled back
        if self.privacy is not None:
            new = self.private_apply(update, staleness, weights, before, reference)
        else:
            new = self.strategy.apply(weights, update.weights, update.num_examples, staleness)
            new = None if new is None else self.step_checked(new, weights, before)
        if new is not None:  # applied (counted, attributed) with the step; a rejected one: step_checked
            self.pending.accepted(self.stats, self.path, self.version + 1, weights, key=("version", self.version))
        return new

    def step_checked(self, new: dict, weights: dict, before: dict) -> dict | None:
        """The server step's new global weights, or None if the aggregate is unsound (or it left the
        strategy's state non-finite): then the strategy's lasting state (FedBuff's momentum) is
        rolled back, and the updates the step folded in are dropped with it."""
        accepted = self.path.aggregate(new, weights, self.strategy.state_dict())
        if accepted is None:
            self.strategy.step_rejected(before)
            self.pending.rejected(self.stats)
        return accepted

    def budget_allows(self, name: str) -> bool:
        """``privacy.max_epsilon``: whether the release this update would complete stays within the
        budget; if not, the run stops before it (the update is not applied)."""
        dp = self.privacy
        over = (dp.buffer_full(self.strategy) and dp.would_exceed_buffer(self.strategy, name)
                if self.strategy.reply_delta else dp.accountant.would_exceed(1))
        if over:
            self.stats.count("not applied: privacy budget")  # (every update processed has an outcome)
            self.budget_spent()
        return not over

    def private_apply(self, update, staleness: int, weights: dict, before: dict, sent: dict) -> dict | None:
        """``privacy=central``: the update clipped (FedAsync: against ``sent``, its node's model, and
        noised), FedBuff's release noised at its server step, each release accounted."""
        dp = self.privacy
        prepared = dp.prepare(self.strategy, update.name, update.weights, sent)
        new = self.strategy.apply(weights, prepared, update.num_examples, staleness)
        if new is None:
            return None
        if self.strategy.reply_delta:
            new = dp.released(self.strategy, weights, new)
        dp.accountant.log_release(self.version + 1, "server update")  # released, even if then rejected
        return self.step_checked(new, weights, before)

    # ------------------------------------------------------------------ stop
    def elapsed(self) -> float:
        """Seconds of the run: virtual in simulation, real in deployment."""
        return self.clock.now if self.clock.simulated else time.perf_counter() - self.t0

    def should_stop(self) -> bool:
        s = self.settings
        return bool(
            self.path.stop_wish is not None
            or (s.max_server_updates and self.version >= s.max_server_updates)
            or (s.max_client_updates and self.stats.client_updates >= s.max_client_updates)
            or (s.time_budget and self.elapsed() >= s.time_budget)
        )

    # ---------------------------------------------------------------- record
    def record(self, arrays: ArrayRecord, weights: dict, evaluate: bool, again: bool = False, last=None) -> None:
        """The version's metrics row (``again``: the run's end evaluating a version whose row, and counters, exist)."""
        fields = {} if again else {"virtual_time": round(self.clock.now, 4) if self.clock.simulated else None,
                                   **self.stats.take_row()}
        if self.accountant is not None:
            epsilon = self.accountant.epsilon
            fields["epsilon"] = round(epsilon, 6)
            self.path.report("privacy", self.accountant.summary())
            save_ledger(self.path.recorder, self.accountant, epsilon)
        self.path.report("async", self.stats_dict())
        end = self.should_stop() if last is None else last  # the run ends here anyway: no wish stops it early
        self.path.global_model(self.version, arrays, evaluate=evaluate, last=end, **fields)
        last = self.should_stop() if last is None else last  # (the run's end: a time budget ends before it)
        if evaluate and self.version > 0 and self.path.checkpoint_due(self.version, last=last):
            self.path.save_checkpoint(self.kind, self.version, weights, self.state_dict())
            self.saved = self.stats.client_updates

    def stats_dict(self) -> dict:
        sim = self.clock.simulated
        devices = {n.info.name: self.fleet.profile(n.partition).name for n in self.transport.ordered_nodes()} if sim else None
        return self.stats.as_dict(self.version, self.clock.now if sim else None, self.clock.bookkeeping, devices,
                                  None if sim else round(self.elapsed(), 3))

    def wind_down(self, last_eval: int) -> None:
        """After the last step: the final model evaluated (and checkpointed) unless it was, and the
        loop's figures, with the tasks still unanswered and the updates still buffered."""
        if last_eval != self.version:
            self.record(self.arrays, self.weights, evaluate=True, again=True, last=True)
        elif (self.version > 0 and self.saved != self.stats.client_updates
              and self.path.checkpoint_due(self.version, last=True)):
            self.path.save_checkpoint(self.kind, self.version, self.weights, self.state_dict())
        log(INFO, "Asynchronous loop finished:")
        for line in stats_lines(self.closing_stats()):
            log(INFO, "  %s", line)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Strategy state, version and counters; not in-flight updates (resumed, nodes get fresh work)."""
        return {"strategy": self.strategy.state_dict(), "pending": self.pending.state(),
                "privacy": (self.privacy or self.sample_dp).state_dict() if self.accountant is not None else None,
                "loop": {"version": self.version, **self.stats.state(), "vnow": self.clock.now,
                         "bookkeeping": self.clock.bookkeeping, "real_s": time.perf_counter() - self.t0,
                         "node_updates": dict(self.transport.partition_updates)}}

    def restore(self, checkpoint: dict) -> None:
        """Take up the loop at the checkpoint's server version (the nodes must be discovered)."""
        loop = checkpoint["engine"]["loop"]
        self.version = loop["version"]
        self.stats.load_state(loop)
        self.clock.now, self.clock.bookkeeping = loop["vnow"], loop["bookkeeping"]
        self.t0 -= loop.get("real_s", 0.0)  # deployment: async_loop.time_budget counts the run so far
        self.strategy.load_state_dict(checkpoint["engine"]["strategy"])
        self.pending.load_state(checkpoint["engine"].get("pending"))  # FedBuff: its buffer's updates
        if self.accountant is not None:
            if not checkpoint["engine"].get("privacy"):
                raise ValueError("the checkpoint has no privacy accountant: it was written without privacy")
            (self.privacy or self.sample_dp).load_state_dict(checkpoint["engine"]["privacy"])
            restore_ledger(self.path.recorder, self.accountant)
        restore_common(self.path, checkpoint)
        self.transport.partition_updates = dict(loop["node_updates"])
        for node in self.transport.nodes.values():
            node.updates = loop["node_updates"].get(node.partition, 0)
        log(INFO, "Resumed the asynchronous loop at server update %d (%d client updates)",
            self.version, self.stats.client_updates)

    # ------------------------------------------------------------------ main
    def run(self, initial: ArrayRecord, checkpoint: dict | None = None) -> ArrayRecord:
        self.arrays, self.weights = initial, to_weights(initial)
        self.model_bytes = sum(v.nbytes for v in self.weights.values())
        self.transport.discover(self.settings.update_timeout)
        if checkpoint is not None:
            self.restore(checkpoint)
        nodes = self.transport.ordered_nodes()
        if not nodes:
            raise RunFailed("no node answered the query with a valid node-info; nothing to train on")
        self.concurrency = min(self.settings.concurrency or len(nodes), len(nodes))
        self.strategy.limit_concurrency(self.concurrency)
        stale = -(-(2 * self.concurrency - 1) // (self.strategy.aggregate_size() or 1))  # a queued task's (conf)
        if self.prefetch and (most := self.strategy.max_staleness) is not None and most < stale:
            log(INFO, "Asynchronous loop: no task queued ahead (async_loop.prefetch): it would arrive about %d "
                "versions stale, past strategy.max_staleness=%d, and be dropped", stale, most)
            self.prefetch = 0
        if self.privacy is not None:
            self.privacy.check(self.strategy)
            if self.privacy.accountant.would_exceed(self.privacy.release_size(self.strategy)):
                self.budget_spent()  # resumed at its budget (killed after it stopped there): no task is sent
        if self.sample_dp is not None:
            self.sample_dp.check_first_release()
        self.path.aggregate_size(self.strategy.aggregate_size())
        log(INFO, "Asynchronous loop: %d nodes, %d training at once, %s clock", len(nodes), self.concurrency,
            "virtual" if self.clock.simulated else "real")
        if checkpoint is None:
            self.record(self.arrays, self.weights, evaluate=True)
        self.idle = list(nodes)
        self.transport.last_discovery = time.monotonic()
        self.liveness.progressed()
        self.refill()
        last_eval = self.version
        if not self.clock.simulated and self.settings.time_budget:  # (a wait for a reply ends with it too)
            self.transport.deadline = time.monotonic() + self.settings.time_budget - self.elapsed()
        while not self.should_stop():
            if (got := self.transport.next(self.settings.time_budget)) is None:
                break  # the time budget ran out: deployment, waiting; simulation, the next update ends after it
            job, reply = got
            if self.clock.simulated:
                self.clock.advance_to(job.vdone)
            new = self.process(job, reply, self.weights)
            if new is not None:
                self.weights, self.arrays = new, to_record(new)
                self.version += 1
                self.liveness.progressed()
                evaluate = self.version % self.settings.eval_every == 0 or self.should_stop()
                self.record(self.arrays, self.weights, evaluate)
                if evaluate:
                    last_eval = self.version
            self.liveness.check_progress()
            self.requeue(job, reply)
            self.refill()
        self.wind_down(last_eval)
        self.liveness.check_some_advanced(self.version, self.stats.client_updates, resumed=checkpoint is not None)
        return self.arrays

    def closing_stats(self) -> dict:  # (async_stats.json) with the tasks unanswered, the updates buffered
        self.stats.unanswered = Counter(self.transport.nodes[job.node_id].info.name for job in self.transport.jobs())
        self.stats.buffered = Counter(self.pending.names())
        self.path.report("async", stats := self.stats_dict())
        return stats

    def finish(self) -> None:  # end of the run, whatever its outcome: the reply path's summary and hooks
        self.closing_stats()  # (as they stand: a run ended by failures made no version after them to report)
        self.path.finish()
