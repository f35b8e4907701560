"""Memory layout of the CNNs on the CPU: contiguous (NCHW) against channels-last (training.place).

Times, per model, one SGD step at the presets' batch sizes and one evaluation of the 10,000 test
images at the evaluation batch sizes, both layouts, same weights and data, in one process:

    python benchmarks/layout.py [--repeat 20]

Also checks that both layouts compute the same function (outputs within 1e-4).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from flmnist.ml.models import CNNMcMahan, LeNet
from flmnist.ml.training import place


def seconds(fn, repeat: int) -> float:
    fn()  # warm-up: first-call kernel selection
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


@torch.no_grad()
def forward_all(model, images, batch_size):
    """The forward passes of training.evaluate, without its placing the model."""
    model.eval()
    for start in range(0, len(images), batch_size):
        model(images[start : start + batch_size]).argmax(1)


def step_fn(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.nll_loss(model(x), y).backward()
        opt.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    test_x, test_y = torch.randn(10_000, 1, 28, 28), torch.randint(0, 10, (10_000,))
    cpu = torch.device("cpu")
    for cls, batch in ((LeNet, 32), (LeNet, 64), (CNNMcMahan, 10)):
        x, y = test_x[:batch], test_y[:batch]
        nchw = cls()
        last = place(cls(), cpu)
        last.load_state_dict(nchw.state_dict())
        with torch.no_grad():
            diff = (nchw(test_x[:500]) - last(test_x[:500])).abs().max().item()
        nchw.train(), last.train()
        row = {"model": cls.__name__, "train_batch": batch, "max_output_diff": diff,
               "train_step_ms": {"nchw": 1e3 * seconds(step_fn(nchw, x, y), args.repeat),
                                 "channels_last": 1e3 * seconds(step_fn(last, x, y), args.repeat)}}
        for eval_batch in (1000, 250):
            row[f"eval_10k_ms_batch{eval_batch}"] = {
                name: 1e3 * seconds(lambda m=m, b=eval_batch: forward_all(m, test_x, b), 3)
                for name, m in (("nchw", nchw), ("channels_last", last))}
        print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
