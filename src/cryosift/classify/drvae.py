"""DRVAE + BSK-means++ (seed 001): a denoising ResNet VAE iterated with balanced K-means++.

Seed 001's loop, as implemented here:

1. **Unsupervised DRVAE** (:func:`train_drvae` with no pseudo-targets): a convolutional VAE with
   residual blocks in encoder and decoder, trained on the noisy images alone with the ELBO:
   Gaussian reconstruction likelihood + KL(q(z|x) || N(0, I)).
2. **Cluster** the denoised images (the decoder's mean for the encoder's mean latent, as 001
   clusters "denoised images"; ``features="latent"`` clusters the latent means instead) with
   BSK-means++ (:mod:`cryosift.classify.balanced`: every class >= 0.35 of the mean size).
3. **Reliable samples**: in each class the ``reliable_fraction`` of members nearest to its
   centre (:func:`~cryosift.classify.balanced.reliable_mask`).
4. **Continue training** with the class average (mean of the class members' standardised
   noisy images) as the reconstruction target of each reliable sample, the image itself for
   the others (001: "the class-average images are used as pseudo supervision of reliable
   samples").
5. Repeat 2-4 until the fraction of images whose label changed (after the best matching of old
   to new classes) is below ``tol`` or after ``max_rounds``; the labels of the last clustering
   are the result and the decoder mean is the denoised output.

Architecture (choices where 001's abstract is silent; sized for a 2-core CPU): each image is
standardised (zero mean, unit variance) and shrunk by area averaging to a working size of
``work`` = 16 px (``None``: full size); encoder: a 3x3 convolution to w channels and a residual
block (two 3x3 convolutions, ReLU, identity skip), then two stages of a stride-2 3x3
convolution (2w, 4w channels) and a residual block; a linear layer to the latent mean and
log-variance (``latent`` dims). The decoder mirrors it (linear, residual block and stride-2
transposed convolution twice, a residual block, a 3x3 convolution to one channel); its output
is upsampled bilinearly to the box. Defaults w = 8, latent 8 (73k parameters at any box).
Why shrink: at B4's SNR (0.05, 0.01) the views differ at low resolution only, and averaging 4x4
pixels raises the per-pixel SNR 16-fold for that signal. Measured on the B4 quick stack
(K = 10, SNR 0.05, 250 images of 64 px): PCA (20 components) + k-means ACC 0.45 on the full
images and 0.74 on the 16 px ones (ahead of the DRVAE loop below: the shrinking, not the VAE,
does most of the work there); the VAE at full size (w = 8, 161k parameters, 27 epochs)
collapsed to the mean image (ACC 0.20), at 16 px it reaches 0.56 after pre-training and 0.62
after the loop (defaults, 89 s on a busy 2-core CPU), in a tenth of the time. Latent 16
instead of 8 gave the same ACC on B4 and split a 3-view 32 px test stack less reliably
(posterior nearly collapsed, KL 1.5 nats).

Likelihood: Gaussian with one noise variance sigma^2 for all pixels, estimated during the
unsupervised phase as the running mean squared residual (the "calibrated decoder" of
sigma-VAE, Rybkin et al. 2021: with white noise the optimal sigma^2 is the noise variance), then
frozen for the pseudo-target phase, so the KL term keeps its natural weight: reconstruction
sum((x_hat - t)^2) / (2 sigma^2) per image; the KL weight rises from 0 to 1 over the first
30 % of the unsupervised epochs (against posterior collapse). No augmentation: fixed views
are distinct classes and rotating them would mix them.

Measured, ``cryosift bench B4 --quick`` (SpCas9, 64 px, unequal 4:1 view weights; 250 images
for K = 10, 1250 for K = 50; quick training 40 + 4 x 6 epochs), ACC / NMI:

=============  ===========  ===========  ===========  ===========  ===================
setting        drvae+bsk    pca+kmeans   kmeans_raw   pca+bsk      nearest-view oracle
=============  ===========  ===========  ===========  ===========  ===================
K=10 SNR 0.05  0.480/0.531  0.320/0.211  0.284/0.163  0.336/0.251  1.000/1.000
K=10 SNR 0.01  0.224/0.113  0.184/0.095  0.200/0.094  0.196/0.085  0.824/0.707
K=50 SNR 0.05  0.294/0.549  0.177/0.363  0.118/0.256  0.192/0.375  0.998/0.997
K=50 SNR 0.01  0.117/0.280  0.103/0.242  0.102/0.248  0.102/0.250  0.622/0.631
=============  ===========  ===========  ===========  ===========  ===================

DRVAE + BSK-means++ is ahead of k-means on pixels and on PCA in every setting, but far from
the oracle, and at SNR 0.01 barely above chance (as PCA + k-means and RELION are on such
data). With more images it pulls away: B4 full size, K = 10, SNR 0.05 (1000 images, default
training 60 + 6 x 10 epochs, 267 s): ACC / NMI 0.954 / 0.904 against 0.736 / 0.747 for
PCA (50) + k-means, 0.202 / 0.065 for k-means on pixels (scikit-learn, 10 restarts) and
1.000 / 1.000 for the oracle; smallest class 0.37 of the mean (the floor is 0.35). At SNR
0.01 (same protocol, 265 s): 0.324 / 0.306 against 0.158 / 0.026 (PCA), 0.158 / 0.020
(pixels) and 0.859 / 0.716 (oracle); labels still changing (15 %) after the sixth round.
Denoiser (quick): PSNR 22-25 dB against 2.4 / -4.4 dB raw (SNR 0.05 / 0.01).

Denoised output (registered denoiser ``drvae``): decoder mean for the encoder mean, mapped back
to each image's intensity scale. Clusterer ``drvae+bsk``: labels of step 5 and class averages of
the noisy images. Both share one training per stack (a small in-memory cache).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn import functional as F

from cryosift.classify.balanced import DEFAULT_MIN_FRACTION, bsk_fit, class_sums, reliable_mask
from cryosift.errors import CryosiftError, InputError
from cryosift.io.atomic import atomic_path, atomic_write_json
from cryosift.progress import progress
from cryosift.registry import ClusterResult, ClusterTask, DenoiseTask, Method, register

log = logging.getLogger("cryosift")

FORMAT = "cryosift-drvae"
FORMAT_VERSION = 1

__all__ = [
    "DRVAE",
    "DRVAEConfig",
    "DRVAEResult",
    "drvae_bsk",
    "drvae_denoise",
    "encode",
    "load_drvae",
    "save_drvae",
    "train_drvae",
]


# --------------------------------------------------------------------------------------------
# Architecture


@dataclass(frozen=True)
class DRVAEConfig:
    """Architecture (saved beside the weights). The network works on the images shrunk by
    area averaging to `work` px (None: box, no shrinking) and upsamples its output back."""

    box: int = 64
    work: int | None = 16
    width: int = 8
    latent: int = 8

    def validate(self) -> None:
        if self.box < 8:
            raise CryosiftError(f"DRVAE needs images of at least 8 px, got {self.box}")
        if self.work is not None and not 4 <= self.work <= self.box:
            raise CryosiftError(f"DRVAE working size must lie in [4, {self.box}], got {self.work}")
        if self.width < 1 or self.latent < 1:
            raise CryosiftError("DRVAE width and latent size must be >= 1")

    @property
    def size(self) -> int:
        return self.box if self.work is None else self.work

    @property
    def padded(self) -> int:
        return self.size + (-self.size) % 4


class ResBlock(nn.Module):
    """Two 3x3 convolutions with a ReLU between, added to the input (then ReLU)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.c2(F.relu(self.c1(x))))


class DRVAE(nn.Module):
    """ResNet VAE on standardised images; see the module docstring."""

    def __init__(self, config: DRVAEConfig = DRVAEConfig()) -> None:
        super().__init__()
        config.validate()
        self.config = config
        w = config.width
        self.encoder = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), ResBlock(w),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(), ResBlock(2 * w),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(), ResBlock(4 * w),
        )
        self.side = config.padded // 4
        flat = 4 * w * self.side * self.side
        self.to_stats = nn.Linear(flat, 2 * config.latent)
        self.from_latent = nn.Linear(config.latent, flat)
        self.decoder = nn.Sequential(
            ResBlock(4 * w),
            nn.ConvTranspose2d(4 * w, 2 * w, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
            ResBlock(2 * w),
            nn.ConvTranspose2d(2 * w, w, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
            ResBlock(w),
            nn.Conv2d(w, 1, 3, padding=1),
        )

    def shrink(self, z: torch.Tensor) -> torch.Tensor:
        """Full-size standardised images (B, 1, box, box) -> the network's working size."""
        c = self.config
        if z.shape[-1] != c.box or z.shape[-2] != c.box:
            raise CryosiftError(f"DRVAE was built for {c.box} px images, got {tuple(z.shape[-2:])}")
        return z if c.work is None else F.interpolate(z, size=(c.size, c.size), mode="area")

    def expand(self, y: torch.Tensor) -> torch.Tensor:
        """Working-size output -> full size (bilinear), the denoised image."""
        c = self.config
        if c.work is None:
            return y
        return F.interpolate(y, size=(c.box, c.box), mode="bilinear", align_corners=False)

    def encode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of q(latent | working-size image z (B, 1, size, size))."""
        p = self.config.padded - z.shape[-1]
        h = F.pad(z, (0, p, 0, p), mode="reflect") if p else z
        mu, logvar = self.to_stats(self.encoder(h).flatten(1)).chunk(2, dim=1)
        return mu, logvar.clamp(-12.0, 8.0)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Decoder mean (B, 1, size, size) at the working size, standardised units."""
        h = self.from_latent(latent).view(-1, 4 * self.config.width, self.side, self.side)
        n = self.config.size
        return self.decoder(F.relu(h))[..., :n, :n]

    def forward(
        self, z: torch.Tensor, sample: bool = True, gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, mu, logvar) at the working size for working-size images `z`; the
        latent is sampled (reparameterised) if `sample`."""
        mu, logvar = self.encode(z)
        lat = mu
        if sample:
            eps = torch.randn(mu.shape, generator=gen, device="cpu").to(mu.device)
            lat = mu + eps * torch.exp(0.5 * logvar)
        return self.decode(lat), mu, logvar


def _standardise(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image (x - mean) / std as float32, with the means and stds (N, 1, 1)."""
    x = np.asarray(images, dtype=np.float32)
    mean = x.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    std = np.maximum(x.std(axis=(1, 2), keepdims=True, dtype=np.float64), 1e-12)
    return ((x - mean) / std).astype(np.float32), mean, std


# --------------------------------------------------------------------------------------------
# Training


def _kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over latent dims, per sample."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)


def train_drvae(
    model: DRVAE,
    z: np.ndarray,
    targets: np.ndarray | None = None,
    epochs: int = 20,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    sigma2: float | None = None,
    warmup: float = 0.0,
    desc: str = "DRVAE",
) -> dict[str, Any]:
    """Train `model` in place on standardised working-size images `z` (N, size, size; see
    :func:`working_images`) for `epochs` passes.

    `targets` (N, size, size) replaces each image's reconstruction target (pseudo-targets; None:
    the images themselves). `sigma2` fixes the likelihood's noise variance; None estimates it
    as the running mean squared residual (unsupervised phase). `warmup`: fraction of the epochs
    over which the KL weight rises linearly from 0 to 1 (against posterior collapse: at SNR
    0.05 the signal is 5 % of each image's variance and an untrained decoder gains little from
    the latents). Returns history and sigma2."""
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise CryosiftError("epochs must be >= 0, the batch size >= 1 and lr > 0")
    device = torch.device(device)
    model.to(device).train()
    n = len(z)
    zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))[:, None]
    tt = zt if targets is None else torch.from_numpy(
        np.ascontiguousarray(targets, dtype=np.float32))[:, None]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    learn_sigma = sigma2 is None
    s2 = 1.0 if sigma2 is None else float(sigma2)
    pixels = z.shape[-1] * z.shape[-2]
    history = []
    t0 = time.time()
    for epoch in progress(range(epochs), total=epochs, desc=desc, unit="epoch"):
        order = torch.randperm(n, generator=gen)
        tot_rec = tot_kl = tot_mse = 0.0
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            xb, yb = zt[idx].to(device), tt[idx].to(device)
            rec, mu, logvar = model(xb, sample=True, gen=gen)
            sq = (rec - yb).pow(2).flatten(1).sum(1)
            kl = _kl(mu, logvar)
            progress_ = (epoch + s / n) / max(warmup * epochs, 1e-9)
            beta = min(1.0, progress_) if warmup > 0 else 1.0
            loss = (sq / (2.0 * s2) + beta * kl).mean() / pixels
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            mse = float(sq.detach().mean()) / pixels
            if learn_sigma:  # calibrated decoder: sigma^2 tracks the mean squared residual
                s2 = 0.9 * s2 + 0.1 * mse if (epoch or s) else mse
            tot_rec += float(sq.detach().sum())
            tot_kl += float(kl.detach().sum())
            tot_mse += mse * len(idx)
        history.append({"epoch": epoch, "mse": tot_mse / n, "kl": tot_kl / n, "sigma2": s2,
                        "seconds": time.time() - t0})
    model.eval()
    return {"history": history, "sigma2": s2, "seconds": time.time() - t0}


@torch.no_grad()
def encode(
    model: DRVAE, z: np.ndarray, device: torch.device | str | None = None, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(latent means (N, latent), decoder means (N, size, size)) for working-size images `z`."""
    device = next(model.parameters()).device if device is None else torch.device(device)
    model.to(device).eval()
    lat = np.empty((len(z), model.config.latent), dtype=np.float32)
    out = np.empty(z.shape, dtype=np.float32)
    for s in range(0, len(z), batch):
        xb = torch.from_numpy(np.ascontiguousarray(z[s : s + batch], dtype=np.float32))[:, None]
        mu, _ = model.encode(xb.to(device))
        lat[s : s + batch] = mu.cpu().numpy()
        out[s : s + batch] = model.decode(mu)[:, 0].cpu().numpy()
    return lat, out


@torch.no_grad()
def working_images(
    model: DRVAE, images: np.ndarray, batch: int = 512
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardised images shrunk to the model's working size, with the per-image means and
    standard deviations (N, 1, 1) that map outputs back to the input's intensity scale."""
    z, mean, std = _standardise(images)
    if model.config.work is None:
        return z, mean, std
    n = model.config.size
    out = np.empty((len(z), n, n), dtype=np.float32)
    for s in range(0, len(z), batch):
        out[s : s + batch] = model.shrink(torch.from_numpy(z[s : s + batch])[:, None])[:, 0]
    return out, mean, std


@torch.no_grad()
def full_size(model: DRVAE, out: np.ndarray, mean: np.ndarray, std: np.ndarray,
              batch: int = 512) -> np.ndarray:
    """Working-size decoder means -> full-size images on the input's intensity scale."""
    box = model.config.box
    full = np.empty((len(out), box, box), dtype=np.float32)
    for s in range(0, len(out), batch):
        y = model.expand(torch.from_numpy(np.ascontiguousarray(out[s : s + batch]))[:, None])
        full[s : s + batch] = y[:, 0].cpu().numpy()
    return (full * std + mean).astype(np.float32)


def drvae_denoise(model: DRVAE, images: np.ndarray,
                  device: torch.device | str | None = None) -> np.ndarray:
    """Denoised images on the input's intensity scale: decoder mean (upsampled to the box),
    times each image's standard deviation plus its mean."""
    w, mean, std = working_images(model.cpu(), images)
    _, out = encode(model, w, device)
    return full_size(model.cpu(), out, mean, std)


# --------------------------------------------------------------------------------------------
# The 001 loop


@dataclass
class DRVAEResult:
    """Labels, class averages (of the noisy images), denoised stack, model and a summary."""

    labels: np.ndarray
    averages: np.ndarray
    denoised: np.ndarray
    model: DRVAE
    info: dict[str, Any]


def _changed_fraction(old: np.ndarray, new: np.ndarray, k: int) -> float:
    """Fraction of labels that differ after the best one-to-one matching of old to new ids."""
    table = np.zeros((k, k), dtype=np.int64)
    np.add.at(table, (old, new), 1)
    r, c = linear_sum_assignment(table, maximize=True)
    return 1.0 - table[r, c].sum() / len(old)


def _class_means(z: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    sums = class_sums(z.reshape(len(z), -1).astype(np.float64), labels, k)
    counts = np.maximum(np.bincount(labels, minlength=k), 1)
    return (sums / counts[:, None]).reshape((k,) + z.shape[1:]).astype(np.float32)


def _cluster(model: DRVAE, z: np.ndarray, k: int, features: str, seed: int,
             min_fraction: float, n_init: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BSK-means++ on the denoised images (or latents): (labels, centres, features)."""
    lat, den = encode(model, z)
    feats = lat if features == "latent" else den.reshape(len(den), -1)
    r = bsk_fit(feats, k, seed=seed, min_fraction=min_fraction, n_init=n_init)
    return r.labels, r.centers, feats


def drvae_bsk(
    images: np.ndarray,
    k: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    work: int | None = 16,
    width: int = 8,
    latent: int = 8,
    pretrain_epochs: int = 60,
    round_epochs: int = 10,
    max_rounds: int = 6,
    tol: float = 0.01,
    reliable_fraction: float = 0.5,
    min_fraction: float = DEFAULT_MIN_FRACTION,
    features: str = "denoised",
    n_init: int = 10,
    batch_size: int = 16,
    lr: float = 2e-3,
    warmup: float = 0.3,
    model: DRVAE | None = None,
) -> DRVAEResult:
    """Seed 001's iterative denoising and clustering of `images` (N, box, box) into `k` classes.

    `model`: start from these weights (copied) instead of training from scratch; `k` < 2 is
    rejected by BSK-means++. See the module docstring for the steps."""
    x = np.asarray(images)
    if x.ndim != 3 or x.shape[1] != x.shape[2]:
        raise CryosiftError(f"images must be a stack (N, box, box) of square images, got {x.shape}")
    if not np.isfinite(x).all():
        raise CryosiftError("images contain NaN or Inf")
    if features not in ("denoised", "latent"):
        raise CryosiftError(f"features must be 'denoised' or 'latent', got {features!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2 or k > len(x):
        raise CryosiftError(f"K must be an integer in [2, {len(x)}] (the number of images), "
                            f"got {k!r}")
    if max_rounds < 0 or not 0 <= tol < 1 or not 0 < reliable_fraction <= 1:
        raise CryosiftError("need max_rounds >= 0, 0 <= tol < 1 and 0 < reliable_fraction <= 1")
    device = torch.device(device)
    t0 = time.time()
    if model is None:
        torch.manual_seed(seed)
        work = None if work is None else min(int(work), x.shape[-1])
        model = DRVAE(DRVAEConfig(box=x.shape[-1], work=work, width=width, latent=latent))
        z, mean, std = working_images(model, x)
        summary = train_drvae(model, z, None, pretrain_epochs, batch_size, lr, seed, device,
                              warmup=warmup, desc="DRVAE unsupervised")
        sigma2 = summary["sigma2"]
    else:
        model = copy.deepcopy(model).cpu()
        z, mean, std = working_images(model, x)
        sigma2 = None
    if sigma2 is None:  # given a model: the residual variance on this stack
        _, den = encode(model.to(device), z)
        sigma2 = float(np.mean((den - z) ** 2))
    labels, centres, feats = _cluster(model, z, k, features, seed, min_fraction, n_init)
    rounds = []
    for r in range(1, max_rounds + 1):
        keep = reliable_mask(feats, labels, centres, reliable_fraction)
        avg = _class_means(z, labels, k)
        targets = np.where(keep[:, None, None], avg[labels], z)
        train_drvae(model, z, targets, round_epochs, batch_size, lr, seed + r, device,
                    sigma2=sigma2, desc=f"DRVAE round {r}")
        new, centres, feats = _cluster(model, z, k, features, seed + r, min_fraction, n_init)
        changed = _changed_fraction(labels, new, k)
        labels = new
        rounds.append({"round": r, "changed": changed, "reliable": int(keep.sum())})
        log.info("DRVAE round %d: %.2f %% of labels changed", r, 100 * changed)
        if changed < tol:
            break
    _, den = encode(model, z)
    averages = _class_means(x.astype(np.float32), labels, k)
    info = {"rounds": rounds, "sigma2": sigma2, "seconds": time.time() - t0,
            "features": features, "min_fraction": min_fraction, "work": model.config.work,
            "class_sizes": np.bincount(labels, minlength=k).tolist()}
    model = model.cpu().eval()
    return DRVAEResult(labels.astype(np.int64), averages, full_size(model, den, mean, std),
                       model, info)


# --------------------------------------------------------------------------------------------
# Saving and loading


def save_drvae(path: str | Path, model: DRVAE, meta: dict[str, Any] | None = None) -> None:
    """model.pt (state_dict + architecture + metadata) and model.json, written atomically."""
    meta = {**(meta or {}), "architecture": asdict(model.config)}
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "meta": meta,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    path = Path(path)
    if path.suffix != ".pt":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "model.pt"
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    atomic_write_json(path.with_suffix(".json"), meta)


def load_drvae(path: str | Path, device: torch.device | str = "cpu") -> tuple[DRVAE, dict]:
    """(DRVAE in eval mode, metadata) from a model folder or .pt (weights_only loading)."""
    from cryosift.denoise.model_io import _load

    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    payload = _load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError("not a cryosift DRVAE model (format tag missing)", path)
    meta = payload.get("meta") or {}
    try:
        arch = meta["architecture"]
        work = None if arch.get("work") is None else int(arch["work"])
        model = DRVAE(DRVAEConfig(int(arch["box"]), work, int(arch["width"]), int(arch["latent"])))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, ValueError, TypeError, RuntimeError, CryosiftError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"weights do not fit the saved architecture ({first})", path) from exc
    return model.to(device).eval(), meta


# --------------------------------------------------------------------------------------------
# Registered methods (clusterer drvae+bsk, denoiser drvae): one training per stack, shared


_CACHE: OrderedDict[str, DRVAEResult] = OrderedDict()


def _cached_run(images: np.ndarray, k: int, seed: int, params: dict[str, Any]) -> DRVAEResult:
    from cryosift.device import select_device

    p = dict(params)
    device = select_device(p.pop("device", "auto"))
    x = np.ascontiguousarray(images, dtype=np.float32)
    digest = hashlib.blake2b(x.tobytes(), digest_size=16).hexdigest()
    key = json.dumps([digest, x.shape, k, seed, p], sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = drvae_bsk(x, k, seed=seed, device=device, **p)
        while len(_CACHE) > 2:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return _CACHE[key]


def _clusterer(**params: Any):
    def run(task: ClusterTask) -> ClusterResult:
        res = _cached_run(task.images, task.k, task.seed, params)
        run.params = {**params, **{k: v for k, v in res.info.items()  # type: ignore[attr-defined]
                                   if k in ("rounds", "seconds", "sigma2")}}
        return ClusterResult(labels=res.labels.copy(), averages=res.averages.copy(),
                             info=dict(res.info))

    return run


def _denoiser(k: int | None = None, **params: Any):
    def run(task: DenoiseTask) -> np.ndarray:
        kk, source = k, "parameter"
        meta = task.metadata
        if kk is None and meta is not None and "cryosiftTrueView" in meta:
            views = meta["cryosiftTrueView"].to_numpy()
            kk, source = int(np.unique(views[views >= 0]).size), "number of views (metadata)"
        if kk is None or kk < 2:
            kk, source = 10, "default"
        res = _cached_run(task.noisy, kk, task.seed, params)
        run.params = {**params, "k": kk, "k_from": source,  # type: ignore[attr-defined]
                      "rounds": res.info["rounds"], "seconds": res.info["seconds"]}
        return res.denoised.copy()

    return run


# Benchmark budget (2 CPU cores): the network works on 16 px images; short training.
BENCH_DEFAULTS: dict[str, Any] = {
    "device": "auto", "work": 16, "width": 8, "latent": 8, "pretrain_epochs": 60,
    "round_epochs": 10, "max_rounds": 6, "tol": 0.01, "reliable_fraction": 0.5,
    "features": "denoised",
}
BENCH_QUICK: dict[str, Any] = {"pretrain_epochs": 40, "round_epochs": 6, "max_rounds": 4}

register(
    Method(
        "clusterer",
        "drvae+bsk",
        _clusterer,
        "DRVAE + BSK-means++ (seed 001): ResNet VAE and balanced K-means++ iterated with "
        "class-average pseudo-targets for reliable samples",
        defaults=BENCH_DEFAULTS,
        quick=BENCH_QUICK,
    )
)
register(
    Method(
        "denoiser",
        "drvae",
        _denoiser,
        "DRVAE (seed 001): decoder mean of the ResNet VAE after the DRVAE + BSK-means++ loop "
        "(K: the number of views when the metadata has it, else 10)",
        defaults={"k": None, **BENCH_DEFAULTS},
        quick=BENCH_QUICK,
    )
)
