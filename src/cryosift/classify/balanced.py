"""BSK-means++: balanced-size K-means++ (seed 001), and the "reliable samples" near the centres.

Seed 001 clusters DRVAE-denoised images with a K-means++ whose classes are kept from becoming
extremely unequal ("avoids the extreme imbalance of class size"); it does not state the
constraint in its abstract. The constraint implemented here is a **lower bound on every class
size**, no upper bound and no equality:

    |class j| >= m = ceil(min_fraction * N / k)   for every j   (default min_fraction = 0.35)

Why a lower bound: the failure the seed fights is k-means at low SNR leaving tiny (or empty)
classes that soak up a few outliers while one class swallows several views. Exact equal sizes
would forbid that too, but real (and B4's 4:1) view populations are unequal, and an equality
constraint must then move correct members of the large classes into the small ones: with B4's
geometric 4:1 weights the smallest true class holds about 0.45 of the mean size and the largest
about 1.8 of it, so equal sizes cost ~20 % accuracy even for a perfect clusterer. A floor at
0.35 of the mean (just above the 1/3 of the mean that issue 6 asks the smallest class to keep)
leaves every genuine class of such a dataset free and binds only on degenerate ones. Large
classes need no cap: if two views merge, the floor on the emptied class forces it to take the
points it fits best, which is what splits them.

Assignment step (exact): minimise sum_i |x_i - c_a(i)|^2 subject to the floor. This is a
transportation problem; its optimum is "each point to argmin_j (d_ij - p_j)" for prices
p_j >= 0 that are positive only on classes sitting exactly at the floor (complementary
slackness). :func:`balanced_assign` finds them in two phases: a bulk dual ascent (the
shortest class raises its price by exactly the margin that brings it its missing points, one
vectorised pass over the (N, k) distances), then successive shortest paths on the k x k graph
of classes (one point at a time along the cheapest chain of moves), which is exact; checked
against an LP solver in the tests. 5 000 x 50 with 45 classes short: 0.4 s.
Update step: class means. Iterate to a fixed point (or `max_iter`); of `n_init` k-means++
seedings (Arthur & Vassilvitskii's D^2 sampling, scikit-learn's ``kmeans_plusplus`` with one
trial per centre: its greedy variant costs 6x more and `n_init` restarts already guard against
a bad seeding) the run of lowest cost wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cryosift.errors import CryosiftError

__all__ = [
    "BSKResult",
    "balanced_assign",
    "bsk_fit",
    "bsk_means_pp",
    "class_sums",
    "min_class_size",
    "reliable_mask",
    "squared_distances",
]

DEFAULT_MIN_FRACTION = 0.35


@dataclass
class BSKResult:
    """Labels (N,) in 0..k-1, centres (k, D), total squared distance, iterations, restarts."""

    labels: np.ndarray
    centers: np.ndarray
    inertia: float
    n_iter: int
    min_size: int
    info: dict[str, Any] = field(default_factory=dict)


def _check(features: np.ndarray, k: int) -> np.ndarray:
    x = np.asarray(features)
    if x.ndim != 2:
        raise CryosiftError(
            f"features must be a 2-D array (images x features), got shape {x.shape}"
        )
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise CryosiftError(f"the number of classes K must be an integer, got {k!r}")
    if k < 2:
        raise CryosiftError(f"the number of classes K must be at least 2, got {k}")
    if k > n:
        raise CryosiftError(f"K = {k} classes is more than the {n} images given")
    if x.shape[1] < 1:
        raise CryosiftError("features have no columns")
    if not np.isfinite(x).all():
        raise CryosiftError("features contain NaN or Inf")
    return np.ascontiguousarray(x, dtype=np.float64)


def min_class_size(n: int, k: int, min_fraction: float = DEFAULT_MIN_FRACTION) -> int:
    """The floor m = ceil(min_fraction * n / k) (at least 1; at most n // k, always feasible)."""
    if not 0 <= min_fraction <= 1:
        raise CryosiftError(f"min_fraction must lie in [0, 1], got {min_fraction}")
    return int(min(max(1, math.ceil(min_fraction * n / k - 1e-9)), n // k))


def squared_distances(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """(N, k) squared Euclidean distances, |x|^2 - 2 x.c + |c|^2, clipped at 0."""
    d = (x * x).sum(1)[:, None] - 2.0 * (x @ centers.T) + (centers * centers).sum(1)[None, :]
    return np.maximum(d, 0.0)


def balanced_assign(
    dist: np.ndarray, min_size: int, ascent_rounds: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact min-cost assignment of N points to k classes with every class >= `min_size`.

    `dist` (N, k): cost of each point in each class. Returns (labels (N,), prices (k,)).
    Invariant throughout: every point sits in a class minimising dist - prices, and a class
    with a positive price holds at most `min_size` points; at the end no class is short, so
    priced classes hold exactly `min_size` and the assignment is optimal (LP duality).
    Bulk phase (at most `ascent_rounds`, default 4k): the shortest class raises its price
    by the margin that brings it all its missing points at once. Exact phase: one point at a
    time along the cheapest chain of moves (Dijkstra on the k x k class graph, prices updated
    as potentials: successive shortest paths), which ends the price wars of the bulk phase."""
    dist = np.asarray(dist, dtype=np.float64)
    n, k = dist.shape
    if min_size * k > n:
        raise CryosiftError(f"cannot give {k} classes {min_size} points each from {n} points")
    rows = np.arange(n)
    labels = np.argmin(dist, axis=1)
    sizes = np.bincount(labels, minlength=k)
    prices = np.zeros(k)
    if sizes.min() >= min_size:
        return labels, prices
    for _ in range(4 * k if ascent_rounds is None else ascent_rounds):
        short = min_size - sizes
        j = int(np.argmax(short))
        need = int(short[j])
        if need <= 1:
            break
        margin = (dist[:, j] - prices[j]) - (dist[rows, labels] - prices[labels])
        margin[labels == j] = np.inf
        take = np.argpartition(margin, need - 1)[:need]
        prices[j] += float(margin[take].max())
        np.subtract.at(sizes, labels[take], 1)
        labels[take] = j
        sizes[j] += need
    # exact phase: edge[a, b] = cheapest reduced cost of moving one point of a into b
    edge = np.full((k, k), np.inf)
    arg = np.zeros((k, k), dtype=np.int64)
    cols = np.arange(k)

    def refresh(a: int) -> None:
        mem = np.flatnonzero(labels == a)
        if len(mem) == 0:
            edge[a] = np.inf
            return
        r = (dist[mem] - prices) - (dist[mem, a] - prices[a])[:, None]
        r[:, a] = np.inf
        best = r.argmin(0)
        edge[a] = r[best, cols]
        arg[a] = mem[best]

    for a in range(k):
        refresh(a)
    while True:
        short = min_size - sizes
        if short.max() <= 0:
            return labels, prices
        t = int(np.argmax(short))
        d = np.full(k, np.inf)
        d[t] = 0.0
        done = np.zeros(k, dtype=bool)
        nxt = np.full(k, -1)
        while True:  # Dijkstra towards t, stopping at the nearest class that can spare a point
            b = int(np.argmin(np.where(done, np.inf, d)))
            if done[b] or not np.isfinite(d[b]):
                raise CryosiftError("balanced assignment is infeasible")  # cannot happen
            done[b] = True
            if b != t and sizes[b] > min_size:
                break
            cand = np.maximum(edge[:, b], 0.0) + d[b]
            upd = ~done & (cand < d)
            d[upd] = cand[upd]
            nxt[upd] = b
        delta = np.where(done, np.maximum(d[b] - d, 0.0), 0.0)
        prices += delta
        edge += delta[:, None] - delta[None, :]
        path = [b]
        c = b
        while c != t:
            nb = int(nxt[c])
            labels[arg[c, nb]] = nb
            c = nb
            path.append(c)
        sizes[b] -= 1
        sizes[t] += 1
        for c in path:
            refresh(c)


def class_sums(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, D) sums of the rows of `x` (N, D) per label, by one sparse product (fast)."""
    from scipy.sparse import csr_matrix

    onehot = csr_matrix((np.ones(len(labels)), (labels, np.arange(len(labels)))), (k, len(x)))
    return np.asarray(onehot @ x)


def _centres(x: np.ndarray, labels: np.ndarray, k: int, old: np.ndarray) -> np.ndarray:
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    sums = class_sums(x, labels, k)
    out = old.copy()
    nz = counts > 0
    out[nz] = sums[nz] / counts[nz, None]
    return out


def bsk_fit(
    features: np.ndarray,
    k: int,
    seed: int = 0,
    min_fraction: float = DEFAULT_MIN_FRACTION,
    n_init: int = 10,
    max_iter: int = 100,
    init: np.ndarray | None = None,
) -> BSKResult:
    """BSK-means++ on `features` (N, D); the best of `n_init` k-means++ seedings (or the given
    `init` centres, one run). Deterministic for a given `seed`."""
    from sklearn.cluster import kmeans_plusplus

    x = _check(features, k)
    n = len(x)
    if n_init < 1 or max_iter < 1:
        raise CryosiftError("n_init and max_iter must be >= 1")
    m = min_class_size(n, k, min_fraction)
    # centre the data: distances are unchanged and |x|^2 - 2x.c + |c|^2 loses less precision
    mu = x.mean(0)
    xc = x - mu
    rng = np.random.default_rng(seed)
    starts: list[np.ndarray]
    if init is not None:
        init = np.asarray(init, dtype=np.float64)
        if init.shape != (k, x.shape[1]):
            raise CryosiftError(f"init centres must have shape {(k, x.shape[1])}, got {init.shape}")
        starts = [init - mu]
    else:
        starts = [
            kmeans_plusplus(xc, k, random_state=int(rng.integers(2**31 - 1)), n_local_trials=1)[0]
            for _ in range(n_init)
        ]
    best: BSKResult | None = None
    for c in starts:
        labels = np.full(n, -1)
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            new, _ = balanced_assign(squared_distances(xc, c), m)
            c = _centres(xc, new, k, c)
            if np.array_equal(new, labels):
                break
            labels = new
        d = squared_distances(xc, c)
        inertia = float(d[np.arange(n), labels].sum())
        if best is None or inertia < best.inertia:
            best = BSKResult(labels.astype(np.int64), c + mu, inertia, n_iter, m)
    assert best is not None
    best.info = {"n_init": len(starts), "min_fraction": min_fraction, "min_size": m}
    return best


def bsk_means_pp(
    features: np.ndarray,
    k: int,
    seed: int = 0,
    min_fraction: float = DEFAULT_MIN_FRACTION,
    n_init: int = 10,
    max_iter: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """BSK-means++ (see the module docstring): (labels (N,) int in 0..k-1, centres (k, D)).

    Every class holds at least ceil(min_fraction * N / k) images; `CryosiftError` for K < 2,
    K > N, features that are not (N, D) or not finite."""
    r = bsk_fit(features, k, seed, min_fraction, n_init, max_iter)
    return r.labels, r.centers


def reliable_mask(
    features: np.ndarray, labels: np.ndarray, centers: np.ndarray, fraction: float = 0.5
) -> np.ndarray:
    """Seed 001's reliable samples: in every class, the `fraction` of its members nearest to
    its centre (at least one per non-empty class). Boolean (N,)."""
    if not 0 < fraction <= 1:
        raise CryosiftError(f"the reliable fraction must lie in (0, 1], got {fraction}")
    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    d = ((x - np.asarray(centers, dtype=np.float64)[labels]) ** 2).sum(1)
    keep = np.zeros(len(x), dtype=bool)
    for j in np.unique(labels):
        idx = np.flatnonzero(labels == j)
        n_keep = max(1, int(round(fraction * len(idx))))
        keep[idx[np.argsort(d[idx], kind="stable")[:n_keep]]] = True
    return keep
