import numpy as np
import torch
from flwr.app import ArrayRecord

from flmnist.ml.data import load_mnist
from flmnist.ml.models import LogReg
from flmnist.ml.training import EvalResult, evaluate
from flmnist.observers.evaluation import DigitEvaluation, group_label, seed_lines


class Constant(torch.nn.Module):
    """A model that always predicts one digit (for checking the counts)."""

    def __init__(self, digit):
        super().__init__()
        self.digit = digit
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.full((len(x), 10), -10.0)
        out[:, self.digit] = 0.0
        return torch.log_softmax(out, 1)


def test_per_digit_counts_add_up(mnist_root):
    x, y = load_mnist(str(mnist_root), False)
    result = evaluate(Constant(3), x, y, batch_size=999)
    assert result.total == 10_000
    assert result.total_per_digit.tolist() == np.bincount(y.numpy(), minlength=10).tolist()
    assert result.correct == result.total_per_digit[3] == 1010
    acc = result.per_digit_accuracy()
    assert acc[3] == 1.0 and acc[0] == 0.0
    assert result.prediction_share([[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]) == [1.0, 0.0, 0.0]


def test_seed_style_lines():
    r = EvalResult(loss_sum=190.0)
    r.confusion[0, 0] = 2875
    r.confusion[5, 1] = 7125
    lines = seed_lines("Model update node 0", r, [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert lines == [
        "Model update node 0: Percentage numbers 0-3: 100%, 4-6: 0%, 7-9: 0%",
        "Model update node 0: Average loss: 0.0190, Accuracy: 2875/10000 (28.75%)",
    ]
    assert group_label([2, 0, 1]) == "0-2" and group_label([1, 5]) == "1,5"


def test_digit_evaluation_schedule_and_outputs(mnist_root, tmp_path):
    x, y = load_mnist(str(mnist_root), False)
    lines = []
    hook = DigitEvaluation(x[:500], y[:500], LogReg, num_rounds=40, every=None, rounds=[1, 11],
                           update_rounds=[1], confusion_dir=tmp_path, printer=lines.append)
    assert [r for r in range(41) if hook.is_scheduled(r)] == [0, 1, 11, 40]
    arrays = ArrayRecord(LogReg().state_dict())
    assert hook.evaluate_global(5, arrays) is None
    metrics = hook.evaluate_global(11, arrays)
    assert set(metrics) >= {"test_accuracy", "test_loss", "test_acc_digit_9", "test_pred_share_0-3"}
    assert (tmp_path / "round_0011.csv").is_file()
    assert lines[0].startswith("Federated model: Percentage numbers 0-3:")
    assert lines[1].startswith("Federated model: Average loss:")
