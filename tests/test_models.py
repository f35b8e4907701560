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
