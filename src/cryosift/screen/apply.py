"""Score a whole dataset with a trained screener, chunk by chunk, and split it at a threshold.

Outputs in DIR, written together through a staging folder once every image is scored (on
failure nothing is left):

* ``scores.star``   — every input row, unchanged, plus ``_cryosiftParticleScore`` (calibrated
  probability of being a particle, in [0, 1]);
* ``kept.star`` / ``rejected.star`` — the rows at or above / below the threshold (``--threshold``
  in [0, 1], or the top ``--keep-fraction`` of the images), with the same optics table, so RELION
  3.1 imports them as the input minus the rejected rows;
* ``score_histogram.png``, ``montage.png`` (the highest- and lowest-scoring images), and
  ``screen_apply.json`` (parameters, counts, the threshold used, provenance).

Relative image paths are re-expressed relative to DIR when DIR is not the input STAR's folder.
Memory: one chunk of images plus one float per image (the STAR table is held as well).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cryosift.errors import CryosiftError, InputError
from cryosift.io import image_names, make_optics_table, open_source, write_star
from cryosift.io.atomic import atomic_path, atomic_write_json, staged_folder
from cryosift.io.source import ImageSource
from cryosift.progress import progress
from cryosift.screen.screener import Screener

log = logging.getLogger("cryosift")

SCORE_COLUMN = "cryosiftParticleScore"
OUTPUTS = (
    "scores.star",
    "kept.star",
    "rejected.star",
    "score_histogram.png",
    "montage.png",
    "screen_apply.json",
)


@dataclass
class ScreenResult:
    """What `screen apply` decided: scores, the kept mask, the threshold, the files written."""

    scores: np.ndarray
    kept: np.ndarray
    threshold: float
    files: dict[str, Path]


def check_selection(threshold: float | None, keep_fraction: float | None) -> None:
    """Refuse a threshold outside [0, 1], a keep fraction outside (0, 1], or both at once."""
    if threshold is not None and keep_fraction is not None:
        raise CryosiftError("give --threshold or --keep-fraction, not both")
    if threshold is not None and not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise CryosiftError(
            f"--threshold must lie in [0, 1] (scores are probabilities), got {threshold}"
        )
    if keep_fraction is not None and not (
        math.isfinite(keep_fraction) and 0.0 < keep_fraction <= 1.0
    ):
        raise CryosiftError(f"--keep-fraction must lie in (0, 1], got {keep_fraction}")


def select(
    scores: np.ndarray, threshold: float | None, keep_fraction: float | None
) -> tuple[np.ndarray, float]:
    """(kept mask, threshold used): score >= threshold, or the top ceil(F·N) scores."""
    check_selection(threshold, keep_fraction)
    if keep_fraction is None:
        t = 0.5 if threshold is None else float(threshold)
        return scores >= t, t
    n_keep = min(len(scores), max(1, math.ceil(keep_fraction * len(scores) - 1e-9)))
    order = np.argsort(-scores, kind="stable")
    kept = np.zeros(len(scores), bool)
    kept[order[:n_keep]] = True
    return kept, float(scores[order[n_keep - 1]]) if n_keep else 1.0


def score_source(
    screener: Screener,
    src: ImageSource,
    chunk_size: int = 1024,
    desc: str = "screen",
    *,
    engine: Any = None,
    model_ref: str | Path | None = None,
) -> np.ndarray:
    """Calibrated particle probability of every image of ``src``, read one chunk at a time.

    With a Dask ``engine`` (:mod:`cryosift.engine`) the chunks are scored by its workers, each
    loading the screener saved at ``model_ref`` (required then); scores are the same.
    """
    screener.check_images(src.box, src.pixel_size, src.path)
    out = np.empty(len(src), dtype=np.float64)
    if engine is not None:
        if model_ref is None:
            raise CryosiftError("scoring on a Dask cluster needs the screener's model path")
        from cryosift.engine import ScreenOp, SourceSpec
        from cryosift.screen.model_io import model_path

        op = ScreenOp(str(model_path(model_ref).resolve()), str(screener.device))
        for start, scores in engine.map_results(
            SourceSpec.of(src), op, len(src), int(chunk_size), desc=desc
        ):
            out[start : start + len(scores)] = scores
        return out
    chunks = src.chunks(chunk_size)
    total = math.ceil(len(src) / chunk_size)
    for start, chunk in progress(chunks, total=total, desc=desc, unit="chunk"):
        out[start : start + len(chunk)] = screener.predict_proba(chunk)
    return out


def _rebase(parts: pd.DataFrame, old_dir: Path, new_dir: Path) -> pd.DataFrame:
    """Re-express relative ``index@path`` values of every *ImageName column for ``new_dir``."""
    if old_dir.resolve() == new_dir.resolve():
        return parts
    parts = parts.copy()
    for col in parts.columns:
        if "ImageName" not in str(col):
            continue
        s = parts[col].astype("string")
        num, at, path = (c for _, c in s.str.partition("@").items())
        if not ((at == "@").fillna(False).all() and num.str.isdecimal().fillna(False).all()):
            continue
        mapping = {}
        for p in pd.unique(path.to_numpy(dtype=object)):
            pp = Path(str(p))
            mapping[p] = str(p) if pp.is_absolute() else Path(
                os.path.relpath(old_dir.resolve() / pp, new_dir.resolve())
            ).as_posix()
        parts[col] = (num + "@" + path.map(mapping)).astype(object)
    return parts


def _tables(src: ImageSource, out_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(particles, optics) of the output STAR files: the input's, re-pointed from ``out_dir``."""
    px = src.pixel_size
    if src.path is None:
        raise CryosiftError("screen_source needs images from a file (.star or .mrcs), "
                            "so the output STAR files can point at them")
    if src.metadata is None:  # a bare stack: one row per image, minimal optics
        if px is None:
            raise InputError("the stack states no pixel size; cannot write a STAR file", src.path)
        rel = Path(os.path.relpath(Path(src.path).resolve(), out_dir.resolve())).as_posix()
        return pd.DataFrame({"rlnImageName": image_names(len(src), rel)}), make_optics_table(
            px, src.box
        )
    parts = _rebase(src.metadata.reset_index(drop=True), Path(src.path).parent, out_dir)
    if src.optics is not None and len(src.optics):
        optics = src.optics.copy()
    else:  # RELION 3.0 input: write 3.1 with one optics group holding the pixel size
        if px is None:
            raise InputError("the STAR file states no pixel size; cannot write RELION 3.1",
                             src.path)
        optics = make_optics_table(px, src.box)
        if "rlnOpticsGroup" in parts.columns:
            groups = pd.unique(parts["rlnOpticsGroup"])
            optics = pd.concat([optics] * len(groups), ignore_index=True)
            optics["rlnOpticsGroup"] = groups
    return parts, optics


def _histogram(scores: np.ndarray, threshold: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.hist(scores, bins=50, range=(0.0, 1.0), color="#4477aa")
    ax.axvline(threshold, color="#cc3311", ls="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel("particle score (calibrated probability)")
    ax.set_ylabel("images")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _montage(screener: Screener, src: ImageSource, scores: np.ndarray, path: Path, k: int):
    from cryosift.report.plots import save_montage

    order = np.argsort(-scores, kind="stable")
    k = max(1, min(k, len(scores) // 2 or 1))
    top, bottom = order[:k], order[::-1][:k]
    rows = {}
    for label, idx in (("highest", top), ("lowest", bottom)):
        imgs = src.images(idx)
        rows[f"{label}: raw"] = imgs
        rows[f"{label}: prepared"] = screener.prepare(imgs)
    titles = [f"{scores[i]:.3f}" for i in top]
    save_montage(rows, path, titles=titles)


def screen_source(
    screener: Screener,
    source: str | Path | ImageSource,
    out_dir: str | Path,
    threshold: float | None = None,
    keep_fraction: float | None = None,
    chunk_size: int = 1024,
    montage_images: int = 8,
    provenance: dict[str, Any] | None = None,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    model_ref: str | Path | None = None,
) -> ScreenResult:
    """Score ``source`` and write DIR/scores.star, kept.star, rejected.star and figures.

    ``scheduler`` / ``workers``: where the chunks are scored (None: in this process; see
    :mod:`cryosift.engine`); a cluster needs ``model_ref``, the screener's saved model, which
    every worker loads once. Scores and outputs are the same wherever the chunks run.
    """
    from cryosift.engine import open_engine

    check_selection(threshold, keep_fraction)
    if int(chunk_size) < 1:
        raise CryosiftError(f"chunk size must be at least 1, got {chunk_size}")
    t0 = time.time()
    src = open_source(source)
    if len(src) == 0:
        raise InputError("holds no images", src.path)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("output exists and is not a folder", out_dir)
    inputs = {Path(p).resolve() for p in [src.path, *getattr(src, "stack_paths", [])] if p}
    for name in OUTPUTS:
        if (out_dir / name).resolve() in inputs:
            raise InputError("output would overwrite an input file", out_dir / name)
    screener.check_images(src.box, src.pixel_size, src.path)
    parts, optics = _tables(src, out_dir)  # refuses a STAR without pixel size before scoring
    with open_engine(
        scheduler or "threads", workers, len(src),
        file_based=src.path is not None and model_ref is not None,
    ) as engine:
        t_score = time.time()
        scores = score_source(screener, src, chunk_size, engine=engine, model_ref=model_ref)
        t_score = time.time() - t_score
        execution = engine.describe() if engine is not None else {"engine": "threads"}
    kept, thr = select(scores, threshold, keep_fraction)
    parts[SCORE_COLUMN] = scores

    files = {name.split(".")[0]: out_dir / name for name in OUTPUTS}
    with staged_folder(out_dir) as tmp:  # all files appear together, or none
        staged = {k: tmp / p.name for k, p in files.items()}
        for key, rows in (("scores", slice(None)), ("kept", kept), ("rejected", ~kept)):
            write_star(staged[key], parts[rows], optics)
        _histogram(scores, thr, staged["score_histogram"],
                   f"{len(scores)} images: {int(kept.sum())} kept, {int((~kept).sum())} rejected")
        _montage(screener, src, scores, staged["montage"], montage_images)
        record = dict(provenance or {})
        record.update(
            input=str(src.path) if src.path else "array",
            model={"method": screener.method, "box": screener.box,
                   "pixel_size": screener.pixel_size,
                   "preprocess": screener.preprocess.to_dict()},
            threshold=thr,
            selection="keep_fraction" if keep_fraction is not None else "threshold",
            keep_fraction=keep_fraction,
            n_images=int(len(scores)),
            n_kept=int(kept.sum()),
            n_rejected=int((~kept).sum()),
            mean_score=float(scores.mean()),
            seconds=time.time() - t0,
            scoring_seconds=t_score,
            scoring_images_per_second=len(scores) / max(t_score, 1e-9),
            device=str(screener.device),
            execution=execution,
        )
        atomic_write_json(staged["screen_apply"], record)
    log.info(
        "screened %d images: %d kept, %d rejected at threshold %.4g -> %s",
        len(scores), int(kept.sum()), int((~kept).sum()), thr, out_dir,
    )
    return ScreenResult(scores, kept, thr, files)


def load_and_screen(
    model: str | Path,
    source: str | Path,
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> ScreenResult:
    """Load a saved screener and run :func:`screen_source`."""
    from cryosift.screen.model_io import load_screener

    check_selection(kwargs.get("threshold"), kwargs.get("keep_fraction"))
    kwargs.setdefault("model_ref", model)
    return screen_source(load_screener(model, device), source, out_dir, **kwargs)
