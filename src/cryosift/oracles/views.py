"""Clustering oracle for datasets with K fixed views: the nearest clean view.

Each view's template is the mean of its clean images (exact when images of a view differ only by
noise; otherwise the best single template in squared error). Every noisy image goes to the
template at the smallest Euclidean distance: the Bayes classifier for white Gaussian noise and
equal class priors. Its accuracy is below 1 when views look alike at the given SNR (ANCHORS A4.4),
which is why it is measured, not assumed.
"""

from __future__ import annotations

import numpy as np


def nearest_clean_view(
    noisy: np.ndarray, clean: np.ndarray, views: np.ndarray, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (the view id of the nearest template) and the templates themselves (K, box, box).

    `views` gives each image's true view id (>= 0; images with negative ids, e.g. junk, are left
    out of the templates but still assigned).
    """
    views = np.asarray(views)
    ids = np.unique(views[views >= 0])
    box = noisy.shape[-1]
    templates = np.zeros((ids.size, box, box))
    counts = np.zeros(ids.size)
    for start in range(0, len(views), chunk):
        v = views[start : start + chunk]
        x = np.asarray(clean[start : start + chunk], dtype=np.float64)
        for j, vid in enumerate(ids):
            sel = v == vid
            if sel.any():
                templates[j] += x[sel].sum(0)
                counts[j] += sel.sum()
    templates /= np.maximum(counts, 1)[:, None, None]
    flat_t = templates.reshape(ids.size, -1)
    t2 = (flat_t**2).sum(1)
    labels = np.empty(len(views), dtype=np.int64)
    for start in range(0, len(views), chunk):
        y = np.asarray(noisy[start : start + chunk], dtype=np.float64).reshape(-1, box * box)
        d = t2[None, :] - 2.0 * y @ flat_t.T  # |y - t|^2 up to the per-image constant |y|^2
        labels[start : start + chunk] = ids[np.argmin(d, axis=1)]
    return labels, templates.astype(np.float32)
