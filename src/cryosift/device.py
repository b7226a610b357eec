"""The one place that chooses the compute device.

`auto` picks CUDA, then Apple MPS, then the CPU, and says which. A device the user asked for by
name that is not there is an error, never a silent fallback to the CPU.
"""

from __future__ import annotations

import logging

import torch

from cryosift.errors import CryosiftError

log = logging.getLogger("cryosift")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def select_device(name: str | None = "auto") -> torch.device:
    """Resolve `auto`, `cpu`, `cuda`, `cuda:N` or `mps` to an available torch device."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            dev = torch.device("cuda")
        elif _mps_available():
            dev = torch.device("mps")
        else:
            dev = torch.device("cpu")
        log.info("device: %s (auto)", describe_device(dev))
        return dev
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise CryosiftError(
            f"--device {name!r} is not a device name (use auto, cpu, cuda, cuda:N, mps)"
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CryosiftError(f"--device {name}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CryosiftError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    elif dev.type == "mps" and not _mps_available():
        raise CryosiftError(f"--device {name}: Apple MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise CryosiftError(f"--device {name}: unsupported device type {dev.type!r}")
    log.info("device: %s", describe_device(dev))
    return dev


def describe_device(dev: torch.device) -> str:
    """Human-readable device description for logs and provenance records."""
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    if dev.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return dev.type
