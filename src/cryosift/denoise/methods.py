"""Learned denoisers registered for `cryosift bench` (trained on the benchmark's own noisy data)."""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np

from cryosift.denoise.apply import denoise_array
from cryosift.denoise.training import TrainConfig, train_denoiser
from cryosift.registry import DenoiseTask, Method, register


def _trained(method: str):
    def factory(**params: Any):
        def run(task: DenoiseTask) -> np.ndarray:
            from cryosift.denoise.model_io import load_model

            cfg = TrainConfig(method=method, seed=task.seed, **params)
            with tempfile.TemporaryDirectory(prefix=f"cryosift-{method}-") as tmp:
                summary = train_denoiser(
                    task.noisy, tmp, cfg, images_b=task.noisy_b, pixel_size=task.pixel_size
                )
                model, _ = load_model(tmp)
            run.params = {
                **summary["train_config"],
                "best_epoch": summary["best_epoch"],  # type: ignore[attr-defined]
                "train_seconds": summary["seconds"],
            }
            return denoise_array(model, task.noisy)

        return run

    return factory


# Benchmark budget: small, fast networks trained on the benchmark's own noisy images.
BENCH_TRAINING = {
    "epochs": 12, "width": 8, "depth": 4, "crop": 48, "patience": 3, "steps_per_epoch": 50,
}
BENCH_QUICK = {"epochs": 5}

register(
    Method(
        "denoiser",
        "n2n",
        _trained("n2n"),
        "Noise2Noise U-Net (seed 003) trained on the two noise realisations",
        needs=frozenset({"pairs"}),
        defaults=BENCH_TRAINING,
        quick=BENCH_QUICK,
    )
)
register(
    Method(
        "denoiser",
        "n2v",
        _trained("n2v"),
        "Noise2Void U-Net (blind-spot, single noisy images)",
        defaults=BENCH_TRAINING,
        quick=BENCH_QUICK,
    )
)


def _shipped(name: str):
    def factory(**params: Any):
        def run(task: DenoiseTask) -> np.ndarray:
            from cryosift.denoise.model_io import load_model

            model, meta = load_model(name)
            run.params = {"model": name, "recipe": meta.get("recipe")}  # type: ignore[attr-defined]
            return denoise_array(model, task.noisy)

        return run

    return factory


register(
    Method(
        "denoiser",
        "general",
        _shipped("general"),
        "shipped general Noise2Noise U-Net (4 other proteins, SNR 0.01-0.5, no training here)",
    )
)
