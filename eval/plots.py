"""Saving matplotlib figures as PNG files, headless and atomically; the bar chart of scores with intervals."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.io import atomic_output  # noqa: E402


def save_png(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_output(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


def plot_intervals(models: dict, path: Path, title: str, ylabel: str, chance: float | None = None) -> Path:
    """Grouped bars: {model: {group: {"score", "low", "high"}}} (%) with the intervals as error
    bars and, when given, the chance line (dotted); saved to `path`."""
    return save_png(intervals_figure(models, title, ylabel, chance), path)


def intervals_figure(models: dict, title: str, ylabel: str, chance: float | None = None):
    """The figure of `plot_intervals`."""
    import numpy as np

    groups = list(next(iter(models.values())))
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) + 2), 4))
    for i, (name, per) in enumerate(models.items()):
        scores = np.array([per[g]["score"] for g in groups])
        errors = np.array([[per[g]["score"] - per[g]["low"] for g in groups],
                           [per[g]["high"] - per[g]["score"] for g in groups]])
        ax.bar(x + i * width - 0.4 + width / 2, scores, width, yerr=errors, capsize=2, label=name)
    if chance is not None:
        ax.axhline(chance, color="black", linestyle="dotted", linewidth=1)
        ylabel += f"; dotted: chance ({chance:g})"
    ax.set_xticks(x, groups, rotation=20, ha="right")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_title(title + " (bars: bootstrap 95% intervals)", fontsize=10)
    ax.legend(fontsize=8)
    return fig
