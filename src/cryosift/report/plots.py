"""Figures shared by evaluate, demo and report: FRC curves and image montages (PNG, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cryosift.io.atomic import atomic_path  # noqa: E402


def plot_frc(
    curves: dict[str, dict],
    path: str | Path,
    thresholds: Sequence[float] = (0.5, 0.143),
    title: str = "Fourier ring correlation",
) -> Path:
    """Plot FRC curves ({label: {"frequency_per_A": [...], "curve": [...]}}) to a PNG."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, c in curves.items():
        ax.plot(c["frequency_per_A"], c["curve"], label=label)
    for t in thresholds:
        ax.axhline(t, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FRC")
    ax.set_ylim(-0.1, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def save_montage(
    rows: dict[str, np.ndarray], path: str | Path, titles: Sequence[str] | None = None
) -> Path:
    """Grid of images, one row per labelled stack (each image contrast-stretched on its own)."""
    n_rows, n_cols = len(rows), max(len(v) for v in rows.values())
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(1.4 * n_cols + 1.2, 1.4 * n_rows), squeeze=False
    )
    for r, (label, imgs) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                img = imgs[c]
                lo, hi = np.percentile(img, [1, 99])
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0 and titles is not None and c < len(titles):
                ax.set_title(titles[c], fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path
