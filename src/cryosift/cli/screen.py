"""`cryosift screen train` / `apply`: particle-vs-junk screening (seed 000's RBM, or a CNN)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from cryosift.cli.options import engine_options

log = logging.getLogger("cryosift")


@click.group("screen")
def command() -> None:
    """Train a particle-vs-junk screener on labelled images, or apply one to a dataset.

    \b
    Examples:
      cryosift screen train --positives good.star --negatives junk.star --method rbm -o rbm_model
      cryosift screen train --labels labelled.star --method cnn -o cnn_model
      cryosift screen train run_it025_data.star --good-classes 1,4,7 --method rbm -o rbm_model
      cryosift screen apply particles.star --model rbm_model -o screened --threshold 0.5
      cryosift screen apply particles.star --model cnn_model -o screened --keep-fraction 0.7
    """


@command.command("train")
@click.argument("classes_star", required=False, type=click.Path(path_type=Path))
@click.option("--positives", type=click.Path(path_type=Path), help="Particle images (.star/.mrcs).")
@click.option("--negatives", type=click.Path(path_type=Path), help="Junk images (.star/.mrcs).")
@click.option(
    "--labels",
    "labels_star",
    type=click.Path(path_type=Path),
    help="One STAR file with a 0/1 label column (see --label-column).",
)
@click.option(
    "--label-column",
    default="cryosiftIsParticle",
    show_default=True,
    help="Column of --labels that says 1 (particle) or 0 (junk).",
)
@click.option(
    "--good-classes",
    help="With a STAR file argument holding _rlnClassNumber: these 2D classes are particles, "
    "e.g. 1,4,7.",
)
@click.option(
    "--bad-classes",
    help="With --good-classes: only these classes are junk (default: every other class).",
)
@click.option("--method", type=click.Choice(["rbm", "cnn"]), required=True)
@click.option(
    "-o",
    "--out",
    "model_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Model folder (model.pt, model.json, screen_train.json).",
)
@click.option(
    "--preprocess/--no-preprocess",
    default=None,
    help="Bilateral filter + histogram equalisation before the screener (seed 000). "
    "Default: on for rbm, off for cnn (the CNN uses the intensities histeq discards).",
)
@click.option("--work-box", type=int, default=None,
              help="Larger images are Fourier-cropped to this box first [default: 32 with the "
              "preprocessing chain, 64 without].")
@click.option("--epochs", type=int, default=None, help="Training epochs (rbm 40, cnn 25).")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--lr", type=float, default=None, help="Adam learning rate (rbm 1e-3, cnn 2e-3).")
@click.option("--hidden", default=256, show_default=True, help="RBM hidden units.")
@click.option("--cd-k", default=1, show_default=True, help="RBM contrastive-divergence steps.")
@click.option("--pcd", is_flag=True, help="RBM: persistent contrastive divergence.")
@click.option(
    "--rbm-mode",
    type=click.Choice(["hybrid", "generative"]),
    default="hybrid",
    show_default=True,
    help="generative: CD only (as in seed 000); hybrid adds the discriminative gradient.",
)
@click.option("--val-fraction", default=0.15, show_default=True,
              help="Held out for early stopping and calibration.")
@click.option("--max-per-class", type=int, default=20000, show_default=True,
              help="Train on at most this many images per class (a random subset).")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
def train(
    classes_star: Path | None,
    positives: Path | None,
    negatives: Path | None,
    labels_star: Path | None,
    label_column: str,
    good_classes: str | None,
    bad_classes: str | None,
    method: str,
    model_dir: Path,
    preprocess: bool | None,
    work_box: int | None,
    epochs: int | None,
    batch_size: int,
    lr: float | None,
    hidden: int,
    cd_k: int,
    pcd: bool,
    rbm_mode: str,
    val_fraction: float,
    max_per_class: int,
    seed: int,
    device: str,
) -> None:
    """Train an RBM or CNN screener; the model records box, pixel size and preprocessing."""
    from cryosift.device import select_device
    from cryosift.errors import CryosiftError
    from cryosift.provenance import provenance_record
    from cryosift.screen.cnn import CNNConfig
    from cryosift.screen.data import load_training_set
    from cryosift.screen.methods import CNN_BENCH, RBM_BENCH
    from cryosift.screen.model_io import save_screener
    from cryosift.screen.preprocess import PreprocessConfig
    from cryosift.screen.rbm import RBMConfig
    from cryosift.screen.screener import train_screener

    if model_dir.exists() and not model_dir.is_dir():
        raise CryosiftError(f"{model_dir}: exists and is not a folder")
    if max_per_class < 2:
        raise CryosiftError("--max-per-class must be at least 2")
    if method == "rbm":
        cfg: RBMConfig | CNNConfig = RBMConfig(
            n_hidden=hidden,
            cd_k=cd_k,
            persistent=pcd,
            mode=rbm_mode,
            epochs=epochs or RBM_BENCH["epochs"],
            batch_size=batch_size,
            lr=lr or 1e-3,
        )
    else:
        cfg = CNNConfig(epochs=epochs or CNN_BENCH["epochs"], batch_size=batch_size, lr=lr or 2e-3)
    cfg.validate()
    chain = (method == "rbm") if preprocess is None else preprocess
    prep = PreprocessConfig(chain=chain, work_box=work_box)
    prep.validate()
    dev = select_device(device)
    ts = load_training_set(
        positives=positives,
        negatives=negatives,
        labels_star=labels_star,
        label_column=label_column,
        classes_star=classes_star,
        good_classes=good_classes,
        bad_classes=bad_classes,
        max_per_class=max_per_class,
        seed=seed,
    )
    log.info("training set: %s (%d particles, %d junk)", ts.description,
             ts.counts["particles"], ts.counts["junk"])
    screener = train_screener(
        ts.images, ts.labels, method, cfg, prep, pixel_size=ts.pixel_size,
        val_fraction=val_fraction, device=dev, seed=seed,
    )
    record = provenance_record(
        "screen train",
        {
            "classes_star": classes_star, "positives": positives, "negatives": negatives,
            "labels": labels_star, "label_column": label_column, "good_classes": good_classes,
            "bad_classes": bad_classes, "method": method, "preprocess": prep.to_dict(),
            "config": cfg.to_dict(), "val_fraction": val_fraction,
            "max_per_class": max_per_class, "seed": seed, "device": str(dev),
        },
        training_set={"description": ts.description, **ts.counts, "box": ts.box,
                      "pixel_size": ts.pixel_size},
    )
    path = save_screener(model_dir, screener, record)
    log.info("model in %s", path)


@command.command("apply")
@click.argument("stack", type=click.Path(path_type=Path))
@click.option("--model", "model_ref", required=True, type=click.Path(path_type=Path),
              help="Model folder from `screen train` (or its model.pt).")
@click.option("-o", "--out", "out_dir", required=True,
              type=click.Path(path_type=Path, file_okay=False),
              help="Output folder: scores.star, kept.star, rejected.star, figures.")
@click.option("--threshold", type=float, default=None,
              help="Keep images scoring at least this probability, in [0, 1] (default 0.5).")
@click.option("--keep-fraction", type=float, default=None,
              help="Instead of a threshold: keep this fraction of best-scoring images, (0, 1].")
@click.option("--chunk-size", default=1024, show_default=True, help="Images per chunk.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@engine_options
def apply(
    stack: Path,
    model_ref: Path,
    out_dir: Path,
    threshold: float | None,
    keep_fraction: float | None,
    chunk_size: int,
    device: str,
    scheduler: str,
    workers: int | None,
) -> None:
    """Score every image (in chunks) and split the dataset into kept and rejected STAR files."""
    from cryosift.device import select_device
    from cryosift.engine import check_scheduler
    from cryosift.provenance import provenance_record
    from cryosift.screen.apply import check_selection, screen_source
    from cryosift.screen.model_io import load_screener

    check_selection(threshold, keep_fraction)
    check_scheduler(scheduler)
    dev = select_device(device)
    screener = load_screener(model_ref, dev)
    record = provenance_record(
        "screen apply",
        {"stack": stack, "model": model_ref, "threshold": threshold,
         "keep_fraction": keep_fraction, "chunk_size": chunk_size, "device": str(dev)},
    )
    screen_source(screener, stack, out_dir, threshold, keep_fraction, chunk_size,
                  provenance=record, scheduler=scheduler, workers=workers, model_ref=model_ref)
