"""The `cryosift` program: one click group, one thin module per subcommand.

Errors in the input (CryosiftError) become one line on stderr and exit code 2; nothing else is
printed, and no partial output is left behind (every writer is atomic).
"""

from __future__ import annotations

import logging
import sys

import click

from cryosift import __version__
from cryosift.errors import CryosiftError
from cryosift.malloc import keep_freed_memory


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="cryosift")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """cryosift: simulate, denoise, screen, classify and measure single-particle cryo-EM images.

    \b
    Quick start:
      cryosift demo -o demo_out
      cryosift simulate model.pdb -o sim --n-images 2000 --box 128 --pixel-size 1.5 --snr 0.05
      cryosift evaluate sim/particles.star --reference sim/clean.mrcs -o sim/raw_eval.json
    """
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


def _register() -> None:
    from cryosift.cli import bench, classify, demo, denoise, evaluate, report, run, screen, simulate
    from cryosift.cli import filter as filter_cli

    for module in (simulate, filter_cli, denoise, screen, classify, evaluate, bench, run, demo,
                   report):
        cli.add_command(module.command)


_register()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the CLI, turn known errors into one line and an exit code."""
    keep_freed_memory()  # torch's per-batch temporaries then cost no page faults (malloc.py)
    try:
        cli.main(args=argv, prog_name="cryosift", standalone_mode=False)
    except CryosiftError as exc:
        click.echo("cryosift: error: " + " ".join(str(exc).split()), err=True)  # one line
        return 2
    except click.exceptions.Abort:
        click.echo("cryosift: aborted", err=True)
        return 130
    except click.UsageError as exc:  # unknown option, missing argument: one line, like ours
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        click.echo(f"cryosift: error: {' '.join(exc.format_message().split())}{hint}", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("cryosift: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
