"""Plot of kurtosis and max |x| per layer (needs matplotlib: ``pip install softmax-n[plot]``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def plot_statistics(
    results: Mapping[str, Any],
    path: str | Path | None = None,
    stats: Sequence[str] = ("kurtosis", "max_abs"),
    title: str | None = None,
):
    """One panel per statistic, one bar per layer (in the order of ``results``); log scale for
    ``max_abs``. Saves to ``path`` if given. Returns the matplotlib figure."""
    try:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plot_statistics needs matplotlib: pip install softmax-n[plot]") from e
    rows = {
        name: value.as_dict() if hasattr(value, "as_dict") else value
        for name, value in results.items()
    }
    names = list(rows)
    fig, axes = plt.subplots(len(stats), 1, figsize=(max(6, 0.4 * len(names)), 3 * len(stats)))
    axes = [axes] if len(stats) == 1 else list(axes)
    for ax, stat in zip(axes, stats):
        ax.bar(range(len(names)), [rows[n].get(stat, float("nan")) for n in names])
        ax.set_ylabel(stat)
        if stat == "max_abs":
            ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
