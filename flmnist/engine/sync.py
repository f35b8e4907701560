"""The synchronous engine: Flower's own round loop (``Strategy.start``) on a guarded strategy.

Each round the guarded strategy (:class:`~flmnist.engine.guard.Guarded`) samples nodes,
screens their replies and aggregates the accepted ones; after each round the run's
:class:`~flmnist.engine.reply_path.ReplyPath` evaluates the global model, records the round and
checkpoints. It is an :class:`~flmnist.engine.base.Engine`, like the asynchronous one.

Which nodes a round trains is the same in every run with the same seed. Flower's strategies
sample with ``random.sample(list(grid.get_node_ids()), n)``, and two things made that differ:

- the list: node ids are new every run and listed in no fixed order. Given a
  :class:`~flmnist.flower_patches.node_order.RegistrationOrderGrid` (as ``run_setup`` builds it) they are
  listed in the order the nodes registered, which in simulation is the partition order;
- the draw: ``random`` is the global generator, which Flower's own threads in the ServerApp
  process draw from at wall-clock times (the heartbeat sender every 17-23 s, object pulls for
  back-off jitter). Given a ``seed``, :class:`SeededSampling` gives the sampling a generator of
  its own while the round loop runs; its state is checkpointed with the strategy's.
"""

from __future__ import annotations

import contextlib
import logging
import random
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import strategy_utils

from flmnist.core.arrays import to_weights
from flmnist.engine.base import restore_common
from flmnist.engine.guard import Guarded
from flmnist.engine.reply_path import ReplyPath


class FlowerRoundChatter(logging.Filter):
    """While active, drops the INFO lines Flower's strategies log from their round loop: the
    start banner with its ConfigRecord dumps (local paths included), ``[ROUND k/n]`` (numbered
    from 1 again after a resume), ``configure_train``/``aggregate_train`` lines, metric record
    dumps, "Global evaluation" and the "Final results" dump. flmnist's own lines say the same
    shorter (its ``[round k/n]`` line per round, the summary table); Flower's warnings stay."""

    STRATEGY_DIR = str(Path(flwr_strategy.__file__).parent)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not record.pathname.startswith(self.STRATEGY_DIR)

    def __enter__(self):
        logging.getLogger("flwr").addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("flwr").removeFilter(self)


class SeededSampling:
    """While active, Flower's node sampling (``strategy_utils.sample_nodes``, used by every
    strategy's ``configure_train``/``configure_evaluate``) draws from ``self.rng``, not from the
    ``random`` module's global generator that other threads draw from too."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self._saved = None

    def __enter__(self):
        self._saved, strategy_utils.random = strategy_utils.random, self.rng
        return self

    def __exit__(self, *exc) -> None:
        strategy_utils.random = self._saved


class TargetReached(Exception):
    """Raised from the evaluation function to end Flower's round loop (``stop_at_target``)."""


class SyncEngine:
    """Run ``num_rounds`` rounds of a guarded Flower strategy on ``grid`` (Flower's, or a
    :class:`~flmnist.flower_patches.node_order.RegistrationOrderGrid` for a run-independent node order). With a
    ``seed`` nodes are sampled by a generator of their own (:class:`SeededSampling`), else by
    the ``random`` module's global one, as Flower does."""

    kind = "sync"
    unit = "round"

    def __init__(self, grid, strategy: Guarded, path: ReplyPath, train_config, num_rounds: int,
                 round_timeout: float = 3600.0, seed: int | None = None) -> None:
        self.grid, self.strategy, self.path = grid, strategy, path
        strategy.last_round = num_rounds  # evaluate_in_train: its evaluate exchange
        self.train_config, self.num_rounds, self.round_timeout = train_config, num_rounds, round_timeout
        self.sampling = SeededSampling(seed) if seed is not None else None
        strategy.sampling_rng = self.sampling.rng if self.sampling is not None else None
        self.arrays: ArrayRecord | None = None

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """After each round (and round 0): hooks, metrics row, checkpoint; Flower logs the headline."""
        if server_round == 0 and self.strategy.round_offset:
            return None  # resumed: the initial model was evaluated in the first run
        step = server_round + self.strategy.round_offset
        self.arrays = arrays
        fields = self.path.global_model(step, arrays, last=step == self.num_rounds)
        if self.path.stop_wish is not None and server_round > 0:  # in_train: no next round evaluates this model
            self.strategy.evaluate_stopped(server_round, arrays, self.train_config, self.grid, self.round_timeout)
        if step > 0 and self.path.checkpoint_due(step, last=step == self.num_rounds or self.path.stop_wish is not None):
            self.path.save_checkpoint(self.kind, step, to_weights(arrays), self.state_dict())
        if self.path.stop_wish is not None:
            raise TargetReached(step)  # stop_at_target: out of Flower's round loop, outputs as usual
        headline = {k: fields[k] for k in ("test_loss", "test_accuracy") if fields.get(k) is not None}
        return MetricRecord(headline) if headline else None

    def state_dict(self) -> dict:
        """The guarded strategy's state and, with a seed, the sampling generator's (as it was before
        an evaluate exchange only the run's end made: an extended run samples as a longer one)."""
        state = self.strategy.state_dict()
        if self.sampling is not None:
            state["sampling_rng"] = self.strategy.rng_before_exchange or self.sampling.rng.getstate()
        return state

    def restore(self, checkpoint: dict) -> None:
        """The guarded strategy's state, the screen's, the random generators and the rounds done."""
        self.strategy.load_state_dict(checkpoint["engine"])
        restore_common(self.path, checkpoint)
        if self.sampling is not None:  # a checkpoint from before SeededSampling: the global state
            self.sampling.rng.setstate(checkpoint["engine"].get("sampling_rng", random.getstate()))
        self.strategy.round_offset = int(checkpoint["round"])

    def run(self, initial: ArrayRecord, checkpoint: dict | None = None) -> ArrayRecord:
        done = 0
        self.arrays = initial
        if checkpoint is not None:
            self.restore(checkpoint)
            done = self.strategy.round_offset
            if done < self.num_rounds:  # (after the last round nothing is left to stop: no stopped_early)
                self.strategy.check_budget(done)
                rows = self.path.recorder.rows if self.path.recorder is not None else {}
                if self.path.stop_wish and done in rows and rows[done].get("test_accuracy") is None:
                    # stopped before its first round (its privacy ledger ran ahead of the checkpoint):
                    # the checkpoint's model is the final one, evaluated as a run's last model is
                    self.path.global_model(done, initial, last=True)
        advanced_before = done > self.strategy.failed_rounds  # a resumed run: some earlier round made a model
        if self.num_rounds > done and self.path.stop_wish is None:
            try:
                first, last = done + 1, self.num_rounds
                log(INFO, "Strategy %s, round%s %s of %d", self.strategy.name,
                    "s" * (last > first), f"{first}-{last}" if last > first else first, last)
                with FlowerRoundChatter(), self.sampling or contextlib.nullcontext():
                    self.strategy.start(
                        grid=self.grid, initial_arrays=initial, num_rounds=self.num_rounds - done,
                        timeout=self.round_timeout, train_config=self.train_config,
                        evaluate_config=self.train_config, evaluate_fn=self.evaluate,
                    )
            except TargetReached:
                pass  # Flower 1.41's loop has no early stop: the evaluation function ends it
            self.strategy.liveness.check_some_advanced(self.num_rounds - done, advanced_before)
        return self.arrays

    def finish(self) -> None:
        """End of the run, whatever its outcome: the reply path's summary and hooks."""
        self.path.finish()
