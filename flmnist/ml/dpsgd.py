"""Sample-level DP-SGD on a node (``privacy=dpsgd``), with Opacus's per-sample gradients.

Each step draws a Poisson sample of the node's training images (each image independently with
probability ``q = batch_size / n``, as the accountant's subsampling analysis assumes, rather than
a shuffled batch), clips every image's gradient to ``clipping_norm`` and adds Gaussian noise of
std ``noise_multiplier * clipping_norm`` to their sum (Opacus's ``GradSampleModule`` and
``DPOptimizer``). The server accounts each node's epsilon from the steps it asked for
(:mod:`flmnist.engine.privacy`): the node needs no state between rounds.

The unit is one training image: epsilon bounds what a node's updates reveal about any one of its
images, to the server as well as to anyone who sees the models. So the samples and the noise come
from generators the operating system seeds, never from the run's seed: with a seed the server
sent (or wrote in config.yaml), the server could regenerate the noise and subtract it. DP-SGD runs
therefore do not repeat bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def train_dpsgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    noise_multiplier: float,
    clipping_norm: float,
    dev: torch.device,
) -> tuple[float, list[float]]:
    """``steps`` DP-SGD steps on Poisson samples of (images, labels); (mean loss, loss trace).

    A step whose sample is empty is a step of noise alone, as the accountant counts it (the loss
    trace has no entry for it); an update none of whose samples held an image reports a mean loss
    of 0 (NaN was refused by the server's screen as a malformed reply)."""
    import warnings

    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    n = len(labels)
    q = min(1.0, batch_size / n) if n else 0.0
    model.to(dev, memory_format=torch.contiguous_format).train()
    private = GradSampleModule(model)
    sample, noise = torch.Generator(), torch.Generator(device=dev)
    sample.seed(), noise.seed()  # the operating system's entropy, not the run's seed (see above)
    opt = DPOptimizer(torch.optim.SGD(private.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay),
                      noise_multiplier=noise_multiplier, max_grad_norm=clipping_norm,
                      expected_batch_size=max(1, min(batch_size, n)), generator=noise)  # q = 1: all n
    trace: list[float] = []
    try:
        for _ in range(steps if n else 0):
            idx = (torch.rand(n, generator=sample) < q).nonzero().squeeze(1)
            opt.zero_grad(set_to_none=True)
            # an empty sample: a summed loss of nothing (zero gradients), so the step is the noise
            loss = F.nll_loss(private(images[idx].to(dev)), labels[idx].to(dev), reduction="mean" if len(idx) else "sum")
            with warnings.catch_warnings():  # Opacus's hooks on a first layer whose input needs no gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            opt.step()
            if len(idx):
                trace.append(loss.item())
    finally:
        private._close()  # the model as it was, without Opacus's hooks and per-sample gradients
    return (float(np.mean(trace)) if trace else 0.0), trace
