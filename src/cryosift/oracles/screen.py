"""Screening oracle: the matched filter against the true projections (Neyman-Pearson detector).

For a particle image y = t + n (t its clean image, white noise of variance sigma^2) the log
likelihood ratio against "no particle" is linear in z = <y, t> / (sigma |t|), distributed
N(|t|/sigma, 1) for particles and N(0, 1) for pure noise: the optimal detector when the pose is
known, d' = |t| / sigma (ANCHORS A4.5). A non-particle image has no pose, so it is scored against
the clean image of a particle drawn at random: the statistic it would receive from a detector that
hypothesises that particle. The decision statistic is z - |t| / (2 sigma) (threshold 0: equal
priors). Structured junk (ice, carbon, aggregates) can correlate with t, so this is an upper bound
for pure-noise negatives and a strong reference otherwise.
"""

from __future__ import annotations

import numpy as np


def matched_filter_scores(
    noisy: np.ndarray,
    clean: np.ndarray,
    is_particle: np.ndarray,
    noise_var: float,
    seed: int = 0,
    chunk: int = 1024,
) -> np.ndarray:
    """Decision statistic per image (> 0: particle), see module docstring."""
    is_particle = np.asarray(is_particle, bool)
    n = len(is_particle)
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(is_particle)
    if pool.size == 0:
        raise ValueError("the matched-filter oracle needs at least one particle image")
    template_row = np.where(is_particle, np.arange(n), rng.choice(pool, n))
    sigma = float(np.sqrt(noise_var))
    out = np.empty(n)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        y = np.asarray(noisy[start:stop], np.float64).reshape(stop - start, -1)
        t = np.asarray(clean[template_row[start:stop]], np.float64).reshape(stop - start, -1)
        norm = np.linalg.norm(t, axis=1).clip(1e-30)
        out[start:stop] = (y * t).sum(1) / (sigma * norm) - norm / (2 * sigma)
    return out
