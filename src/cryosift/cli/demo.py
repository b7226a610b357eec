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
@click.option("--seed", default=0, show_default=True, help="Random seed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
def command(out_dir: Path, n_images: int, snr: float, seed: int, device: str) -> None:
    """Simulate GroEL-GroES (PDB 1AON, shipped inside the package) with CTF, shifts, junk and two
    noise realisations, measure it against ground truth and between the halves, and write a small
    report (report/index.html with montage and FRC figures, metrics.json).

    \b
    Example:
      cryosift demo -o demo_out
    """
    from cryosift.device import select_device
    from cryosift.pipeline.demo import run_demo

    result = run_demo(out_dir, n_images=n_images, snr=snr, seed=seed, device=select_device(device))
    click.echo(f"report: {result['report']}")
    for line in result["headline"]:
        click.echo(line)
