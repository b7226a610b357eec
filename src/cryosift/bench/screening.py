"""Benchmark B3 (and B5's screening): train every registered screener, score the test set.

The seed's protocol (`000_*` Table 1): train on one simulated set of particles and non-particle
images and test on another, simulated the same way. Here the training set is the test dataset's
spec with another seed (``seed + TRAIN_SEED_OFFSET``), cached beside the test data, so training
and test images never share a noise realisation, a pose or a junk object. Every screener returns
calibrated probabilities; accuracy, precision, recall and F1 are at 0.5, ROC-AUC is threshold-free.
The matched-filter oracle (runner.score_screen_oracle) is scored on the same test images.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from cryosift.bench.runner import BenchData, load_dataset
from cryosift.metrics import screening_metrics
from cryosift.registry import ScreenTask, available

log = logging.getLogger("cryosift")

TRAIN_SEED_OFFSET = 1000


def training_data(data: BenchData, folder: Path, device: str = "cpu") -> BenchData:
    """The training set of a screening benchmark: the same spec, another seed (cached)."""
    spec = replace(data.spec, seed=data.spec.seed + TRAIN_SEED_OFFSET, tasks=("screen",))
    return load_dataset(spec, folder, device)


def score_screeners(
    data: BenchData,
    train_folder: Path,
    quick: bool = False,
    only: list[str] | None = None,
    device: str = "cpu",
) -> dict[str, dict]:
    """Scores of every registered screener (trained on a fresh simulated set) on ``data``."""
    methods = [
        m for m in available("screener") if only is None or m.name in only
    ]
    if not methods:
        return {}
    train = training_data(data, train_folder, device)
    labels = train.is_particle.astype(int)
    truth = data.is_particle.astype(int)
    results: dict[str, dict] = {}
    for method in methods:
        fn = method.build(**(dict(method.quick) if quick else {}))
        task = ScreenTask(
            train_images=train.noisy,
            train_labels=labels,
            images=data.noisy,
            pixel_size=data.pixel_size,
            seed=data.spec.seed,
        )
        t0 = time.time()
        prob = np.asarray(fn(task), dtype=np.float64)
        seconds = time.time() - t0
        scores = screening_metrics(truth, prob, threshold=0.5)
        resolved = getattr(fn, "params", None)
        scores.update(
            kind="screener",
            oracle=method.oracle,
            params=resolved if resolved is not None else dict(method.defaults),
            n_train=int(len(labels)),
            train_particles=int(labels.sum()),
            seconds=seconds,
            mean_probability_particles=float(prob[truth == 1].mean()) if truth.any() else None,
            mean_probability_junk=float(prob[truth == 0].mean()) if (truth == 0).any() else None,
        )
        results[method.name] = scores
        log.info("  %-22s accuracy %.4f  ROC-AUC %.4f", method.name, scores["accuracy"],
                 scores["roc_auc"])
    return results
