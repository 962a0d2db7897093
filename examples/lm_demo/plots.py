"""Pictures of a run: loss curves and which experts each layer picks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


def plot_losses(history: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """Training and validation loss (nats/byte) over steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name, points in history.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=name, marker="o" if len(points) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title("byte-level LM")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# Colour scale of experts.png, fixed across layers and runs: usage relative to uniform, 0..2.
USAGE_COLOUR_RANGE = (0.0, 2.0)
_KIND_ORDER = ("feedforward", "attention V", "attention O")


@dataclass
class UsagePanel:
    """One panel of experts.png: one MoE selection of one layer."""

    row: int  # the layer (one row of panels per layer)
    column: int  # feedforward, attention V, attention O
    title: str
    relative: torch.Tensor  # [experts] share of selections / uniform share (1 = uniform use)
    dead: int  # experts never selected
    groups: int  # heads (each with its own experts) of an attention, 1 for a feedforward


def expert_usage_panels(usage: list) -> tuple[list[UsagePanel], list[str], list[str]]:
    """The data of experts.png: panels (one per MoE selection), row labels (layers) and column
    labels (selection kinds). ``usage``: ``lm_demo.metrics.LayerUsage`` items."""
    layer_of = lambda u: u.name[: -len(u.kind) - 1]  # "layer 0 attention V" -> "layer 0"
    layers = list(dict.fromkeys(layer_of(u) for u in usage))
    kinds = [k for k in _KIND_ORDER if any(u.kind == k for u in usage)]
    panels = []
    for u in usage:
        layer = layer_of(u)
        counts = u.counts.double()
        n = counts.numel()
        share = counts / counts.sum().clamp_min(1)
        times = round(u.applications)
        shared = f", shared: applied {times}x per forward" if times > 1 else ""
        per_head = f" ({u.groups} heads x {n // u.groups})" if u.groups > 1 else ""
        panels.append(
            UsagePanel(
                row=layers.index(layer),
                column=kinds.index(u.kind),
                title=f"{u.name}{shared}\n{n} experts{per_head}, top-{u.k}",
                relative=share * n,
                dead=int((counts == 0).sum()),
                groups=u.groups,
            )
        )
    return panels, layers, kinds


def plot_expert_usage(usage: list, path: Path, window: str = "") -> Path | None:
    """experts.png: for every MoE layer (feedforward, attention value and output experts), each
    expert's share of the top-k selections relative to uniform use (dashed line at 1), bars
    coloured on a fixed scale, dead experts marked. One row per layer, one column per kind.

    Args:
        usage: ``lm_demo.metrics.LayerUsage`` items (counts of one window of training steps).
        window: what the counts cover, for the title (e.g. "steps 251-300, 600k tokens").
    """
    if not usage:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels, layers, kinds = expert_usage_panels(usage)
    rows, cols = len(layers), len(kinds)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.6 * cols + 1.2, 2.3 * rows + 1.3), dpi=110, squeeze=False
    )
    cmap = plt.get_cmap("viridis")
    norm = matplotlib.colors.Normalize(*USAGE_COLOUR_RANGE)
    top = max(2.5, max(float(p.relative.max()) for p in panels) * 1.05)
    for ax in axes.flat:
        ax.set_visible(False)
    for p in panels:
        ax = axes[p.row][p.column]
        ax.set_visible(True)
        x = torch.arange(p.relative.numel()).numpy()
        ax.bar(x, p.relative.numpy(), width=0.85, color=cmap(norm(p.relative.numpy())))
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        dead = (p.relative == 0).nonzero().flatten().numpy()
        if len(dead):
            ax.plot(dead, [0.04 * top] * len(dead), "x", color="red", markersize=5)
        for g in range(1, p.groups):  # head boundaries
            ax.axvline(g * p.relative.numel() / p.groups - 0.5, color="grey", linewidth=0.6)
        ax.set_ylim(0, top)
        ax.set_xlim(-0.6, p.relative.numel() - 0.4)
        ax.set_title(p.title + (f", {p.dead} dead" if p.dead else ""), fontsize=8.5)
        ax.set_xlabel("expert" + (" (grouped by head)" if p.groups > 1 else ""), fontsize=8)
        ax.set_ylabel("usage / uniform", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(
        "Expert usage in training"
        + (f" ({window})" if window else "")
        + ": each expert's share of top-k selections divided by the uniform share\n"
        "(dashed line at 1 = every expert used equally; red x = dead expert, never selected; "
        "colour scale fixed at 0-2)",
        fontsize=9.5,
    )
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    cax = fig.add_axes((0.945, 0.15, 0.012, 0.65))
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, extend="max")
    cax.set_ylabel("usage / uniform", fontsize=8)
    fig.savefig(path)
    plt.close(fig)
    return path
