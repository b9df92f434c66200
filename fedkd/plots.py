"""Plots of a run, written into its run directory (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402


def plot_accuracy(history: Sequence[dict[str, Any]], ensemble: float, best_teacher: float, path: Path) -> None:
    epochs = [h["epoch"] + 1 for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["student_accuracy"] for h in history], marker="o", label="student")
    ax.axhline(ensemble, color="tab:green", linestyle="--", label=f"ensemble ({ensemble:.3f})")
    ax.axhline(best_teacher, color="tab:red", linestyle=":", label=f"best teacher ({best_teacher:.3f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curriculum(history: Sequence[dict[str, Any]], path: Path) -> None:
    epochs = [h["epoch"] + 1 for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key, title in zip(axes, ("lambda", "adv_weight", "admitted"),
                              ("self-paced threshold lambda", "adversarial weight", "share of samples admitted")):
        ax.plot(epochs, [h[key] for h in history], marker="o")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[2].set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_samples(stages: Sequence[tuple[int, Tensor]], path: Path) -> None:
    """One row per stage (epoch), each a row of generated images in [0, 1]."""
    rows, cols = len(stages), max(len(s[1]) for s in stages)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.0, rows * 1.1), squeeze=False)
    for r, (epoch, images) in enumerate(stages):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                img = images[c].clamp(0, 1)
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(img.permute(1, 2, 0).numpy())
        axes[r][0].set_title(f"epoch {epoch + 1}", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
