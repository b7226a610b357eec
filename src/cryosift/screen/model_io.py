"""Saving and loading screeners: weights (state_dict) + a plain description, never pickled objects.

``MODEL_DIR/model.pt`` holds {"format", "format_version", "meta", "state_dict"}; ``model.json``
beside it repeats the metadata readably: method, architecture, box and pixel size of the training
images, the preprocessing, the calibration, the training configuration and summary. Loading uses
``torch.load(weights_only=True)`` (a malicious checkpoint cannot run code), and every failure —
missing, corrupt, another kind of model, weights that do not fit the architecture or the box —
is a one-line InputError naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cryosift.errors import CryosiftError, InputError
from cryosift.io.atomic import atomic_write_json, staged_folder, to_jsonable
from cryosift.screen.preprocess import PreprocessConfig
from cryosift.screen.screener import Screener, build_network

FORMAT = "cryosift-screener"
FORMAT_VERSION = 1


def model_meta(s: Screener) -> dict[str, Any]:
    """The JSON-ready description saved with the weights."""
    return {
        "method": s.method,
        "architecture": s.arch,
        "box": int(s.box),
        "pixel_size": s.pixel_size,
        "preprocess": s.preprocess.to_dict(),
        "calibration": s.calibration,
        "train_config": s.train_config,
        "training": {k: v for k, v in s.info.items() if k != "history"},
        "history": s.info.get("history", []),
    }


def _plain(obj: Any) -> Any:
    """Plain JSON types only (str subclasses such as torch's version string too), so that
    ``weights_only`` loading accepts the metadata."""
    return json.loads(json.dumps(to_jsonable(obj)))


def save_screener(model_dir: str | Path, s: Screener, provenance: dict | None = None) -> Path:
    """Write MODEL_DIR/model.pt, model.json (and screen_train.json with a provenance record)
    all or nothing; returns the .pt path."""
    folder = Path(model_dir)
    if folder.exists() and not folder.is_dir():
        raise InputError("model output exists and is not a folder", folder)
    meta = _plain(model_meta(s))
    if provenance is not None:
        meta["provenance"] = _plain(provenance)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": meta,
        "state_dict": {k: v.detach().cpu() for k, v in s.net.state_dict().items()},
    }
    with staged_folder(folder) as tmp:
        torch.save(payload, tmp / "model.pt")
        atomic_write_json(tmp / "model.json", meta)
        if provenance is not None:
            atomic_write_json(tmp / "screen_train.json", meta["provenance"])
    return folder / "model.pt"


def _read(path: Path) -> Any:
    if not path.is_file():
        raise InputError("screening model not found (expected a folder holding model.pt)", path)
    from cryosift.denoise.model_io import read_weights_file

    return read_weights_file(path)  # zip-bomb checks, weights_only, one-line errors


def model_path(model: str | Path) -> Path:
    p = Path(model)
    return p / "model.pt" if p.is_dir() else p


def load_screener(model: str | Path, device: torch.device | str = "cpu") -> Screener:
    """A saved screener (folder or model.pt), in eval mode on ``device``."""
    path = model_path(model)
    payload = _read(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError("not a cryosift screening model (format tag missing)", path)
    if int(payload.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError("screening model written by a newer cryosift", path)
    meta = payload.get("meta") or {}
    try:
        method = str(meta["method"])
        arch = dict(meta["architecture"])
        box = int(meta["box"])
        prep = PreprocessConfig.from_dict(meta["preprocess"])
        net = build_network(method, arch)
        net.load_state_dict(payload["state_dict"])
    except CryosiftError as exc:
        raise InputError(str(exc), path) from exc
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"weights do not fit the saved architecture ({first})", path) from exc
    if method == "rbm" and int(arch["n_visible"]) != prep.out_box(box) ** 2:
        raise InputError(
            f"the RBM has {arch['n_visible']} visible units, which does not match its recorded "
            f"box of {box} px (working box {prep.out_box(box)} px)",
            path,
        )
    s = Screener(
        method=method,
        net=net,
        box=box,
        pixel_size=meta.get("pixel_size"),
        preprocess=prep,
        arch=arch,
        calibration=dict(meta.get("calibration") or {"a": 1.0, "b": 0.0}),
        train_config=dict(meta.get("train_config") or {}),
        info=dict(meta.get("training") or {}),
    )
    return s.to(device)
