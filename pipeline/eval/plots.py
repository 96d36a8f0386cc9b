"""Evaluation figures: the IJB-C ROC curve and a retrieval example grid (PNG files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def roc_png(
    fpr: np.ndarray, tpr: np.ndarray, tar_at_far: dict[float, float], path: str | Path
) -> Path:
    """TAR against FAR (log scale), with the reported TAR@FAR points marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    keep = fpr > 0  # log axis
    ax.plot(fpr[keep], tpr[keep], lw=1.5, label="ROC")
    fars = sorted(tar_at_far)
    ax.scatter(fars, [tar_at_far[f] for f in fars], color="k", zorder=3, s=14, label="TAR@FAR")
    for f in fars:
        ax.annotate(
            f"{tar_at_far[f]:.3f}",
            (f, tar_at_far[f]),
            fontsize=7,
            xytext=(3, -10),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlim(min(fars) / 2, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title("IJB-C 1:1 verification")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def retrieval_grid_png(
    queries: Sequence[np.ndarray],
    neighbours: Sequence[Sequence[np.ndarray]],
    correct: Sequence[Sequence[bool]],
    path: str | Path,
    titles: Sequence[str] | None = None,
) -> Path:
    """One row per query: the query (black frame), then its neighbours framed green where they
    share its label and red where not. Images are HxWx3 uint8 arrays."""
    plt = _pyplot()
    rows = len(queries)
    cols = 1 + max((len(n) for n in neighbours), default=0)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
    for r in range(rows):
        cells = [(queries[r], "black")] + [
            (img, "tab:green" if ok else "tab:red") for img, ok in zip(neighbours[r], correct[r])
        ]
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.axis("off")
                continue
            img, colour = cells[c]
            ax.imshow(img)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
        axes[r][0].set_ylabel(titles[r] if titles else f"query {r}", fontsize=7)
    for c in range(1, cols):
        axes[0][c].set_title(f"#{c}", fontsize=8)
    axes[0][0].set_title("query", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
