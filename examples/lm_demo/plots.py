"""Pictures of a run: loss curves and which experts each layer picks."""

from __future__ import annotations

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


def plot_expert_usage(usage: dict[str, torch.Tensor], path: Path) -> Path | None:
    """Heatmap: one row per MoE layer, one column per expert, colour = share of selections.

    Args:
        usage: layer name -> selection counts per expert ``[n_experts]``.
    """
    if not usage:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(c.numel() for c in usage.values())
    grid = torch.full((len(usage), width), float("nan"))
    for row, counts in enumerate(usage.values()):
        counts = counts.float()
        grid[row, : counts.numel()] = counts / counts.sum().clamp_min(1)
    fig, ax = plt.subplots(figsize=(min(14, 2 + width * 0.08), 1 + 0.4 * len(usage)), dpi=120)
    image = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_yticks(range(len(usage)), list(usage))
    ax.set_xlabel("expert")
    ax.set_title("share of selections per expert")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
