"""PNG plots of a run: accuracy and loss per round, per-client training loss, per-digit heatmap."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def plot_run(run_dir: Path, rows: list[dict], loss_traces: dict[str, list[float]],
             async_stats: dict | None = None) -> None:
    evaluated = [r for r in rows if r.get("test_accuracy") is not None]
    plot_time(run_dir, evaluated)
    if async_stats:
        plot_async(run_dir, async_stats)
    if evaluated:
        rounds = [r["round"] for r in evaluated]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.plot(rounds, [100 * r["test_accuracy"] for r in evaluated], marker="o", label="global model, test set")
        client = [r for r in rows if r.get("client_accuracy") is not None]
        if client:
            ax1.plot([r["round"] for r in client], [100 * r["client_accuracy"] for r in client],
                     marker=".", label="clients, held-out data")
        ax1.set(xlabel="round", ylabel="accuracy (%)", title="Accuracy per round")
        ax1.legend()
        ax1.grid(alpha=0.3)
        ax2.plot(rounds, [r["test_loss"] for r in evaluated], marker="o", label="test loss")
        train = [r for r in rows if r.get("train_loss") is not None]
        if train:
            ax2.plot([r["round"] for r in train], [r["train_loss"] for r in train], marker=".", label="train loss")
        ax2.set(xlabel="round", ylabel="loss", title="Loss per round", yscale="log")
        ax2.legend()
        ax2.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / "accuracy_loss.png", dpi=100)
        plt.close(fig)

        digits = np.array([[r.get(f"test_acc_digit_{d}") or 0.0 for d in range(10)] for r in evaluated])
        fig, ax = plt.subplots(figsize=(8, max(3, 0.25 * len(rounds) + 1.5)))
        im = ax.imshow(100 * digits, aspect="auto", cmap="viridis", vmin=0, vmax=100)
        ax.set(xlabel="digit", ylabel="round", title="Per-digit test accuracy (%)")
        ax.set_xticks(range(10))
        ax.set_yticks(range(len(rounds)), [str(r) for r in rounds])
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(run_dir / "per_digit_accuracy.png", dpi=100)
        plt.close(fig)

    if loss_traces:
        fig, ax = plt.subplots(figsize=(8, 4))
        for name, trace in sorted(loss_traces.items()):
            ax.plot(np.arange(1, len(trace) + 1), trace, lw=0.8, label=name)
        ax.set(xlabel="local batch (all rounds)", ylabel="training loss", title="Training loss per client",
               yscale="log")
        if len(loss_traces) <= 12:
            ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run_dir / "client_loss.png", dpi=100)
        plt.close(fig)


def plot_time(run_dir: Path, evaluated: list[dict]) -> None:
    """Accuracy against virtual time (when simulated) and against client updates."""
    timed = [r for r in evaluated if r.get("virtual_time") is not None]
    counted = [r for r in evaluated if r.get("client_updates") is not None]
    if not timed and not counted:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if timed:
        axes[0].plot([r["virtual_time"] for r in timed], [100 * r["test_accuracy"] for r in timed], marker=".")
    axes[0].set(xlabel="virtual time (s)", ylabel="test accuracy (%)", title="Accuracy against virtual time")
    if counted:
        axes[1].plot([r["client_updates"] for r in counted], [100 * r["test_accuracy"] for r in counted], marker=".")
    axes[1].set(xlabel="client updates", ylabel="test accuracy (%)", title="Accuracy against client updates")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "accuracy_time.png", dpi=100)
    plt.close(fig)


def plot_async(run_dir: Path, stats: dict) -> None:
    """Staleness histogram and applied updates per node."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    hist = {int(k): v for k, v in (stats.get("staleness_histogram") or {}).items()}
    ax1.bar(list(hist), list(hist.values()))
    ax1.set(xlabel="staleness (server versions)", ylabel="applied updates", title="Staleness")
    per_node = stats.get("updates_per_node") or {}
    ax2.bar(range(len(per_node)), list(per_node.values()))
    ax2.set_xticks(range(len(per_node)), list(per_node), rotation=90, fontsize=7)
    ax2.set(ylabel="applied updates", title="Contributions per node")
    fig.tight_layout()
    fig.savefig(run_dir / "staleness_nodes.png", dpi=100)
    plt.close(fig)


def plot_attribution(run_dir: Path, nodes: list[str], totals: np.ndarray) -> None:
    """Heatmap of the cumulative node x digit contributions (percentage points), diverging at 0:
    green cells are digits a node's updates taught the global model, red ones it broke."""
    limit = float(np.nanmax(np.abs(totals))) or 1.0
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.35 * len(nodes) + 1.5)))
    im = ax.imshow(totals, aspect="auto", cmap="RdYlGn", vmin=-limit, vmax=limit)
    ax.set_xticks(range(10))
    ax.set_yticks(range(len(nodes)), nodes, fontsize=8 if len(nodes) <= 30 else 5)
    ax.set(xlabel="digit", title="What each node's updates did to each digit\n"
           "(summed change of the global model's per-digit accuracy, pp)")
    if len(nodes) <= 20:
        for i in range(len(nodes)):
            for d in range(10):
                ax.text(d, i, f"{totals[i, d]:+.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="percentage points")
    fig.tight_layout()
    fig.savefig(run_dir / "attribution.png", dpi=100)
    plt.close(fig)
