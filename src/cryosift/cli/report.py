"""`cryosift report`: one self-contained HTML page about a `cryosift run` folder."""

from __future__ import annotations

import logging
from pathlib import Path

import click

log = logging.getLogger("cryosift")


@click.command("report")
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    "out_path",
    default=None,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Output HTML file  [default: RUN_DIR/report.html].",
)
def command(run_dir: Path, out_path: Path | None) -> None:
    """Write one self-contained HTML report of a pipeline run folder (RUN_DIR/run.json).

    Every figure is embedded, so the file opens offline and can be mailed or archived: the
    input, denoised and clean images side by side with FRC curves and image metrics; screening
    scores with the kept and rejected images; the class averages by size with their counts;
    confusion matrices and metrics where the run has ground truth; and each stage's
    parameters, status and time. Stages that did not run are named as such.

    \b
    Examples:
      cryosift report run_out
      cryosift report run_out -o ~/reports/run_out.html
    """
    from cryosift.report.html import build_report

    path = build_report(run_dir, out_path)
    click.echo(f"report: {path}")
