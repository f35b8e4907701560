import pytest
import torch

from flmnist.core.errors import ConfigError
from flmnist.ml.models import (
    MLP,
    MODELS,
    CNNMcMahan,
    LeNet,
    LogReg,
    count_parameters,
    model_from_spec,
)


@pytest.mark.parametrize(
    "cls, expected",
    [(LeNet, 431_080), (CNNMcMahan, 1_663_370), (MLP, 199_210), (LogReg, 7_850)],
)
def test_parameter_counts_match_the_papers(cls, expected):
    assert count_parameters(cls()) == expected


@pytest.mark.parametrize("target", sorted(MODELS))
def test_every_model_maps_a_batch_to_log_probabilities(target):
    out = model_from_spec({"_target_": target})(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5)


def test_unknown_model_target_names_the_valid_ones():
    with pytest.raises(ConfigError, match="flmnist.ml.models: LeNet, CNNMcMahan"):
        model_from_spec({"_target_": "os.system"})


@pytest.mark.parametrize("cls", [LeNet, CNNMcMahan])
def test_pooling_before_the_relu_computes_the_seeds_relu_then_pool_exactly(cls):
    """The CNNs pool first (ReLU on a quarter of the elements); outputs and gradients are the
    seeds' ReLU-then-pool ones, bit for bit."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model, x, y = cls(), torch.randn(64, 1, 28, 28), torch.arange(64) % 10

    def seeds_forward(m, x):
        x = F.max_pool2d(F.relu(m.conv1(x)), 2)
        x = F.max_pool2d(F.relu(m.conv2(x)), 2)
        return F.log_softmax(m.fc2(F.relu(m.fc1(x.flatten(1)))), dim=1)

    ours = model(x)
    ours_grads = torch.autograd.grad(F.nll_loss(ours, y), list(model.parameters()))
    theirs = seeds_forward(model, x)
    their_grads = torch.autograd.grad(F.nll_loss(theirs, y), list(model.parameters()))
    assert torch.equal(ours, theirs)
    assert all(torch.equal(a, b) for a, b in zip(ours_grads, their_grads))


@pytest.mark.parametrize("spec, message", [
    ({"_target_": "flmnist.ml.models.MLP", "hidden": 200_000}, "model.hidden must be at most 10000"),  # 150 GiB
    ({"_target_": "flmnist.ml.models.LeNet", "num_classes": 5}, "model.num_classes must be 10"),  # IndexError later
    ({"_target_": "flmnist.ml.models.LeNet", "bogus": 1}, "model.bogus: LeNet takes no setting 'bogus'"),
])
def test_a_node_checks_the_model_spec_of_its_task_before_building_it(spec, message):
    """Only the class was allow-listed; its settings went to the constructor, which allocated
    before any weights arrived (a review of the node side)."""
    with pytest.raises(ConfigError, match=message):
        model_from_spec(spec)


@pytest.mark.parametrize("cls", [LeNet, CNNMcMahan])
def test_evaluation_pooling_gives_max_pool2ds_outputs_bit_for_bit(cls, mnist_root):
    """Without a gradient, on channels-last tensors, the CNNs pool with pairwise maxima: their
    log-probabilities on real test images (after 100 SGD steps) are max_pool2d's
    exactly, as are the pooled tensors themselves, channels-last in and out."""
    import torch.nn.functional as F

    from flmnist.ml.data import load_mnist
    from flmnist.ml.models import pool2
    from flmnist.ml.training import evaluate, place, train

    images, labels = load_mnist(str(mnist_root), train=False)
    model = cls()
    train(model, images[:3200], labels[:3200], batch_size=32, lr=0.05, steps=100)
    place(model, torch.device("cpu")).eval()
    x = images[3200:3700].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        c1 = model.conv1(x)
        assert c1.is_contiguous(memory_format=torch.channels_last)
        pooled = pool2(c1)
        assert torch.equal(pooled, F.max_pool2d(c1, 2))
        assert pooled.is_contiguous(memory_format=torch.channels_last)
        ours = model(x)

        def max_pool2d_forward(m, x):
            x = F.relu(F.max_pool2d(m.conv1(x), 2))
            x = F.relu(F.max_pool2d(m.conv2(x), 2))
            return F.log_softmax(m.fc2(F.relu(m.fc1(x.flatten(1)))), dim=1)

        assert torch.equal(ours, max_pool2d_forward(model, x))
    assert evaluate(model, x, labels[3200:3700], 250).accuracy > 0.5  # (a model that learnt something)
