"""Where the project's shared real data (atomic models, maps, RELION particle files) lives.

`CRYOSIFT_SHARED_DATA` names it explicitly; otherwise the first `shared/data` folder found beside
the checkout or in one of its parents (the project keeps it at ../shared/data). Tests that need
it skip with a clear reason where it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path:
    env = os.environ.get("CRYOSIFT_SHARED_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return here.parents[2] / "shared" / "data"


SHARED_DATA = shared_data_dir()
