"""Clustering benchmarks: B2/B4 (fixed views, labels known) and B5 (random poses, no labels).

B2 and B4 (datasets with K fixed views): every registered clusterer, plus k-means++ and Ward on
the images of the denoisers in :data:`DENOISED` (seed 004's "clustering of denoised images"), with
K = the number of views, scored by ACC (Hungarian), NMI, ARI, pairwise F1, the smallest / largest
class-size ratio, and the class averages' FRC-0.5 resolution against the clean view they are
matched to (each average first aligned to that view by rotation and shift, so that a method whose
averages come out turned, like align2d's reference-free ones, is not penalised for it). The
nearest-clean-view oracle is scored beside them by the runner.

B5 (uniform random orientations, in-plane rotations, shifts, CTF, junk): no discrete truth, so
the class averages are scored: each against the clean projection of the structure at its
particles' mean orientation (chordal L2 mean of the particles' rotations, each with the in-plane
angle the method found taken off), multiplied by the particles' mean CTF, FRC-0.5 resolution
after the same alignment; and the angular spread of each class (mean angle between the
particles' viewing directions and their mean). Junk images are classified too (as in real use)
but do not enter the references.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from cryosift.classify.align2d import align_to_references, rotate, shift
from cryosift.classify.cluster import class_averages, kmeans_pp, ward
from cryosift.classify.features import denoise_stack, raw_features
from cryosift.metrics import (
    FRC_CLEAN,
    FrcAccumulator,
    class_size_balance,
    clustering_metrics,
    frc_resolution,
)
from cryosift.metrics.clustering import cluster_to_class_map
from cryosift.registry import ClusterResult, ClusterTask, Method, available

log = logging.getLogger("cryosift")

#: denoisers whose output is clustered by k-means++ and Ward in B2/B4 (when registered)
DENOISED = ("cdae", "cwf", "drvae")
#: clusterers run on B5 (the others ignore in-plane rotations by design; two are kept as a
#: baseline) and the number of classes there
B5_METHODS = ("pca+kmeans", "rotinv+kmeans", "align2d")
B5_CLASSES = {True: 10, False: 25}


def _frc_res(avg: np.ndarray, ref: np.ndarray, pixel_size: float, align: bool = True) -> float:
    """FRC-0.5 resolution (Å) of `avg` against `ref`, after aligning avg to ref (psi 1°, shifts,
    bicubic) when `align` (for averages in a frame of their own, e.g. align2d's)."""
    box = avg.shape[-1]
    al = np.asarray(avg, dtype=np.float32)
    if align:
        _, psi, origin, _ = align_to_references(avg[None], ref[None], psi_step=1.0,
                                                max_shift=0.15 * box)
        x = torch.as_tensor(avg[None], dtype=torch.float32)
        al = rotate(shift(x, torch.as_tensor(origin, dtype=torch.float32)),
                    -torch.as_tensor(psi, dtype=torch.float32), "bicubic")[0].numpy()
    acc = FrcAccumulator(box)
    acc.add(al[None].astype(np.float64), ref[None].astype(np.float64))
    freq, curve = acc.result()
    return frc_resolution(freq, curve, FRC_CLEAN, pixel_size)


def _view_templates(clean: np.ndarray, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.unique(views)
    lab = np.searchsorted(ids, views)
    return ids, class_averages(clean, lab, len(ids))


def _label_scores(
    views: np.ndarray, res: ClusterResult, images: np.ndarray, templates: np.ndarray,
    ids: np.ndarray, k: int, pixel_size: float,
) -> dict[str, Any]:
    labels = np.asarray(res.labels)
    scores: dict[str, Any] = dict(clustering_metrics(views, labels))
    scores["min_max_class_ratio"] = class_size_balance(labels, k)["min_max_ratio"]
    avgs = res.averages if res.averages is not None else class_averages(images, labels, k)
    mapping = cluster_to_class_map(views, labels)
    res_a = [
        _frc_res(np.asarray(avgs[c]), templates[int(np.searchsorted(ids, v))], pixel_size,
                 align=res.psi is not None)
        for c, v in mapping.items()
        if (labels == c).sum() >= 2
    ]
    scores["class_average_frc_resolution_A"] = float(np.mean(res_a)) if res_a else float("nan")
    return scores


def _feature_run(images: np.ndarray, k: int, algorithm: str, seed: int) -> ClusterResult:
    feats = raw_features(images)
    fn = kmeans_pp if algorithm == "kmeans" else ward
    labels = fn(feats, k, seed=seed)[0]
    return ClusterResult(labels, class_averages(images, labels, k))


def score_clusterers(
    data: Any, quick: bool = False, only: list[str] | None = None
) -> dict[str, dict]:
    """B2/B4: every registered clusterer and k-means/Ward on denoised images vs the views."""
    from cryosift.registry import get

    meta = data.metadata
    views_all = meta["cryosiftTrueView"].to_numpy()
    keep = views_all >= 0
    views = views_all[keep]
    images = data.noisy[keep]
    sub_meta = meta[keep].reset_index(drop=True)
    k = int(np.unique(views).size)
    ids, templates = _view_templates(data.clean[keep], views)
    seed = data.spec.seed
    results: dict[str, dict] = {}

    def record(label: str, res: ClusterResult, seconds: float, params: dict, oracle: bool = False
               ) -> None:
        scores = _label_scores(views, res, images, templates, ids, k, data.pixel_size)
        scores.update(kind="clusterer", oracle=oracle, params=params, seconds=seconds,
                      images_per_second=len(images) / max(seconds, 1e-9))
        results[label] = scores
        log.info("  %-22s ACC %.3f  NMI %.3f  min/max %.2f", label, scores["acc"],
                 scores["nmi"], scores["min_max_class_ratio"])

    for method in available("clusterer"):
        if only is not None and method.name not in only:
            continue
        params = dict(method.quick) if quick else {}
        fn = method.build(**params)
        task = ClusterTask(images, k, data.pixel_size, metadata=sub_meta, seed=seed,
                           clean=data.clean[keep] if (method.oracle or "clean" in method.needs)
                           else None)
        t0 = time.time()
        res = fn(task)
        record(method.name, res, time.time() - t0, {**method.defaults, **params}, method.oracle)
    registered = {m.name for m in available("denoiser")}
    for name in DENOISED:
        labels = [f"{name}+kmeans", f"{name}+hc"]
        if name not in registered or (only is not None and not set(labels) & set(only)):
            continue
        method: Method = get("denoiser", name)
        t0 = time.time()
        try:
            den = denoise_stack(images, name, data.pixel_size, sub_meta, seed,
                                dict(method.quick) if quick else None)
        except Exception as err:  # one failing denoiser must not sink the benchmark
            log.warning("  %s: denoising failed (%s); skipped", name, err)
            continue
        t_den = time.time() - t0
        for label, algo in zip(labels, ("kmeans", "hc"), strict=True):
            if only is not None and label not in only:
                continue
            t1 = time.time()
            res = _feature_run(den, k, algo, seed)
            res.averages = class_averages(images, res.labels, k)  # averages of the raw images
            record(label, res, t_den + time.time() - t1,
                   {"denoiser": name, "algorithm": algo, "features": "raw pixels of denoised"})
    return results


def _mean_rotation(rots: np.ndarray) -> np.ndarray:
    """Chordal L2 mean of rotation matrices (n, 3, 3): the SO(3) matrix nearest their sum."""
    u, _, vt = np.linalg.svd(rots.sum(0))
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def _angular_spread(rots: np.ndarray) -> float:
    """Mean angle (deg) between the viewing directions (third rows) and their mean direction."""
    dirs = rots[:, 2, :]
    mean = dirs.sum(0)
    mean /= max(np.linalg.norm(mean), 1e-12)
    return float(np.rad2deg(np.arccos(np.clip(dirs @ mean, -1.0, 1.0))).mean())


class _Projections:
    """Clean projections of the benchmark structure at given rotations, times a mean CTF."""

    def __init__(self, data: Any) -> None:
        from cryosift.bench.protocol import structure_path
        from cryosift.simulate.projector import FourierProjector
        from cryosift.simulate.simulator import load_structure

        spec = data.spec
        vol = load_structure(structure_path(spec.structure), data.pixel_size, spec.box, 0.0)
        self.projector = FourierProjector(vol.data)
        self.field, self.box = vol.size, spec.box
        self.meta, self.pixel_size, self.ctf = data.metadata, data.pixel_size, spec.ctf

    def __call__(self, rot: np.ndarray, rows: np.ndarray) -> np.ndarray:
        img = self.projector.project(rot[None].astype(np.float32))[0]
        lo = self.field // 2 - self.box // 2
        img = img[lo : lo + self.box, lo : lo + self.box]
        if self.ctf:
            from cryosift.filters.ctf import batch_ctf
            from cryosift.simulate.projector import images_to_slices, slices_to_images

            # the clusterers phase-flip CTF data, so their averages carry |CTF|
            ctf = batch_ctf(self.meta.iloc[rows], self.box, self.pixel_size).abs().mean(0)
            img = slices_to_images(images_to_slices(img[None]) * ctf, self.box)[0]
        return img.numpy()


def score_classes_realistic(
    data: Any, quick: bool = False, only: list[str] | None = None
) -> dict[str, dict]:
    """B5: class-average FRC against the clean projection at the mean pose; angular spread."""
    from cryosift.registry import get
    from cryosift.simulate.orientations import euler_to_matrix

    meta = data.metadata
    k = B5_CLASSES[bool(quick)]
    particle = data.is_particle
    project = _Projections(data)
    results: dict[str, dict] = {}
    for name in B5_METHODS:
        if only is not None and name not in only:
            continue
        method = get("clusterer", name)
        params = dict(method.quick) if quick else {}
        fn = method.build(**params)
        t0 = time.time()
        res = fn(ClusterTask(data.noisy, k, data.pixel_size, metadata=meta, seed=data.spec.seed))
        seconds = time.time() - t0
        labels = np.asarray(res.labels)
        psi_est = np.zeros(len(labels)) if res.psi is None else np.asarray(res.psi)
        avgs = res.averages if res.averages is not None else class_averages(data.noisy, labels, k)
        rots = euler_to_matrix(meta["rlnAngleRot"].to_numpy(), meta["rlnAngleTilt"].to_numpy(),
                               meta["rlnAnglePsi"].to_numpy() - psi_est)
        frcs, spreads, sizes = [], [], []
        for j in range(k):
            rows = np.flatnonzero((labels == j) & particle)
            if len(rows) < 2:
                continue
            ref = project(_mean_rotation(rots[rows]), rows)
            # always aligned: a non-aligning method's average is in no particular frame
            frcs.append(_frc_res(np.asarray(avgs[j]), ref, data.pixel_size))
            spreads.append(_angular_spread(rots[rows]))
            sizes.append(len(rows))
        w = np.asarray(sizes, dtype=np.float64)
        finite = np.isfinite(frcs)
        scores = {
            "k": k,
            "class_average_frc_resolution_A": float(np.mean(np.asarray(frcs)[finite]))
            if finite.any() else float("nan"),
            "best_class_frc_resolution_A": float(np.min(np.asarray(frcs)[finite]))
            if finite.any() else float("nan"),
            "angular_spread_deg": float((np.asarray(spreads) * w).sum() / max(w.sum(), 1)),
            "min_max_class_ratio": class_size_balance(labels, k)["min_max_ratio"],
            "kind": "classes2d",
            "oracle": False,
            "params": {**method.defaults, **params},
            "seconds": seconds,
            "images_per_second": len(labels) / max(seconds, 1e-9),
        }
        results[name] = scores
        log.info("  %-22s class-average FRC %.1f Å  spread %.1f°", name,
                 scores["class_average_frc_resolution_A"], scores["angular_spread_deg"])
    return results
