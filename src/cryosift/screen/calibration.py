"""Turning a screener's raw score (a logit) into a calibrated probability of being a particle.

Platt scaling fits p = sigmoid(a·z + b) to held-out images by weighted maximum likelihood;
temperature scaling is the special case b = 0, a = 1/T (it keeps the decision boundary z = 0).
The held-out images are weighted so that both classes count equally: the probabilities are those
of a dataset with equal numbers of particles and junk, whatever the training set's imbalance
(a dataset with another junk fraction shifts them; `--keep-fraction` needs no calibration).
"""

from __future__ import annotations

import numpy as np
import torch


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-sample weights giving each class the same total weight (mean weight 1)."""
    y = np.asarray(labels).astype(int)
    w = np.ones(len(y), dtype=np.float64)
    for c in (0, 1):
        n = int((y == c).sum())
        if n:
            w[y == c] = len(y) / (2.0 * n)
    return w


def fit_platt(
    logits: np.ndarray, labels: np.ndarray, temperature_only: bool = False, iters: int = 200
) -> dict[str, float]:
    """{"a", "b"} of p = sigmoid(a·z + b) by class-balanced log-likelihood (L-BFGS, float64)."""
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float64))
    w = torch.as_tensor(balanced_weights(np.asarray(labels)))
    log_a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    params = [log_a] if temperature_only else [log_a, b]
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        s = torch.exp(log_a) * z + b
        loss = (w * torch.nn.functional.binary_cross_entropy_with_logits(
            s, y, reduction="none")).mean() + 1e-6 * log_a**2
        loss.backward()
        return loss

    opt.step(closure)
    a = float(torch.exp(log_a).detach())
    bb = float(b.detach())
    if not (np.isfinite(a) and np.isfinite(bb)):  # degenerate (e.g. perfectly separated)
        a, bb = 1.0, 0.0
    return {"a": a, "b": bb}


def apply_platt(logits: np.ndarray, calib: dict[str, float]) -> np.ndarray:
    """Calibrated probabilities in [0, 1] (float64)."""
    s = float(calib.get("a", 1.0)) * np.asarray(logits, dtype=np.float64) + float(
        calib.get("b", 0.0)
    )
    return 1.0 / (1.0 + np.exp(-np.clip(s, -500, 500)))
