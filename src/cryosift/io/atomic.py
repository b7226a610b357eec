"""Atomic file output: write to a hidden temporary name in the target folder, then rename.

A reader (or a crashed run) never sees a half-written file: the final name either holds the
previous complete file or the new complete file. The temporary file lives in the same folder so
that ``os.replace`` is a same-filesystem rename.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cryosift.errors import CryosiftError, OutputError

__all__ = [
    "atomic_path", "atomic_write_json", "atomic_write_text", "final_path_for", "output_error",
    "staged_folder", "temp_path_for",
]

_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-\d+-[0-9a-f]{8}")


def temp_path_for(final: str | Path) -> Path:
    """A fresh hidden temporary name next to ``final`` that keeps its suffix.

    ``out/particles.mrcs`` -> ``out/.particles.mrcs.tmp-<pid>-<random>.mrcs``; the suffix is kept
    so that libraries which look at it (mrcfile, starfile) behave as for the final name.
    """
    final = Path(final)
    while True:
        tmp = final.with_name(
            f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{final.suffix}"
        )
        if not tmp.exists():
            return tmp


def final_path_for(path: str | Path) -> Path:
    """The final name a :func:`temp_path_for` name stands for (other paths are returned as
    given), so that error messages name the file the user asked for."""
    path = Path(path)
    while (m := _TEMP_NAME.match(path.name)) is not None:  # a temporary of a temporary, too
        path = path.with_name(m.group("name"))
    return path


def output_error(err: OSError, path: str | Path) -> OutputError:
    """A one-line OutputError for a failed write (disk full, permission denied, ...)."""
    why = err.strerror or " ".join(str(err).split()) or type(err).__name__
    return OutputError(
        f"cannot write ({why}); nothing was saved and any previous file is kept",
        final_path_for(path),
    )


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto ``final`` when the block succeeds.

    The parent folder is created. If the block raises (including KeyboardInterrupt) the
    temporary file is removed and whatever was at ``final`` before is left untouched; an
    OSError (disk full, no permission) becomes a one-line :class:`OutputError` naming ``final``.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(err, final) from err
    tmp = temp_path_for(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, CryosiftError):
            raise output_error(exc, final) from exc
        raise


@contextmanager
def staged_folder(final: str | Path) -> Iterator[Path]:
    """Yield a hidden staging folder beside ``final``; move its files into ``final`` on success.

    A failed or interrupted block leaves ``final`` as it was (staging removed), so a folder of
    outputs is either the previous one or the complete new one, file by file.
    """
    import shutil

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.staging-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        final.mkdir(exist_ok=True)
        for item in sorted(staging.iterdir()):
            os.replace(item, final / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, paths and tuples (also inside dicts/lists) to JSON types."""
    if isinstance(obj, dict):
        return {_json_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def _json_key(key: Any) -> Any:
    """Dict keys: numpy scalars become Python scalars, paths become strings."""
    if isinstance(key, np.generic):
        return key.item()
    if isinstance(key, os.PathLike):
        return os.fspath(key)
    return key


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (key order kept) atomically; numpy values are converted."""
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=False)
    atomic_write_text(path, text + "\n")
