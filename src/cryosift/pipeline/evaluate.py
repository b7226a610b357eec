"""Evaluate a stack against ground truth or against itself, streaming in chunks.

Three modes, mirroring `cryosift evaluate`:
- against a clean reference: PSNR, scale-invariant PSNR, CC, SSIM, MSE per image (averaged) and the
  pooled FRC with its 0.5-threshold resolution;
- between two independent noisy halves: FRC, 0.143-threshold resolution, SSNR curve and the scalar
  SNR estimate (signal = covariance of the halves);
- labels against truth STAR columns: clustering (rlnClassNumber vs cryosiftTrueView) and screening
  (cryosiftParticleScore vs cryosiftIsParticle) metrics, rows matched by image name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryosift.errors import InputError
from cryosift.io import ImageSource, parse_image_name, read_star
from cryosift.metrics import (
    FRC_CLEAN,
    FRC_HALVES,
    FrcAccumulator,
    clustering_metrics,
    frc_resolution,
    screening_metrics,
    ssnr_from_frc,
)
from cryosift.metrics.image import cc, mse, psnr, scale_invariant_psnr, ssim
from cryosift.progress import progress


def _check_pair(a: ImageSource, b: ImageSource) -> None:
    if len(a) != len(b):
        raise InputError(f"holds {len(a)} images but the reference {b.path} holds {len(b)}", a.path)
    if a.box != b.box:
        raise InputError(f"images are {a.box} px but the reference {b.path} has {b.box} px", a.path)


def _nanmean(x: np.ndarray) -> float:
    finite = x[np.isfinite(x)]
    return float(finite.mean()) if finite.size else float("nan")


def evaluate_against_reference(
    stack: ImageSource,
    reference: ImageSource,
    chunk_size: int = 512,
    mask: np.ndarray | None = None,
) -> dict:
    """Image-quality metrics of `stack` against the clean `reference` (optionally a subset mask)."""
    _check_pair(stack, reference)
    n = len(stack)
    keep = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    per = {k: np.full(n, np.nan) for k in ("psnr", "si_psnr", "cc", "ssim", "mse")}
    acc = FrcAccumulator(stack.box)
    for start, imgs in progress(
        stack.chunks(chunk_size), total=-(-n // chunk_size), desc="evaluating"
    ):
        stop = start + len(imgs)
        sel = keep[start:stop]
        if not sel.any():
            continue
        pred = imgs[sel].astype(np.float64)
        ref = reference.images(slice(start, stop))[sel].astype(np.float64)
        idx = np.flatnonzero(sel) + start
        with np.errstate(divide="ignore", invalid="ignore"):
            per["psnr"][idx] = psnr(pred, ref)
            per["si_psnr"][idx] = scale_invariant_psnr(pred, ref)
            per["cc"][idx] = cc(pred, ref)
            per["ssim"][idx] = ssim(pred, ref)
            per["mse"][idx] = mse(pred, ref)
        acc.add(pred, ref)
    freq, curve = acc.result()
    px = stack.pixel_size or reference.pixel_size
    out = {k: _nanmean(v[keep]) for k, v in per.items()}
    out.update(
        n_images=int(keep.sum()),
        pixel_size=px,
        frc_resolution_A=frc_resolution(freq, curve, FRC_CLEAN, px),
        frc_threshold=FRC_CLEAN,
        frc={"frequency_per_A": (freq / (px or 1.0)).tolist(), "curve": curve.tolist()},
    )
    return out


def evaluate_halves(a: ImageSource, b: ImageSource, chunk_size: int = 512) -> dict:
    """Self-consistency of two independent noisy copies: FRC, SSNR and the scalar SNR estimate."""
    _check_pair(a, b)
    acc = FrcAccumulator(a.box)
    s_cov = s_va = s_vb = 0.0
    n = len(a)
    for start, x in progress(a.chunks(chunk_size), total=-(-n // chunk_size), desc="evaluating"):
        y = b.images(slice(start, start + len(x))).astype(np.float64)
        x = x.astype(np.float64)
        acc.add(x, y)
        xc = x - x.mean(axis=(1, 2), keepdims=True)
        yc = y - y.mean(axis=(1, 2), keepdims=True)
        s_cov += float((xc * yc).mean(axis=(1, 2)).sum())
        s_va += float((xc * xc).mean(axis=(1, 2)).sum())
        s_vb += float((yc * yc).mean(axis=(1, 2)).sum())
    signal = s_cov / n
    noise = (s_va + s_vb) / (2 * n) - signal
    freq, curve = acc.result()
    px = a.pixel_size or b.pixel_size
    return {
        "n_images": n,
        "pixel_size": px,
        "snr": signal / noise if noise > 0 else float("inf"),
        "signal_var": signal,
        "noise_var": noise,
        "frc_resolution_A": frc_resolution(freq, curve, FRC_HALVES, px),
        "frc_threshold": FRC_HALVES,
        "frc": {
            "frequency_per_A": (freq / (px or 1.0)).tolist(),
            "curve": curve.tolist(),
            "ssnr": ssnr_from_frc(curve).tolist(),
        },
    }


def _image_keys(table: pd.DataFrame, star_path: Path) -> list[tuple[int, str]]:
    """(index, absolute stack path) of every row, to match rows across STAR files."""
    folder = star_path.parent
    keys = []
    for name in table["rlnImageName"]:
        idx, path = parse_image_name(str(name))
        p = Path(path)
        keys.append((idx, os.path.normpath(str(p if p.is_absolute() else folder / p))))
    return keys


def evaluate_labels(pred_star: str | Path, truth_star: str | Path, threshold: float = 0.5) -> dict:
    """Clustering and/or screening metrics of a labelled STAR against a simulated truth STAR."""
    pred_star, truth_star = Path(pred_star), Path(truth_star)
    pred = read_star(pred_star).particles
    truth = read_star(truth_star).particles
    for table, path in ((pred, pred_star), (truth, truth_star)):
        if "rlnImageName" not in table:
            raise InputError("STAR file has no rlnImageName column", path)
    lookup = {k: i for i, k in enumerate(_image_keys(truth, truth_star))}
    rows = [lookup.get(k, -1) for k in _image_keys(pred, pred_star)]
    if min(rows, default=-1) < 0:
        missing = sum(r < 0 for r in rows)
        raise InputError(f"{missing} images are not in the truth STAR {truth_star}", pred_star)
    truth = truth.iloc[rows].reset_index(drop=True)
    out: dict = {"n_images": len(pred)}
    if "rlnClassNumber" in pred and "cryosiftTrueView" in truth:
        view = truth["cryosiftTrueView"].to_numpy()
        ok = view >= 0
        out["clustering"] = clustering_metrics(view[ok], pred["rlnClassNumber"].to_numpy()[ok])
    if "cryosiftParticleScore" in pred and "cryosiftIsParticle" in truth:
        out["screening"] = screening_metrics(
            truth["cryosiftIsParticle"].to_numpy().astype(int),
            pred["cryosiftParticleScore"].to_numpy(float),
            threshold,
        )
    if len(out) == 1:
        raise InputError(
            "nothing to compare: needs rlnClassNumber (with cryosiftTrueView in the truth) "
            "or cryosiftParticleScore (with cryosiftIsParticle in the truth)",
            pred_star,
        )
    return out
