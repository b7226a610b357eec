"""What `cryosift classify` writes, and `--select` of classes from a classified STAR.

Output folder: ``classes.star`` (every input column, ``_rlnClassNumber`` 1-based, and for aligning
methods ``_rlnAnglePsi``, ``_rlnOriginXAngst``/``YAngst``; ``rlnImageName`` points at the input
stacks, relative to the folder), ``class_averages.mrcs`` (image j = class j), ``montage.png``
(classes ordered by size, with their counts), ``class_stats.json`` / ``class_stats.csv`` and the
provenance ``classify.json``. Classes are numbered by size: class 1 is the largest.

All files are written into a temporary folder beside the output and moved into place only when
every one of them is complete, so a failure leaves no partial output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryosift.errors import InputError
from cryosift.io import atomic_write_json, atomic_write_text, make_optics_table, read_star
from cryosift.io.mrc import write_mrcs
from cryosift.io.star import write_star
from cryosift.registry import ClusterResult

__all__ = ["OUTPUT_FILES", "class_table", "parse_classes", "select_classes", "write_outputs"]

OUTPUT_FILES = (
    "classes.star",
    "class_averages.mrcs",
    "montage.png",
    "class_stats.json",
    "class_stats.csv",
    "classify.json",
)


def _image_names(source: Any, out_dir: Path) -> list[str]:
    """``index@path`` of every image, relative to `out_dir` (absolute paths stay absolute)."""
    out_dir = out_dir.resolve()
    if hasattr(source, "stack_paths"):  # StarSource: keep its own stacks and indices
        rel = [os.path.relpath(Path(p).resolve(), out_dir) for p in source.stack_paths]
        return [f"{i + 1}@{Path(rel[f]).as_posix()}" for f, i in zip(
            source._file, source._index, strict=True)]
    rel = Path(os.path.relpath(Path(source.path).resolve(), out_dir)).as_posix()
    return [f"{i}@{rel}" for i in range(1, len(source) + 1)]


def class_table(
    source: Any, labels: np.ndarray, out_dir: Path, pixel_size: float,
    psi: np.ndarray | None = None, origins_a: np.ndarray | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(particles, optics) for classes.star: input rows + class numbers (and poses)."""
    meta = getattr(source, "metadata", None)
    parts = pd.DataFrame() if meta is None else meta.copy().reset_index(drop=True)
    parts["rlnImageName"] = _image_names(source, out_dir)
    parts["rlnClassNumber"] = np.asarray(labels, dtype=np.int64) + 1
    if psi is not None:
        parts["rlnAnglePsi"] = np.asarray(psi, dtype=np.float64)
    if origins_a is not None:
        parts["rlnOriginXAngst"] = np.asarray(origins_a[:, 0], dtype=np.float64)
        parts["rlnOriginYAngst"] = np.asarray(origins_a[:, 1], dtype=np.float64)
    optics = getattr(source, "optics", None)
    if optics is None or not len(optics):
        optics = make_optics_table(pixel_size, int(source.box))
        if "rlnOpticsGroup" in parts.columns:
            parts["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
    return parts, optics.reset_index(drop=True)


def class_stats(
    labels: np.ndarray, k: int, averages: np.ndarray, result: ClusterResult
) -> list[dict[str, Any]]:
    """Per class: number, size, fraction, and for aligning methods the pose spread."""
    counts = np.bincount(labels, minlength=k)
    rows = []
    for j in range(k):
        sel = labels == j
        row: dict[str, Any] = {
            "class": j + 1,
            "size": int(counts[j]),
            "fraction": float(counts[j] / max(len(labels), 1)),
            "average_std": float(np.std(averages[j])),
        }
        if result.psi is not None and sel.any():
            a = np.deg2rad(result.psi[sel])
            row["psi_circular_std_deg"] = float(
                np.rad2deg(np.sqrt(-2.0 * np.log(max(np.hypot(np.cos(a).mean(),
                                                              np.sin(a).mean()), 1e-12))))
            )
        if result.shifts is not None and sel.any():
            row["mean_abs_origin_A"] = float(np.abs(result.shifts[sel]).mean())
        rows.append(row)
    return rows


def write_outputs(
    out_dir: Path,
    source: Any,
    result: ClusterResult,
    k: int,
    pixel_size: float,
    provenance: dict[str, Any],
) -> dict[str, Path]:
    """Write every output file of `cryosift classify` (classes numbered by size)."""
    from cryosift.classify.cluster import order_by_size

    labels, order = order_by_size(np.asarray(result.labels, dtype=np.int64), k)
    averages = np.asarray(result.averages, dtype=np.float32)[order]
    counts = np.bincount(labels, minlength=k)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".classify-", dir=out_dir))
    try:
        parts, optics = class_table(source, labels, out_dir, pixel_size, result.psi,
                                    result.shifts)
        write_star(tmp / "classes.star", parts, optics)
        write_mrcs(tmp / "class_averages.mrcs", averages, pixel_size)
        titles = [f"class {j + 1}: {counts[j]}" for j in range(k)]
        _montage(averages, titles, tmp / "montage.png", per_row=10)
        stats = class_stats(labels, k, averages, result)
        atomic_write_json(tmp / "class_stats.json", {"n_images": int(len(labels)), "k": k,
                                                     "classes": stats})
        atomic_write_text(tmp / "class_stats.csv", pd.DataFrame(stats).to_csv(index=False))
        atomic_write_json(tmp / "classify.json", provenance)
        paths = {}
        for name in OUTPUT_FILES:
            os.replace(tmp / name, out_dir / name)
            paths[name] = out_dir / name
        return paths
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _montage(averages: np.ndarray, titles: list[str], path: Path, per_row: int) -> None:
    """Montage of class averages, largest class first, each titled with its size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(averages)
    n_cols = min(per_row, k)
    n_rows = (k + n_cols - 1) // n_cols
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.3 * n_cols, 1.45 * n_rows),
                             squeeze=False)
    for j, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        if j >= k:
            ax.axis("off")
            continue
        img = averages[j]
        lo, hi = np.percentile(img, [1, 99])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
        ax.set_title(titles[j], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)


def parse_classes(text: str) -> list[int]:
    """'1,4,7' or '2-5,9' -> sorted class numbers (1-based)."""
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                if a > b:
                    raise ValueError
                out.update(range(a, b + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise InputError(
                f"--select: {part!r} is not a class number or range (e.g. 1,4,7)"
            ) from None
    if not out:
        raise InputError("--select names no classes (e.g. --select 1,4,7)")
    return sorted(out)


def select_classes(star: Path, classes: str, out_star: Path) -> int:
    """Write the particles of the chosen classes of a classified STAR to `out_star`; count."""
    table = read_star(star)
    parts = table.particles
    if "rlnClassNumber" not in parts.columns:
        raise InputError("has no rlnClassNumber column (classify it first)", star)
    wanted = parse_classes(classes)
    present = set(pd.unique(parts["rlnClassNumber"].astype(int)))
    missing = [c for c in wanted if c not in present]
    if missing:
        raise InputError(
            f"--select names classes {', '.join(map(str, missing))} that are not in the file "
            f"(it has classes {min(present)}-{max(present)}, "
            f"{len(present)} non-empty)",
            star,
        )
    if Path(out_star).suffix.lower() != ".star":
        raise InputError(f"output must be a .star file, got '{Path(out_star).name}'")
    keep = parts[parts["rlnClassNumber"].astype(int).isin(wanted)].reset_index(drop=True)
    out_star = Path(out_star)
    out_star.parent.mkdir(parents=True, exist_ok=True)
    src_dir, dst_dir = star.resolve().parent, out_star.resolve().parent
    if src_dir != dst_dir and "rlnImageName" in keep.columns:
        def rebase(name: str) -> str:
            idx, _, p = str(name).partition("@")
            if Path(p).is_absolute():
                return name
            return f"{idx}@{Path(os.path.relpath(src_dir / p, dst_dir)).as_posix()}"

        keep["rlnImageName"] = keep["rlnImageName"].map(rebase)
    optics = table.optics
    if optics is None:  # RELION 3.0 input: one optics group from the stacks themselves
        from cryosift.io import open_source

        src = open_source(star)
        if src.pixel_size is None:
            raise InputError("states no pixel size (no optics table, MRC voxel size 0)", star)
        optics = make_optics_table(float(src.pixel_size), int(src.box))
    write_star(out_star, keep, optics)
    return len(keep)
