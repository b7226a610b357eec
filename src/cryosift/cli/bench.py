"""`cryosift bench`: the benchmark protocol (B1-B5, P10) on simulated data, JSON and Markdown."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import click

from cryosift.bench.protocol import BENCHMARKS

log = logging.getLogger("cryosift")


@click.command("bench")
@click.argument(
    "which", type=click.Choice([*BENCHMARKS, "all"], case_sensitive=False)
)
@click.option("--quick", is_flag=True, help="Fewer and smaller images: minutes instead of an hour.")
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Output folder: results.json, results.md, protocol.json, figures, data/.",
)
@click.option(
    "--methods",
    default=None,
    help="Only these registered methods, comma-separated (default: all), e.g. "
    "raw,lowpass,wiener_oracle. Oracles of other kinds always run.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
def command(which: str, quick: bool, out_dir: Path, methods: str | None, device: str) -> None:
    """Run the benchmark protocol of SPEC.md on datasets simulated from real atomic models.

    Every registered method is scored beside the baselines and the oracles (Wiener filter with the
    true spectra, nearest clean view, matched filter): B1 denoising vs SNR on GroEL, B2 the
    four-view setting of seed 004, B3 particle-vs-noise screening of seed 000, B4 many views with
    unequal class sizes (seed 001), B5 a realistic dataset with CTF, shifts and structured junk,
    P10 the 10-view phantom on which other tools' denoising figures are known (printed beside).
    Simulated datasets are cached in DIR/data and reused when their parameters are unchanged.

    \b
    Examples:
      cryosift bench B1 --quick -o bench_quick
      cryosift bench all -o bench_full
    """
    from cryosift.bench.report import write_results
    from cryosift.bench.runner import protocol_record, run_benchmarks
    from cryosift.device import select_device
    from cryosift.provenance import provenance_record

    ids = list(BENCHMARKS) if which.lower() == "all" else [which.upper()]
    dev = select_device(device)
    only = None if not methods else [m.strip() for m in methods.split(",") if m.strip()]
    results = run_benchmarks(ids, out_dir, quick=quick, device=str(dev), methods=only)
    cmd = "cryosift " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    protocol = protocol_record(ids, quick)
    write_results(
        results,
        protocol,
        out_dir,
        cmd,
        provenance_record(
            "bench", {"which": which, "quick": quick, "methods": methods, "device": str(dev)}
        ),
    )
    log.info("wrote %s and %s", out_dir / "results.json", out_dir / "results.md")
