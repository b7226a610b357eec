"""`cryosift run`: the whole pipeline over a dataset, resumable, configured by flags or TOML."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

log = logging.getLogger("cryosift")


@click.command("run")
@click.argument("source", metavar="IN", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path, file_okay=False),
              help="Run folder (default cryosift_run). A rerun into it skips finished stages.")
@click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
              help="TOML file with the same keys as the flags (flags given here win).")
@click.option("--pairs", type=click.Path(path_type=Path),
              help="Second independent half of every image (even/odd frame sums): N2N training "
              "and half-set FRC.")
@click.option("--pixel-size", type=float, help="Override the pixel size (Å/px).")
@click.option("--normalize/--no-normalize", default=True, show_default=True,
              help="RELION-style normalisation first (background mean 0, σ 1).")
@click.option("--denoise", default="auto", show_default=True,
              help="auto (n2n with --pairs, else n2v, trained on the data), n2v, n2n, cwf (the "
              "covariance Wiener filter, fitted on the data), none, a shipped model (general) "
              "or a model folder from `cryosift denoise train`.")
@click.option("--denoise-init", default="general", show_default=True,
              help="What n2n/n2v training starts from: a model to fine-tune (shipped name or "
              "folder) or none (random weights).")
@click.option("--denoise-epochs", default=10, show_default=True)
@click.option("--denoise-steps-per-epoch", default=100, show_default=True)
@click.option("--denoise-max-images", default=5000, show_default=True,
              help="Train the denoiser on at most this many images.")
@click.option("--denoise-tta/--no-denoise-tta", default=False, show_default=True,
              help="Average the denoiser over the 8 rotations and flips of each image (better "
              "at low SNR, 8x the apply compute).")
@click.option("--denoise-sure/--no-denoise-sure", default=False, show_default=True,
              help="Add the denoiser's SURE-fitted output stage (see `denoise apply --sure`).")
@click.option("--screen", default="auto", show_default=True,
              help="auto (train when --screen-labels or --good-classes is given, else skip), "
              "none, or a model folder from `cryosift screen train`.")
@click.option("--screen-method", type=click.Choice(["cnn", "rbm"]), default="cnn",
              show_default=True, help="Screener that auto trains.")
@click.option("--screen-labels", type=click.Path(path_type=Path),
              help="STAR file with a 0/1 particle column to train the screener on.")
@click.option("--screen-label-column", default="cryosiftIsParticle", show_default=True)
@click.option("--screen-classes", type=click.Path(path_type=Path),
              help="A classified STAR (_rlnClassNumber) to train the screener from, with "
              "--good-classes.")
@click.option("--good-classes", help="Particle classes of --screen-classes, e.g. 1,4,7.")
@click.option("--threshold", type=float, help="Keep images scoring >= this, in [0, 1] "
              "(default 0.5).")
@click.option("--keep-fraction", type=float, help="Instead: keep this fraction of the best.")
@click.option("--classes", default=20, show_default=True, help="Number of 2D classes (0: skip).")
@click.option("--classify-method", default="align2d", show_default=True,
              help="align2d, kmeans, hierarchical, bskmeans, drvae (see `cryosift classify`).")
@click.option("--classify-features", default="pca", show_default=True,
              help="Features for kmeans/hierarchical/bskmeans.")
@click.option("--psi-step", default=10.0, show_default=True, help="align2d rotation step (°).")
@click.option("--iterations", default=10, show_default=True, help="align2d iterations.")
@click.option("--align-box", default=32, show_default=True,
              help="align2d: Fourier-crop to this box for the search.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N, mps.")
@click.option("--chunk-size", default=256, show_default=True, help="Images per chunk.")
@click.pass_context
def command(ctx: click.Context, source: Path | None, config_file: Path | None,
            **flags: Any) -> None:
    """Normalise, denoise, screen and classify a dataset, score it against ground truth when
    the STAR has it, and write an HTML report: all into one run folder.

    \b
    Outputs (OUT/...):
      normalize/particles.star    normalised stack (RELION 3.1 STAR + .mrcs)
      denoise/denoised.star       denoised stack (+ denoise/model/ when trained here)
      screen/kept.star            particles kept (rejected.star, scores.star, figures)
      classify/classes.star       _rlnClassNumber, _rlnAnglePsi, _rlnOriginX/YAngst;
                                  class_averages.mrcs, montage.png, class_stats.json
      evaluate/metrics.json       scores against ground truth (simulated data)
      report.html                 self-contained report; run.json: stages, parameters, times
    A rerun into the same folder skips stages whose inputs and parameters did not change.

    \b
    Examples:
      cryosift run particles.star -o run1 --screen-labels labelled.star --classes 50
      cryosift run particles.star -o run1 --denoise general --screen none --classes 20
      cryosift run --config run1/config.toml
    """
    from dataclasses import fields

    from cryosift.pipeline.config import RunConfig, read_config
    from cryosift.pipeline.run import run_pipeline

    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(read_config(config_file))
    given = {k for k in flags if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    for f in fields(RunConfig):
        if f.name in flags and (f.name in given or f.name not in values):
            values[f.name] = flags[f.name]
    if source is not None:
        values["input"] = source
    values = {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}
    values.setdefault("out", "cryosift_run")
    if values.get("out") is None:
        values["out"] = "cryosift_run"
    result = run_pipeline(RunConfig(**values))
    for s in result.stages:
        click.echo(f"{s['name']:>9}: {s['status']}"
                   + (f" ({s.get('seconds', 0):.1f} s)" if s["status"] == "done" else ""))
    if result.report is not None:
        click.echo(f"report: {result.report}")
