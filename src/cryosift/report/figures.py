"""In-memory figures for the HTML report: PNG bytes, ready to embed as data URIs.

Plots use matplotlib's object-oriented API on an Agg canvas (no pyplot state, no display);
particle tiles are numpy -> 8-bit grey PNG through Pillow (a dependency of matplotlib).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_png(fig: Figure, dpi: int = 100) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def to_uint8(img: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """Contrast-stretch one image to 0..255 between its own percentiles (flat images: grey)."""
    a = np.asarray(img, dtype=np.float64)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.full(a.shape, 128, np.uint8)
    lo, hi = np.percentile(finite, percentiles)
    if not hi > lo:
        return np.full(a.shape, 128, np.uint8)
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    return np.round(np.clip((a - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def tile_png(img: np.ndarray, max_size: int = 128) -> bytes:
    """One particle image or class average as a grey PNG, at most ``max_size`` pixels wide.

    Small images stay at their own size (the page scales them up); larger ones are reduced
    with a Lanczos filter so that a gallery of many classes stays small.
    """
    pil = Image.fromarray(to_uint8(img))  # 2-D uint8: mode "L"
    if max(pil.size) > max_size:
        pil = pil.resize((max_size, max_size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def frc_png(
    curves: dict[str, dict],
    thresholds: Sequence[float] = (0.5, 0.143),
    title: str = "Fourier ring correlation",
) -> bytes:
    """FRC curves ({label: {"frequency_per_A": [...], "curve": [...]}}) with threshold lines."""
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    for label, c in curves.items():
        ax.plot(c["frequency_per_A"], c["curve"], label=label, lw=1.6)
    for t in thresholds:
        ax.axhline(t, color="grey", lw=0.8, ls="--")
        ax.annotate(f"{t:g}", xy=(1.0, t), xycoords=("axes fraction", "data"),
                    xytext=(3, 0), textcoords="offset points", va="center", fontsize=7,
                    color="grey")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FRC")
    ax.set_ylim(-0.1, 1.02)
    ax.set_xlim(left=0)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return _figure_png(fig)


def score_histogram_png(
    scores: np.ndarray, threshold: float | None, truth: np.ndarray | None = None, bins: int = 40
) -> bytes:
    """Histogram of particle scores in [0, 1] with the threshold; split by truth when given."""
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.add_subplot()
    edges = np.linspace(0.0, 1.0, bins + 1)
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    if truth is not None:
        t = np.asarray(truth).astype(bool)
        ax.hist([s[t], s[~t]], bins=edges, stacked=True, color=["#2b7bba", "#d9822b"],
                label=[f"true particles ({int(t.sum())})", f"true junk ({int((~t).sum())})"])
    else:
        ax.hist(s, bins=edges, color="#2b7bba", label=f"all images ({len(s)})")
    if threshold is not None:
        ax.axvline(threshold, color="black", lw=1.2, ls="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel("particle score")
    ax.set_ylabel("images")
    ax.set_xlim(0, 1)
    ax.set_title("Screening scores", fontsize=10)
    ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    return _figure_png(fig)
