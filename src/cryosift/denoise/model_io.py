"""Saving and loading denoisers: state_dict + architecture config, never pickled whole models.

Files are read with `torch.load(weights_only=True)`, which refuses arbitrary pickled objects, so a
malicious checkpoint cannot run code; every failure becomes a one-line InputError naming the file.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
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


def _check_zip(path: Path) -> None:
    """Refuse a zip whose entries would inflate beyond the file (a zip bomb) before torch reads
    it: torch writes its entries uncompressed, so every entry must be stored and together they
    fit in the file. Only the zip directory is read; nothing is allocated from its sizes."""
    try:
        with zipfile.ZipFile(path) as zf:
            entries = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise InputError(f"unreadable or corrupt model file (bad zip: {exc})", path) from exc
    size = path.stat().st_size
    for e in entries:
        if e.compress_type != zipfile.ZIP_STORED:
            raise InputError(f"refused to load: entry {e.filename!r} is compressed (torch never "
                             "compresses; a zip bomb?)", path)
    declared = sum(e.file_size for e in entries)
    if declared > size:
        raise InputError(f"refused to load: entries declare {declared} bytes but the file holds "
                         f"{size}", path)


def read_weights_file(path: Path) -> Any:
    """torch.load(weights_only=True) behind the zip checks; every failure one InputError.
    Shared by every model file cryosift reads (denoisers, cascades, screeners)."""
    if not path.is_file():
        raise InputError("model file not found", path)
    try:  # is_zipfile itself raises on some damaged end records (e.g. a multi-disk flag)
        is_zip = zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise InputError(f"unreadable or corrupt model file (bad zip: {exc})", path) from exc
    if is_zip:
        _check_zip(path)
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols: noise here
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = " ".join(str(exc).split())
        why = text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]
        raise InputError(
            f"refused to load: not a plain weights file ({why.strip() or 'unpickling failed'})",
            path,
        ) from exc
    except Exception as exc:  # torch's readers raise many types on damaged files
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(f"unreadable or corrupt model file ({detail})", path) from exc


_load = read_weights_file


def _check_weights(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """The saved weights: a non-empty dict of names to finite real floating-point tensors."""
    if not isinstance(state, dict) or not state:
        raise InputError("no weights in the model file (state_dict missing or empty)", path)
    for name, t in state.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise InputError(f"weights entry {name!r} is not a named tensor", path)
        if not t.is_floating_point():
            raise InputError(f"weights {name} have dtype {t.dtype}, not real floating point",
                             path)
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"weights {name} hold NaN or infinite values", path)
    return state


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
    if not isinstance(meta, dict) or not isinstance(meta.get("architecture"), dict):
        raise InputError("model metadata has no architecture", path)
    state = _check_weights(payload.get("state_dict"), path)
    try:
        # the architecture comes from the file: build it on the meta device (no memory, however
        # large it claims to be), then take the file's own tensors, checked name by name and
        # shape by shape; memory therefore never exceeds what the file holds
        with torch.device("meta"):
            net = build_network(meta["architecture"])
        net.load_state_dict(state, assign=True)
        net = net.float().to(device)
    except Exception as exc:  # bad config values raise TypeError/ValueError/OverflowError...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"weights do not fit the saved architecture ({first})", path) from exc
    return net.eval(), meta
