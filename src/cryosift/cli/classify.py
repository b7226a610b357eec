"""`cryosift classify`: group particle images into K 2D classes; `--select` keeps chosen classes."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import click

log = logging.getLogger("cryosift")

_METHODS_HELP = (
    "kmeans (k-means++ on --features), hierarchical (Ward on --features), bskmeans "
    "(balanced-size k-means++, seed 001), align2d (reference-free alignment of rotations and "
    "shifts), drvae (DRVAE + BSK-means++, seed 001), or any clusterer that `cryosift bench` "
    "lists (e.g. pca+kmeans)."
)


@click.command("classify")
@click.argument("source", metavar="IN", type=click.Path(path_type=Path))
@click.option("-k", "--classes", "k", type=int, default=None, help="Number of classes K.")
@click.option("--method", default="kmeans", show_default=True, help=_METHODS_HELP)
@click.option(
    "--features",
    default="pca",
    show_default=True,
    help="Features for kmeans/hierarchical/bskmeans: raw, pca, rotinv, denoised:NAME "
    "(any registered denoiser, e.g. denoised:cwf; add +pca to reduce), or an (N, D) .npy file.",
)
@click.option(
    "-o",
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Output folder (with --select: the output STAR file).",
)
@click.option(
    "--select",
    "select",
    default=None,
    metavar="CLASSES",
    help="Instead of classifying: write the particles of these classes (e.g. 1,4,7 or 2-5) of "
    "an already classified STAR (IN, with _rlnClassNumber) to the STAR file -o.",
)
@click.option("--n-components", default=50, show_default=True, help="PCA components.")
@click.option("--psi-step", default=10.0, show_default=True, help="align2d: rotation step (°).")
@click.option(
    "--max-shift",
    type=float,
    default=None,
    metavar="PX",
    help="align2d: largest shift searched, in pixels [default: 10 % of the box].",
)
@click.option("--iterations", default=15, show_default=True, help="align2d: most iterations.")
@click.option(
    "--align-box",
    default=32,
    show_default=True,
    help="align2d: Fourier-crop images to this size for the search (0: no downsampling).",
)
@click.option(
    "--mem-mb", default=256.0, show_default=True, help="align2d: memory for one chunk (MB)."
)
@click.option(
    "--phase-flip/--no-phase-flip",
    default=True,
    show_default=True,
    help="CTF phase-flip the images first when the STAR has CTF parameters (averages are then "
    "of the phase-flipped images).",
)
@click.option("--pixel-size", type=float, default=None, metavar="A", help="Override (Å/px).")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N, mps.")
def command(source: Path, k: int | None, method: str, features: str, out: Path,
            select: str | None, **opts: Any) -> None:
    """Classify particle images into K 2D classes, or --select classes of a classified STAR.

    Writes OUT/classes.star (input columns + _rlnClassNumber, 1-based, classes numbered by size:
    class 1 is the largest; align2d adds _rlnAnglePsi and _rlnOriginXAngst/YAngst in RELION's
    convention), OUT/class_averages.mrcs (image j = class j), OUT/montage.png (averages ordered by
    size with their counts), OUT/class_stats.json and .csv, and the provenance OUT/classify.json.

    \b
    Examples:
      cryosift classify particles.star -k 10 --method kmeans --features pca -o cls
      cryosift classify particles.star -k 50 --method align2d --psi-step 6 -o cls2d
      cryosift classify particles.star -k 4 --method hierarchical --features denoised:cwf -o hc
      cryosift classify cls2d/classes.star --select 1,4,7 -o good.star
    """
    from cryosift.errors import CryosiftError

    if select is not None:
        from cryosift.classify.outputs import select_classes

        if k is not None:
            raise CryosiftError("--select works on a classified STAR: leave out -k")
        n = select_classes(source, select, out)
        log.info("selected classes %s: %d particles -> %s", select, n, out)
        return
    if k is None:
        raise CryosiftError("give the number of classes with -k (or --select CLASSES)")
    _classify(source, k, method, features, out, opts)


def _classify(source: Path, k: int, method: str, features: str, out: Path,
              opts: dict[str, Any]) -> None:
    import numpy as np

    from cryosift.classify.cluster import check_features, check_k, class_averages
    from cryosift.classify.methods import cluster_features
    from cryosift.device import select_device
    from cryosift.errors import CryosiftError, InputError
    from cryosift.io import open_source
    from cryosift.provenance import provenance_record
    from cryosift.registry import ClusterResult, ClusterTask, available

    if out.suffix.lower() == ".star" or (out.exists() and not out.is_dir()):
        raise CryosiftError(f"-o must name a folder for classify outputs, got '{out}'")
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
            metadata=_metadata(src) if opts["phase_flip"] else None, pixel_size=px,
        )
        result = ClusterResult(res.labels, res.averages, res.psi, res.origins * px,
                               info={"history": res.history})
        params.update(res.params)
    else:
        images = src.images(slice(None))
        meta = _metadata(src)
        if method in builtin:
            from cryosift.classify.features import has_ctf, phase_flip

            if opts["phase_flip"] and has_ctf(meta):
                images = phase_flip(images, meta, px)
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


def _metadata(src: Any) -> Any:
    """Particle rows merged with optics columns (CTF etc.), or None for bare stacks."""
    from cryosift.io import merged_metadata

    table = getattr(src, "table", None)
    return merged_metadata(table) if table is not None else None
