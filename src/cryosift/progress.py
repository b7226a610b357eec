"""Progress bars for long work (tqdm on stderr); CRYOSIFT_NO_PROGRESS=1 silences them."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it"
) -> Iterator[T]:
    """Wrap an iterable in a progress bar unless progress output is switched off."""
    disable = os.environ.get("CRYOSIFT_NO_PROGRESS", "") not in ("", "0")
    yield from tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=disable,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5,
    )
