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
    with pytest.raises(ConfigError, match="flmnist.ml.models.LeNet"):
        model_from_spec({"_target_": "os.system"})
