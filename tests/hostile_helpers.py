"""Shared helpers for the hostile-input tests (tests/test_hostile_*.py); not a test module.

- :data:`TALLY` counts the hostile inputs tried, per family, and how each ended: ``refused``
  (a CryosiftError naming the file) or ``accepted`` (a mutation that happened to leave a valid
  file, which the test then checked for consistency). :func:`write_tally` stores the totals as
  JSON (``hostile_tally.json`` under pytest's base temporary folder, or the file named by
  ``CRYOSIFT_HOSTILE_TALLY``) and prints one line per family (visible with ``pytest -s``).
- :func:`expect_refusal` / :func:`outcome`: call something on a hostile input; the only
  acceptable exception is CryosiftError with a one-line message naming the file.
- :func:`cli_refuses`: run the CLI in-process and check exit code 2, one line on stderr and no
  output file (not even a hidden temporary one) left in the output folder.
- :func:`address_space_limit`: cap this process's virtual memory (RLIMIT_AS) for a block, so an
  allocation sized from an unchecked header fails loudly instead of passing unnoticed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryosift.errors import CryosiftError
from sim_helpers import run_cli

#: family -> Counter(tried=..., refused=..., accepted=...)
TALLY: dict[str, Counter] = defaultdict(Counter)


def record(family: str, refused: bool) -> None:
    TALLY[family]["tried"] += 1
    TALLY[family]["refused" if refused else "accepted"] += 1


def write_tally(base: Path) -> Path:
    """Write the totals so far (all families) as JSON and print them; returns the file."""
    target = Path(os.environ.get("CRYOSIFT_HOSTILE_TALLY") or base / "hostile_tally.json")
    totals = {k: dict(v) for k, v in sorted(TALLY.items())}
    tried = sum(v["tried"] for v in TALLY.values())
    refused = sum(v["refused"] for v in TALLY.values())
    doc = {"tried": tried, "refused": refused, "accepted_valid": tried - refused,
           "families": totals}
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nhostile inputs: {tried} tried, {refused} refused, {tried - refused} valid after "
          f"mutation (checked) -> {target}")
    for fam, c in totals.items():
        print(f"  {fam:40s} tried {c.get('tried', 0):5d}  refused {c.get('refused', 0):5d}")
    return target


def check_message(err: CryosiftError, name: str) -> None:
    """One line, naming the file."""
    msg = str(err)
    assert "\n" not in msg, msg
    assert name in msg, f"{name!r} not named in: {msg}"


def outcome(fn: Callable[[], Any], name: str) -> tuple[bool, Any]:
    """(refused, result): run ``fn``; a CryosiftError must name ``name``; any other exception
    type propagates (and fails the test)."""
    try:
        return False, fn()
    except CryosiftError as err:
        check_message(err, name)
        return True, err


def expect_refusal(fn: Callable[[], Any], name: str) -> CryosiftError:
    refused, result = outcome(fn, name)
    assert refused, f"hostile input {name} was accepted: {result!r}"
    return result


def cli(argv: list[str]) -> tuple[int, str]:
    """Exit code and stderr of the CLI run in-process (progress bars off)."""
    err = io.StringIO()
    old = os.environ.get("CRYOSIFT_NO_PROGRESS")
    os.environ["CRYOSIFT_NO_PROGRESS"] = "1"
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = run_cli(argv)
    finally:
        if old is None:
            os.environ.pop("CRYOSIFT_NO_PROGRESS", None)
        else:
            os.environ["CRYOSIFT_NO_PROGRESS"] = old
    return code, err.getvalue()


def cli_refuses(argv: list[str], out_dir: Path, name: str | None = None) -> str:
    """The CLI exits 2 with one 'cryosift: error:' line (naming ``name``) and writes nothing
    into ``out_dir``."""
    before = set(os.listdir(out_dir)) if out_dir.exists() else set()
    code, err = cli(argv)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("cryosift: error: "), err
    if name is not None:
        assert name in lines[0], lines[0]
    after = set(os.listdir(out_dir)) if out_dir.exists() else set()
    assert after == before, f"left behind: {sorted(after - before)}"
    return lines[0]


def _vm_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def address_space_limit(extra: int = 1 << 30) -> Iterator[None]:
    """Lower the soft RLIMIT_AS to the current virtual size + ``extra`` for the block.

    Unprivileged processes may raise a soft limit back up to the hard limit, so this is undone
    on exit. Where /proc is missing (not Linux) the block runs unlimited.
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_bytes() + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
