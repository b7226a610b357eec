"""Training sets for screeners, the way users have them.

* two stacks or STAR files, one of particles and one of junk (``--positives`` / ``--negatives``);
* one STAR file with a 0/1 label column (``--labels``; ``_cryosiftIsParticle`` by default);
* one STAR file from a 2D classification: particles of the good classes are positives
  (``--good-classes 1,4,7`` on ``_rlnClassNumber``); the rest, or only ``--bad-classes`` when
  given, are negatives — the seed's recipe (best and worst RELION 2D classes).

Every loader returns a :class:`TrainingSet` (images in memory: training sets are the small,
high-confidence part of a dataset; ``max_per_class`` bounds them) and refuses sets holding one
class only, labels that are not 0/1, missing columns and stacks of different box sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cryosift.errors import InputError
from cryosift.io import open_source
from cryosift.io.source import ImageSource
from cryosift.screen.screener import check_labels

DEFAULT_LABEL_COLUMN = "cryosiftIsParticle"


@dataclass
class TrainingSet:
    """Images (N, box, box) float32, labels (N,) 0/1, pixel size, and where they came from."""

    images: np.ndarray
    labels: np.ndarray
    pixel_size: float | None
    description: str

    @property
    def box(self) -> int:
        return int(self.images.shape[-1])

    @property
    def counts(self) -> dict[str, int]:
        return {"particles": int(self.labels.sum()), "junk": int((1 - self.labels).sum())}


def _subset(n: int, max_n: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_n is None or n <= max_n:
        return np.arange(n)
    return np.sort(rng.choice(n, int(max_n), replace=False))


def _column(df: pd.DataFrame, name: str, path: Path) -> pd.Series:
    """A STAR column by name, with or without the leading underscore."""
    key = name.lstrip("_")
    if key not in df.columns:
        raise InputError(f"no _{key} column in the particle table", path)
    return df[key]


def from_two_sources(
    positives: str | Path,
    negatives: str | Path,
    max_per_class: int | None = None,
    seed: int = 0,
) -> TrainingSet:
    """Particles from one stack/STAR, junk from another (same box size)."""
    rng = np.random.default_rng(seed)
    pos, neg = open_source(positives), open_source(negatives)
    for src, what in ((pos, positives), (neg, negatives)):
        if len(src) == 0:
            raise InputError("holds no images", what)
    if pos.box != neg.box:
        raise InputError(
            f"junk images are {neg.box} px but the particles ({positives}) are {pos.box} px; "
            "both sets must have the same box size",
            negatives,
        )
    ip, ineg = _subset(len(pos), max_per_class, rng), _subset(len(neg), max_per_class, rng)
    images = np.concatenate([pos.images(ip), neg.images(ineg)])
    labels = np.concatenate([np.ones(len(ip), int), np.zeros(len(ineg), int)])
    px = pos.pixel_size or neg.pixel_size
    return TrainingSet(images, labels, px, f"positives {positives}, negatives {negatives}")


def _from_star_labels(
    src: ImageSource, labels: np.ndarray, keep: np.ndarray, max_per_class: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = []
    for c in (1, 0):
        cand = np.flatnonzero(keep & (labels == c))
        rows.append(cand[_subset(len(cand), max_per_class, rng)])
    idx = np.sort(np.concatenate(rows))
    return src.images(idx), labels[idx]


def from_label_column(
    star: str | Path,
    column: str = DEFAULT_LABEL_COLUMN,
    max_per_class: int | None = None,
    seed: int = 0,
) -> TrainingSet:
    """One STAR file whose ``column`` says 1 (particle) or 0 (junk) per row."""
    path = Path(star)
    if path.suffix.lower() != ".star":
        raise InputError("--labels needs a STAR file with a label column", path)
    src = open_source(path)
    raw = _column(src.metadata, column, path)
    values = pd.to_numeric(raw, errors="coerce").to_numpy()
    if np.isnan(values).any() or not np.all((values == 0) | (values == 1)):
        bad = raw[~np.isin(values, (0, 1))].iloc[0]
        raise InputError(f"label column _{column.lstrip('_')} must hold 0 or 1, found {bad!r}",
                         path)
    labels = check_labels(values.astype(int), path)
    images, labels = _from_star_labels(
        src, labels, np.ones(len(labels), bool), max_per_class, seed
    )
    return TrainingSet(images, labels, src.pixel_size, f"{path} (labels: _{column.lstrip('_')})")


def parse_classes(text: str | Sequence[int] | None) -> list[int]:
    """'1,4,7' -> [1, 4, 7] (class numbers are RELION's, 1-based)."""
    if text is None:
        return []
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        s = str(item).strip()
        if not s:
            continue
        try:
            v = int(s)
        except ValueError:
            raise InputError(f"class numbers must be integers, got {s!r}", None) from None
        if v < 1:
            raise InputError(f"class numbers start at 1, got {v}", None)
        out.append(v)
    return sorted(set(out))


def from_good_classes(
    star: str | Path,
    good: str | Sequence[int],
    bad: str | Sequence[int] | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
) -> TrainingSet:
    """Positives: particles in the ``good`` 2D classes; negatives: ``bad`` classes (or the rest)."""
    path = Path(star)
    if path.suffix.lower() != ".star":
        raise InputError("--good-classes needs a STAR file with _rlnClassNumber", path)
    good_l, bad_l = parse_classes(good), parse_classes(bad)
    if not good_l:
        raise InputError("--good-classes lists no class", path)
    overlap = sorted(set(good_l) & set(bad_l))
    if overlap:
        raise InputError(f"classes {overlap} are listed both as good and as bad", path)
    src = open_source(path)
    cls = pd.to_numeric(_column(src.metadata, "rlnClassNumber", path), errors="coerce")
    cls = cls.fillna(-1).astype(int).to_numpy()
    present = set(np.unique(cls).tolist())
    missing = [c for c in good_l + bad_l if c not in present]
    if missing:
        raise InputError(
            f"classes {missing} do not occur in _rlnClassNumber (present: "
            f"{', '.join(map(str, sorted(present)))})",
            path,
        )
    labels = np.isin(cls, good_l).astype(int)
    keep = np.isin(cls, good_l) | (np.isin(cls, bad_l) if bad_l else np.ones(len(cls), bool))
    check_labels(labels[keep], path)
    images, labels = _from_star_labels(src, labels, keep, max_per_class, seed)
    desc = f"{path} (good classes {good_l}; bad: {bad_l or 'all other classes'})"
    return TrainingSet(images, labels, src.pixel_size, desc)


def load_training_set(
    positives: str | Path | None = None,
    negatives: str | Path | None = None,
    labels_star: str | Path | None = None,
    label_column: str = DEFAULT_LABEL_COLUMN,
    classes_star: str | Path | None = None,
    good_classes: str | None = None,
    bad_classes: str | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
) -> TrainingSet:
    """Dispatch on which of the three ways was given (exactly one)."""
    ways = [
        positives is not None or negatives is not None,
        labels_star is not None,
        classes_star is not None or good_classes is not None,
    ]
    if sum(ways) != 1:
        raise InputError(
            "give exactly one training set: --positives P --negatives N, or --labels IN.star, "
            "or IN.star --good-classes 1,2",
            None,
        )
    if ways[0]:
        if positives is None or negatives is None:
            raise InputError("--positives and --negatives go together", None)
        return from_two_sources(positives, negatives, max_per_class, seed)
    if ways[1]:
        assert labels_star is not None
        return from_label_column(labels_star, label_column, max_per_class, seed)
    if classes_star is None or good_classes is None:
        raise InputError("--good-classes needs an input STAR file (and the STAR the classes)",
                         None)
    return from_good_classes(classes_star, good_classes, bad_classes, max_per_class, seed)
