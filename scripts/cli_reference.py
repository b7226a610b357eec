"""Write docs/CLI.md: the `--help` text of every cryosift command, generated, never hand-edited.

    python scripts/cli_reference.py            # rewrite docs/CLI.md
    python scripts/cli_reference.py --check    # exit 1 if docs/CLI.md is out of date

tests/test_cli_reference.py runs the check, so a changed option cannot leave the reference stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cryosift.cli.main import cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "CLI.md"
#: What the program's group passes down to every command (see cli/main.py).
SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100, "terminal_width": 100}


def _commands(group: click.Group, prefix: list[str]) -> list[tuple[list[str], click.Command]]:
    """Every command under ``group`` (depth first, in the order `--help` lists them)."""
    out: list[tuple[list[str], click.Command]] = []
    ctx = click.Context(group, info_name=" ".join(prefix), **SETTINGS)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        out.append(([*prefix, name], cmd))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, [*prefix, name])
    return out


def _help(path: list[str], cmd: click.Command) -> str:
    ctx = click.Context(cmd, info_name=" ".join(path), **SETTINGS)
    return cmd.get_help(ctx)


def reference() -> str:
    """The whole reference as Markdown."""
    parts = [
        "# cryosift command-line reference",
        "",
        "Generated from `--help` by `python scripts/cli_reference.py`; do not edit by hand.",
        "",
        "## cryosift",
        "",
        "```",
        _help(["cryosift"], cli),
        "```",
    ]
    for path, cmd in _commands(cli, ["cryosift"]):
        parts += ["", f"## {' '.join(path)}", "", "```", _help(path, cmd), "```"]
    return "\n".join(parts) + "\n"


def main(argv: list[str]) -> int:
    text = reference()
    if "--check" in argv:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is out of date: run python scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
