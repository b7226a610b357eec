"""Classify a particle stack into K 2D classes and write the outputs: the library behind
`cryosift classify` and the pipeline's classification stage."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from cryosift.classify.cluster import check_features, check_k, class_averages
from cryosift.classify.methods import cluster_features
from cryosift.device import select_device
from cryosift.errors import CryosiftError, InputError
from cryosift.io import merged_metadata, open_source
from cryosift.provenance import provenance_record
from cryosift.registry import ClusterResult, ClusterTask, available

__all__ = ["METHODS", "classify_source"]

log = logging.getLogger("cryosift")

#: Methods of `cryosift classify` besides the registered clusterers.
METHODS = ("kmeans", "hierarchical", "bskmeans", "align2d", "drvae")

def classify_source(
    source: str | Path,
    k: int,
    method: str = "kmeans",
    features: str = "pca",
    out: str | Path = "classes",
    *,
    n_components: int = 50,
    psi_step: float = 10.0,
    max_shift: float | None = None,
    iterations: int = 15,
    align_box: int = 32,
    mem_mb: float = 256.0,
    candidates: int = 6,
    assignment: str = "soft",
    init_images: int = 5000,
    phase_flip: bool = True,
    pixel_size: float | None = None,
    seed: int = 0,
    device: str = "auto",
    scheduler: str | None = None,
    workers: int | None = None,
) -> ClusterResult:
    """Classify ``source`` (.star/.mrcs) into ``k`` classes and write the outputs to ``out``.

    See :mod:`cryosift.classify.outputs` for the files. Everything is checked (method, features,
    K, pixel size) before the work starts; outputs appear all together or not at all.
    ``scheduler`` / ``workers``: where the per-image part of raw, pca and rotinv features runs
    for kmeans/hierarchical/bskmeans (None: in this process; see :mod:`cryosift.engine`); on a
    cluster the images are then never all in memory here (the class averages are streamed).
    """
    source, out = Path(source), Path(out)
    opts: dict[str, Any] = {
        "n_components": n_components, "psi_step": psi_step, "max_shift": max_shift,
        "iterations": iterations, "align_box": align_box, "mem_mb": mem_mb,
        "candidates": candidates, "assignment": assignment, "init_images": init_images,
        "phase_flip": phase_flip, "pixel_size": pixel_size, "seed": seed, "device": device,
    }
    if out.suffix.lower() == ".star" or (out.exists() and not out.is_dir()):
        raise CryosiftError(f"-o must name a folder for classify outputs, got '{out}'")
    if scheduler is not None:
        from cryosift.engine import check_scheduler

        check_scheduler(scheduler)
    src = open_source(source, pixel_size=opts["pixel_size"])
    if src.pixel_size is None:
        raise InputError("states no pixel size (MRC voxel size 0, no STAR optics); give "
                         "--pixel-size", source)
    px = float(src.pixel_size)
    n = len(src)
    k = check_k(k, n)
    method = method.strip().lower()
    builtin = {"kmeans": "kmeans", "hierarchical": "hc", "hc": "hc", "bskmeans": "bsk"}
    registered = {m.name for m in available("clusterer")}
    if method not in builtin and method not in ("align2d", "drvae") and method not in registered:
        raise CryosiftError(
            f"unknown --method {method!r} (choose from kmeans, hierarchical, bskmeans, align2d, "
            f"drvae, {', '.join(sorted(registered))})"
        )
    feats = None
    if method in builtin and features.lower().endswith(".npy"):
        path = Path(features)
        if not path.is_file():
            raise InputError("features file does not exist", path)
        try:
            feats = np.load(path, allow_pickle=False)
        except Exception as err:  # numpy raises several types for bad files
            raise InputError(f"not a readable .npy file ({err})", path) from err
        feats = check_features(feats, k, n)
    elif method in builtin:
        from cryosift.classify.features import check_feature_kind

        check_feature_kind(features)
    if method == "drvae" and "drvae+bsk" not in registered:
        raise CryosiftError("--method drvae is not available in this installation")
    dev = select_device(opts["device"])
    t0 = time.time()
    params: dict[str, Any] = {"source": source, "k": k, "method": method, "device": str(dev),
                              "seed": opts["seed"], "pixel_size": px}
    if method == "align2d":
        from cryosift.classify.align2d import align2d

        res = align2d(
            src, k, iterations=opts["iterations"], psi_step=opts["psi_step"],
            max_shift=opts["max_shift"], align_box=opts["align_box"] or None,
            mem_mb=opts["mem_mb"], seed=opts["seed"], device=dev,
            candidates=opts["candidates"] or None, assignment=opts["assignment"],
            init_images=opts["init_images"] or None,
            metadata=_metadata(src) if opts["phase_flip"] else None, pixel_size=px,
        )
        result = ClusterResult(res.labels, res.averages, res.psi, res.origins * px,
                               info={"history": res.history})
        params.update(res.params)
    elif method in builtin and feats is None and _chunked(features) and scheduler not in (
        None, "threads"
    ):
        result = _cluster_on_engine(src, k, method, builtin[method], features, params, opts,
                                    scheduler, workers)
    else:
        images = src.images(slice(None))
        meta = _metadata(src)
        if method in builtin:
            from cryosift.classify.features import has_ctf
            from cryosift.classify.features import phase_flip as ctf_phase_flip

            if opts["phase_flip"] and has_ctf(meta):
                images = ctf_phase_flip(images, meta, px)
                params["ctf_phase_flip"] = True
                meta = meta.drop(columns=["rlnDefocusU"])  # already corrected: no CTF twice
            if feats is None:
                from cryosift.classify.features import compute_features

                feats = compute_features(images, features, px, meta, opts["seed"],
                                         opts["n_components"])
                check_features(feats, k, n)
            labels = cluster_features(feats, k, builtin[method], opts["seed"])
            result = ClusterResult(np.asarray(labels, np.int64), class_averages(images, labels, k))
            params.update(features=features, n_features=int(feats.shape[1]))
        else:
            from cryosift.registry import get

            name = "drvae+bsk" if method == "drvae" else method
            fn = get("clusterer", name).build()
            task = ClusterTask(images, k, px, metadata=meta if opts["phase_flip"] else None,
                               seed=opts["seed"])
            result = fn(task)
            if result.averages is None:
                result.averages = class_averages(images, result.labels, k)
            params.update(getattr(fn, "params", {}) or {})
    params["seconds"] = time.time() - t0
    from cryosift.classify.outputs import write_outputs

    record = provenance_record("classify", params, history=result.info.get("history"))
    write_outputs(out, src, result, k, px, record)
    sizes = np.bincount(result.labels, minlength=k)
    log.info("%d images -> %d classes (sizes %d..%d) in %.1f s; outputs in %s", n, k,
             sizes.min(), sizes.max(), params["seconds"], out)
    return result


def _chunked(features: str) -> bool:
    from cryosift.classify.features import CHUNKED_KINDS

    return features.strip() in CHUNKED_KINDS


def _cluster_on_engine(
    src: Any, k: int, method: str, algorithm: str, features: str, params: dict[str, Any],
    opts: dict[str, Any], scheduler: str, workers: int | None,
) -> ClusterResult:
    """kmeans/hierarchical/bskmeans with the per-image part of the features run on a Dask
    cluster (or in-process when ``auto`` finds the stack small) and streamed class averages."""
    from cryosift.classify.features import compute_features, features_on_engine, has_ctf
    from cryosift.classify.features import phase_flip as ctf_phase_flip
    from cryosift.engine import open_engine

    meta = _metadata(src)
    flip = bool(opts["phase_flip"] and has_ctf(meta))
    if flip:
        params["ctf_phase_flip"] = True
    px, n = float(src.pixel_size), len(src)
    with open_engine(scheduler, workers, n, file_based=src.path is not None) as engine:
        if engine is None:
            images = src.images(slice(None))
            if flip:
                images = ctf_phase_flip(images, meta, px)
            feats = compute_features(images, features, px, None, opts["seed"],
                                     opts["n_components"])
        else:
            params["engine"] = engine.describe()
            feats = features_on_engine(src, features, engine, phase_flip=flip,
                                       n_components=opts["n_components"], seed=opts["seed"])
    check_features(feats, k, n)
    labels = np.asarray(cluster_features(feats, k, algorithm, opts["seed"]), np.int64)
    box = src.box
    sums = np.zeros((k, box, box), np.float64)
    step = 4096
    for s in range(0, n, step):
        chunk = src.images(slice(s, s + step))
        if flip:
            chunk = ctf_phase_flip(chunk, meta.iloc[s : s + step], px)
        sums += class_averages(chunk, labels[s : s + step], k) * np.bincount(
            labels[s : s + step], minlength=k)[:, None, None]
    counts = np.bincount(labels, minlength=k)
    averages = (sums / np.maximum(counts, 1)[:, None, None]).astype(np.float32)
    params.update(features=features, n_features=int(feats.shape[1]), method=method)
    return ClusterResult(labels, averages)


def _metadata(src: Any) -> Any:
    """Particle rows merged with optics columns (CTF etc.), or None for bare stacks."""
    table = getattr(src, "table", None)
    return merged_metadata(table) if table is not None else None
