"""The one path every reply and every new global model takes, in the sync and the async engine.

- :meth:`ReplyPath.train_replies`: screen each train reply (:mod:`flmnist.protocol.screen`), log and count
  each rejection with its node and reason, clip long updates, record loss traces, run the update hooks.
- :meth:`ReplyPath.evaluate_replies`: screen evaluate replies and sum their counts.
- :meth:`ReplyPath.aggregate`: an aggregate becomes the global model only if it is sound.
- :meth:`ReplyPath.global_model`: hooks on the new global model, the metrics row, the progress
  line; :meth:`ReplyPath.save_checkpoint`: the one checkpoint layout.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from flmnist.core.arrays import all_finite, to_weights
from flmnist.core.run_files import CHECKPOINT_INFO, atomic_write
from flmnist.engine.effect_guard import Candidate, EffectGuard
from flmnist.engine.identity import IdentityBook
from flmnist.engine.length_bounds import LengthBounds
from flmnist.observers.base import Observer, observer_keys
from flmnist.observers.checkpoint import PAYLOAD_FORMAT, CheckpointWriter, rng_state
from flmnist.observers.recorder import RunRecorder
from flmnist.observers.stop import StopAtTarget
from flmnist.protocol import messages as p
from flmnist.protocol.aggregation import aggregate_evaluate_counts
from flmnist.protocol.reasons import count_reason, recounted
from flmnist.protocol.replies import ClientUpdate, NodeInfo, Rejection
from flmnist.protocol.screen import ReplyScreen, Weights, aggregate_problem


class ReplyPath:
    """Screen, hooks, recording and checkpoints, shared by both engines."""

    def __init__(
        self,
        screen: ReplyScreen,
        sent: p.TrainSettings,
        hooks: Sequence[Observer] = (),
        recorder: RunRecorder | None = None,
        checkpoint_every: int = 0,
        stop_at: float | None = None,
        identities: IdentityBook | None = None,
        guard: EffectGuard | None = None,
        asynchronous: bool = False,
        update_clip: float | None = None,
    ) -> None:
        self.screen, self.sent = screen, sent
        self.identities = identities or IdentityBook()
        self.guard, self.asynchronous = guard, asynchronous
        self.hooks, self.recorder = list(hooks), recorder
        self.checkpoint_every, self.checkpoints = checkpoint_every, CheckpointWriter()  # (run_setup's: background)
        if stop_at is not None:  # stop_at_target: the accuracy that ends the run
            self.hooks.append(StopAtTarget(stop_at))
        self.stopped: tuple[int, str] | None = None  # the step after which an observer asked to stop, and why
        # privacy=client: update_clip, the clip every node applied (None: none)
        self.lengths = LengthBounds(screen.settings, update_clip, asynchronous)
        self.failed: Counter = Counter()     # node name -> error replies
        self.reasons: Counter = Counter()    # reason's kind (protocol.reasons) -> count
        self.aggregates_rejected = self.screened = self.guard_rejected = 0  # counters
        self.last_aggregate_problem: str | None = None  # why the last aggregate was rejected
        self.screen_seconds = 0.0
        self.evaluations: list[RecordDict] = []  # see train_replies / received_evaluation
        self.devices: dict[str, str] = {}    # node name -> the device its replies say it trained on
        self.run_config: dict | None = None  # what makes the run what it is (checked on resume), for checkpoints

    # ------------------------------------------------------------- replies
    def work(self, partition: int, claimed: int) -> int:
        """The examples an update of ``partition`` processes, for the simulated fleet's clock: by
        the server's own partition size, never the node's claim (a node claiming none would finish
        first every time); where nodes bring their own data, the claim within the cap."""
        limits, size = self.screen.limits, int(claimed)
        if limits is not None and limits.max_examples is None and 0 <= partition < limits.num_partitions:
            size = limits.train_examples[partition]
        elif limits is not None:
            size = min(max(size, 0), limits.max_examples)
        return self.sent.examples_per_update(size)

    def _reject(self, what: str, r: Rejection) -> None:
        if r.failed:
            self.failed[r.name] += 1
            log(WARNING, "%s from %s failed: %s", what, r.name, r.reason)
        else:
            self.identities.count_rejection(r.node_id, r.name)
            count_reason(self.reasons, r.reason)
            log(WARNING, "Rejected %s from %s: %s", what.lower(), r.name if r.name.startswith("node id")
                else f"{r.name} (node id {r.node_id})", r.reason)

    @property
    def norms(self) -> deque:  # recent accepted update lengths (LengthBounds)
        return self.lengths.norms

    @property
    def rejected(self) -> Counter:  # node name -> rejected replies (IdentityBook.rejections: whose)
        return self.identities.rejections()

    def _identity(self, out, msg: Message, sent_to: dict[str, int] | None = None):
        """The reply judged by its node id's bound identity, named as bound (a rejection counts against
        it; an error reply against the node it concerns, ``sent_to``: IdentityBook.failure_of)."""
        if isinstance(out, Rejection) and out.failed:
            return self.identities.failure_of(out, msg, sent_to)
        if isinstance(out, Rejection):
            return dataclasses.replace(out, name=self.identities.name_of(out.node_id, out.name))
        reason = self.identities.judge(out.node_id, out.name, out.partition)
        return Rejection(out.node_id, self.identities.name_of(out.node_id, out.name), reason) if reason else out

    def train_replies(
        self, step: int, replies: Iterable[Message], reference: Weights, delta: bool = False,
        current: Weights | None = None, row: int | None = None, sent_to: dict[str, int] | None = None,
    ) -> tuple[list[ClientUpdate], list[Rejection]]:
        """Screen train replies against ``reference`` (the model sent), then the node ids' bound
        identities, the norm bounds and the effect guard (on ``current``, the model the updates
        will be applied to; default ``reference``); hooks see the accepted ones, their metrics go
        in the row of ``step`` (asynchronous: ``row``, the server update they arrived at)."""
        updates, rejections = [], []
        t = time.perf_counter()
        for msg in replies:
            out = self._identity(self.screen.train(msg, reference, self.sent, delta), msg, sent_to)
            self.screened += 1
            if isinstance(out, Rejection):
                rejections.append(out)
                self._reject("Update", out)
            else:
                out.metadata = msg.metadata
                updates.append(out)
        rejections += self._doubted(updates, "Update")
        if not self.asynchronous:  # a fixed order, whatever the arrival: reproducible sums (the guard's, FedAvg's)
            updates.sort(key=lambda u: (u.partition, u.name))
        # Refuse absurd lengths, judge the rest as sent (the guard), then clip what was accepted:
        # the guard must see a scaled attack at its full strength to weigh its harm.
        for r in [*self.lengths.refuse_unclipped(updates, reference, delta), *self.lengths.refuse_long(updates, reference),
                  *self._guard_effects(updates, reference, delta, current)]:
            rejections.append(r)
            self._reject("Update", r)
        self.lengths.clip_long(updates, reference, delta)
        # The received model's evaluations (evaluate-received), from the replies whose update is accepted
        # (a node whose update the guard or a length check refused does not report on the model either).
        self.evaluations = [RecordDict({p.METRICS: MetricRecord(u.evaluation)}) for u in updates if u.evaluation]
        self.devices.update((u.name, u.device) for u in updates)
        self.screen_seconds += time.perf_counter() - t
        if self.recorder is not None:
            if self.devices:  # (as it goes: the summary of a run stopped from outside has it too)
                self.recorder.set_section("node_devices", dict(sorted(self.devices.items())))
            for u in updates:
                self.recorder.add_loss_trace(u.name, u.metrics[p.LOSS_TRACE], step)
        if not delta:  # a delta is not a model to evaluate
            for hook in self.hooks:
                self.record(step if row is None else row, **(hook.evaluate_updates(step, updates) or {}))
        return updates, rejections

    def _guard_effects(self, updates: list[ClientUpdate], reference: Weights, delta: bool,
                       current: Weights | None) -> list[Rejection]:
        """The effect guard (:mod:`flmnist.engine.effect_guard`): rejects the updates that make the
        aggregate worse on the probe set; removes them from ``updates``."""
        if self.guard is None or not updates:
            return []
        sync = not (delta or self.asynchronous)  # (FedAvg's aggregate of the models: what the guard judges)
        candidates = [Candidate(u, u.name, u.weights if delta else {k: u.weights[k] - reference[k] for k in reference},
                                float(u.num_examples), u.weights if sync else None,
                                u.aggregation_metrics if sync else None)
                      for u in updates]
        refused = []
        for c, reason in self.guard.judge(current if current is not None else reference, candidates,
                                          self.asynchronous, self.lengths.others(updates)):
            updates.remove(c.key)
            self.guard_rejected += 1
            refused.append(Rejection(c.key.node_id, c.name, reason))
        return refused

    def aggregate_size(self, size: int | None) -> None:
        """Asynchronous: a server step averages ``size`` updates (None: each is applied alone); the
        guard judges each among the ``size - 1`` (at least 1) latest accepted ones: more would dilute
        an attacker's share. (FedAsync mixes an update in at alpha * s(staleness), 0.6 at most by
        default: among 10 others it weighed 1/11 in the guard's aggregate and a sign flip passed.)"""
        if self.guard is not None:
            self.guard.limit_pool(max(1, (size or 1) - 1))

    def query_reply(self, msg: Message) -> NodeInfo | Rejection:
        """A node's answer to "who are you" (asynchronous discovery), screened and judged by its identity."""
        return self._identity(self.screen.query(msg), msg)

    def received_evaluation(self) -> MetricRecord | None:
        """The summed evaluations of the model sent, from the last batch of train replies (None if none)."""
        return aggregate_evaluate_counts(self.evaluations, p.NUM_EXAMPLES) if self.evaluations else None

    def evaluate_replies(self, replies: Iterable[Message], sent_to: dict[str, int] | None = None,
                         ) -> tuple[MetricRecord | None, list[Rejection]]:
        """Screen evaluate replies; the summed counts of the accepted ones (None if none)."""
        accepted, rejections = [], []
        for msg in replies:
            out = self._identity(self.screen.evaluate(msg), msg, sent_to)
            if isinstance(out, Rejection):
                rejections.append(out)
                self._reject("Evaluation", out)
            else:
                accepted.append(out)
        rejections += self._doubted(accepted, "Evaluation")
        records = [RecordDict({p.METRICS: MetricRecord(r.metrics)}) for r in accepted]
        return (aggregate_evaluate_counts(records, p.NUM_EXAMPLES) if records else None), rejections

    def _doubted(self, accepted: list, kind: str) -> list[Rejection]:
        """Take out of ``accepted`` the replies whose node id a later reply of the batch put in doubt."""
        out = [Rejection(a.node_id, self.identities.name_of(a.node_id, a.name), self.identities.flagged[a.node_id])
               for a in accepted if not self.identities.trusted(a.node_id)]
        accepted[:] = [a for a in accepted if self.identities.trusted(a.node_id)]
        return [self._reject(kind, r) or r for r in out]

    def applied(self, step: int, before: Weights, updates: Sequence[ClientUpdate], reference: Weights,
                delta: bool, key: object = None) -> None:
        """Hooks see the updates applied to the global model ``before`` (for attribution): each
        as what its node's training changed (its model minus ``reference``, the model it was sent)."""
        if not any(type(h).updates_applied is not Observer.updates_applied for h in self.hooks):
            return
        deltas = [(u.name, u.weights if delta else {k: u.weights[k] - reference[k] for k in reference})
                  for u in updates]
        for hook in self.hooks:
            self.record(step, **(hook.updates_applied(step, before, deltas, key) or {}))

    def finish(self) -> None:
        """End of the run: the screen's figures (a run ended by failed rounds made no model after
        them, so they were last set before), the nodes' devices and what the hooks have to say."""
        if self.recorder is not None:
            self.recorder.set_section("screen", self.stats())
        if self.recorder is not None and self.guard is not None and self.guard.judged:
            self.recorder.printer(self.guard.report())
        if self.recorder is not None and self.devices:
            counts = Counter(self.devices.values())
            total = int(self.sent.num_partitions or 0)
            missing = total - len(self.devices)
            self.recorder.printer("Nodes trained on: " + ", ".join(f"{d} ({n} node{'s' * (n > 1)})"
                                                                   for d, n in counts.most_common())
                                  + (f"; {missing} of the {total} nodes had no update accepted" if missing > 0 else ""))
        for hook, key in zip(self.hooks, observer_keys(self.hooks), strict=True):
            try:
                out = hook.finish(self.recorder.elapsed() if self.recorder is not None else None)
            except Exception as err:  # noqa: BLE001 - a hook must never lose the run's results
                log(WARNING, "%s could not finish: %s: %s", type(hook).__name__, type(err).__name__, err)
                continue
            if out and self.recorder is not None:
                self.recorder.set_section(key.lower(), out)

    # ----------------------------------------------------------- aggregates
    def aggregate(self, new: Weights | ArrayRecord | None, reference: Weights, state=None) -> Weights | None:
        """The aggregate as the next global weights, or None (logged, counted) if it is unsound or left
        the strategy's ``state`` non-finite (FedAdam's second moment can overflow, its aggregate finite)."""
        problem = None  # the aggregate's first problem found
        if isinstance(new, ArrayRecord):
            try:
                new = to_weights(new)
            except Exception as err:  # noqa: BLE001
                new, problem = None, f"undecodable ({err})"
        if new is not None:
            new = {k: (np.asarray(v).astype(reference[k].dtype) if k in reference and np.asarray(v).dtype.kind == "f"
                       else v) for k, v in new.items()}
        problem = problem or aggregate_problem(new, reference) or (
            None if all_finite(state) else "the strategy's state holds non-finite values")
        self.last_aggregate_problem = problem
        if problem:
            self.aggregates_rejected += 1
            log(WARNING, "Aggregate rejected (%s); the global model stays as it was", problem)
            return None
        return new

    # ---------------------------------------------------------- global model
    def report(self, section: str, value) -> None:
        """An engine's section of ``summary.json`` (``async``: the asynchronous loop's statistics)."""
        if self.recorder is not None:
            self.recorder.set_section(section, value)

    def record(self, step: int, **fields) -> None:
        if self.recorder is not None and fields:
            self.recorder.add(step, **fields)

    def global_model(self, step: int, arrays: ArrayRecord, evaluate: bool = True, last: bool = False,
                     **fields) -> dict:
        """Hooks on the global model of ``step`` (if ``evaluate``), its metrics row and progress line
        (``last``: the run ends after it anyway, so nobody's wish stops it early)."""
        if evaluate:
            for hook in self.hooks:
                fields.update(hook.evaluate_global(step, arrays) or {})
            if not last:
                self._stop_wishes(step, fields)
        if self.recorder is not None:
            self.recorder.set_section("screen", self.stats())
            self.recorder.add(step, **fields)
            self.recorder.end_round(step, arrays.to_torch_state_dict() if evaluate else None, quiet=not evaluate)
        return fields

    def _stop_wishes(self, step: int, fields: dict) -> None:
        """Ask each observer whether the run should end after this evaluated step (not one the global
        evaluation skipped: the run would report an earlier model's accuracy as its final one); the
        first wish holds."""
        if self.stopped is not None or step == 0 or any(hook.skips(step) for hook in self.hooks):
            return
        for hook in self.hooks:
            reason = hook.stop_wish(step, fields)
            if reason:
                self.stopped = (step, reason)
                if self.recorder is not None:
                    self.recorder.set_section("stopped_early", {"reason": reason, "step": step,
                                                                "accuracy": fields.get("test_accuracy")})
                return

    def request_stop(self, step: int, reason: str, **info) -> None:
        """The engine's reason to end the run after ``step`` (the privacy budget): ``stopped_early``, first holds."""
        if self.stopped is None:
            self.stopped = (step, reason)
            log(WARNING, "Stopping after %s %d: %s (%s)", "update" if self.asynchronous else "round", step, reason,
                ", ".join(f"{k} {v}" for k, v in info.items()))
            if self.recorder is not None:
                self.recorder.set_section("stopped_early", {"reason": reason, "step": step, **info})
            for hook in self.hooks:
                hook.stopping(step)

    @property
    def stop_wish(self) -> str | None:
        """Why the run should end after this step (an observer asked), or None: both engines stop on it."""
        return None if self.stopped is None else self.stopped[1]

    @property
    def target_reached(self) -> int | None:
        """``stop_at_target``: the step whose evaluation reached the target accuracy, or None."""
        return next((h.reached for h in self.hooks if isinstance(h, StopAtTarget)), None)

    def checkpoint_due(self, step: int, last: bool = False) -> bool:
        return bool(self.checkpoint_every) and (last or step % self.checkpoint_every == 0)

    def save_checkpoint(self, kind: str, step: int, weights: Weights, engine: dict) -> None:
        """The one checkpoint layout: model, engine state, recorder, screen counters, RNG states."""
        if self.recorder is None:
            return
        run_dir, info = self.recorder.run_dir, json.dumps({"kind": kind, "round": step})
        self.checkpoints.save(run_dir, {
            "format": PAYLOAD_FORMAT,
            "kind": kind,
            "round": step,
            "arrays": weights,
            "engine": engine,
            "screen": self.state(),
            "recorder": self.recorder.state(step),
            "rng": rng_state(),
            "config": self.run_config,
        }, then=lambda: atomic_write(run_dir / CHECKPOINT_INFO, info, durable=True))  # (after it, on its thread)

    # --------------------------------------------------------------- state
    def stats(self) -> dict:
        return {
            "replies_screened": self.screened,
            "rejected_per_node": dict(sorted(self.rejected.items())),
            "failed_per_node": dict(sorted(self.failed.items())),
            "rejection_reasons": dict(self.reasons.most_common()),
            "updates_clipped": self.lengths.clipped,
            "aggregates_rejected": self.aggregates_rejected,
            "rejected_by_guard": self.guard_rejected,
            "identities": self.identities.summary(),
            "guard": self.guard.summary() if self.guard is not None else None,
            "screen_seconds": round(self.screen_seconds, 4),
            "screen_ms_per_reply": round(1000 * self.screen_seconds / self.screened, 3) if self.screened else None,
        }

    def state(self) -> dict:
        return {"norms": [float(n) for n in self.norms], "rejected": dict(self.rejected), "failed": dict(self.failed),
                "reasons": dict(self.reasons), "clipped": self.lengths.clipped, "aggregates_rejected": self.aggregates_rejected,
                "guard_rejected": self.guard_rejected, "screened": self.screened, "screen_seconds": self.screen_seconds,
                "devices": dict(self.devices), "guard": self.guard.state() if self.guard is not None else None,
                "refused_claims": self.identities.refused_claims,
                "hooks": {key: st for h, key in zip(self.hooks, observer_keys(self.hooks), strict=True)
                          if (st := h.state()) is not None}}

    def load_state(self, state: dict) -> None:
        self.norms.extend(state.get("norms", []))  # (not the nodes' latest: a resumed run refills them)
        self.identities.named, self.failed = Counter(state.get("rejected", {})), Counter(state.get("failed", {}))
        self.identities.refused_claims = state.get("refused_claims", 0)  # (0: a checkpoint from before they were kept)
        self.reasons = recounted(state.get("reasons", {}))
        self.lengths.clipped, self.aggregates_rejected = state.get("clipped", 0), state.get("aggregates_rejected", 0)
        self.guard_rejected, self.screened = state.get("guard_rejected", 0), state.get("screened", 0)
        self.screen_seconds, self.devices = state.get("screen_seconds", 0.0), dict(state.get("devices", {}))
        if self.recorder is not None and self.devices:
            self.recorder.set_section("node_devices", dict(sorted(self.devices.items())))
        if self.guard is not None:
            self.guard.load_state(state.get("guard") or {})
        hooks = state.get("hooks", {})
        for hook, key in zip(self.hooks, observer_keys(self.hooks), strict=True):
            if key in hooks:
                hook.load_state(hooks[key])
        target = next((h for h in self.hooks if isinstance(h, StopAtTarget) and h.reached is not None), None)
        if target is not None and self.stopped is None:  # checkpointed at the stop, the summary never written
            self.stopped = (target.reached, target.reason)
            if self.recorder is not None:
                self.recorder.set_section("stopped_early", {"reason": target.reason, "step": target.reached,
                                                            "accuracy": target.accuracy})
