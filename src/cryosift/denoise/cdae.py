"""CDAE: a cascade of denoising autoencoders (seed 004, Lei & Yang 2021), and the single DAE.

Model (004 section 3.5, "Figure 2"). Each block is one convolutional autoencoder:

* encoder: three modules, each two 3x3 convolutions (ReLU) and a 2x2 max-pool; widths
  ``widths = (c1, c2, c3)`` per module;
* decoder: three 3x3 transposed convolutions of stride 2 (ReLU), widths c3, c2, c1 (the encoder
  mirrored), then one 3x3 convolution c1 -> 1 (linear) that combines the channels into the image;
* dropout 0.5 (004: "in the encoder and decoder"): one element-wise dropout on the encoder's
  output (the code) and one after the decoder's first transposed convolution; active in
  training only.

004 gives the widths only in Figure 2 (not in its text) except that the last convolution
"combines 32 channels into one", i.e. c1 = 32 in the paper (``PAPER_WIDTHS = (32, 64, 128)``,
527k parameters per block). The default here is ``(8, 16, 32)`` (33 145 parameters per block,
99 435 for the cascade), 16x fewer operations, so that pre-training and fine-tuning run in
seconds to minutes on a laptop CPU; every function takes ``widths`` to run the paper's size.
The blocks are fully convolutional (reflect-padded to a multiple of 8, cropped back) and
standardise each image inside ``forward`` (restored after, as the U-Net of networks.py does), so a
block is exactly equivariant to per-image affine intensity changes and serves stacks of any scale.

Skips between blocks (``CDAE(skip=True)``, the default of :func:`pretrain_cdae` and of the bench's
``cdae``; ``skip=False`` / ``cdae_plain`` is 004's cascade as published). Each block is the same
autoencoder, but blocks 2 and 3 output their input plus their decoder's output, and their last
convolution starts at zero, so each starts as the identity and learns a correction to what the
blocks before it produced: the cascade then works as boosting. Why: in 004's plain cascade every
block must rebuild the whole image through its 8x8 bottleneck, and block j > 1 is trained on the
same k-NN targets as block 1 from an input that has lost information, so it cannot do better than
block 1 and, measured, does worse (its error is mostly bias - what the autoencoder cannot draw -
not leftover noise; on B2 SpCas9 the single DAE's error is 80 % bias). A block that only adds
a correction keeps what block 1 drew and removes part of that bias: per block on B2 (4,000
images, 4 epochs each), PSNR 24.18 -> 24.48 -> 24.49 (SpCas9) where the plain cascade goes
24.18 -> 24.03 -> 22.80.

Training (Algorithm 1 of 004; Figure 1):

* Phase 1, pre-training (:func:`pretrain_cdae`) on simulated images of a structure *other* than
  the target: one clean stack (K views x n images, no CTF, no in-plane rotation, as 004's XMIPP
  sets) is simulated by ``cryosift.simulate`` and white Gaussian noise is added to it at each SNR
  (SPEC definition: sigma^2 = mean over images of var(clean image) / SNR), so the SNR_low /
  SNR_mid / SNR_high / clean versions show the *same* particles. The noise is drawn
  independently per SNR (default) or, with ``noise="nested"``, as one realisation scaled per SNR
  (what `cryosift simulate` gives when run at each SNR with the same seed). Block 1 learns
  SNR_low -> SNR_mid, block 2 SNR_mid -> SNR_high, block 3 SNR_high -> clean (004 defaults 0.1,
  0.4, 0.6), each on its own simulated pair, independently ("the three blocks can be trained
  in parallel"). The single-DAE baseline of 004 (:func:`pretrain_single_dae`) is one block of
  the same architecture trained SNR_low -> clean on the same images.
* Phase 2, fine-tuning (:func:`finetune_cdae`) on the target stack alone, block by block in
  order: block j is trained on x_j (the target stack passed through the fine-tuned blocks < j,
  in eval mode; x_1 = the raw images; 004: "the outputs of the fine-tuned blocks are fed to the
  next block"). Its target for image i is 004's equation 5: the mean of the *test images* over
  the neighbourhood of i (k = 30 nearest neighbours). 004 does not say (its Algorithm 1 is a
  figure) on which images the neighbourhood of blocks 2 and 3 is determined; by default it is
  the block's own input x_j (``neighbours="input"``; ``"images"``: always the raw images).
  ``targets="input"`` averages x_j instead of the raw images over the neighbours; it inherits
  the previous blocks' bias and, measured on 4-view SpCas9 / GroEL stacks at SNR 0.1, makes
  blocks 2 and 3 lower the PSNR.
* Output: the last block's output, optionally histogram-equalised (004's "HEE").

Choices where 004 is silent (see also the parameters):

* Nearest neighbours (:func:`knn_indices`): Euclidean distance between the images projected on
  their leading principal components (:func:`pca_features`: randomised PCA on up to 20 000
  images, at most 50 components, kept where their variance exceeds the Marchenko-Pastur edge of
  white noise, i.e. the components that carry signal), then a k-d / ball tree: linear memory,
  so it scales to 10^5 images. On raw 64-px images at SNR 0.1 with 4 views this keeps 3
  components and finds neighbours of the same view for 99.7 % (GroEL) of the pairs, against
  66 % for 50 components and 65 % for the raw pixels. The image itself is *not* one of its
  neighbours: with it, 1/k of the image's own noise would sit in its target.
* Losses are mean squared errors measured in the units of each input image's standardisation
  (what the network sees), Adam with lr 1e-3 (004 used RMSprop for its autoencoders), batches
  of 16, one pass over the training images per epoch, 10 % held out for validation and the
  best epoch's weights kept. Training pairs are augmented with the same
  random 90-degree rotation and flip (more views for a network pre-trained on only 4).
* Histogram equalisation: ``equalize_hist_batch`` (skimage's equalize_hist per image) maps each
  image to (0, 1]; the result is mapped back onto the denoised image's own range [min, max]
  so that the output stays on the stack's intensity scale (PSNR against the clean images is
  then meaningful; 004 compared images on a common grey scale).

Measured: full bench B2 (`benchmarks/results/bench_B2`; 4,000 images of 64 px at 3 Å/px per
protein, SNR 0.1, 4 views, no in-plane rotation; phase 1 on TRPV1, 4 fine-tuning epochs per
block), PSNR in dB on GroEL / SpCas9 / T20S:

* cascade with skips (``cdae``): 21.10 / 24.60 / 22.88; single DAE (``dae``, one block, same
  pre-training and epochs): 20.47 / 24.15 / 22.28; 004's own single-DAE baseline (``dae_knn``:
  k-NN means only, 12 epochs, the cascade's compute): 20.71 / 24.34 / 22.73; 004's plain cascade
  (``cdae_plain``): 19.97 / 22.80 / 21.91. So the cascade beats the single DAE on every test
  protein only with the skips; the plain cascade's blocks 2 and 3 lower the PSNR (per block,
  SpCas9: 24.18, 24.03, 22.80).
* with the SURE output stage (:mod:`cryosift.denoise.sure`): cdae 21.27 / 24.73 / 22.99, dae
  20.77 / 24.36 / 22.55.
* with 004's histogram equalisation (HEE), which costs 5-15 dB everywhere: the plain cascade is
  ahead of the single DAE (17.13 / 11.38 / 16.59 against 15.51 / 9.58 / 15.00, as 004 reports
  it), the cascade with skips is not (14.65 / 8.54 / 14.48): HEE rewards outputs whose grey levels
  spread evenly, not closeness to the clean image.

The plain cascade's failure is the finding that led to the skips: once the neighbours are found
accurately on the raw images (PCA features; 99.7 % same-view pairs on GroEL), later blocks get
no better targets than block 1, and without skips each block must redraw the whole image.
Pre-training blocks 2 and 3 with skips on white-noise pairs teaches them little (their correction
would have to be the noise itself, which the bottleneck cannot draw: block 3's validation loss
0.625 -> 0.603); they learn their corrections in fine-tuning, from block 1's real output.

Weights are saved with :func:`save_cdae` as a state_dict plus metadata (architecture, number of
blocks, pre-training parameters) and read back with ``torch.load(weights_only=True)`` by
:func:`load_cdae`, which never unpickles code; a bad file is a one-line InputError.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cryosift.errors import CryosiftError, InputError
from cryosift.io.atomic import atomic_path, atomic_write_json
from cryosift.progress import progress
from cryosift.registry import DenoiseTask, Method, register

log = logging.getLogger("cryosift")

FORMAT = "cryosift-cdae"
FORMAT_VERSION = 1
PAPER_WIDTHS = (32, 64, 128)  # 004 Figure 2 as far as its text tells (last layer 32 -> 1)
DEFAULT_WIDTHS = (8, 16, 32)
TRAINING_STRUCTURE = "3J5P_refined_locscale.pdb"  # TRPV1: 004's "other protein" for phase 1

__all__ = [
    "CDAE",
    "DAEBlock",
    "DAEConfig",
    "cdae_denoise",
    "finetune_cdae",
    "histeq_keep_range",
    "knn_indices",
    "knn_mean_targets",
    "load_cdae",
    "parameter_count",
    "pca_features",
    "pretrain_cdae",
    "pretrain_single_dae",
    "pretrained_cached",
    "save_cdae",
    "simulate_training_set",
    "train_block",
]


# --------------------------------------------------------------------------------------------
# Architecture


@dataclass(frozen=True)
class DAEConfig:
    """Architecture of one autoencoder block (saved beside the weights)."""

    widths: tuple[int, int, int] = DEFAULT_WIDTHS
    dropout: float = 0.5
    kind: str = "cdae-block"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DAEConfig:
        widths = tuple(int(w) for w in d.get("widths", DEFAULT_WIDTHS))
        return cls(widths=widths, dropout=float(d.get("dropout", 0.5)))  # type: ignore[arg-type]

    def validate(self) -> None:
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise CryosiftError(f"a DAE block needs three positive widths, got {self.widths}")
        if not 0 <= self.dropout < 1:
            raise CryosiftError(f"dropout must lie in [0, 1), got {self.dropout}")


class DAEBlock(nn.Module):
    """One convolutional denoising autoencoder of 004 (see the module docstring)."""

    multiple = 8  # three 2x poolings

    def __init__(self, config: DAEConfig = DAEConfig()) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c1, c2, c3 = config.widths
        layers: list[nn.Module] = []
        cin = 1
        for w in (c1, c2, c3):
            layers += [
                nn.Conv2d(cin, w, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            cin = w
        layers.append(nn.Dropout(config.dropout))
        self.encoder = nn.Sequential(*layers)

        def up(a: int, b: int) -> list[nn.Module]:
            return [
                nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=1),
                nn.ReLU(inplace=True),
            ]

        self.decoder = nn.Sequential(
            *up(c3, c3),
            nn.Dropout(config.dropout),
            *up(c3, c2),
            *up(c2, c1),
            nn.Conv2d(c1, 1, 3, padding=1),
        )

    #: set by :class:`CDAE` on the blocks after the first of a cascade with skips: the block
    #: then outputs its input plus its decoder's output (in the input's units)
    residual: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(-2, -1), keepdim=True)
        std = x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
        z = (x - mean) / std
        h, w = z.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:
            z = F.pad(z, (0, pw, 0, ph), mode="reflect")
        z = self.decoder(self.encoder(z))[..., :h, :w]
        return x + z * std if self.residual else z * std + mean


def parameter_count(widths: Sequence[int] = DEFAULT_WIDTHS) -> int:
    """Parameters of one block, by formula (3x3 kernels, biases everywhere)."""
    c1, c2, c3 = widths
    n, cin = 0, 1
    for w in (c1, c2, c3):
        n += (9 * cin * w + w) + (9 * w * w + w)
        cin = w
    for a, b in ((c3, c3), (c3, c2), (c2, c1)):
        n += 9 * a * b + b
    return n + 9 * c1 + 1


class CDAE(nn.Module):
    """Blocks applied in sequence; ``forward(x, upto=j)`` runs the first j blocks only.

    ``n_blocks=1`` is the single DAE of 004 (same block, same code paths). ``skip=True`` (the
    default of :func:`pretrain_cdae`; 004's cascade is ``skip=False``) adds an identity skip
    around every block after the first: block j > 1 outputs x_j + its decoder's output, and its
    last convolution starts at zero, so a new block starts as the identity and its training
    only has to correct what the blocks before it got wrong (see the module docstring)."""

    def __init__(self, config: DAEConfig = DAEConfig(), n_blocks: int = 3,
                 skip: bool = False) -> None:
        super().__init__()
        if n_blocks < 1:
            raise CryosiftError(f"a cascade needs at least one block, got {n_blocks}")
        self.config = config
        self.skip = bool(skip)
        self.blocks = nn.ModuleList(DAEBlock(config) for _ in range(n_blocks))
        for block in self.blocks[1:] if self.skip else ():
            block.residual = True
            last = block.decoder[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def forward(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        upto = self.n_blocks if upto is None else upto
        if not 0 <= upto <= self.n_blocks:
            raise ValueError(f"upto must lie in [0, {self.n_blocks}], got {upto}")
        for block in self.blocks[:upto]:
            x = block(x)
        return x


# --------------------------------------------------------------------------------------------
# Saving and loading


def save_cdae(path: str | Path, cascade: CDAE, meta: dict[str, Any]) -> None:
    """model.pt (weights + metadata) and model.json (the metadata, readable), atomically."""
    meta = {
        **meta,
        "architecture": cascade.config.to_dict(),
        "n_blocks": cascade.n_blocks,
        "skip": cascade.skip,
    }
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": meta,
        "state_dict": {k: v.detach().cpu() for k, v in cascade.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    atomic_write_json(Path(path).with_suffix(".json"), meta)


def load_cdae(path: str | Path, device: torch.device | str = "cpu") -> tuple[CDAE, dict]:
    """(cascade in eval mode on `device`, its metadata) from a model folder or .pt file."""
    from cryosift.denoise.model_io import _load  # weights_only loading, one-line InputErrors

    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    payload = _load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError("not a cryosift CDAE model (format tag missing)", path)
    meta = payload.get("meta") or {}
    try:
        skip = meta.get("skip", False)  # files written before skips existed have none
        if not isinstance(skip, bool):
            raise ValueError(f"skip must be true or false, got {skip!r}")
        model = CDAE(DAEConfig.from_dict(meta["architecture"]), int(meta["n_blocks"]), skip)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, ValueError, TypeError, RuntimeError, CryosiftError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"weights do not fit the saved architecture ({first})", path) from exc
    return model.to(device).eval(), meta


# --------------------------------------------------------------------------------------------
# Training one block


def _augment_pair(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random 90-degree rotation and flip of input and target."""
    k = int(torch.randint(0, 4, (1,), generator=gen))
    x, y = torch.rot90(x, k, dims=(-2, -1)), torch.rot90(y, k, dims=(-2, -1))
    if bool(torch.randint(0, 2, (1,), generator=gen)):
        x, y = torch.flip(x, dims=(-1,)), torch.flip(y, dims=(-1,))
    return x, y


def _standardised_mse(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE of output vs target in units of each input image's standard deviation."""
    std = x.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    return (((out - y) / std) ** 2).mean()


@torch.no_grad()
def _eval_loss(
    block: nn.Module, x: np.ndarray, y: np.ndarray, device: torch.device, batch: int = 128
) -> float:
    block.eval()
    total = 0.0
    for s in range(0, len(x), batch):
        xb = torch.from_numpy(x[s : s + batch])[:, None].to(device)
        yb = torch.from_numpy(y[s : s + batch])[:, None].to(device)
        total += float(_standardised_mse(block(xb), xb, yb)) * len(xb)
    return total / max(1, len(x))


def train_block(
    block: nn.Module,
    inputs: np.ndarray,
    targets: np.ndarray,
    epochs: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    val_fraction: float = 0.1,
    augment: bool = True,
    desc: str = "block",
) -> dict:
    """Train `block` (in place) to map inputs -> targets, both (N, box, box); keeps the weights
    of the epoch with the lowest validation loss. Returns {"history", "best_epoch", ...}."""
    if epochs < 1 or batch_size < 1:
        raise CryosiftError("epochs and batch size must be >= 1")
    if inputs.shape != targets.shape:
        raise CryosiftError(f"inputs {inputs.shape} and targets {targets.shape} differ")
    n = len(inputs)
    if n < 4:
        raise CryosiftError(f"need at least 4 images to train, got {n}")
    device = torch.device(device)
    x_all = np.ascontiguousarray(inputs, dtype=np.float32)
    y_all = np.ascontiguousarray(targets, dtype=np.float32)
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 2, max(1, int(round(val_fraction * n)))) if val_fraction > 0 else 0
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    x_val, y_val = x_all[val_idx], y_all[val_idx]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    block.to(device)
    opt = torch.optim.Adam(block.parameters(), lr=lr)
    batch_size = min(batch_size, len(train_idx))
    steps = max(1, len(train_idx) // batch_size)
    best = (math.inf, -1, copy.deepcopy(block.state_dict()))
    history = []
    t0 = time.time()
    for epoch in range(epochs):
        block.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        total = 0.0
        for s in progress(range(steps), total=steps, desc=f"{desc} epoch {epoch + 1}/{epochs}"):
            sel = np.sort(perm[s * batch_size : (s + 1) * batch_size])
            xb = torch.from_numpy(x_all[sel])[:, None]
            yb = torch.from_numpy(y_all[sel])[:, None]
            if augment:
                xb, yb = _augment_pair(xb, yb, gen)
            xb, yb = xb.to(device), yb.to(device)
            loss = _standardised_mse(block(xb), xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        val = _eval_loss(block, x_val, y_val, device) if n_val else total / steps
        history.append(
            {"epoch": epoch, "train_loss": total / steps, "val_loss": val,
             "seconds": time.time() - t0}
        )
        log.info("%s epoch %d: train %.5g, validation %.5g", desc, epoch + 1, total / steps, val)
        if val < best[0]:
            best = (val, epoch, copy.deepcopy(block.state_dict()))
    block.load_state_dict(best[2])
    block.eval()
    return {
        "history": history,
        "best_epoch": best[1],
        "best_val_loss": best[0],
        "n_train": int(len(train_idx)),
        "n_val": int(n_val),
        "seconds": time.time() - t0,
    }


# --------------------------------------------------------------------------------------------
# Phase 1: pre-training on simulated data


def simulate_training_set(
    structure: str | Path,
    box: int,
    pixel_size: float,
    n_per_view: int = 1000,
    views: int = 4,
    snrs: Sequence[float] = (0.1, 0.4, 0.6),
    seed: int = 0,
    device: torch.device | str = "cpu",
    work_dir: str | Path | None = None,
    noise: str = "independent",
) -> tuple[np.ndarray, dict[float, np.ndarray], dict]:
    """(clean, {snr: noisy}, simulation record): one clean stack of `views` fixed views x
    `n_per_view` images (no CTF, no in-plane rotation) and an independent noisy copy of it at
    every SNR (sigma^2 = mean image variance of the clean stack / SNR)."""
    from cryosift.io import open_source
    from cryosift.simulate import SimulationConfig, simulate

    if noise not in ("independent", "nested"):
        raise CryosiftError(f"noise must be 'independent' or 'nested', got {noise!r}")
    if not snrs or min(snrs) <= 0:
        raise CryosiftError(f"SNRs must be positive, got {tuple(snrs)}")
    if n_per_view < 1 or views < 1:
        raise CryosiftError("n_per_view and views must be >= 1")
    cfg = SimulationConfig(
        n_images=n_per_view * views, box=box, pixel_size=pixel_size, snr=float(min(snrs)),
        views=views, in_plane=False, ctf=False, seed=seed,
    )
    with tempfile.TemporaryDirectory(prefix="cryosift-cdae-sim-", dir=work_dir) as tmp:
        res = simulate(structure, tmp, cfg, device=device, command="cdae pretrain")
        clean = open_source(res.clean).images(slice(None)).astype(np.float32)
    signal_var = float(clean.astype(np.float64).var(axis=(1, 2)).mean())
    noisy = {}
    for i, snr in enumerate(snrs):
        sigma = math.sqrt(signal_var / snr)
        rng = np.random.default_rng([seed, 1000 + (0 if noise == "nested" else i)])
        noisy[float(snr)] = clean + (rng.standard_normal(clean.shape) * sigma).astype(np.float32)
    record = {
        "structure": str(structure), "box": box, "pixel_size": res.pixel_size,
        "n_images": cfg.n_images, "views": views, "snrs": [float(s) for s in snrs],
        "signal_variance": signal_var, "seed": seed,
        "noise": f"{noise} white Gaussian, sigma^2 = signal variance / SNR",
    }
    return clean, noisy, record


def _pretrain(
    kind: str,
    structure: str | Path,
    out_dir: str | Path,
    box: int,
    pixel_size: float,
    n_per_view: int,
    views: int,
    snrs: Sequence[float],
    epochs: int,
    seed: int,
    device: torch.device | str,
    widths: Sequence[int],
    batch_size: int,
    lr: float,
    augment: bool,
    noise: str = "independent",
    skip: bool = False,
) -> dict:
    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    snrs = tuple(float(s) for s in snrs)
    if kind == "cdae" and (len(snrs) != 3 or list(snrs) != sorted(snrs)):
        raise CryosiftError(f"CDAE needs three increasing SNRs (low, mid, high), got {snrs}")
    clean, noisy, sim = simulate_training_set(
        structure, box, pixel_size, n_per_view, views, snrs, seed, device, work_dir=out_dir,
        noise=noise,
    )
    config = DAEConfig(widths=tuple(int(w) for w in widths))  # type: ignore[arg-type]
    torch.manual_seed(seed)
    n_blocks = 3 if kind == "cdae" else 1
    model = CDAE(config, n_blocks, skip=skip)
    if kind == "cdae":
        stages = [(snrs[0], snrs[1]), (snrs[1], snrs[2]), (snrs[2], "clean")]
    else:
        stages = [(snrs[0], "clean")]
    blocks = []
    for j, (src, dst) in enumerate(stages):
        target = clean if dst == "clean" else noisy[dst]  # type: ignore[index]
        summary = train_block(
            model.blocks[j], noisy[src], target, epochs, batch_size, lr, seed + j, device,
            augment=augment, desc=f"pretrain {kind} block {j + 1}",
        )
        blocks.append({"block": j + 1, "input_snr": src, "target": dst, **summary})
    params = {
        "kind": kind, "structure": str(structure), "box": box, "pixel_size": sim["pixel_size"],
        "n_per_view": n_per_view, "views": views, "snrs": list(snrs), "epochs": epochs,
        "seed": seed, "widths": list(config.widths), "batch_size": batch_size, "lr": lr,
        "augment": augment, "noise": noise, "device": str(device),
        **({"skip": model.skip} if kind == "cdae" else {}),
    }
    meta = {"method": kind, "phase": "pretrained", "pixel_size": sim["pixel_size"],
            "train_box": box, "pretrain": params}
    save_cdae(out_dir / "model.pt", model.cpu(), meta)
    record = {"parameters": params, "simulation": sim, "blocks": blocks,
              "seconds": time.time() - t0}
    atomic_write_json(out_dir / "pretrain.json", record)
    return record


def pretrain_cdae(
    structure: str | Path,
    out_dir: str | Path,
    box: int,
    pixel_size: float,
    n_per_view: int = 1000,
    views: int = 4,
    snrs: Sequence[float] = (0.1, 0.4, 0.6),
    epochs: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    widths: Sequence[int] = DEFAULT_WIDTHS,
    batch_size: int = 16,
    lr: float = 1e-3,
    augment: bool = True,
    noise: str = "independent",
    skip: bool = True,
) -> dict:
    """Phase 1 of 004: simulate `structure` at SNR_low/mid/high/clean and train block 1 on
    low -> mid, block 2 on mid -> high, block 3 on high -> clean. ``skip``: identity skips
    around blocks 2 and 3 (:class:`CDAE`; False: 004's plain cascade).

    Writes OUT_DIR/model.pt (+ model.json) loadable by :func:`load_cdae`, and pretrain.json
    (parameters, simulation record, per-block loss history). Returns the pretrain.json record.
    """
    return _pretrain("cdae", structure, out_dir, box, pixel_size, n_per_view, views, snrs,
                     epochs, seed, device, widths, batch_size, lr, augment, noise, skip)


def pretrain_single_dae(
    structure: str | Path,
    out_dir: str | Path,
    box: int,
    pixel_size: float,
    n_per_view: int = 1000,
    views: int = 4,
    snr: float = 0.1,
    epochs: int = 10,
    seed: int = 0,
    device: torch.device | str = "cpu",
    widths: Sequence[int] = DEFAULT_WIDTHS,
    batch_size: int = 16,
    lr: float = 1e-3,
    augment: bool = True,
) -> dict:
    """004's "single DAE" baseline: one block of the same architecture, SNR_low -> clean, on the
    same simulated images as :func:`pretrain_cdae` (same seed). Same files as pretrain_cdae."""
    return _pretrain("dae", structure, out_dir, box, pixel_size, n_per_view, views, (snr,),
                     epochs, seed, device, widths, batch_size, lr, augment)


# --------------------------------------------------------------------------------------------
# Phase 2: fine-tuning with nearest-neighbour means


def pca_features(
    images: np.ndarray, n_components: int | str | None = "auto", max_components: int = 50,
    seed: int = 0, fit_max: int = 20000, chunk: int = 4096,
) -> tuple[np.ndarray, dict]:
    """(features (N, q) float32, info): the images projected on their leading principal
    components (randomised PCA fitted on up to `fit_max` images).

    `n_components` "auto": the components whose variance exceeds the Marchenko-Pastur edge of
    white noise, sigma^2 (1 + sqrt(D / n))^2 (D pixels, n images; sigma^2 estimated from the
    variance left outside the first `max_components`), at least 2: the components that carry
    signal above the noise; an int: that many; None: the raw pixels."""
    from sklearn.decomposition import PCA

    x = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    n, dim = x.shape
    if n_components is None or (isinstance(n_components, int) and n_components >= dim):
        return x, {"n_components": None}
    if isinstance(n_components, str) and n_components != "auto":
        raise CryosiftError(f"n_components must be an int, 'auto' or None, got {n_components!r}")
    cap = max_components if n_components == "auto" else int(n_components)
    q = int(min(cap, n - 1, dim))
    if q < 1:
        raise CryosiftError("PCA needs at least 2 images")
    rng = np.random.default_rng(seed)
    fit = x if n <= fit_max else x[np.sort(rng.choice(n, fit_max, replace=False))]
    pca = PCA(n_components=q, svd_solver="randomized", random_state=seed).fit(fit)
    info: dict[str, Any] = {"n_components": q}
    keep = q
    if n_components == "auto":
        eig = pca.explained_variance_.astype(np.float64)
        total = float(fit.astype(np.float64).var(axis=0, ddof=1).sum())
        rest = max(total - float(eig.sum()), 0.0)
        noise_var, edge, spikes = _mp_noise(rest, eig, dim, len(fit) - 1)
        keep = int(min(q, max(2, spikes)))
        info = {"n_components": keep, "noise_variance": noise_var, "mp_edge": edge}
    feats = np.concatenate([pca.transform(x[s : s + chunk])[:, :keep] for s in range(0, n, chunk)])
    return feats.astype(np.float32), info


def _mp_noise(rest: float, eig: np.ndarray, dim: int, n: int) -> tuple[float, float, int]:
    """(sigma^2, Marchenko-Pastur edge, number of eigenvalues above it) for white noise of
    variance sigma^2 in `dim` pixels seen in `n` (centred) samples, given the variance `rest`
    left outside the leading eigenvalues `eig` of the sample covariance.

    The noise eigenvalues follow the MP law: min(dim, n) of them, sigma^2 max(1, dim/n) times
    an MP variable of ratio r = min/max (support (1 -+ sqrt r)^2, mean 1). Of the dim sigma^2
    they sum to, the top q - s (s = eigenvalues above the edge, i.e. signal) take an expected
    share computed from the law; the rest must equal `rest`. Two passes settle s."""
    m, big = min(dim, n), max(dim, n)
    r = m / big
    scale = max(1.0, dim / n)
    a, b = (1 - math.sqrt(r)) ** 2, (1 + math.sqrt(r)) ** 2
    x = np.linspace(a, b, 4001)[1:-1]
    dens = np.sqrt((b - x) * (x - a)) / (2 * math.pi * r * x)
    dx = x[1] - x[0]
    tail_mass = np.cumsum((dens * dx)[::-1])[::-1]  # P(X >= x)
    tail_sum = np.cumsum((x * dens * dx)[::-1])[::-1]  # E[X; X >= x]
    spikes = 0
    sigma2 = edge = 0.0
    for _ in range(2):
        u = max(len(eig) - spikes, 0) / m  # fraction of the noise eigenvalues among the top q
        i = int(np.searchsorted(-tail_mass, -u))  # first x with P(X >= x) <= u
        captured = m * scale * (float(tail_sum[i]) if i < len(x) else 0.0)
        sigma2 = rest / max(dim - captured, 0.05 * dim)
        edge = sigma2 * scale * b
        spikes = int(np.count_nonzero(eig > edge))
    return sigma2, edge, spikes


def knn_indices(
    features: np.ndarray, k: int = 30, n_components: int | str | None = "auto", seed: int = 0,
    chunk: int = 4096,
) -> np.ndarray:
    """(N, k) indices of each image's k nearest other images (the image itself excluded),
    nearest first: Euclidean distance after projection on the leading principal components
    (:func:`pca_features`; None: on the raw pixels)."""
    from sklearn.neighbors import NearestNeighbors

    n = len(features)
    if n < 2:
        raise CryosiftError("nearest neighbours need at least 2 images")
    k = min(int(k), n - 1)
    if k < 1:
        raise CryosiftError("k must be >= 1")
    x, _ = pca_features(features, n_components, seed=seed, chunk=chunk)
    nn_ = NearestNeighbors(n_neighbors=k + 1).fit(x)
    ind = np.concatenate([nn_.kneighbors(x[s : s + chunk], return_distance=False)
                          for s in range(0, n, chunk)])
    # drop the image itself (moved last by a stable sort; a row without it drops its farthest)
    is_self = ind == np.arange(n)[:, None]
    ind = np.take_along_axis(ind, np.argsort(is_self, axis=1, kind="stable"), axis=1)
    return ind[:, :k].astype(np.int64)


def knn_mean_targets(
    images: np.ndarray, k: int = 30, n_components: int | str | None = "auto",
    features: np.ndarray | None = None, seed: int = 0, chunk: int = 1024,
) -> np.ndarray:
    """Each image's fine-tuning target: the mean of its k nearest neighbours (itself excluded),
    found on `features` (default: the images) by :func:`knn_indices`. float32 (N, box, box)."""
    images = np.asarray(images)
    ind = knn_indices(images if features is None else features, k, n_components, seed)
    out = np.empty(images.shape, dtype=np.float32)
    for s in range(0, len(images), chunk):
        rows = ind[s : s + chunk]
        acc = np.zeros((len(rows),) + images.shape[1:], dtype=np.float64)
        for j in range(rows.shape[1]):
            acc += images[rows[:, j]]
        out[s : s + chunk] = acc / rows.shape[1]
    return out


@torch.no_grad()
def _apply(module: nn.Module, images: np.ndarray, device: torch.device, batch: int = 128,
           **kw: Any) -> np.ndarray:
    module.eval()
    out = np.empty(images.shape, dtype=np.float32)
    for s in range(0, len(images), batch):
        x = torch.from_numpy(np.ascontiguousarray(images[s : s + batch], dtype=np.float32))
        out[s : s + batch] = module(x[:, None].to(device), **kw)[:, 0].float().cpu().numpy()
    return out


def finetune_cdae(
    cascade: CDAE,
    images: np.ndarray,
    k: int = 30,
    epochs: int = 5,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    n_components: int | str | None = "auto",
    targets: str = "images",
    neighbours: str = "input",
    augment: bool = True,
    copy_model: bool = True,
) -> tuple[CDAE, dict]:
    """Phase 2 of 004 on the target stack `images` (N, box, box): blocks 1, 2, 3 in order, block
    j trained on x_j (the images through the fine-tuned blocks < j; x_1 = the images) against,
    for each image, a mean over its k nearest neighbours, the neighbours found on x_j.
    `targets` "images" (default; 004 eq. 5: the neighbourhood mean of the test images): the
    mean of the *images* over those neighbours; "input": the mean of x_j over them.

    Returns (fine-tuned cascade in eval mode, a copy unless copy_model=False; summary)."""
    if targets not in ("images", "input"):
        raise CryosiftError(f"targets must be 'images' or 'input', got {targets!r}")
    device = torch.device(device)
    model = copy.deepcopy(cascade) if copy_model else cascade
    model.to(device)
    raw = np.ascontiguousarray(images, dtype=np.float32)
    x = raw
    t0 = time.time()
    blocks = []
    for j, block in enumerate(model.blocks):
        tk = time.time()
        target = knn_mean_targets(
            raw if targets == "images" else x, k, n_components,
            features=x if neighbours == "input" else raw, seed=seed,
        )
        knn_seconds = time.time() - tk
        summary = train_block(block, x, target, epochs, batch_size, lr, seed + j, device,
                              augment=augment, desc=f"fine-tune block {j + 1}")
        blocks.append({"block": j + 1, "knn_seconds": knn_seconds, **summary})
        x = _apply(block, x, device)
    model.eval()
    return model, {
        "k": k, "epochs": epochs, "lr": lr, "batch_size": batch_size, "targets": targets,
        "n_components": n_components, "seed": seed, "blocks": blocks,
        "seconds": time.time() - t0,
    }


def finetune_and_save(
    pretrained: str | Path,
    images: np.ndarray,
    out_dir: str | Path,
    pixel_size: float | None,
    histeq: bool = False,
    provenance: dict | None = None,
    **finetune: Any,
) -> dict:
    """`denoise train --method cdae`: fine-tune a pre-trained cascade (folder, file or shipped
    name) on `images` and write OUT_DIR/model.pt + finetune.json (nothing on failure)."""
    from cryosift.denoise.apply import MAX_PIXEL_SIZE_RATIO
    from cryosift.denoise.model_io import resolve_model_path
    from cryosift.io.atomic import staged_folder

    path = resolve_model_path(pretrained)
    cascade, meta = load_cdae(path)
    trained = meta.get("pixel_size")
    if trained and pixel_size:
        ratio = max(trained / pixel_size, pixel_size / trained)
        if ratio > MAX_PIXEL_SIZE_RATIO:
            raise InputError(
                f"pre-trained at {trained:.3g} Å/px but the stack is at {pixel_size:.3g} Å/px "
                f"(factor {ratio:.2f} > {MAX_PIXEL_SIZE_RATIO}); pre-train at the stack's sampling",
                path,
            )
    model, summary = finetune_cdae(cascade, images, copy_model=False, **finetune)
    new_meta = {**{k: v for k, v in meta.items() if k not in ("architecture", "n_blocks", "skip")},
                "phase": "finetuned", "pixel_size": pixel_size, "train_box": images.shape[-1],
                "histeq": bool(histeq), "pretrained_from": str(path)}
    record = {"finetune": summary, "pretrained_meta": meta, "provenance": provenance or {}}
    with staged_folder(out_dir) as tmp:
        save_cdae(tmp / "model.pt", model.cpu(), new_meta)
        atomic_write_json(tmp / "finetune.json", record)
    return record


def cdae_denoise(
    cascade: CDAE, images: np.ndarray, histeq: bool = False,
    device: torch.device | str | None = None, batch: int = 128, nbins: int = 256,
) -> np.ndarray:
    """The cascade's output for `images` (N, box, box), float32; with `histeq` each image is
    histogram-equalised and mapped back onto its own [min, max] (see the module docstring).
    `device`: where to run (default: where the cascade's weights are)."""
    if device is None:
        device = next(cascade.parameters()).device
    device = torch.device(device)
    out = _apply(cascade.to(device), np.asarray(images), device, batch)
    return histeq_keep_range(out, nbins) if histeq else out


def histeq_keep_range(images: np.ndarray, nbins: int = 256) -> np.ndarray:
    """Histogram equalisation per image, mapped from (0, 1] back onto the image's [min, max]."""
    from cryosift.filters.histogram import equalize_hist_batch

    eq = equalize_hist_batch(images, nbins)
    lo = images.min(axis=(1, 2), keepdims=True)
    hi = images.max(axis=(1, 2), keepdims=True)
    return (lo + (hi - lo) * eq).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Benchmark methods: pre-train on TRPV1 (cached), fine-tune on the task's stack


def cache_root() -> Path:
    """Where pre-trained weights are cached: $CRYOSIFT_CACHE, else $XDG_CACHE_HOME/cryosift,
    else ~/.cache/cryosift (nothing is ever downloaded)."""
    if os.environ.get("CRYOSIFT_CACHE"):
        return Path(os.environ["CRYOSIFT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cryosift"


def shipped_pretrained(kind: str, box: int, pixel_size: float, params: dict) -> Path | None:
    """The phase-1 weights shipped in the package (trained by scripts/train_cdae_weights.py on
    TRPV1 at 64 px, 3 Å/px with the benchmark defaults: ``cdae-*`` with skips, ``cdae_plain-*``
    without, ``dae-*``) when they are exactly what `params` asks for; else None."""
    from importlib import resources

    wanted = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in params.items()}
    if kind == "dae" and "snr" in wanted:  # recorded as the one-element list of SNRs
        wanted["snrs"] = [wanted.pop("snr")]
    names = [kind] + (["cdae_plain"] if kind == "cdae" else [])
    for name in names:
        path = Path(str(resources.files("cryosift") / "data" / "models"
                        / f"{name}-trpv1-box{box}-px{pixel_size:g}.pt"))
        if not path.is_file():
            continue
        done = {"skip": False, "noise": "independent", **load_cdae(path)[1].get("pretrain", {})}
        if done["noise"] == "independent" and all(done.get(k) == v for k, v in wanted.items()):
            return path
    return None


def pretrained_cached(kind: str, box: int, pixel_size: float, **params: Any) -> tuple[CDAE, Path]:
    """Pre-trained cascade ("cdae") or single DAE ("dae") on TRPV1 for this box and pixel size,
    from cache_root()/cdae/<key>/ or trained there first (key: every parameter + format)."""
    from cryosift.bench.protocol import structure_path

    structure = structure_path(TRAINING_STRUCTURE)
    spec = {"kind": kind, "structure": structure.name, "box": int(box),
            "pixel_size": round(float(pixel_size), 4), "format": FORMAT_VERSION, **params}
    key = hashlib.sha1(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()[:16]
    shipped = shipped_pretrained(kind, box, pixel_size, params)
    if shipped is not None:
        return load_cdae(shipped)[0], shipped
    folder = cache_root() / "cdae" / f"{kind}-box{box}-px{pixel_size:g}-{key}"
    if (folder / "model.pt").is_file():
        try:
            return load_cdae(folder)[0], folder
        except InputError:
            log.warning("cached %s weights unreadable, re-training: %s", kind, folder)
    fn = pretrain_cdae if kind == "cdae" else pretrain_single_dae
    log.info("pre-training %s on %s (box %d, %g Å/px) into %s", kind, structure.name, box,
             pixel_size, folder)
    fn(structure, folder, box, pixel_size, **params)
    atomic_write_json(folder / "cache_key.json", spec)
    return load_cdae(folder)[0], folder


def _starting_model(
    kind: str, box: int, pixel_size: float, pre: dict[str, Any], seed: int
) -> tuple[CDAE, Path | str]:
    """What a bench method fine-tunes: the cached phase-1 weights of "cdae" / "cdae_plain" /
    "dae", or for "dae_knn" (004 section 4.3: no simulated pre-training) one block of random
    weights."""
    if kind == "dae_knn":
        torch.manual_seed(int(seed))
        return CDAE(DAEConfig(widths=tuple(pre["widths"])), n_blocks=1), "none (random weights)"
    return pretrained_cached("dae" if kind == "dae" else "cdae", box, pixel_size, **pre)


# cdae, cdae+histeq and cdae+sure share one fine-tuned model: (model, its output, record)
_RESULTS: OrderedDict[str, tuple[CDAE, np.ndarray, dict]] = OrderedDict()


def _bench(kind: str, histeq: bool, sure: bool = False):
    pre_keys = ("n_per_view", "views", "pretrain_epochs", "widths", "pretrain_seed")

    def factory(**params: Any):
        def run(task: DenoiseTask) -> np.ndarray:
            p = dict(params)
            pre = {
                "n_per_view": int(p["n_per_view"]), "views": int(p["views"]),
                "epochs": int(p["pretrain_epochs"]), "widths": list(p["widths"]),
                "seed": int(p["pretrain_seed"]),
            }
            if kind.startswith("cdae"):
                pre["snrs"] = list(p["snrs"])
                pre["skip"] = kind == "cdae"
            else:
                pre["snr"] = float(p["snrs"][0])
            fine = {k: v for k, v in p.items() if k not in pre_keys and k != "snrs"}
            noisy = np.ascontiguousarray(task.noisy, dtype=np.float32)
            digest = hashlib.blake2b(noisy.tobytes(), digest_size=16).hexdigest()
            key = json.dumps([kind, pre, fine, task.seed, digest, task.pixel_size],
                             sort_keys=True, default=list)
            if key not in _RESULTS:
                t0 = time.time()
                model, folder = _starting_model(kind, noisy.shape[-1], task.pixel_size,
                                                pre, task.seed)
                t1 = time.time()
                model, summary = finetune_cdae(model, noisy, seed=task.seed, **fine)
                out = cdae_denoise(model, noisy)
                info = {"pretrained": str(folder), "pretrain_load_seconds": t1 - t0,
                        "finetune_seconds": summary["seconds"],
                        "finetune_best_epochs": [b["best_epoch"] for b in summary["blocks"]]}
                _RESULTS[key] = (model, out, info)
                while len(_RESULTS) > 2:
                    _RESULTS.popitem(last=False)
            model, out, info = _RESULTS[key]
            run.params = {  # type: ignore[attr-defined]
                **params, "histeq": histeq, "sure": sure, **info}
            if sure:
                from cryosift.denoise.sure import fit_sure_blend

                blend = fit_sure_blend(lambda y: cdae_denoise(model, y), noisy, seed=task.seed)
                run.params["sure_blend"] = blend.record()  # type: ignore[attr-defined]
                return blend.apply(noisy, out)
            return histeq_keep_range(out) if histeq else out.copy()

        return run

    return factory


# Benchmark budget (2 CPU cores): pre-training is done once per box / pixel size and cached.
BENCH_DEFAULTS: dict[str, Any] = {
    "n_per_view": 1000, "views": 4, "snrs": (0.1, 0.4, 0.6), "pretrain_epochs": 6,
    "widths": DEFAULT_WIDTHS, "pretrain_seed": 0, "k": 30, "epochs": 4,
}
BENCH_QUICK: dict[str, Any] = {"n_per_view": 250, "pretrain_epochs": 4, "epochs": 4}

_PRETRAINED = "pre-trained on simulated TRPV1 3J5P, fine-tuned with k-nearest-neighbour means"
#: kind -> (label, how it is trained, fine-tuning epochs as a multiple of the cascade's)
_KINDS = {
    "cdae": ("CDAE cascade of 3 DAEs with identity skips around blocks 2 and 3", _PRETRAINED,
             1),
    "cdae_plain": ("CDAE cascade of 3 DAEs as 004 builds it (no skips)", _PRETRAINED, 1),
    "dae": ("single DAE (one block)", _PRETRAINED, 1),
    "dae_knn": ("single DAE (one block)", "trained from random weights on the stack's "
                "k-nearest-neighbour means only, as 004's own single-DAE baseline (section 4.3); "
                "as many epochs as the cascade's three blocks", 3),
}
#: (suffix, histogram-equalised, SURE output stage) of each kind's bench rows
_VARIANTS = (("", False, False), ("+histeq", True, False), ("+sure", False, True))
for _kind, (_label, _training, _epochs) in _KINDS.items():
    for _suffix, _histeq, _sure in _VARIANTS:
        register(
            Method(
                "denoiser",
                _kind + _suffix,
                _bench(_kind, _histeq, _sure),
                f"{_label} (seed 004): {_training}"
                f"{', histogram-equalised' if _histeq else ''}"
                f"{', with the SURE-fitted output stage (cryosift.denoise.sure)' if _sure else ''}",
                defaults={**BENCH_DEFAULTS, "epochs": _epochs * BENCH_DEFAULTS["epochs"]},
                quick={**BENCH_QUICK, "epochs": _epochs * BENCH_QUICK["epochs"]},
            )
        )
