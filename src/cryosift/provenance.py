"""What produced an output: version, resolved parameters, command line, time, platform."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any

from cryosift import __version__


def provenance_record(command: str, parameters: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A JSON-ready record written beside every output (`<command>.json` in the output folder)."""
    import numpy
    import torch

    record: dict[str, Any] = {
        "program": "cryosift",
        "version": __version__,
        "command": command,
        "argv": list(sys.argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": numpy.__version__,
        "torch": torch.__version__,
        "parameters": {k: _plain(v) for k, v in parameters.items()},
    }
    record.update({k: _plain(v) for k, v in extra.items()})
    return record


def _plain(value: Any) -> Any:
    """Turn paths, tuples and numpy scalars into JSON-friendly values."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (ValueError, TypeError):
            return value
    return value
