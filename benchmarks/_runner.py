"""Run the cryosift CLI in a fresh process and report its own wall time and peak RSS."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

_WRAPPER = (
    "import resource, sys\n"
    "from cryosift.cli.main import main\n"
    "code = main(sys.argv[1:])\n"
    "print('CRYOSIFT_MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
    " file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def run_cli(*args: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of `cryosift ARGS` in its own process; exits on failure."""
    env = {**os.environ, "CRYOSIFT_NO_PROGRESS": "1"}
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *args], env=env, capture_output=True, text=True
    )
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"cryosift {' '.join(args)} failed:\n{proc.stderr}")
    match = re.search(r"CRYOSIFT_MAXRSS_KB (\d+)", proc.stderr)
    return wall, (int(match.group(1)) / 1024 if match else float("nan"))
