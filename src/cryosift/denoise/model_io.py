"""Saving and loading denoisers: state_dict + architecture config, never pickled whole models.

Files are read with `torch.load(weights_only=True)`, which refuses arbitrary pickled objects, so a
malicious checkpoint cannot run code; every failure becomes a one-line InputError naming the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cryosift.denoise.networks import build_network
from cryosift.errors import InputError
from cryosift.io.atomic import atomic_path, atomic_write_json

FORMAT = "cryosift-denoiser"
FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically (a crash never leaves a half-written file)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load(path: Path) -> Any:
    if not path.is_file():
        raise InputError("model file not found", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"refused to load: not a plain weights file ({str(exc).splitlines()[0]})", path
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as exc:
        raise InputError(f"unreadable or corrupt model file ({exc})", path) from exc


def load_checkpoint(path: Path) -> dict[str, Any]:
    ck = _load(Path(path))
    if not isinstance(ck, dict) or "model" not in ck or "train_config" not in ck:
        raise InputError("not a cryosift training checkpoint", path)
    return ck


def save_model(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """model.pt (weights + metadata) and model.json (the same metadata, readable) side by side."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": meta,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    atomic_write_json(Path(path).with_suffix(".json"), meta)


def resolve_model_path(model: str | Path) -> Path:
    """A model folder (holding model.pt), a .pt file, or the name of a shipped model."""
    p = Path(model)
    if p.is_dir():
        return p / "model.pt"
    if p.suffix == ".pt" or p.exists():
        return p
    from importlib import resources

    shipped = Path(str(resources.files("cryosift") / "data" / "models" / f"{model}.pt"))
    if shipped.is_file():
        return shipped
    raise InputError("no such model folder, file or shipped model name", model)


def load_model(model: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """(network in eval mode on `device`, its metadata) from a folder, file or shipped name."""
    path = resolve_model_path(model)
    payload = _load(path)
    from cryosift.denoise import cdae

    if isinstance(payload, dict) and payload.get("format") == cdae.FORMAT:
        return cdae.load_cdae(path, device)  # a (fine-tuned or pre-trained) cascade
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError("not a cryosift denoiser model (format tag missing)", path)
    meta = payload.get("meta") or {}
    try:
        net = build_network(meta["architecture"])
        net.load_state_dict(payload["state_dict"])
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"weights do not fit the saved architecture ({first})", path) from exc
    return net.to(device).eval(), meta
