"""The pipeline's evaluation stage: score every stage against ground truth where it exists.

Simulated STAR files (from `cryosift simulate`) carry their truth in columns that every stage
keeps: ``cryosiftCleanImageName`` (the noiseless image), ``cryosiftIsParticle`` and
``cryosiftTrueView``. Real data has none of these; with a second half (``pairs``) the half-vs-half
FRC and SNR estimate still say something. Denoising is measured on true particles only, with
scale-free figures (CC, scale-invariant PSNR, FRC) because normalisation rescales the images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cryosift.io import open_source, read_star, rebase_image_columns, write_star
from cryosift.metrics import clustering_metrics, screening_metrics
from cryosift.metrics.clustering import contingency
from cryosift.pipeline.evaluate import evaluate_against_reference, evaluate_halves

__all__ = ["evaluate_run", "truth_image_star"]


def truth_image_star(star: str | Path, column: str, dest: str | Path) -> Path:
    """Write ``dest`` (a STAR whose rlnImageName is ``column`` of ``star``), re-pointed for its
    folder, so the truth images open as an ordinary image source in the same row order."""
    star, dest = Path(star), Path(dest)
    table = read_star(star)
    parts = table.particles.copy()
    parts["cryosiftTruthImageName"] = parts[column]
    parts = rebase_image_columns(parts, star.resolve().parent, dest.resolve().parent)
    parts["rlnImageName"] = parts["cryosiftTruthImageName"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_star(dest, parts.drop(columns=["cryosiftTruthImageName"]), table.optics)
    return dest


def _scalars(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "frc"}


def _denoise_metrics(out: Path, images: str, denoised: str | None) -> dict[str, Any]:
    src = open_source(images)
    clean = open_source(truth_image_star(images, "cryosiftCleanImageName",
                                         out / "evaluate" / "clean.star"))
    mask = (src.metadata["cryosiftIsParticle"].to_numpy().astype(bool)
            if "cryosiftIsParticle" in src.metadata else None)
    raw = evaluate_against_reference(src, clean, mask=mask)
    result: dict[str, Any] = {"raw": _scalars(raw), "frc": {"raw": raw["frc"]}}
    if denoised is not None:
        den = evaluate_against_reference(open_source(denoised), clean, mask=mask)
        result["denoised"] = _scalars(den)
        result["frc"]["denoised"] = den["frc"]
    return result


def _screen_metrics(scores_star: Path, threshold: float | None) -> dict[str, Any] | None:
    parts = read_star(scores_star).particles
    if "cryosiftIsParticle" not in parts or "cryosiftParticleScore" not in parts:
        return None
    record = scores_star.parent / "screen_apply.json"
    if threshold is None and record.is_file():
        threshold = json.loads(record.read_text()).get("threshold")
    return screening_metrics(parts["cryosiftIsParticle"].to_numpy().astype(int),
                             parts["cryosiftParticleScore"].to_numpy(float),
                             0.5 if threshold is None else float(threshold))


def _classify_metrics(classes_star: Path) -> dict[str, Any] | None:
    parts = read_star(classes_star).particles
    if "cryosiftTrueView" not in parts or "rlnClassNumber" not in parts:
        return None
    view = parts["cryosiftTrueView"].to_numpy().astype(int)
    cls = parts["rlnClassNumber"].to_numpy().astype(int)
    ok = view >= 0  # junk the screen let through has no view
    if ok.sum() < 2:
        return None
    out: dict[str, Any] = dict(clustering_metrics(view[ok], cls[ok]))
    table, views, classes = contingency(view[ok], cls[ok])
    out.update(
        n_particles=int(ok.sum()),
        n_junk_in_classes=int((~ok).sum()),
        confusion={"views": views.tolist(), "classes": classes.tolist(),
                   "matrix": table.tolist()},
    )
    return out


def evaluate_run(
    out: str | Path,
    images: str,
    pairs: str | None,
    denoised: str | None,
    scores_star: Path | None,
    classes_star: str | None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Every metric the run's truth allows (sections absent when they cannot be computed)."""
    out = Path(out)
    meta = open_source(images).metadata
    columns = set(meta.columns) if meta is not None else set()
    metrics: dict[str, Any] = {"ground_truth": sorted(
        c for c in ("cryosiftIsParticle", "cryosiftCleanImageName", "cryosiftTrueView")
        if c in columns
    )}
    if "cryosiftCleanImageName" in columns:
        metrics["denoise"] = _denoise_metrics(out, images, denoised)
    if pairs is not None:
        metrics["halves"] = evaluate_halves(open_source(images), open_source(pairs))
    if scores_star is not None:
        screen = _screen_metrics(Path(scores_star), threshold)
        if screen is not None:
            metrics["screen"] = screen
    if classes_star is not None:
        cls = _classify_metrics(Path(classes_star))
        if cls is not None:
            metrics["classify"] = cls
    for section in ("denoise", "screen", "classify"):
        if section in metrics:
            metrics[section] = {k: (float(v) if isinstance(v, np.floating) else v)
                                for k, v in metrics[section].items()}
    return metrics
