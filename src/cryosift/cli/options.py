"""Command-line options shared by several subcommands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from cryosift.engine import SCHEDULER_HELP, WORKERS_HELP

__all__ = ["engine_options"]


def engine_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--scheduler`` and ``--workers`` (where the per-image chunks run; cryosift.engine)."""
    fn = click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help=WORKERS_HELP,
    )(fn)
    fn = click.option(
        "--scheduler",
        default="auto",
        show_default=True,
        metavar="auto|threads|local|tcp://HOST:PORT|FILE.json",
        envvar="CRYOSIFT_SCHEDULER",
        help=SCHEDULER_HELP + " Also set by CRYOSIFT_SCHEDULER.",
    )(fn)
    return fn
