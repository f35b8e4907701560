"""Local training and evaluation loops in plain PyTorch (no Flower here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flmnist.core.constants import NUM_CLASSES
from flmnist.ml.threads import on_torch_thread


def device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def place(model: nn.Module, dev: torch.device) -> nn.Module:
    """Move ``model`` to ``dev``; on the CPU its 4-D weights go channels-last.

    oneDNN's CPU convolutions are fastest on channels-last tensors: a LeNet training step of
    batch 32 took 4.5 ms instead of 7.8 ms, and evaluating 1,000 images 30 ms instead of 120 ms
    (McMahan's CNN: 5.3 against 6.3 ms, 89 against 298 ms), ``benchmarks/layout.py``. Values and
    state-dict keys are unchanged; only strides differ, and Flower's arrays serialize them in
    C order. Models without 4-D weights (MLP, logreg) are left as they are.
    """
    fmt = torch.channels_last if dev.type == "cpu" else torch.preserve_format
    return model.to(dev, memory_format=fmt)


class CpuSGD:
    """``torch.optim.SGD(params, lr, momentum, weight_decay)`` for CPU tensors, step for step the
    same arithmetic as its single-tensor loop (the one it runs on the CPU), without what the first
    ``torch.optim`` optimizer of a process costs: its ``add_param_group`` imports ``torch._dynamo``,
    1.5 s on 2 cores in every process that trains (a ClientApp's, the simulation's, the
    plain-PyTorch reference's). ``tests/test_training.py`` compares the two tensor for tensor."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)  # momentum, per parameter

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:  # (torch.optim.SGD leaves such a parameter and its buffer alone)
                continue
            grad = p.grad
            if self.weight_decay != 0:
                grad = grad.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                if self.buffers[i] is None:
                    self.buffers[i] = grad.detach().clone()
                else:
                    self.buffers[i].mul_(self.momentum).add_(grad, alpha=1)  # (dampening 0)
                grad = self.buffers[i]
            p.add_(grad, alpha=-self.lr)


def sgd(model: nn.Module, dev: torch.device, lr: float, momentum: float, weight_decay: float):
    """The optimizer :func:`train` steps: :class:`CpuSGD` on the CPU, else ``torch.optim.SGD``
    (on a GPU it takes its multi-tensor path, whose kernels CpuSGD does not claim to match)."""
    if dev.type == "cpu":
        return CpuSGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def batches(n: int, batch_size: int, generator: torch.Generator, epochs: int | None, steps: int | None):
    """Index batches: ``epochs`` shuffled passes, or exactly ``steps`` batches (reshuffling as needed).

    No data (``n == 0``) gives no batches, whatever ``steps`` says: nothing can spin without data.
    """
    if n <= 0:
        return
    if steps is not None:
        done = 0
        while done < steps:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                if done == steps:
                    return
                yield order[start : start + batch_size]
                done += 1
        return
    for _ in range(epochs or 1):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    epochs: int | None = 1,
    steps: int | None = None,
    proximal_mu: float = 0.0,
    generator: torch.Generator | None = None,
    dev: torch.device | None = None,
    dp_noise_multiplier: float = 0.0,
    dp_clipping_norm: float = 0.0,
) -> tuple[float, list[float]]:
    """SGD on (images, labels); returns (mean batch loss, per-batch loss trace).

    With ``proximal_mu > 0`` the FedProx term (mu/2)||w - w_start||^2 is added to each batch loss.
    With ``dp_noise_multiplier > 0``: as many DP-SGD steps on Poisson samples (:mod:`flmnist.ml.dpsgd`).
    """
    dev = dev or device()
    generator = generator or torch.Generator().manual_seed(0)
    if dp_noise_multiplier > 0:
        from flmnist.ml.dpsgd import train_dpsgd

        if proximal_mu > 0:
            raise ValueError("DP-SGD with FedProx's proximal term is not supported")
        n = len(labels)
        count = (steps if n else 0) if steps is not None else (epochs or 1) * -(-n // batch_size)
        return train_dpsgd(model, images, labels, steps=count, batch_size=batch_size, lr=lr, momentum=momentum,
                           weight_decay=weight_decay, noise_multiplier=dp_noise_multiplier,
                           clipping_norm=dp_clipping_norm, dev=dev)
    place(model, dev).train()
    opt = sgd(model, dev, lr, momentum, weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    pin = dev.type == "cuda"
    trace: list[float] = []
    for idx in batches(len(labels), batch_size, generator, epochs, steps):
        x, y = images[idx], labels[idx]
        if pin:
            x, y = x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = F.nll_loss(model(x), y)
        objective = loss
        if anchor is not None:  # FedProx: trained with the proximal term, reported without it, so
            prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))  # losses compare
            objective = loss + 0.5 * proximal_mu * prox
        objective.backward()
        opt.step()
        trace.append(loss.item())
    return (float(np.mean(trace)) if trace else float("nan")), trace


@dataclass
class EvalResult:
    """Counts from evaluating a model on labelled images; counts add up across nodes."""

    loss_sum: float = 0.0
    confusion: np.ndarray = field(default_factory=lambda: np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64))
    predictions: np.ndarray | None = None  # each image's predicted digit, when asked for (``keep_predictions``)

    @property
    def total(self) -> int:
        return int(self.confusion.sum())

    @property
    def correct(self) -> int:
        return int(np.trace(self.confusion))

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.total, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    @property
    def correct_per_digit(self) -> np.ndarray:
        return np.diag(self.confusion).copy()

    @property
    def total_per_digit(self) -> np.ndarray:
        return self.confusion.sum(axis=1)

    @property
    def predicted_per_digit(self) -> np.ndarray:
        return self.confusion.sum(axis=0)

    def per_digit_accuracy(self) -> list[float | None]:
        tot = self.total_per_digit
        return [float(c / t) if t else None for c, t in zip(self.correct_per_digit, tot)]

    def prediction_share(self, groups) -> list[float]:
        """Share of all predictions that fall in each digit group."""
        pred = self.predicted_per_digit
        return [float(pred[list(g)].sum() / max(self.total, 1)) for g in groups]


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1000,
    dev: torch.device | None = None,
    keep_predictions: bool = False,
    enough: Callable[[np.ndarray], bool] | None = None,
) -> EvalResult:
    """Summed loss and the confusion matrix (rows: true digit, columns: predicted), and with
    ``keep_predictions`` each image's predicted digit; on the process's PyTorch thread when
    ClientApps run in-process (see :func:`on_torch_thread`). ``enough``: asked with the confusion
    matrix so far after each batch but the last; True stops there (the result counts the images
    evaluated: ``total``)."""
    return on_torch_thread(_evaluate, model, images, labels, batch_size, dev, keep_predictions, enough)


@torch.no_grad()  # (grad mode is per thread: here, where the work is done)
def _evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
              dev: torch.device | None, keep_predictions: bool = False,
              enough: Callable[[np.ndarray], bool] | None = None) -> EvalResult:
    dev = dev or device()
    place(model, dev).eval()
    result = EvalResult()
    predictions = []
    for start in range(0, len(labels), batch_size):
        x = images[start : start + batch_size].to(dev, non_blocking=True)
        y = labels[start : start + batch_size].to(dev, non_blocking=True)
        out = model(x)
        result.loss_sum += F.nll_loss(out, y, reduction="sum").item()
        pred = out.argmax(1)
        if keep_predictions:
            predictions.append(pred.cpu())
        result.confusion += (
            torch.bincount(y * NUM_CLASSES + pred, minlength=NUM_CLASSES**2)
            .view(NUM_CLASSES, NUM_CLASSES)
            .cpu()
            .numpy()
        )
        if enough is not None and start + batch_size < len(labels) and enough(result.confusion):
            break
    if keep_predictions:
        result.predictions = torch.cat(predictions).numpy() if predictions else np.zeros(0, np.int64)
    return result


def counts(labels: np.ndarray, predictions: np.ndarray) -> EvalResult:
    """The :class:`EvalResult` counts (no loss) of ``predictions`` against ``labels``."""
    confusion = np.bincount(np.asarray(labels) * NUM_CLASSES + np.asarray(predictions),
                            minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)
    return EvalResult(confusion=confusion.astype(np.int64))
