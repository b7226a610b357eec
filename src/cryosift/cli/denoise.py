"""`cryosift denoise train` / `apply` / `cwf` / `pretrain-cdae`: learned denoisers (Noise2Noise,
Noise2Void, the CDAE cascade of seed 004) and the covariance Wiener filter."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from cryosift.cli.options import engine_options

log = logging.getLogger("cryosift")


@click.group("denoise")
def command() -> None:
    """Train a denoiser on a particle stack, or apply a trained one (or the covariance
    Wiener filter, which needs no training).

    \b
    Examples:
      cryosift denoise train particles.star --method n2v -o n2v_model --epochs 30
      cryosift denoise train even.star --pairs odd.star --method n2n -o n2n_model
      cryosift denoise apply particles.star --model n2v_model -o denoised.star
      cryosift denoise apply particles.star --model general -o denoised.star
      cryosift denoise cwf particles.star -o cwf/denoised.star
      cryosift denoise train particles.star --method n2v --init none --width 16 -o scratch
      cryosift denoise pretrain-cdae trpv1.pdb -o cdae_pre --box 64 --pixel-size 3
      cryosift denoise train particles.star --method cdae --pretrained cdae_pre -o cdae_model
    """


@command.command("train")
@click.argument("stack", type=click.Path(path_type=Path))
@click.option(
    "--method",
    type=click.Choice(["n2n", "n2v", "cdae"]),
    required=True,
    help="n2n: two noisy copies (--pairs); n2v: single noisy images (blind spot); cdae: "
    "fine-tune a pre-trained cascade (--pretrained) on k-nearest-neighbour means (seed 004).",
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
@click.option("--epochs", type=int, default=None, help="Epochs [n2n/n2v: 30; cdae: 5 per block].")
@click.option("--batch-size", type=int, default=None,
              help="Images per step [32 at boxes up to 64 px, fewer for larger crops, at least 8].")
@click.option("--crop", default=0, show_default=True,
              help="Training crop size (px); 0 = the whole box, so the network learns that the "
              "box edges are background (smaller crops: cheaper steps on large boxes).")
@click.option("--lr", default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--depth", type=int, default=None,
              help="U-Net levels [4]; given, it trains from random weights (no --init).")
@click.option("--width", type=int, default=None,
              help="Channels of the first level [16]; given, it trains from random weights.")
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
    "--schedule",
    type=click.Choice(["plateau", "cosine"]),
    default="plateau",
    show_default=True,
    help="Learning rate: halve on a validation plateau, or cosine decay to 0 over all epochs.",
)
@click.option(
    "--ema",
    default=0.0,
    show_default=True,
    help="Average the weights (exponential moving average with this decay, e.g. 0.99; 0 = off).",
)
@click.option(
    "--max-images",
    default=20000,
    show_default=True,
    help="Train on at most this many images (a random subset of a larger stack).",
)
@click.option(
    "--init",
    default=None,
    help="n2n/n2v: start from this model's weights and architecture (a model folder, .pt "
    "file or shipped name) and fine-tune it on the stack, or 'none' for random weights "
    "[default: general, or none when --depth or --width is given]. Fine-tuning the general "
    "model beats training from scratch most at low SNR (README, B1).",
)
@click.option(
    "--pretrained",
    help="cdae: pre-trained cascade (folder/file from pretrain-cdae, or a shipped model name).",
)
@click.option("--k", "k", default=30, show_default=True, help="cdae: nearest neighbours.")
@click.option("--histeq", is_flag=True, help="cdae: histogram-equalise the output (004's HEE).")
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
    """Train Noise2Noise or Noise2Void on a stack (checkpoints every epoch, --resume continues),
    by default fine-tuning the shipped general model; or fine-tune a pre-trained CDAE on it."""
    import numpy as np

    from cryosift.denoise.training import TrainConfig, batch_for_box, train_denoiser
    from cryosift.device import select_device
    from cryosift.errors import CryosiftError
    from cryosift.io import open_source
    from cryosift.provenance import provenance_record

    pretrained, k, histeq = opts.pop("pretrained"), opts.pop("k"), opts.pop("histeq")
    if method == "cdae":
        if pretrained is None:
            raise CryosiftError("--method cdae needs --pretrained (see 'denoise pretrain-cdae')")
        if resume:
            raise CryosiftError("--resume is for n2n/n2v (CDAE fine-tuning is minutes long)")
    elif pretrained is not None:
        raise CryosiftError("--pretrained is for --method cdae")
    init = resolve_init(method, opts["init"], opts["depth"], opts["width"])
    opts["init"] = init
    if opts["epochs"] is None:
        opts["epochs"] = 5 if method == "cdae" else 30
    cfg = TrainConfig(
        method="n2v" if method == "cdae" else method,  # validated here, unused for cdae
        epochs=opts["epochs"],
        batch_size=opts["batch_size"] or 32,
        crop=opts["crop"],
        lr=opts["lr"],
        depth=opts["depth"] or 4,
        width=opts["width"] or 16,
        val_fraction=opts["val_fraction"],
        patience=opts["patience"],
        n2v_replace=opts["n2v_replace"],
        schedule=opts["schedule"],
        ema=opts["ema"],
        seed=opts["seed"],
        init=init,
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
    if opts["batch_size"] is None and method != "cdae":
        cfg.batch_size = batch_for_box(src.box, cfg.crop)
    idx = np.arange(len(src))
    if len(idx) > max_images:
        idx = np.sort(
            np.random.default_rng(opts["seed"]).choice(len(idx), max_images, replace=False)
        )
    images = src.images(idx)
    images_b = src_b.images(idx) if src_b is not None else None
    record = provenance_record(
        "denoise train",
        {"stack": stack, "pairs": pairs, **opts, "method": method, "device": str(dev),
         "pretrained": pretrained, "k": k, "histeq": histeq},
    )
    if method == "cdae":
        from cryosift.denoise.cdae import finetune_and_save

        finetune_and_save(pretrained, images, model_dir, src.pixel_size, k=k,
                          epochs=opts["epochs"], batch_size=opts["batch_size"] or 32, lr=opts["lr"],
                          seed=opts["seed"], histeq=histeq, device=dev, provenance=record)
        log.info("fine-tuned cascade in %s", model_dir / "model.pt")
        return
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


def resolve_init(method: str, init: str | None, depth: int | None, width: int | None) -> str:
    """The model n2n/n2v training starts from ("" = random weights): --init as given ("none"
    for random weights), else the general model unless an architecture was asked for."""
    from cryosift.errors import CryosiftError

    if method == "cdae":
        if init is not None:
            raise CryosiftError("--init is for n2n/n2v (a cascade starts from --pretrained)")
        return ""
    if init is None:
        return "" if depth is not None or width is not None else "general"
    if init.lower() == "none":
        return ""
    if depth is not None or width is not None:
        raise CryosiftError("--depth/--width set the architecture of a network trained from "
                            "random weights: give them with --init none, not --init " + init)
    return init


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
@click.option(
    "--tta", is_flag=True,
    help="Average the output over the 8 rotations by 90 degrees and flips of each image: "
    "better at low SNR, 8x the compute.",
)
@click.option(
    "--snr", type=float, default=None,
    help="The stack's SNR, for a model conditioned on it (the general model) [default: "
    "estimated from the noise in the image corners of up to 2,000 images].",
)
@click.option(
    "--sure/--no-sure", default=None,
    help="Output stage fitted by Stein's unbiased risk estimate on up to 1,000 images: per "
    "frequency band, the mix of the network's output and the noisy image with the lowest "
    "estimated error against the clean images (none needed). It assumes white noise: by "
    "default it is fitted when the noise in the image corners is white (within 10% over "
    "0.3-0.5 cycles/px), and skipped with a warning otherwise; --sure forces it, --no-sure "
    "gives the network's output alone.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@engine_options
def apply(stack: Path, model_ref: str, out_star: Path, chunk_size: int, tta: bool,
          snr: float | None, sure: bool | None, device: str, scheduler: str,
          workers: int | None) -> None:
    """Denoise a stack of any size in chunks; pixel size and STAR metadata are kept."""
    from cryosift.denoise.apply import denoise_source
    from cryosift.device import select_device
    from cryosift.engine import check_scheduler

    check_scheduler(scheduler)
    out = denoise_source(
        model_ref, stack, out_star, device=select_device(device), chunk_size=chunk_size,
        scheduler=scheduler, workers=workers, tta=tta, snr=snr,
        sure="auto" if sure is None else sure,
    )
    log.info("wrote %s", out)


@command.command("cwf")
@click.argument("stack", type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", "out_star", required=True, type=click.Path(path_type=Path, dir_okay=False),
    help="Output STAR (+ .mrcs and _filter.json beside).",
)
@click.option("--max-fit-images", default=20000, show_default=True,
              help="Estimate the covariance from at most this many images (a random subset).")
@click.option("--noise-var", type=float, default=None,
              help="Noise variance per pixel [default: estimated from the image corners].")
@click.option("--ctf/--no-ctf", "use_ctf", default=True, show_default=True,
              help="Use the STAR's CTF columns (where there are any).")
@click.option("--ctf-corrected", is_flag=True,
              help="Write the CTF-corrected estimate instead of the image as imaged.")
@click.option("--covariance", type=click.Choice(["auto", "rotation-invariant", "plain"]),
              default="auto", show_default=True,
              help="rotation-invariant (images at any in-plane angle share statistics), plain "
              "(one covariance of the images as they are; no CTF), or auto: the one with the "
              "lower Stein risk on held-out images.")
@click.option("--bandlimit", default=0.9, show_default=True,
              help="Highest frequency of the Fourier-Bessel basis, as a fraction of Nyquist.")
@click.option("--pixel-size", type=float, default=None,
              help="Pixel size in Å, overriding the input's.")
@click.option("--chunk-size", default=512, show_default=True, help="Images per chunk.")
@click.option("--seed", default=0, show_default=True, help="Picks the fitted subset.")
def cwf(stack: Path, out_star: Path, max_fit_images: int, noise_var: float | None,
        use_ctf: bool, ctf_corrected: bool, covariance: str, bandlimit: float,
        pixel_size: float | None, chunk_size: int, seed: int) -> None:
    """Covariance Wiener filter (ASPIRE Cov2D-style): no training, no network.

    Estimates the mean and the rotation-invariant covariance of the clean images from the
    noisy stack itself (noise subtracted, CTF-aware from the STAR's defocus columns), then
    Wiener-filters every image with them. It pools statistics over the whole stack, so it is
    strongest on stacks with many images of few views, and the best denoiser of the
    benchmarks at SNR <= 0.1 (README, B1). Runs on the CPU.

    \b
    Example:
      cryosift denoise cwf particles.star -o cwf/denoised.star
    """
    from cryosift.denoise.cwf import cwf_denoise_source

    out = cwf_denoise_source(
        stack, out_star, chunk_size=chunk_size, pixel_size=pixel_size,
        max_fit_images=max_fit_images, noise_var=noise_var, use_ctf=use_ctf,
        ctf_corrected=ctf_corrected, bandlimit=bandlimit, seed=seed,
        rotation_invariant={"auto": "auto", "plain": False}.get(covariance, True),
    )
    log.info("wrote %s", out)


@command.command("pretrain-cdae")
@click.argument("structure", type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", "out_dir", required=True,
    type=click.Path(path_type=Path, file_okay=False), help="Model folder.",
)
@click.option("--box", default=64, show_default=True, help="Box of the simulated images (px).")
@click.option("--pixel-size", default=3.0, show_default=True, help="Å/px of the simulation.")
@click.option("--views", default=4, show_default=True, help="Fixed views simulated (004: 4).")
@click.option("--n-per-view", default=1000, show_default=True, help="Images per view.")
@click.option(
    "--snrs", default="0.1,0.4,0.6", show_default=True,
    help="SNR_low,SNR_mid,SNR_high: block 1 low->mid, 2 mid->high, 3 high->clean.",
)
@click.option("--epochs", default=10, show_default=True, help="Epochs per block.")
@click.option("--widths", default="8,16,32", show_default=True,
              help="Encoder widths (004's figure: 32,64,128).")
@click.option("--single", is_flag=True, help="004's single-DAE baseline: one block, low->clean.")
@click.option(
    "--skip/--no-skip", default=True, show_default=True,
    help="Identity skips around blocks 2 and 3 (each then corrects the blocks before it); "
    "--no-skip: 004's plain cascade.",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
def pretrain_cdae_command(
    structure: Path, out_dir: Path, box: int, pixel_size: float, views: int, n_per_view: int,
    snrs: str, epochs: int, widths: str, single: bool, skip: bool, seed: int, device: str,
) -> None:
    """Phase 1 of seed 004: pre-train the cascade on images simulated from STRUCTURE (a
    protein other than the target); the weights are then fine-tuned on any stack by
    'denoise train --method cdae --pretrained OUT'."""
    from cryosift.denoise.cdae import pretrain_cdae, pretrain_single_dae
    from cryosift.device import select_device
    from cryosift.errors import CryosiftError, InputError
    from cryosift.io.atomic import staged_folder

    if not structure.is_file():
        raise InputError("structure file not found", structure)
    try:
        snr_list = [float(v) for v in snrs.split(",")]
        width_list = [int(v) for v in widths.split(",")]
    except ValueError:
        raise CryosiftError(
            f"--snrs {snrs!r} / --widths {widths!r}: comma-separated numbers"
        ) from None
    if len(snr_list) != 3 or not all(0 < v < float("inf") for v in snr_list):
        raise CryosiftError(f"--snrs needs three positive values, got {snrs!r}")
    dev = select_device(device)
    common = dict(box=box, pixel_size=pixel_size, n_per_view=n_per_view, views=views,
                  epochs=epochs, seed=seed, device=dev, widths=width_list)
    with staged_folder(out_dir) as tmp:
        if single:
            pretrain_single_dae(structure, tmp, snr=snr_list[0], **common)
        else:
            pretrain_cdae(structure, tmp, snrs=snr_list, skip=skip, **common)
    log.info("pre-trained %s in %s", "DAE" if single else "cascade", out_dir / "model.pt")
