"""Evaluation figures: the IJB-C ROC curve and a retrieval example grid (PNG files); the framed
image grid is shared with ``pipeline search``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def roc_png(
    fpr: np.ndarray, tpr: np.ndarray, tar_at_far: dict[float, float], path: str | Path
) -> Path:
    """TAR against FAR (log scale), with the reported TAR@FAR points marked."""
    plt = pyplot()
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
    return save_png(fig, path, dpi=110)


def retrieval_grid_png(
    queries: Sequence[np.ndarray],
    neighbours: Sequence[Sequence[np.ndarray]],
    correct: Sequence[Sequence[bool]],
    path: str | Path,
    titles: Sequence[str] | None = None,
) -> Path:
    """One row per query: the query (black frame), then its neighbours framed green where they
    share its label and red where not. Images are HxWx3 uint8 arrays."""
    cells = [
        [(query, "black", None)]
        + [(img, "tab:green" if ok else "tab:red", None) for img, ok in zip(row, oks)]
        for query, row, oks in zip(queries, neighbours, correct)
    ]
    fig, axes = framed_image_grid(cells, cell_inches=(1.6, 1.7))
    for r in range(len(queries)):
        axes[r][0].set_ylabel(titles[r] if titles else f"query {r}", fontsize=7)
    for c in range(1, len(axes[0])):
        axes[0][c].set_title(f"#{c}", fontsize=8)
    axes[0][0].set_title("query", fontsize=8)
    return save_png(fig, path, dpi=90)


def framed_image_grid(
    cells: Sequence[Sequence[tuple[np.ndarray, str, str | None]]],
    cell_inches: tuple[float, float],
) -> tuple[Any, Any]:
    """A figure with one row of images per entry of ``cells``, each (image, frame colour,
    caption or None) framed in its colour and captioned below; cells past the end of a shorter
    row stay blank. Returns (figure, axes indexed [row][column])."""
    plt = pyplot()
    rows = len(cells)
    cols = max((len(row) for row in cells), default=1)
    fig, axes = plt.subplots(
        rows, cols, figsize=(cell_inches[0] * cols, cell_inches[1] * rows), squeeze=False
    )
    for r, row in enumerate(cells):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(row):
                ax.axis("off")
                continue
            img, colour, caption = row[c]
            ax.imshow(img)
            if caption is not None:
                ax.set_xlabel(caption, fontsize=6)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
    return fig, axes


def save_png(fig: Any, path: str | Path, dpi: int) -> Path:
    """Lay out ``fig``, write it to ``path`` (creating its folder) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
