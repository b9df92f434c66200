"""Plots of a run, written into its run directory (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torch import Tensor  # noqa: E402


def _epochs_axis(ax: Any) -> None:
    """Whole epochs on the x axis (a two-epoch run has no epoch 1.5)."""
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _student_accuracy(x: Sequence[float], history: Sequence[dict[str, Any]], xlabel: str,
                      lines: Sequence[tuple[float, str, str, str]], path: Path, title: str) -> None:
    """Student accuracy against ``x``, with horizontal reference lines (value, label, colour, style); the student
    refitted on the final pool (``student-refit``'s record after the epochs) as its own point."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set_title(title, fontsize=9)
    epochs = [(at, h) for at, h in zip(x, history) if "stage" not in h]
    ax.plot([at for at, _ in epochs], [h["student_accuracy"] for _, h in epochs], marker="o",
            label="student (trained along the way)" if len(epochs) < len(history) else "student")
    for at, h in zip(x, history):
        if "stage" in h and h.get("student_accuracy") is not None:
            ax.plot([at], [h["student_accuracy"]], marker="*", markersize=12, linestyle="none", color="tab:purple",
                    label=f"student refitted on the final pool ({h['student_accuracy']:.3f})")
    for value, label, color, style in lines:
        ax.axhline(value, color=color, linestyle=style, label=f"{label} ({value:.3f})")
    if xlabel == "epoch":
        _epochs_axis(ax)
    else:
        ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy(history: Sequence[dict[str, Any]], ensemble: float, best_teacher: float, path: Path,
                  title: str = "") -> None:
    _student_accuracy([h["epoch"] + 1 for h in history], history, "epoch",
                      [(ensemble, "ensemble", "tab:green", "--"), (best_teacher, "best teacher", "tab:red", ":")], path,
                      f"student accuracy per epoch: {title}")


CURRICULUM_PANELS = (
    ("lambda", "self-paced threshold lambda"),
    ("adv_weight", "adversarial weight"),
    ("admitted", "share of samples admitted (v >= 0.5)"),
)


def plot_curriculum(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> None:
    """The schedule panels a method reports (any of lambda, adversarial weight, admitted share)."""
    history = [h for h in history if "stage" not in h]  # the epochs only (student-refit adds a record after them)
    panels = [(k, t) for k, t in CURRICULUM_PANELS if any(h.get(k) is not None for h in history)]
    if not panels:
        return
    epochs = [h["epoch"] + 1 for h in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (key, panel) in zip(axes[0], panels):
        ax.plot(epochs, [h.get(key) for h in history], marker="o", label="measured")
        if key == "admitted" and any("admitted_target" in h for h in history):
            ax.plot(epochs, [h.get("admitted_target") for h in history], linestyle="--", label="target q(t)")
            ax.legend(loc="lower right")
        if key == "admitted":
            ax.set_ylim(0, 1.05)
        ax.set_title(panel, fontsize=9)
        _epochs_axis(ax)
        ax.grid(alpha=0.3)
    fig.suptitle(f"curriculum: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_queries(history: Sequence[dict[str, Any]], ensemble: float, path: Path, title: str = "") -> None:
    """Student accuracy against the query samples spent so far (after each epoch)."""
    _student_accuracy([h["query_samples"] / 1e3 for h in history], history, "query samples (thousands, all teachers)",
                      [(ensemble, "ensemble", "tab:green", "--")], path, f"student accuracy per query: {title}")


def plot_samples(stages: Sequence[tuple[int, Tensor]], path: Path, title: str = "",
                 labels: Sequence[Sequence[str]] | None = None) -> None:
    """One row per stage (epoch), each a row of generated images in [0, 1]; under each image its label in
    ``labels`` (per stage, per image: what the final student takes it for) when given."""
    rows, cols = len(stages), max(len(s[1]) for s in stages)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.0, rows * 1.25 + 0.4), squeeze=False)
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
                if labels is not None:
                    ax.text(0.5, -0.08, labels[r][c], transform=ax.transAxes, ha="center", va="top", fontsize=6)
        axes[r][0].set_title(f"epoch {epoch + 1}", fontsize=8, loc="left")
    fig.suptitle(f"synthetic samples from fixed latents: {title}"
                 + ("\n(under each: the final student's class and confidence)" if labels is not None else ""),
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
