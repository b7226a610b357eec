"""The parameters of `cryosift run`: one dataclass, mirrored by the CLI flags and a TOML file.

A config file holds a flat table of the same keys as :class:`RunConfig` (``denoise = "n2v"``,
``classes = 20``, ...); unknown keys and values of the wrong type are refused with one line that
names the file. Precedence: defaults < config file < flags given on the command line. Every run
writes its effective config to ``OUT/config.toml``, which reruns it as it was.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from cryosift.errors import CryosiftError, InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["DENOISE_FITTED", "DENOISE_TRAINED", "RunConfig", "read_config", "to_toml"]

#: Denoising choices that train a network on the data itself.
DENOISE_TRAINED = ("n2v", "n2n")
#: Denoising choices that fit on the data itself without a network (the covariance Wiener filter).
DENOISE_FITTED = ("cwf",)


@dataclass
class RunConfig:
    """Everything that decides a pipeline run (recorded in run.json and config.toml)."""

    input: str = ""  # particles.star (RELION 3.0/3.1) or a .mrcs stack
    out: str = "cryosift_run"
    pairs: str | None = None  # second independent half of every image (even/odd frame sums)
    pixel_size: float | None = None  # Å/px, overrides what the input states
    normalize: bool = True  # RELION-style: background mean 0, sigma 1 outside a circle
    # denoise: auto (n2n with --pairs, else n2v, trained on the data), n2v, n2n, cwf (the
    # covariance Wiener filter, fitted on the data), none, a shipped model name (e.g. general)
    # or a model folder from `cryosift denoise train`
    denoise: str = "auto"
    # what n2n / n2v training starts from: a model to fine-tune (the shipped general one by
    # default; a name or folder) or "none" (random weights, as seeds 002/003 train)
    denoise_init: str = "general"
    denoise_epochs: int = 10
    denoise_steps_per_epoch: int = 100
    denoise_max_images: int = 5000  # train on at most this many images (a random subset)
    denoise_tta: bool = False  # average over the 8 rotations and flips (8x the apply compute)
    denoise_sure: bool = False  # add the SURE-fitted output stage (cryosift.denoise.sure)
    # screen: auto (train when screen_labels or good_classes is given, else none), none,
    # or a model folder from `cryosift screen train`
    screen: str = "auto"
    screen_method: str = "cnn"  # what auto trains: cnn or rbm
    screen_labels: str | None = None  # STAR with a 0/1 column (screen_label_column)
    screen_label_column: str = "cryosiftIsParticle"
    screen_classes: str | None = None  # a classified STAR (_rlnClassNumber) ...
    good_classes: str | None = None  # ... and its particle classes, e.g. "1,4,7"
    threshold: float | None = None  # keep images scoring >= this (default 0.5)
    keep_fraction: float | None = None  # or keep this fraction of best-scoring images
    classes: int = 20  # K; "0" skips classification
    classify_method: str = "align2d"
    classify_features: str = "pca"  # for kmeans / hierarchical / bskmeans
    psi_step: float = 10.0
    iterations: int = 10
    align_box: int = 32
    seed: int = 0
    device: str = "auto"
    chunk_size: int = 256

    def validate(self) -> None:
        """Refuse impossible values before anything runs (one line each)."""
        if not self.input:
            raise CryosiftError("no input: give a particles STAR file or an .mrcs stack")
        if self.pixel_size is not None and not (
            math.isfinite(self.pixel_size) and self.pixel_size > 0
        ):
            raise CryosiftError(f"pixel_size must be positive, got {self.pixel_size}")
        if self.denoise in DENOISE_TRAINED or self.denoise == "auto":
            if self.denoise == "n2n" and self.pairs is None:
                raise CryosiftError("denoise n2n needs pairs (the second half of every image)")
        for name in ("denoise_epochs", "denoise_steps_per_epoch", "denoise_max_images",
                     "iterations", "chunk_size"):
            if int(getattr(self, name)) < 1:
                raise CryosiftError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.screen_method not in ("cnn", "rbm"):
            raise CryosiftError(f"screen_method must be cnn or rbm, got {self.screen_method!r}")
        if self.screen_labels is not None and self.good_classes is not None:
            raise CryosiftError(
                "give screen_labels or good_classes (with screen_classes), not both"
            )
        if (self.good_classes is None) != (self.screen_classes is None):
            raise CryosiftError("good_classes and screen_classes go together")
        if self.screen == "none" and (self.screen_labels or self.good_classes):
            raise CryosiftError("screen = none, but a screening training set was given")
        if self.threshold is not None and self.keep_fraction is not None:
            raise CryosiftError("give threshold or keep_fraction, not both")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise CryosiftError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:
            raise CryosiftError(f"keep_fraction must lie in (0, 1], got {self.keep_fraction}")
        if self.classes < 0 or self.classes == 1:
            raise CryosiftError(
                f"classes must be 0 (no classification) or >= 2, got {self.classes}"
            )
        if not 0 < self.psi_step <= 90:
            raise CryosiftError(f"psi_step must lie in (0, 90] degrees, got {self.psi_step}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS = {f.name: f for f in fields(RunConfig)}


def _coerce(key: str, value: Any, path: Path) -> Any:
    """A TOML value checked against the field's type (int for float fields is fine)."""
    kind = str(_FIELDS[key].type)
    optional = "None" in kind
    if optional and value in ("", "none", "None"):
        return None
    if kind.startswith("bool"):
        ok = isinstance(value, bool)
    elif kind.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:  # str
        ok = isinstance(value, str)
    if not ok:
        want = kind.replace(" | None", "")
        raise InputError(f"config key '{key}' must be a {want}, got {value!r}", path)
    return value


def read_config(path: str | Path) -> dict[str, Any]:
    """The keys of a TOML config file, checked against :class:`RunConfig`."""
    path = Path(path)
    if not path.is_file():
        raise InputError("config file does not exist", path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"not a valid TOML file ({' '.join(str(err).split())})", path) from err
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise InputError(
            f"unknown config key(s) {', '.join(unknown)}; known keys: {', '.join(_FIELDS)}", path
        )
    return {k: _coerce(k, v, path) for k, v in data.items()}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def to_toml(cfg: RunConfig) -> str:
    """The config as a flat TOML table (keys that are None are left out: they mean default)."""
    lines = ["# cryosift run configuration (rerun: cryosift run --config this-file)"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in cfg.to_dict().items() if v is not None]
    return "\n".join(lines) + "\n"
