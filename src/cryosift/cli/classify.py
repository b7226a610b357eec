"""`cryosift classify`: group particle images into K 2D classes; `--select` keeps chosen classes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from cryosift.cli.options import engine_options

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
    "--candidates",
    default=6,
    show_default=True,
    help="align2d: classes searched per image, the most promising by a cheap score (0: all; "
    "fewer is faster, its current class is always searched).",
)
@click.option(
    "--assignment",
    type=click.Choice(["soft", "hard"]),
    default="soft",
    show_default=True,
    help="align2d: soft (expectation-maximisation, posterior-weighted averages) or hard "
    "(each image in its single best class and pose).",
)
@click.option(
    "--init-images",
    default=5000,
    show_default=True,
    help="align2d: images clustered for the initial classes (0: all).",
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
@engine_options
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
    from cryosift.classify.run import classify_source

    classify_source(source, k, method, features, out, **opts)
