"""Exports of a run's final model for devices without flmnist: TorchScript and ONNX.

Both take the model from ``model.pt`` in the run directory and are written atomically next
to it. Neither needs flmnist to load:

- ``model_scripted.pt``: ``torch.jit.load(path)``;
- ``model.onnx``: any ONNX runtime (TensorRT on a Jetson), input ``image`` of shape
  (batch, 1, 28, 28), normalised like flmnist's data; output ``logits`` of shape (batch, 10),
  which holds the models' log-softmax log-probabilities (their argmax is the digit).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from flmnist.core.atomic import replaced

EXAMPLE = torch.zeros(2, 1, 28, 28)
logger = logging.getLogger("flwr")  # Flower's log, where the run's other lines go (no Flower import here)


def save_state_dict(state_dict: dict, path: Path) -> None:
    """``torch.save`` to a temporary file renamed over ``path``: never a half-written model file."""
    with replaced(path) as tmp:
        torch.save(state_dict, tmp)


def export_model(model: torch.nn.Module, run_dir: Path) -> list[Path]:
    """Write the exports of ``run_dir/model.pt``; return the files written. A failed export is
    logged and skipped: the run's results are already on disk and stay valid."""
    state = Path(run_dir) / "model.pt"
    if not state.is_file():
        return []
    try:
        model.load_state_dict(torch.load(state, weights_only=True))
    except Exception as err:  # noqa: BLE001 - raised from the ServerApp's finally, it hid the run's own error
        logger.warning("Could not export %s: %s: %s", state, type(err).__name__, " ".join(str(err).split())[:300])
        return []
    model.eval()
    written = []
    for name, write in (("model_scripted.pt", to_torchscript), ("model.onnx", to_onnx)):
        path = Path(run_dir) / name
        tmp = path.with_name(path.name + ".tmp")
        try:
            write(model, tmp)
            tmp.replace(path)
            written.append(path)
        except Exception as err:  # noqa: BLE001 - an export must never lose a finished run
            tmp.unlink(missing_ok=True)
            logger.warning("Could not export %s: %s: %s", name, type(err).__name__, err)
    return written


def to_torchscript(model: torch.nn.Module, path: Path) -> None:
    """TorchScript (deprecated since PyTorch 2.10 in favour of torch.export, still what a Jetson's
    libtorch loads); its deprecation notice is not for the user of a run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(str(path))


def to_onnx(model: torch.nn.Module, path: Path) -> None:
    """ONNX with a dynamic batch size, through torch.onnx's TorchScript-based exporter.

    That exporter is deprecated since PyTorch 2.9 but present in the pinned 2.14; it takes
    about 0.1 s and needs only the ``onnx`` package. The torch.export-based default took 5.4 s
    per run here (1.6 s warm) and needs ``onnxscript`` as well. Revisit when PyTorch drops it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation notice
        torch.onnx.export(
            model, (EXAMPLE,), str(path), dynamo=False, input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )
