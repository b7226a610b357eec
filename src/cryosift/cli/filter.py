"""`cryosift filter`: classic image filters, chained in command-line order, on a STAR or stack."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from cryosift.cli.options import engine_options
from cryosift.errors import CryosiftError

log = logging.getLogger("cryosift")

_ORDER_KEY = "cryosift_filter_order"
#: options that add a filter to the chain (in the order they appear on the command line)
_FILTER_OPTIONS = (
    "lowpass",
    "highpass",
    "gaussian",
    "median",
    "bilateral",
    "histeq",
    "clahe",
    "normalize",
    "invert",
    "phase_flip",
    "wiener",
)
#: options that tune a filter, and the filter option they need
_TUNING = {
    "lowpass_kind": "lowpass",
    "highpass_kind": "highpass",
    "bilateral_sigma_spatial": "bilateral",
    "bilateral_sigma_range": "bilateral",
    "bilateral_window": "bilateral",
    "clahe_clip": "clahe",
    "clahe_kernel": "clahe",
    "bg_radius": "normalize",
    "no_ramp": "normalize",
}


def _record(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Remember the command-line position of every filter option that was given.

    click processes parameters in the order they were typed, so appending here yields the
    chain order.
    """
    given = ctx.get_parameter_source(param.name) in (
        ParameterSource.COMMANDLINE,
        ParameterSource.ENVIRONMENT,
    )
    if given and value is not None and value is not False:  # 0 is a value (refused later)
        ctx.meta.setdefault(_ORDER_KEY, []).append(param.name)
    return value


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


class _FilterCommand(click.Command):
    """Keeps the raw arguments so that a filter option given twice can be refused (click would
    silently keep the last value)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["cryosift_raw_args"] = list(args)
        return super().parse_args(ctx, args)


def _refuse_repeats(ctx: click.Context) -> None:
    raw = ctx.meta.get("cryosift_raw_args", [])
    for name in _FILTER_OPTIONS:
        flag = _flag_name(name)
        if sum(a == flag or a.startswith(flag + "=") for a in raw) > 1:
            raise CryosiftError(
                f"{flag} is given more than once; each filter appears once in a chain "
                "(run cryosift filter again on the output for a second pass)"
            )


def _build(name: str, opts: dict[str, Any]) -> Any:
    """The filter object for one chain entry."""
    from cryosift.filters import make_filter

    if name == "lowpass":
        return make_filter(
            "lowpass",
            cutoff_A=opts["lowpass"],
            kind=opts["lowpass_kind"],
            order=opts["butterworth_order"],
        )
    if name == "highpass":
        return make_filter(
            "highpass",
            cutoff_A=opts["highpass"],
            kind=opts["highpass_kind"],
            order=opts["butterworth_order"],
        )
    if name == "gaussian":
        return make_filter("gaussian", sigma_px=opts["gaussian"])
    if name == "median":
        return make_filter("median", size_px=opts["median"])
    if name == "bilateral":
        return make_filter(
            "bilateral",
            sigma_spatial_px=opts["bilateral_sigma_spatial"],
            sigma_range=opts["bilateral_sigma_range"],
            window_px=opts["bilateral_window"],
        )
    if name == "histeq":
        return make_filter("histeq")
    if name == "clahe":
        return make_filter("clahe", clip_limit=opts["clahe_clip"], kernel_size=opts["clahe_kernel"])
    if name == "normalize":
        return make_filter("normalize", radius_px=opts["bg_radius"], ramp=not opts["no_ramp"])
    if name == "invert":
        return make_filter("invert")
    if name == "phase_flip":
        return make_filter("phaseflip")
    if name == "wiener":
        return make_filter("wiener", snr=opts["wiener"])
    raise AssertionError(name)  # pragma: no cover


def _chain(ctx: click.Context, opts: dict[str, Any]) -> Any:
    from cryosift.filters import FilterChain

    _refuse_repeats(ctx)
    order: list[str] = list(ctx.meta.get(_ORDER_KEY, []))
    if not order:
        raise CryosiftError(
            "no filter given: add at least one of "
            + ", ".join(_flag_name(n) for n in _FILTER_OPTIONS)
        )
    for tuning, needs in _TUNING.items():
        if ctx.get_parameter_source(tuning) is ParameterSource.COMMANDLINE and needs not in order:
            raise CryosiftError(f"{_flag_name(tuning)} only applies with {_flag_name(needs)}")
    if ctx.get_parameter_source("butterworth_order") is ParameterSource.COMMANDLINE and not any(
        opts[k] == "butterworth" for k in ("lowpass_kind", "highpass_kind")
    ):
        raise CryosiftError(
            "--butterworth-order only applies with --lowpass-kind/--highpass-kind butterworth"
        )
    return FilterChain([_build(name, opts) for name in order])


_KINDS = click.Choice(["gaussian", "butterworth", "hard"], case_sensitive=False)


@click.command("filter", cls=_FilterCommand)
@click.argument("source", metavar="IN", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    "out_star",
    required=True,
    type=click.Path(path_type=Path),
    help="Output STAR file; the filtered stack is written beside it as OUT.mrcs "
    "and the provenance as OUT_filter.json.",
)
@click.option(
    "--lowpass",
    type=float,
    default=None,
    callback=_record,
    metavar="A",
    help="Low-pass filter with the cutoff at this resolution (Å).",
)
@click.option(
    "--lowpass-kind",
    type=_KINDS,
    default="gaussian",
    show_default=True,
    help="Gaussian: H(kc)=0.5; Butterworth: H(kc)=1/sqrt(2); hard: disk.",
)
@click.option(
    "--highpass",
    type=float,
    default=None,
    callback=_record,
    metavar="A",
    help="High-pass filter (removes ice gradients and the mean) with the cutoff at "
    "this resolution (Å).",
)
@click.option(
    "--highpass-kind",
    type=_KINDS,
    default="gaussian",
    show_default=True,
    help="Shape of the high-pass (complement of the low-pass shapes).",
)
@click.option(
    "--butterworth-order",
    type=int,
    default=8,
    show_default=True,
    help="Order of the Butterworth filters.",
)
@click.option(
    "--gaussian",
    type=float,
    default=None,
    callback=_record,
    metavar="SIGMA_PX",
    help="Real-space Gaussian blur with this σ in pixels.",
)
@click.option(
    "--median",
    type=int,
    default=None,
    callback=_record,
    metavar="SIZE",
    help="Median filter over SIZE x SIZE pixels (odd, >= 3).",
)
@click.option(
    "--bilateral",
    is_flag=True,
    callback=_record,
    help="Edge-preserving bilateral filter (seed 000 preprocessing).",
)
@click.option(
    "--bilateral-sigma-spatial",
    type=float,
    default=2.0,
    show_default=True,
    metavar="PX",
    help="Bilateral spatial σ in pixels.",
)
@click.option(
    "--bilateral-sigma-range",
    type=float,
    default=1.0,
    show_default=True,
    metavar="R",
    help="Bilateral range σ in units of each image's noise σ.",
)
@click.option(
    "--bilateral-window",
    type=int,
    default=None,
    metavar="PX",
    help="Bilateral window in pixels, odd [default: max(5, 2*ceil(3σ)+1)].",
)
@click.option(
    "--histeq",
    is_flag=True,
    callback=_record,
    help="Global histogram equalisation per image (output in [0, 1]).",
)
@click.option(
    "--clahe",
    is_flag=True,
    callback=_record,
    help="Contrast-limited adaptive histogram equalisation (output in [0, 1]).",
)
@click.option(
    "--clahe-clip",
    type=float,
    default=0.01,
    show_default=True,
    metavar="C",
    help="CLAHE clip limit in (0, 1].",
)
@click.option(
    "--clahe-kernel",
    type=int,
    default=None,
    metavar="PX",
    help="CLAHE tile size in pixels [default: 1/8 of the box].",
)
@click.option(
    "--normalize",
    is_flag=True,
    callback=_record,
    help="RELION normalisation: background mean 0, σ 1 outside --bg-radius.",
)
@click.option(
    "--bg-radius",
    type=float,
    default=None,
    metavar="PX",
    help="Background radius in pixels [default: RELION's ROUND(0.375 * box)].",
)
@click.option(
    "--no-ramp",
    is_flag=True,
    help="Normalise without subtracting a plane fitted to the background.",
)
@click.option("--invert", is_flag=True, callback=_record, help="Invert the contrast (x -> -x).")
@click.option(
    "--phase-flip",
    is_flag=True,
    callback=_record,
    help="CTF phase flip (needs a STAR file with CTF columns).",
)
@click.option(
    "--wiener",
    type=float,
    default=None,
    callback=_record,
    metavar="SNR",
    help="Wiener CTF correction, CTF/(CTF^2 + 1/SNR) (needs CTF columns).",
)
@click.option(
    "--pixel-size",
    type=float,
    default=None,
    metavar="A",
    help="Pixel size in Å, overriding what the input states.",
)
@click.option(
    "--chunk-size",
    type=int,
    default=256,
    show_default=True,
    help="Images read, filtered and written at a time (bounds memory); one task per chunk "
    "on a Dask cluster.",
)
@engine_options
@click.pass_context
def command(ctx: click.Context, source: Path, out_star: Path, **opts: Any) -> None:
    """Apply classic image filters to a particle STAR file or an .mrcs stack.

    Filters run in the order their options appear on the command line, so
    `--histeq --lowpass 20` equalises first and `--lowpass 20 --histeq` low-passes first;
    each filter appears at most once. The output STAR keeps every input column and the optics
    table (pixel size included) and points rlnImageName at OUT.mrcs.

    \b
    Examples:
      # seed-000 preprocessing: bilateral filter, then histogram equalisation
      cryosift filter particles.star -o pre.star --bilateral --histeq
      # RELION-style normalisation, then a 20 Å Butterworth low-pass
      cryosift filter particles.star -o lp.star --normalize --lowpass 20 \\
          --lowpass-kind butterworth
      # CTF phase flip, then a light Gaussian blur; a 3x3 median of a bare stack
      cryosift filter particles.star -o pf.star --phase-flip --gaussian 1.5
      cryosift filter stack.mrcs -o med.star --median 3 --pixel-size 1.3
    """
    from cryosift.filters import apply_filter_to_source

    chain = _chain(ctx, opts)
    if not source.exists():
        raise CryosiftError("input file does not exist", source)
    out = apply_filter_to_source(
        source, chain, out_star, chunk_size=opts["chunk_size"], pixel_size=opts["pixel_size"],
        scheduler=opts["scheduler"], workers=opts["workers"],
    )
    log.info(
        "filtered %s with %s -> %s (+ %s)",
        source,
        " -> ".join(f.name for f in chain.filters),
        out,
        out.with_suffix(".mrcs").name,
    )
