"""`cryosift denoise train` / `apply`: learned denoisers (Noise2Noise, Noise2Void)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

log = logging.getLogger("cryosift")


@click.group("denoise")
def command() -> None:
    """Train a denoiser on a particle stack, or apply a trained one.

    \b
    Examples:
      cryosift denoise train particles.star --method n2v -o n2v_model --epochs 30
      cryosift denoise train even.star --pairs odd.star --method n2n -o n2n_model
      cryosift denoise apply particles.star --model n2v_model -o denoised.star
    """


@command.command("train")
@click.argument("stack", type=click.Path(path_type=Path))
@click.option(
    "--method",
    type=click.Choice(["n2n", "n2v"]),
    required=True,
    help="n2n: two noisy copies (--pairs); n2v: single noisy images (blind spot).",
)
@click.option(
    "-o",
    "--out",
    "model_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Model folder.",
)
@click.option(
    "--pairs",
    "pairs",
    type=click.Path(path_type=Path),
    help="Second noisy copy of every image (same order): even/odd sums, or simulate --pairs.",
)
@click.option("--epochs", default=30, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--crop", default=64, show_default=True, help="Training crop size (px).")
@click.option("--lr", default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--depth", default=4, show_default=True, help="U-Net levels.")
@click.option("--width", default=16, show_default=True, help="Channels of the first level.")
@click.option("--val-fraction", default=0.1, show_default=True, help="Held-out fraction.")
@click.option("--patience", default=5, show_default=True, help="Early-stopping patience (epochs).")
@click.option(
    "--n2v-replace",
    type=click.Choice(["uniform", "median"]),
    default="uniform",
    show_default=True,
    help="N2V pixel replacement (median = N2V2).",
)
@click.option(
    "--max-images",
    default=20000,
    show_default=True,
    help="Train on at most this many images (a random subset of a larger stack).",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from the folder's last checkpoint.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
def train(
    stack: Path,
    method: str,
    model_dir: Path,
    pairs: Path | None,
    max_images: int,
    resume: bool,
    device: str,
    **opts,
) -> None:
    """Train Noise2Noise or Noise2Void on a stack; checkpoints every epoch, --resume continues."""
    import numpy as np

    from cryosift.denoise.training import TrainConfig, train_denoiser
    from cryosift.device import select_device
    from cryosift.errors import CryosiftError
    from cryosift.io import open_source
    from cryosift.provenance import provenance_record

    cfg = TrainConfig(
        method=method,
        epochs=opts["epochs"],
        batch_size=opts["batch_size"],
        crop=opts["crop"],
        lr=opts["lr"],
        depth=opts["depth"],
        width=opts["width"],
        val_fraction=opts["val_fraction"],
        patience=opts["patience"],
        n2v_replace=opts["n2v_replace"],
        seed=opts["seed"],
    )
    cfg.validate()
    if method == "n2n" and pairs is None:
        raise CryosiftError("--method n2n needs --pairs (a second noisy copy of every image)")
    dev = select_device(device)
    src = open_source(stack)
    src_b = open_source(pairs) if pairs is not None else None
    if src_b is not None and (len(src_b) != len(src) or src_b.box != src.box):
        raise CryosiftError(
            f"--pairs {pairs}: {len(src_b)} images of {src_b.box} px, but {stack} "
            f"holds {len(src)} of {src.box} px"
        )
    idx = np.arange(len(src))
    if len(idx) > max_images:
        idx = np.sort(
            np.random.default_rng(opts["seed"]).choice(len(idx), max_images, replace=False)
        )
    images = src.images(idx)
    images_b = src_b.images(idx) if src_b is not None else None
    record = provenance_record(
        "denoise train",
        {"stack": stack, "pairs": pairs, **opts, "method": method, "device": str(dev)},
    )
    summary = train_denoiser(
        images,
        model_dir,
        cfg,
        images_b=images_b,
        device=dev,
        resume=resume,
        pixel_size=src.pixel_size,
        provenance=record,
    )
    log.info(
        "best validation loss %.5g at epoch %d; model in %s",
        summary["best_val_loss"],
        summary["best_epoch"] + 1,
        model_dir / "model.pt",
    )


@command.command("apply")
@click.argument("stack", type=click.Path(path_type=Path))
@click.option(
    "--model",
    "model_ref",
    required=True,
    help="Model folder (from denoise train), a model.pt file, or a shipped model name.",
)
@click.option(
    "-o",
    "--out",
    "out_star",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Output STAR (+ .mrcs beside).",
)
@click.option("--chunk-size", default=256, show_default=True, help="Images per chunk.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
def apply(stack: Path, model_ref: str, out_star: Path, chunk_size: int, device: str) -> None:
    """Denoise a stack of any size in chunks; pixel size and STAR metadata are kept."""
    from cryosift.denoise.apply import denoise_source
    from cryosift.device import select_device

    out = denoise_source(
        model_ref, stack, out_star, device=select_device(device), chunk_size=chunk_size
    )
    log.info("wrote %s", out)
