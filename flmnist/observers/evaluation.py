"""Evaluation hooks: what a strategy calls on client updates and on the global model.

A strategy takes a list of hooks; adding a hook needs no change to a strategy.
:class:`DigitEvaluation` is the per-digit hook: on the 10,000 test images it
measures loss, accuracy, per-digit accuracy, the share of predictions per digit
and per digit group, saves a confusion matrix, and prints seed-002 style lines::

    Model update node 0: Percentage numbers 0-3: 100%, 4-6: 0%, 7-9: 0%
    Federated model: Average loss: 0.1209, Accuracy: 9636/10000 (96.36%)

("Average loss" is the mean negative log-likelihood per test image.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord

from flmnist.core.checks import check_style
from flmnist.ml.training import EvalResult, device, evaluate
from flmnist.observers.base import Observer, RunContext


def group_label(group: Sequence[int]) -> str:
    g = sorted(group)
    if g == list(range(g[0], g[-1] + 1)) and len(g) > 1:
        return f"{g[0]}-{g[-1]}"
    return ",".join(map(str, g))


def seed_lines(who: str, result: EvalResult, groups: Sequence[Sequence[int]],
               style: str = "seed002") -> list[str]:
    """The seed-style lines for one evaluated model: seed 002's two (prediction shares per digit
    group, then loss and accuracy), or with ``style="seed000"`` seed 000's one line, in its
    format (whole percent): ``Test set: Average loss: 0.0421, Accuracy: 9863/10000 (99%)``."""
    if style == "seed000":
        return [(f"Test set: Average loss: {result.loss:.4f}, Accuracy: {result.correct}/{result.total} "
                 f"({100 * result.accuracy:.0f}%)")]
    shares = result.prediction_share(groups)
    pct = ", ".join(f"{group_label(g)}: {round(100 * s)}%" for g, s in zip(groups, shares))
    return [
        f"{who}: Percentage numbers {pct}",
        (f"{who}: Average loss: {result.loss:.4f}, Accuracy: {result.correct}/{result.total} "
         f"({100 * result.accuracy:.2f}%)"),
    ]


def result_metrics(result: EvalResult, groups: Sequence[Sequence[int]], prefix: str = "test") -> dict:
    """A flat dict of an evaluation: loss, accuracy, per-digit accuracy and prediction shares."""
    out = {f"{prefix}_loss": result.loss, f"{prefix}_accuracy": result.accuracy, f"{prefix}_correct": result.correct}
    for d, acc in enumerate(result.per_digit_accuracy()):
        out[f"{prefix}_acc_digit_{d}"] = acc
    total = max(result.total, 1)
    for d, n in enumerate(result.predicted_per_digit):
        out[f"{prefix}_pred_share_digit_{d}"] = float(n / total)
    for g, share in zip(groups, result.prediction_share(groups)):
        out[f"{prefix}_pred_share_{group_label(g)}"] = share
    return out


class DigitEvaluation(Observer):
    """Per-digit evaluation of the global model and of chosen client updates on the test set."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        model_fn: Callable[[], torch.nn.Module],
        num_rounds: int,
        every: int | None = 1,
        rounds: Sequence[int] = (),
        update_rounds: Sequence[int] = (),
        digit_groups: Sequence[Sequence[int]] = ((0, 1, 2, 3), (4, 5, 6), (7, 8, 9)),
        batch_size: int = 1000,
        confusion_dir: Path | None = None,
        printer: Callable[[str], None] = print,
        style: str = "seed002",
        asynchronous: bool = False,
        probes=None,
    ) -> None:
        """``probes``: the run's :class:`~flmnist.observers.probe.Probes`, handed each evaluated
        global model's predictions (so the probe need not evaluate it again)."""
        self.style = check_style(style)
        self.asynchronous = asynchronous  # update_rounds are client-update numbers, not rows
        self.images, self.labels = images, labels
        self.model = model_fn()
        self.num_rounds = num_rounds
        self.every = every
        self.rounds = set(rounds)
        self.update_rounds = set(update_rounds)
        self.groups = [list(g) for g in digit_groups]
        self.batch_size = batch_size
        self.confusion_dir = confusion_dir
        self.printer = printer
        self.device = device()
        self.probes = probes

    @classmethod
    def from_run(cls, run: RunContext, every: int | None = 1, rounds: Sequence[int] = (),
                 update_rounds: Sequence[int] = (), digit_groups=((0, 1, 2, 3), (4, 5, 6), (7, 8, 9)),
                 batch_size: int = 250, style: str = "seed002") -> DigitEvaluation:
        """Built from ``observers.digits`` (``eval.*``): an asynchronous run evaluates at every
        evaluation point of its loop (``async_loop.eval_every``)."""
        return cls(run.test_images, run.test_labels, run.model_fn, run.steps, every=1 if run.asynchronous else every,
                   rounds=list(rounds), update_rounds=list(update_rounds), digit_groups=digit_groups,
                   batch_size=batch_size, confusion_dir=run.run_dir / "confusion", printer=run.printer, style=style,
                   asynchronous=run.asynchronous, probes=run.probe)

    def skips(self, step: int) -> bool:
        return not self.is_scheduled(step)

    def is_scheduled(self, server_round: int) -> bool:
        """Global evaluation: round 0, every ``every`` rounds, the listed rounds and the last."""
        return (
            server_round in (0, self.num_rounds)
            or server_round in self.rounds
            or (self.every is not None and server_round % self.every == 0)
        )

    def stopping(self, step: int) -> None:
        self.rounds.add(step)  # a run ended early is evaluated at its last step, as at num_rounds

    def _evaluate(self, arrays: ArrayRecord, offer: bool = False) -> EvalResult:
        """``offer``: hand the predictions to the run's probes (a global model)."""
        state = arrays.to_torch_state_dict()
        self.model.load_state_dict(state)
        # (on the CPU, the same predictions as the probe's own pass: flmnist.observers.probe)
        offer = offer and self.probes is not None and self.device.type == "cpu"
        result = evaluate(self.model, self.images, self.labels, self.batch_size, self.device, keep_predictions=offer)
        if offer:
            self.probes.offer(self.images, {k: v.numpy() for k, v in state.items()}, result.predictions)
        return result

    def evaluate_updates(self, server_round, updates):
        if server_round not in self.update_rounds:
            return None
        out = {}
        for update in sorted(updates, key=lambda u: u.name):
            result = self._evaluate(update.arrays)
            # asynchronous: recorded in the row of the server update it arrived at, named by its number
            name = f"{update.name} (client update {server_round})" if self.asynchronous else update.name
            for line in seed_lines(f"Model update {name}", result, self.groups):
                self.printer(line)
            out[name] = result_metrics(result, self.groups)
        return {"update_eval": out}

    def evaluate_global(self, server_round, arrays):
        if not self.is_scheduled(server_round):
            return None
        result = self._evaluate(arrays, offer=True)
        if server_round > 0:
            for line in seed_lines("Federated model", result, self.groups, self.style):
                self.printer(line)
        if self.confusion_dir is not None:
            self.confusion_dir.mkdir(parents=True, exist_ok=True)
            np.savetxt(
                self.confusion_dir / f"round_{server_round:04d}.csv",
                result.confusion, fmt="%d", delimiter=",",
                header="rows: true digit 0-9, columns: predicted digit 0-9",
            )
        return result_metrics(result, self.groups)
