"""flmnist: federated MNIST on Flower, with per-digit diagnostics, from laptop simulation to Jetson fleets."""

__version__ = "0.1.0"
