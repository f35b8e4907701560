import pytest
import torch

from flmnist.ml.data import load_mnist
from flmnist.ml.models import LeNet, LogReg
from flmnist.ml.training import batches, evaluate, train


def test_fixed_steps_run_exactly_that_many_batches():
    g = torch.Generator().manual_seed(0)
    assert len(list(batches(100, 32, g, epochs=None, steps=10))) == 10  # wraps around the data


def test_epochs_visit_every_example_once_per_epoch():
    g = torch.Generator().manual_seed(0)
    seen = torch.cat(list(batches(70, 32, g, epochs=2, steps=None)))
    assert sorted(seen.tolist()) == sorted(list(range(70)) * 2)


def test_training_is_reproducible_and_learns(mnist_root):
    images, labels = load_mnist(str(mnist_root), True)
    x, y = images[:2000], labels[:2000]
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = LeNet()
        _, trace = train(model, x, y, batch_size=32, lr=0.05, momentum=0.9, steps=60,
                            generator=torch.Generator().manual_seed(1))
        results.append((trace, model.state_dict()))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])
    trace = results[0][0]
    assert len(trace) == 60 and sum(trace[-10:]) < sum(trace[:10])
    test_x, test_y = load_mnist(str(mnist_root), False)
    model = LeNet()
    model.load_state_dict(results[0][1])
    assert evaluate(model, test_x[:2000], test_y[:2000]).accuracy > 0.5  # chance is 0.1


def test_proximal_term_keeps_weights_closer_to_the_start(mnist_root):
    images, labels = load_mnist(str(mnist_root), True)
    distances = []
    for mu in (0.0, 5.0):
        torch.manual_seed(0)
        model = LogReg()
        start = [p.detach().clone() for p in model.parameters()]
        train(model, images[:1000], labels[:1000], batch_size=50, lr=0.1, steps=40, proximal_mu=mu,
              generator=torch.Generator().manual_seed(0))
        distances.append(sum(((p - s) ** 2).sum().item() for p, s in zip(model.parameters(), start)))
    assert distances[1] < distances[0]


def test_fedprox_reports_the_data_loss_without_its_proximal_term():
    """The same two steps with mu = 0 and mu = 1e6: the first step's loss is the same (the model
    is still the one received, the proximal term 0), and the second step's reported loss stays a
    data loss (with the term, 0.5 mu ||w - w0||^2 made it thousands), so strategies' train
    losses compare."""
    torch.manual_seed(0)
    images, labels = torch.randn(64, 1, 28, 28), torch.arange(64) % 10
    start = LeNet().state_dict()
    traces = {}
    for mu in (0.0, 1e6):
        model = LeNet()
        model.load_state_dict(start)
        _, traces[mu] = train(model, images, labels, batch_size=32, lr=0.1, steps=2, proximal_mu=mu,
                              generator=torch.Generator().manual_seed(1), dev=torch.device("cpu"))
    assert traces[0.0][0] == traces[1e6][0]
    assert traces[1e6][1] < 5.0


@pytest.mark.parametrize("n", [1, 9, 10, 31, 32, 33, 100, 320, 1000])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_the_examples_an_update_reports_are_the_examples_its_batches_hold(n, steps):
    """What a node reports (and the fleet times) is what ``batches`` feeds it: 10 steps of 32 on
    100 examples are 264 (each pass ends with a batch of 4), not 320; on 10 examples 100 (a review)."""
    from flmnist.protocol.messages import examples_per_update

    held = sum(len(b) for b in batches(n, 32, torch.Generator().manual_seed(0), None, steps))
    assert examples_per_update(n, 32, 1, steps) == held


@pytest.mark.parametrize("momentum, weight_decay, mu", [(0.0, 0.0, 0.0), (0.9, 1e-4, 0.0), (0.5, 0.0, 0.01)])
@pytest.mark.parametrize("model_cls", [LeNet, LogReg])
def test_training_on_the_cpu_steps_exactly_as_torch_optim_sgd(mnist_root, monkeypatch, model_cls, momentum,
                                                               weight_decay, mu):
    """CpuSGD (what train steps on the CPU) against torch.optim.SGD on the same real MNIST batches:
    every loss and every tensor equal, bit for bit, with momentum, weight decay and FedProx's term."""
    from flmnist.ml import training

    images, labels = load_mnist(str(mnist_root), train=True)
    images, labels = images[:640], labels[:640]
    ours, theirs = model_cls(), model_cls()
    theirs.load_state_dict(ours.state_dict())
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    kw = {"batch_size": 32, "lr": 0.05, "momentum": momentum, "weight_decay": weight_decay, "steps": 30,
          "proximal_mu": mu, "dev": torch.device("cpu")}
    loss, trace = train(ours, images, labels, generator=torch.Generator().manual_seed(3), **kw)
    monkeypatch.setattr(training, "sgd", lambda model, dev, lr, momentum, weight_decay: torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay))
    loss_ref, trace_ref = train(theirs, images, labels, generator=torch.Generator().manual_seed(3), **kw)
    assert trace == trace_ref and loss == loss_ref
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name
    assert not any(torch.equal(ours.state_dict()[k], v) for k, v in start.items())  # every tensor trained


def test_training_on_the_cpu_does_not_import_torch_dynamo(mnist_root):
    """torch.optim's first optimizer imports torch._dynamo (1.5 s on 2 cores); a process that trains
    and evaluates on the CPU with flmnist's loops never does."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from flmnist.ml.data import load_mnist\n"
            "from flmnist.ml.models import LeNet\n"
            "from flmnist.ml.training import evaluate, train\n"
            f"x, y = load_mnist({str(mnist_root)!r}, train=True)\n"
            "m = LeNet()\n"
            "cpu = torch.device('cpu')\n"
            "train(m, x[:320], y[:320], batch_size=32, lr=0.05, momentum=0.9, steps=5, dev=cpu)\n"
            "evaluate(m, x[:500], y[:500], 250, cpu)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
