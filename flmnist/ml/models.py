"""The MNIST models flmnist trains, selected by the Hydra group ``model``.

Each constructor takes explicit parameters so ``conf/model/*.yaml`` can build it
with ``hydra.utils.instantiate``. Parameter counts are asserted in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flmnist.core.errors import ConfigError
from flmnist.core.model_spec import check_model_spec


def pool2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)``, value for value. Where no gradient is wanted and ``x`` is channels-last
    with even sides (the CNNs' evaluations on the CPU), as the larger of each window's two rows, then
    of its two columns: a max is exact, and PyTorch's CPU max_pool2d of LeNet's 20 channels-last channels took
    9.5 ms per 1,000 images against 2.9 ms here (a LeNet evaluation about 10% faster). With a gradient,
    max_pool2d: its backward sends a tie's gradient to one element, ``torch.maximum``'s splits it."""
    n, c, h, w = x.shape
    if torch.is_grad_enabled() or h % 2 or w % 2 or not x.is_contiguous(memory_format=torch.channels_last):
        return F.max_pool2d(x, 2)
    v = x.permute(0, 2, 3, 1).view(n, h // 2, 2, w // 2, 2, c)  # (the channels-last memory, as it lies)
    rows = torch.maximum(v[:, :, 0], v[:, :, 1])
    return torch.maximum(rows[:, :, :, 0], rows[:, :, :, 1]).permute(0, 3, 1, 2)


class TwoConvNet(nn.Module):
    """Two conv + pool stages, then two fully connected layers, log-softmax out: the forward
    pass both CNNs share (subclasses make ``conv1``, ``conv2``, ``fc1``, ``fc2``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # max-pool, then ReLU: the same values and gradients as ReLU then pool (both are monotone),
        # with ReLU on a quarter of the elements (LeNet on 1,000 images: 25 ms instead of 50)
        x = F.relu(pool2(self.conv1(x)))
        x = F.relu(pool2(self.conv2(x)))
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


class LeNet(TwoConvNet):
    """The seeds' CNN: conv 1->20 5x5, pool, conv 20->50 5x5, pool, fc 800->500, fc 500->10.

    431,080 parameters. Returns log-probabilities (log-softmax), as in the seeds.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, num_classes)


class CNNMcMahan(TwoConvNet):
    """McMahan et al. (2017) CNN: conv 5x5 32 "same", pool, conv 5x5 64 "same", pool, fc 512.

    1,663,370 parameters.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(7 * 7 * 64, 512)
        self.fc2 = nn.Linear(512, num_classes)


class MLP(nn.Module):
    """McMahan et al.'s 2NN: 784 -> hidden -> hidden -> 10 with ReLU. 199,210 parameters at 200.

    ``hidden2`` sets a second hidden width other than ``hidden`` and ``dropout`` a dropout
    after the second hidden layer (seed 003's 784 -> 128 -> 1280 -> 10 with dropout 0.2,
    278,410 parameters). The defaults give the 2NN above, with the same layer names.
    """

    def __init__(self, hidden: int = 200, num_classes: int = 10, hidden2: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        hidden2 = hidden if hidden2 is None else hidden2
        self.fc1 = nn.Linear(28 * 28, hidden)
        self.fc2 = nn.Linear(hidden, hidden2)
        self.dropout = nn.Dropout(dropout)
        self.fc3 = nn.Linear(hidden2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x.flatten(1)))
        x = self.dropout(F.relu(self.fc2(x)))
        return F.log_softmax(self.fc3(x), dim=1)


class LogReg(nn.Module):
    """Multinomial logistic regression 784 -> 10 (seed 001). 7,850 parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc(x.flatten(1)), dim=1)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


MODELS = {
    "flmnist.ml.models.LeNet": LeNet,
    "flmnist.ml.models.CNNMcMahan": CNNMcMahan,
    "flmnist.ml.models.MLP": MLP,
    "flmnist.ml.models.LogReg": LogReg,
}


def model_from_spec(spec: dict) -> nn.Module:
    """Build a model from its config dict (``_target_`` plus parameters), as clients receive it."""
    check_model_spec(spec)  # a node's task is untrusted input: widths bounded, settings known
    spec = dict(spec)
    target = spec.pop("_target_", None)
    if target not in MODELS:
        raise ConfigError(f"model._target_ {target!r} is not a known model; valid: {', '.join(MODELS)}")
    return MODELS[target](**spec)
