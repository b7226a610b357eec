"""A trained screener (RBM or CNN) with everything needed to score new images the same way.

:func:`train_screener` prepares the images (:mod:`cryosift.screen.preprocess`), holds out a
stratified validation split, trains the network, and calibrates its logit on the held-out images
(Platt scaling, p = sigmoid(a·z + b); for the RBM, z is the free-energy difference, so this is
the softmax of −F/T over the labels with T = 1/a and the label bias shifted by b).
:class:`Screener` scores any stack in batches and refuses images of another box size than
the one it was trained on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cryosift.errors import CryosiftError, InputError
from cryosift.screen.calibration import apply_platt, fit_platt
from cryosift.screen.cnn import CNNConfig, ScreenCNN, cnn_logits, train_cnn
from cryosift.screen.preprocess import PreprocessConfig, preprocess
from cryosift.screen.rbm import ClassificationRBM, RBMConfig, train_rbm

log = logging.getLogger("cryosift")

METHODS = ("rbm", "cnn")
#: a model applied at another sampling sees the particle at another size in pixels
MAX_PIXEL_SIZE_RATIO = 1.5


def build_network(method: str, arch: dict[str, Any]) -> nn.Module:
    """The untrained network of a saved architecture description."""
    if method == "rbm":
        return ClassificationRBM(int(arch["n_visible"]), int(arch["n_hidden"]))
    if method == "cnn":
        return ScreenCNN(
            [int(w) for w in arch["widths"]],
            float(arch.get("dropout", 0.0)),
            bool(arch.get("centre_pool", False)),
        )
    raise CryosiftError(f"unknown screening method {method!r} (choose from {', '.join(METHODS)})")


@dataclass
class Screener:
    """A trained, calibrated particle-vs-junk classifier for images of one box size."""

    method: str
    net: nn.Module
    box: int
    pixel_size: float | None
    preprocess: PreprocessConfig
    arch: dict[str, Any]
    calibration: dict[str, float]
    train_config: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def check_images(self, box: int, pixel_size: float | None, where: Any = None) -> None:
        """InputError if images of ``box`` px at ``pixel_size`` Å cannot be scored by this model."""
        if int(box) != int(self.box):
            raise InputError(
                f"images are {box} px but the screening model was trained on {self.box} px images "
                "(resample the stack or train a model on this box size)",
                where,
            )
        if self.pixel_size and pixel_size:
            ratio = max(self.pixel_size / pixel_size, pixel_size / self.pixel_size)
            if ratio > MAX_PIXEL_SIZE_RATIO:
                raise InputError(
                    f"images are at {pixel_size:.3g} Å/px but the model was trained at "
                    f"{self.pixel_size:.3g} Å/px (factor {ratio:.2f} > {MAX_PIXEL_SIZE_RATIO})",
                    where,
                )

    def prepare(self, images: np.ndarray) -> np.ndarray:
        return preprocess(images, self.preprocess)

    @torch.no_grad()
    def logits_prepared(self, x: np.ndarray, batch: int = 512) -> np.ndarray:
        """Uncalibrated logits (float64) of already prepared images."""
        self.net.eval()
        if self.method == "cnn":
            return cnn_logits(self.net, x, self.device, batch)
        out = np.empty(len(x), dtype=np.float64)
        for s in range(0, len(x), batch):
            t = torch.from_numpy(np.ascontiguousarray(x[s : s + batch], np.float32))
            out[s : s + batch] = self.net(t.to(self.device)).double().cpu().numpy()
        return out

    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.logits_prepared(self.prepare(images))

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probability of being a particle, per image, in [0, 1] (float64)."""
        images = np.asarray(images)
        if images.ndim != 3 or images.shape[-1] != images.shape[-2]:
            raise CryosiftError(f"expected a stack (N, box, box), got shape {images.shape}")
        self.check_images(images.shape[-1], None)
        if len(images) == 0:
            return np.zeros(0)
        return apply_platt(self.logits(images), self.calibration)

    def to(self, device: torch.device | str) -> Screener:
        self.device = torch.device(device)
        self.net.to(self.device)
        return self


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int, min_per_class: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows); no validation rows when a class is too small to spare."""
    y = np.asarray(labels).astype(int)
    rng = np.random.default_rng(seed)
    val = []
    for c in (0, 1):
        rows = np.flatnonzero(y == c)
        k = int(round(val_fraction * len(rows)))
        if len(rows) < min_per_class or k < 1:
            return np.arange(len(y)), np.zeros(0, dtype=int)
        val.append(rng.choice(rows, k, replace=False))
    v = np.sort(np.concatenate(val))
    return np.setdiff1d(np.arange(len(y)), v), v


def check_labels(labels: np.ndarray, where: Any = None) -> np.ndarray:
    """Labels as int 0/1; refuses other values and training sets holding only one class."""
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise InputError("the training set is empty", where)
    if y.dtype == bool:
        y = y.astype(int)
    if not np.all((y == 0) | (y == 1)):
        raise InputError("training labels must be 0 (junk) or 1 (particle)", where)
    y = y.astype(int)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        only, other = ("particles", "junk") if n_neg == 0 else ("junk", "particles")
        raise InputError(
            f"the training set holds only one class ({len(y)} images, all {only}, no "
            f"{other}); a screener needs both",
            where,
        )
    return y


def train_screener(
    images: np.ndarray,
    labels: np.ndarray,
    method: str = "rbm",
    config: RBMConfig | CNNConfig | dict[str, Any] | None = None,
    prep: PreprocessConfig | None = None,
    pixel_size: float | None = None,
    val_fraction: float = 0.15,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Screener:
    """Train and calibrate a screener on images (N, box, box) with labels (1 = particle)."""
    if method not in METHODS:
        raise CryosiftError(f"unknown screening method {method!r} (choose from rbm, cnn)")
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise CryosiftError(f"expected a stack of square images, got shape {images.shape}")
    y = check_labels(labels)
    if len(y) != len(images):
        raise CryosiftError(f"{len(images)} images but {len(y)} labels")
    if not 0 <= val_fraction < 1:
        raise CryosiftError(f"validation fraction must lie in [0, 1), got {val_fraction}")
    cls = RBMConfig if method == "rbm" else CNNConfig
    if config is None:
        config = cls()
    elif isinstance(config, dict):
        config = cls(**config)
    prep = prep or PreprocessConfig()
    prep.validate()
    device = torch.device(device)
    t0 = time.time()
    x = np.concatenate([preprocess(images[s : s + 1024], prep) for s in
                        range(0, len(images), 1024)])
    t_prep = time.time() - t0
    tr, va = stratified_split(y, val_fraction, seed)
    vx, vy = (x[va], y[va]) if len(va) else (None, None)
    if method == "rbm":
        assert isinstance(config, RBMConfig)
        net, info = train_rbm(x[tr], y[tr], vx, vy, config, device, seed)
        arch = {"n_visible": int(x[0].size), "n_hidden": config.n_hidden}
    else:
        assert isinstance(config, CNNConfig)
        net, info = train_cnn(x[tr], y[tr], vx, vy, config, device, seed)
        arch = config.arch()
    screener = Screener(
        method=method,
        net=net,
        box=int(images.shape[-1]),
        pixel_size=float(pixel_size) if pixel_size else None,
        preprocess=prep,
        arch=arch,
        calibration={"a": 1.0, "b": 0.0},
        train_config=config.to_dict(),
        device=device,
    )
    cal_x, cal_y = (vx, vy) if vx is not None else (x[tr], y[tr])
    z = screener.logits_prepared(cal_x)
    screener.calibration = fit_platt(z, cal_y)
    info.update(
        n_train=int(len(tr)),
        n_val=int(len(va)),
        n_particles=int(y.sum()),
        n_junk=int((1 - y).sum()),
        calibrated_on="held-out validation split" if vx is not None else "training images",
        preprocess_seconds=t_prep,
        train_seconds=time.time() - t0 - t_prep,
    )
    if vx is not None:
        p = apply_platt(z, screener.calibration)
        info["val_accuracy"] = float(((p >= 0.5) == (cal_y == 1)).mean())
    screener.info = info
    log.info(
        "%s screener: %d images (%d particles, %d junk), best epoch %d%s",
        method,
        len(y),
        info["n_particles"],
        info["n_junk"],
        info["best_epoch"] + 1,
        f", validation accuracy {info['val_accuracy']:.4f}" if "val_accuracy" in info else "",
    )
    return screener
