"""Screeners registered for `cryosift bench` (kind "screener"): train on labelled images, score.

``rbm`` is the seed's screener (classification RBM on bilateral + histogram-equalised images),
``rbm_nopre`` the same RBM on raw standardised pixels (the seed's ablation), ``cnn`` the small
convolutional screener, on standardised pixels without the chain (histogram equalisation throws
away the intensity information the CNN uses: at SNR 0.0078 on B3 quick data it scored 0.959
accuracy with the chain and 0.986 without). Each factory returns
``f(task: ScreenTask) -> probabilities``; the resolved parameters and the training summary are
left on ``f.params`` for the results table.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cryosift.registry import Method, ScreenTask, register
from cryosift.screen.cnn import CNNConfig
from cryosift.screen.preprocess import PreprocessConfig
from cryosift.screen.rbm import RBMConfig
from cryosift.screen.screener import train_screener


def _screener(method: str, chain: bool):
    def factory(**params: Any):
        def run(task: ScreenTask) -> np.ndarray:
            cfg_cls = RBMConfig if method == "rbm" else CNNConfig
            cfg = cfg_cls(**params)
            prep = PreprocessConfig(chain=chain)
            s = train_screener(
                task.train_images,
                task.train_labels,
                method,
                cfg,
                prep,
                pixel_size=task.pixel_size,
                seed=task.seed,
            )
            run.params = {  # type: ignore[attr-defined]
                **cfg.to_dict(),
                "preprocess": prep.to_dict(),
                "best_epoch": s.info["best_epoch"],
                "train_seconds": s.info["train_seconds"] + s.info["preprocess_seconds"],
                "calibration": s.calibration,
            }
            return s.predict_proba(task.images)

        return run

    return factory


#: benchmark budgets; `bench --quick` trains for fewer epochs
RBM_BENCH = {"epochs": 40, "n_hidden": 256, "patience": 8}
CNN_BENCH = {"epochs": 25, "patience": 6}

register(
    Method(
        "screener",
        "rbm",
        _screener("rbm", True),
        "classification RBM with label units on bilateral + hist-eq images (seed 000)",
        defaults=RBM_BENCH,
        quick={"epochs": 25},
    )
)
register(
    Method(
        "screener",
        "rbm_nopre",
        _screener("rbm", False),
        "the same RBM on raw standardised pixels (seed 000's ablation)",
        defaults=RBM_BENCH,
        quick={"epochs": 25},
    )
)
register(
    Method(
        "screener",
        "cnn",
        _screener("cnn", False),
        "small CNN, rotation/shift augmentation, Platt-calibrated, on standardised pixels",
        defaults=CNN_BENCH,
        quick={"epochs": 15},
    )
)
