"""Headless matplotlib figures saved as PNG.

Figures are built with `matplotlib.figure.Figure` directly rather than pyplot,
so they render with the Agg canvas whatever backend is configured and leave no
global pyplot state behind.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from ._output import atomic_open


def new_figure(ncols: int = 1, *, size: float = 4.0, nrows: int = 1):
    """A figure with a grid of axes; returns `(figure, axes)` (axes as a list)."""
    fig = Figure(figsize=(size * ncols, size * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    return fig, axes


def save_figure(fig: Figure, path: Path) -> Path:
    """Save `fig` as a PNG at 110 dpi (atomically) and return the path."""
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return path


def plot_loss(history: list[dict[str, float]], path: Path, label: str = "loss"):
    """Plot the logged training loss against the step, over the whole history."""
    fig, (ax,) = new_figure(size=4.0)
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.set_title("training loss")
    return save_figure(fig, path)
