"""PNG plots of a run: accuracy and loss per round, per-client training loss, per-digit heatmap."""

from __future__ import annotations

import functools
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import LogFormatterSciNotation, MaxNLocator

from flmnist.core.atomic import replaced

MAX_NAMED = 50  # nodes named under a per-node bar chart; more are told by their place
HEATMAP_ROWS = 60  # at most this many evaluated rounds in the per-digit heatmap (evenly picked, the last kept)


def _plain_text(plot):
    """Titles as plain text: a run's name may hold ``$`` (Matplotlib's maths markup raised on
    ``a$b_{$c``, and no plot was drawn, or set ``cost$5 vs $6`` in italics)."""
    @functools.wraps(plot)
    def plain(*args, **kwargs):
        with plt.rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)
    return plain


class PlainLog(LogFormatterSciNotation):
    """A log axis's tick labels as plain numbers (0.2, 1, 10): Matplotlib writes them as maths
    markup, which the plain-text titles turn off (every loss axis read ``$\\mathdefault{10^{0}}$``)."""

    def __call__(self, x, pos=None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _save(fig, path: Path, title: str) -> None:
    """Save with the title in the PNG's metadata (what a test or a file browser reads back);
    titles are wrapped to the figure's width, so none is cut off."""
    for axis in (a for ax in fig.axes for a in (ax.xaxis, ax.yaxis) if a.get_scale() == "log"):
        axis.set_major_formatter(PlainLog())
        axis.set_minor_formatter(PlainLog(labelOnlyBase=False))
    for ax in fig.axes:
        if ax.get_title():
            width = max(40, int(fig.get_figwidth() * 9))
            ax.set_title("\n".join(textwrap.fill(line, width) for line in ax.get_title().split("\n")))
    fig.tight_layout()
    try:
        with replaced(path) as tmp:  # a kill never leaves half a plot
            fig.savefig(tmp, format="png", dpi=100, metadata={"Title": title})
    finally:
        plt.close(fig)


def _integer_axis(ax, axis: str = "x") -> None:
    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


@_plain_text
def plot_run(run_dir: Path, rows: list[dict], loss_traces: dict[str, list[float]],
             async_stats: dict | None = None, loss_points: dict[str, list] | None = None,
             label: str = "", unit: str = "round") -> None:
    """Every plot of a run. ``label`` names the run (strategy, split, model) in each title;
    ``unit`` is "round" (synchronous) or "update" (asynchronous server updates)."""
    step = "round" if unit == "round" else "server update"
    evaluated = [r for r in rows if r.get("test_accuracy") is not None]
    plot_time(run_dir, evaluated, label)
    plot_epsilon(run_dir, evaluated, label)
    if async_stats:
        plot_async(run_dir, async_stats, label)
    if evaluated:
        rounds = [r["round"] for r in evaluated]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        ax1.plot(rounds, [100 * r["test_accuracy"] for r in evaluated], marker="o", label="global model, test set")
        client = [r for r in rows if r.get("client_accuracy") is not None]
        if client:
            ax1.plot([r["round"] for r in client], [100 * r["client_accuracy"] for r in client],
                     marker=".", label="clients, held-out data")
        ax1.set(xlabel=step, ylabel="accuracy (%)", title=f"Accuracy per {step}")
        ax1.legend()
        ax1.grid(alpha=0.3)
        ax2.plot(rounds, [r["test_loss"] for r in evaluated], marker="o", label="test loss")
        train = [r for r in rows if r.get("train_loss") is not None]
        if train:
            ax2.plot([r["round"] for r in train], [r["train_loss"] for r in train], marker=".", label="train loss")
        ax2.set(xlabel=step, ylabel="loss", title=f"Loss per {step}", yscale="log")
        ax2.legend()
        ax2.grid(alpha=0.3)
        for ax in (ax1, ax2):
            _integer_axis(ax)
        title = f"Accuracy and loss: {label}"
        fig.suptitle(title)
        _save(fig, run_dir / "accuracy_loss.png", title)

        shown = np.unique(np.linspace(0, len(evaluated) - 1, min(len(evaluated), HEATMAP_ROWS)).round().astype(int))
        picked = [evaluated[i] for i in shown]  # a long run: evenly picked rows, not an image metres tall
        rounds = [r["round"] for r in picked]
        digits = np.array([[r.get(f"test_acc_digit_{d}") or 0.0 for d in range(10)] for r in picked])
        fig, ax = plt.subplots(figsize=(8, max(3, 0.3 * len(rounds) + 1.8)))
        im = ax.imshow(100 * digits, aspect="auto", cmap="viridis", vmin=0, vmax=100)
        title = f"Per-digit test accuracy (%): {label}"
        of = f" ({len(picked)} of {len(evaluated)} evaluated)" if len(picked) < len(evaluated) else ""
        ax.set(xlabel="digit", ylabel=step + of, title=title)
        ax.set_xticks(range(10))
        ax.set_yticks(range(len(rounds)), [str(r) for r in rounds])
        if len(rounds) <= 30:
            for i in range(len(rounds)):
                for d in range(10):
                    v = 100 * digits[i, d]
                    ax.text(d, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 60 else "black")
        fig.colorbar(im, ax=ax)
        _save(fig, run_dir / "per_digit_accuracy.png", title)

    if loss_points:
        fig, ax = plt.subplots(figsize=(9, 4.2))
        for name, points in sorted(loss_points.items(), key=lambda kv: _node_key(kv[0])):
            x, y = zip(*points)
            ax.plot(x, y, marker=".", lw=1.2, label=name)
        xlabel = "round" if unit == "round" else "client update"
        title = f"Training loss per client (mean of each {xlabel}): {label}"
        ax.set(xlabel=xlabel, ylabel="mean training loss", title=title, yscale="log")
        _integer_axis(ax)
        if unit == "round":  # round boundaries
            ax.grid(axis="x", alpha=0.4)
        ax.grid(axis="y", alpha=0.3)
        if len(loss_points) <= 12:
            ax.legend(fontsize=8)
        _save(fig, run_dir / "client_loss.png", title)


def _node_key(name: str) -> tuple:
    tail = name.rsplit(" ", 1)[-1]
    return (0, int(tail), name) if tail.isdigit() else (1, 0, name)


def plot_time(run_dir: Path, evaluated: list[dict], label: str = "") -> None:
    """Accuracy against virtual time (only with a simulated fleet) and against client updates."""
    timed = [r for r in evaluated if r.get("virtual_time") is not None]
    counted = [r for r in evaluated if r.get("client_updates") is not None]
    if not timed and len({r["client_updates"] / r["round"] for r in counted if r.get("round")}) <= 1:
        return  # the same updates every round, no clock: it would repeat accuracy_loss.png
    panels = [p for p in (("virtual time (s)", timed, "virtual_time"), ("client updates", counted, "client_updates"))
              if p[1]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (xlabel, data, key) in zip(axes[0], panels):
        ax.plot([r[key] for r in data], [100 * r["test_accuracy"] for r in data], marker=".")
        ax.set(xlabel=xlabel, ylabel="test accuracy (%)", title=f"Accuracy against {xlabel.split(' (')[0]}")
        ax.grid(alpha=0.3)
        if key == "client_updates":
            _integer_axis(ax)
    title = f"Accuracy over time: {label}"
    fig.suptitle(title)
    _save(fig, run_dir / "accuracy_time.png", title)


def plot_epsilon(run_dir: Path, evaluated: list[dict], label: str = "") -> None:
    """Differential privacy runs: test accuracy against the epsilon spent so far."""
    spent = [r for r in evaluated if r.get("epsilon") is not None]
    if not spent:
        return
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.plot([r["epsilon"] for r in spent], [100 * r["test_accuracy"] for r in spent], marker=".")
    ax.set(xlabel="epsilon spent", ylabel="test accuracy (%)", title="Accuracy against epsilon")
    ax.grid(alpha=0.3)
    title = f"Accuracy against epsilon: {label}"
    fig.suptitle(title)
    _save(fig, run_dir / "accuracy_epsilon.png", title)


def plot_async(run_dir: Path, stats: dict, label: str = "") -> None:
    """Staleness histogram and applied updates per node (with its simulated device)."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    hist = {int(k): v for k, v in (stats.get("staleness_histogram") or {}).items()}
    ax1.bar(list(hist), list(hist.values()))
    ax1.set(xlabel="staleness (server versions)", ylabel="applied updates", title="Staleness of applied updates")
    _integer_axis(ax1)
    per_node = stats.get("updates_per_node") or {}
    devices = stats.get("devices") or {}
    names = sorted(per_node, key=_node_key)
    ax2.bar(range(len(names)), [per_node[n] for n in names])
    ticks = [f"{n} ({devices[n]})" if n in devices else n for n in names]
    if len(names) <= MAX_NAMED:
        ax2.set_xticks(range(len(names)), ticks, rotation=90 if len(names) > 6 else 0, fontsize=7)
    else:  # a thousand names are a black block: the nodes by their place, the table in async_stats.json
        ax2.set_xlabel(f"node (the {len(names)} in name order; async_stats.json names them)")
    ax2.set(ylabel="applied updates", title="Applied updates per node (device)")
    _integer_axis(ax2, "y")
    title = f"Asynchronous run: {label}"
    fig.suptitle(title)
    _save(fig, run_dir / "staleness_nodes.png", title)


@_plain_text
def plot_attribution(run_dir: Path, nodes: list[str], totals: np.ndarray, label: str = "") -> None:
    """Heatmap of the cumulative node x digit contributions (percentage points), diverging at 0:
    green cells are digits a node's updates taught the global model, red ones it broke."""
    limit = float(np.nanmax(np.abs(totals))) or 1.0
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.35 * len(nodes) + 1.5)))
    im = ax.imshow(totals, aspect="auto", cmap="RdYlGn", vmin=-limit, vmax=limit)
    ax.set_xticks(range(10))
    ax.set_yticks(range(len(nodes)), nodes, fontsize=8 if len(nodes) <= 30 else 5)
    title = f"What each node's updates did to each digit: {label}" if label else "What each node's updates did to each digit"
    ax.set(xlabel="digit", title=f"{title}\n(each update alone on the model it was applied to: its per-digit accuracy "
                                 "change in points, summed over the node's updates)")
    if len(nodes) <= 20:
        for i in range(len(nodes)):
            for d in range(10):
                ax.text(d, i, f"{totals[i, d]:+.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="percentage points")
    _save(fig, run_dir / "attribution.png", title)
