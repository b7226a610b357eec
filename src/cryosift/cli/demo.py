"""`cryosift demo`: the pipeline end to end on the structure shipped in the package, offline."""

from __future__ import annotations

import logging
from pathlib import Path

import click

log = logging.getLogger("cryosift")


@click.command("demo")
@click.option(
    "-o",
    "--out",
    "out_dir",
    default=Path("cryosift_demo"),
    show_default=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Output folder.",
)
@click.option("--n-images", default=2000, show_default=True, help="Number of simulated images.")
@click.option("--snr", default=0.05, show_default=True, help="Simulated SNR.")
@click.option("--views", default=8, show_default=True, help="Distinct views (= 2D classes).")
@click.option("--n-train", default=1000, show_default=True,
              help="Labelled images simulated to train the screener.")
@click.option("--seed", default=0, show_default=True, help="Random seed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
def command(out_dir: Path, n_images: int, snr: float, views: int, n_train: int, seed: int,
            device: str) -> None:
    """Run the whole pipeline on GroEL-GroES (PDB 1AON, shipped inside the package): simulate
    a stack with CTF, in-plane rotations, shifts and structured junk plus a small labelled set,
    then normalise, denoise (shipped general model), screen (a CNN trained on the labelled set),
    classify (align2d), score each stage against the ground truth and write OUT/run/report.html.

    \b
    Example:
      cryosift demo -o demo_out
    """
    import shlex
    import sys

    from cryosift.device import select_device
    from cryosift.pipeline.demo import demo_headline, run_demo

    result = run_demo(out_dir, n_images=n_images, snr=snr, views=views, n_train=n_train,
                      seed=seed, device=select_device(device),
                      command=shlex.join(["cryosift", *sys.argv[1:]]))
    click.echo(f"report: {result.report}")
    for line in demo_headline(result):
        click.echo(line)
