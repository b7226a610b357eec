"""`cryosift evaluate`: metrics against a clean reference, between two halves, or against truth."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from cryosift.errors import CryosiftError

log = logging.getLogger("cryosift")


@click.command("evaluate")
@click.argument("stack", type=click.Path(path_type=Path))
@click.option(
    "--reference", type=click.Path(path_type=Path), help="Clean reference stack (.mrcs/.star)."
)
@click.option("--half-b", type=click.Path(path_type=Path), help="Second independent noisy copy.")
@click.option(
    "--truth", type=click.Path(path_type=Path), help="Simulated STAR with _cryosift truth."
)
@click.option(
    "--threshold", default=0.5, show_default=True, help="Score threshold for screening metrics."
)
@click.option(
    "--particles-only/--all-images",
    default=True,
    show_default=True,
    help="With --reference and a simulated STAR: score particle images only.",
)
@click.option(
    "-o",
    "--out",
    "out_json",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Output JSON; an FRC plot is written beside it (<name>_frc.png).",
)
def command(
    stack: Path,
    reference: Path | None,
    half_b: Path | None,
    truth: Path | None,
    threshold: float,
    particles_only: bool,
    out_json: Path,
) -> None:
    """Measure a stack: PSNR, SI-PSNR, CC, SSIM, FRC resolution vs a clean reference (--reference);
    FRC at 0.143, SSNR and SNR between two noisy halves (--half-b); clustering ACC/NMI/ARI/F1 and
    screening accuracy/precision/recall/ROC-AUC against a simulated truth STAR (--truth).

    \b
    Examples:
      cryosift evaluate sim/particles.mrcs --reference sim/clean.mrcs -o raw.json
      cryosift evaluate sim/particles.mrcs --half-b sim/particles_b.mrcs -o halves.json
      cryosift evaluate classes/classes.star --truth sim/particles.star -o clustering.json
    """
    from cryosift.io import atomic_write_json, open_source
    from cryosift.pipeline.evaluate import (
        evaluate_against_reference,
        evaluate_halves,
        evaluate_labels,
    )
    from cryosift.provenance import provenance_record
    from cryosift.report.plots import plot_frc

    if sum(x is not None for x in (reference, half_b, truth)) != 1:
        raise CryosiftError("give exactly one of --reference, --half-b, --truth")
    if truth is not None:
        result = evaluate_labels(stack, truth, threshold)
    else:
        src = open_source(stack)
        if reference is not None:
            mask = None
            meta = src.metadata
            if particles_only and meta is not None and "cryosiftIsParticle" in meta:
                mask = meta["cryosiftIsParticle"].to_numpy().astype(bool)
            result = evaluate_against_reference(src, open_source(reference), mask=mask)
            label = "vs clean reference"
        else:
            result = evaluate_halves(src, open_source(half_b))
            label = "between halves"
        plot_frc(
            {label: result["frc"]},
            out_json.with_name(out_json.stem + "_frc.png"),
            thresholds=(result["frc_threshold"],),
        )
    record = provenance_record(
        "evaluate",
        {
            "stack": stack,
            "reference": reference,
            "half_b": half_b,
            "truth": truth,
            "threshold": threshold,
        },
    )
    atomic_write_json(out_json, {**result, "provenance": record})
    summary = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    log.info("wrote %s: %s", out_json, ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
