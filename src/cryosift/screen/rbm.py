"""The classification RBM of `000_*`: a restricted Boltzmann machine with label units.

Model (Larochelle & Bengio 2008, "Classification using discriminative RBMs"): visible pixels v
(D units), one-hot label units y (C = 2: junk, particle) and binary hidden units h (H units),

    E(v, y, h) = ½‖v − b‖² − cᵀh − dᵀy − hᵀW v − hᵀU y,
    F(v, y)    = ½‖v − b‖² − d_y − Σ_j softplus(c_j + W_j·v + U_{j,y})      (free energy).

**Gaussian-Bernoulli visible units.** Pixels are continuous and, after standardisation (each
image to zero mean, unit variance: :mod:`cryosift.screen.preprocess`), close to Gaussian;
Bernoulli visibles would force pixel values into [0, 1] and model them as probabilities, which
raw or noisy images are not. The visible variance is fixed at 1 rather than learned: learned
variances make Gaussian RBMs notoriously unstable under CD (Hinton, "A practical guide to training
RBMs", §13.2), and standardised pixels have variance 1 by construction.

**Classification by free energy**, as in the seed: the label with the lowest F(v, y) wins, and
since exp(−F(v, y)) ∝ p(v, y), the softmax of −F over labels is exactly p(y | v) under the model
(½‖v − b‖² cancels). The screener's score is the free-energy difference
z = F(v, junk) − F(v, particle) = log p(particle | v) − log p(junk | v), turned into a calibrated
probability by temperature scaling on held-out images (:mod:`cryosift.screen.calibration`).

**Training** follows the seed's supervised RBM: contrastive divergence on the joint (v, y), CD-k
(k Gibbs steps from the data) or persistent CD (chains carried across batches, Tieleman 2008).
The CD gradient is obtained by automatic differentiation of F(data) − F(negative samples) with the
samples held fixed. ``mode="hybrid"`` (the default) adds the exact discriminative gradient of
−log p(y | v) (Larochelle & Bengio's HDRBM: ``discriminative_weight`` x discriminative +
generative), which classifies better than CD alone at low SNR; ``mode="generative"`` is the seed's
pure CD training. Class imbalance is handled by weighting images so each class counts equally.
Batched torch on any device.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch convention
from torch import nn

from cryosift.errors import CryosiftError
from cryosift.progress import progress
from cryosift.screen.calibration import balanced_weights
from cryosift.screen.early_stopping import EarlyStopping

log = logging.getLogger("cryosift")


@dataclass
class RBMConfig:
    """Hyper-parameters of the classification RBM and its training (saved with the model)."""

    n_hidden: int = 256
    cd_k: int = 1
    persistent: bool = False
    mode: str = "hybrid"  # "hybrid" (CD + discriminative) or "generative" (CD only, the seed)
    discriminative_weight: float = 1.0
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 8

    def validate(self) -> None:
        if self.n_hidden < 1 or self.cd_k < 1 or self.epochs < 1 or self.batch_size < 1:
            raise CryosiftError("RBM: hidden units, CD steps, epochs and batch size must be >= 1")
        if self.mode not in ("hybrid", "generative"):
            raise CryosiftError(f"RBM mode must be 'hybrid' or 'generative', got {self.mode!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise CryosiftError(f"learning rate must be positive, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ClassificationRBM(nn.Module):
    """Gaussian(unit variance)-Bernoulli RBM with one-hot label units (module docstring)."""

    def __init__(self, n_visible: int, n_hidden: int, n_classes: int = 2) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = nn.Parameter(torch.randn(n_hidden, n_visible, generator=g) * 0.01)
        self.U = nn.Parameter(torch.randn(n_hidden, n_classes, generator=g) * 0.01)
        self.b = nn.Parameter(torch.zeros(n_visible))
        self.c = nn.Parameter(torch.zeros(n_hidden))
        self.d = nn.Parameter(torch.zeros(n_classes))

    @property
    def n_classes(self) -> int:
        return self.U.shape[1]

    def free_energy(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """F(v, y) per row; y one-hot (B, C) (or soft)."""
        pre = v @ self.W.T + y @ self.U.T + self.c
        return 0.5 * ((v - self.b) ** 2).sum(1) - y @ self.d - F.softplus(pre).sum(1)

    def label_free_energies(self, v: torch.Tensor) -> torch.Tensor:
        """F(v, y) − ½‖v − b‖² for every label y: (B, C). Its −softmax is p(y | v)."""
        vw = v @ self.W.T + self.c  # (B, H)
        pre = vw[:, None, :] + self.U.T[None]  # (B, C, H)
        return -self.d[None] - F.softplus(pre).sum(-1)

    def particle_logit(self, v: torch.Tensor) -> torch.Tensor:
        """F(v, junk) − F(v, particle) = log-odds of label 1 under the model."""
        fe = self.label_free_energies(v)
        return fe[:, 0] - fe[:, 1]

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.particle_logit(v.flatten(1))

    @torch.no_grad()
    def gibbs(
        self, v: torch.Tensor, y: torch.Tensor, k: int, gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k steps of block Gibbs sampling v, y -> h -> (v, y); returns the final (v, y)."""
        for _ in range(k):
            ph = torch.sigmoid(v @ self.W.T + y @ self.U.T + self.c)
            h = torch.bernoulli(ph, generator=gen)
            mean_v = h @ self.W + self.b
            v = mean_v + torch.randn(mean_v.shape, generator=gen, device=v.device)
            py = torch.softmax(h @ self.U + self.d, dim=1)
            y = F.one_hot(torch.multinomial(py, 1, generator=gen)[:, 0], self.n_classes)
            y = y.to(v.dtype)
        return v, y


def train_rbm(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray | None,
    val_y: np.ndarray | None,
    cfg: RBMConfig,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[ClassificationRBM, dict[str, Any]]:
    """Train on prepared images (N, b, b) with labels 0/1; returns the best model and a history.

    The model kept is the one with the lowest class-balanced validation cross-entropy (the last
    one without validation data); training stops after ``patience`` epochs without improvement.
    """
    cfg.validate()
    device = torch.device(device)
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed) if device.type != "mps" else None
    x = torch.from_numpy(np.ascontiguousarray(train_x, np.float32)).flatten(1).to(device)
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long, device=device)
    w = torch.as_tensor(balanced_weights(train_y), dtype=torch.float32, device=device)
    n, dim = x.shape
    net = ClassificationRBM(dim, cfg.n_hidden).to(device)
    with torch.no_grad():  # visible bias at the data mean: the usual RBM start
        net.b.copy_(x.mean(0))
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    chains_v = chains_y = None
    if cfg.persistent:
        idx = torch.randint(0, n, (cfg.batch_size,), device=device, generator=gen)
        chains_v, chains_y = x[idx].clone(), F.one_hot(y[idx], 2).float()
    vx = vy = vw = None
    if val_x is not None and val_y is not None and len(val_x):
        vx = torch.from_numpy(np.ascontiguousarray(val_x, np.float32)).flatten(1).to(device)
        vy = torch.as_tensor(np.asarray(val_y), dtype=torch.long, device=device)
        vw = torch.as_tensor(balanced_weights(val_y), dtype=torch.float32, device=device)
    stopper = EarlyStopping("RBM", cfg.patience)
    rng = np.random.default_rng(seed)
    for epoch in progress(range(cfg.epochs), total=cfg.epochs, desc="rbm", unit="epoch"):
        net.train()
        perm = torch.from_numpy(rng.permutation(n)).to(device)
        sums = {"disc": 0.0, "gen": 0.0}
        for start in range(0, n, cfg.batch_size):
            bi = perm[start : start + cfg.batch_size]
            v0, y0, w0 = x[bi], F.one_hot(y[bi], 2).float(), w[bi]
            if cfg.persistent:
                assert chains_v is not None and chains_y is not None
                vn, yn = net.gibbs(chains_v, chains_y, cfg.cd_k, gen)
                chains_v, chains_y = vn, yn
            else:
                vn, yn = net.gibbs(v0, y0, cfg.cd_k, gen)
            gen_loss = (w0 * net.free_energy(v0, y0)).sum() / w0.sum() - net.free_energy(
                vn, yn
            ).mean()
            loss = gen_loss
            disc = F.cross_entropy(-net.label_free_energies(v0), y[bi], reduction="none")
            disc_loss = (w0 * disc).sum() / w0.sum()
            if cfg.mode == "hybrid":
                loss = loss + cfg.discriminative_weight * disc_loss
            loss = loss + 0.5 * cfg.weight_decay * (net.W**2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["disc"] += float(disc_loss.detach()) * len(bi)
            sums["gen"] += float(gen_loss.detach()) * len(bi)
        rec = {"epoch": epoch, "train_ce": sums["disc"] / n, "train_cd_gap": sums["gen"] / n}
        if vx is not None:
            net.eval()
            with torch.no_grad():
                ce = F.cross_entropy(-net.label_free_energies(vx), vy, reduction="none")
                rec["val_ce"] = float((vw * ce).sum() / vw.sum())
                rec["val_acc"] = float(
                    ((net.particle_logit(vx) > 0).long() == vy).float().mean()
                )
            score = rec["val_ce"]
        else:
            score = rec["train_ce"]
        if stopper.update(net, epoch, score, rec):
            break
    return stopper.finish(net)
