"""A model spec (``conf/model``: ``_target_`` and its settings), checked without PyTorch: by the
command before anything runs, and by each node before it builds the model its task names (there
the spec is untrusted input: an MLP with hidden=200000 is 150 GiB, num_classes=5 an index error
in training)."""

from __future__ import annotations

from flmnist.core.checks import check_integer, check_number
from flmnist.core.errors import ConfigError

MODEL_ARGUMENTS = {"LeNet": ("num_classes",), "CNNMcMahan": ("num_classes",), "LogReg": ("num_classes",),
                   "MLP": ("hidden", "num_classes", "hidden2", "dropout")}
MAX_WIDTH = 10_000  # an MLP's hidden layers: 10,000 x 10,000 is 400 MB of weights


def check_model_spec(spec: dict) -> None:
    """A ConfigError naming the ``model.*`` setting at fault, else nothing."""
    target = str(spec.get("_target_", ""))
    name = target.rsplit(".", 1)[-1]
    if not target.startswith("flmnist.ml.models.") or name not in MODEL_ARGUMENTS:
        raise ConfigError(f"model._target_ {target!r} is not a model the nodes build (flmnist.ml.models: "
                          f"{', '.join(MODEL_ARGUMENTS)}); choose one with model=NAME")
    takes = MODEL_ARGUMENTS[name]
    for key in spec:
        if key != "_target_" and key not in takes:
            raise ConfigError(f"model.{key}: {name} takes no setting {key!r} (its settings: {', '.join(takes)})")
    for key in ("hidden", "hidden2"):
        if key in spec:
            check_integer(f"model.{key}", spec[key], 1, allow_none=key == "hidden2", high=MAX_WIDTH)
    if "dropout" in spec:
        check_number("model.dropout", spec["dropout"], 0, 1, high_open=True)
    if spec.get("num_classes", 10) != 10:
        raise ConfigError(f"model.num_classes must be 10 (MNIST's ten digits), got {spec['num_classes']!r}")
