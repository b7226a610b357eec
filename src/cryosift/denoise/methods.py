"""Learned denoisers registered for `cryosift bench` (trained on the benchmark's own noisy data).

Each comes as plain, ``+tta`` (the same model's output averaged over the 8 rotations and flips,
:func:`cryosift.denoise.apply.dihedral_average`) and ``+sure`` (with the output stage fitted by
Stein's unbiased risk estimate on the stack, :mod:`cryosift.denoise.sure`). Within one benchmark
run they share one trained model (cached by method, parameters, seed and the images' hash), so
the rows differ only by what is done to its output.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from cryosift.denoise.apply import denoise_array
from cryosift.denoise.training import TrainConfig, batch_for_box, train_denoiser
from cryosift.registry import DenoiseTask, Method, register

_MODELS: OrderedDict[str, tuple[torch.nn.Module, dict]] = OrderedDict()


def _digest(*arrays: np.ndarray | None) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        if a is not None:
            h.update(np.ascontiguousarray(a, dtype=np.float32).tobytes())
    return h.hexdigest()


def _train_once(method: str, task: DenoiseTask, params: dict) -> tuple[torch.nn.Module, dict]:
    """The model trained with these settings on these images (trained at most once)."""
    from cryosift.denoise.model_io import load_model

    key = json.dumps([method, params, task.seed, task.pixel_size,
                      _digest(task.noisy, task.noisy_b)], sort_keys=True, default=str)
    if key not in _MODELS:
        if "batch_size" not in params:  # as many pixels per step at any box size
            params = {**params, "batch_size": batch_for_box(task.noisy.shape[-1], params["crop"])}
        cfg = TrainConfig(method=method, seed=task.seed, **params)
        with tempfile.TemporaryDirectory(prefix=f"cryosift-{method}-") as tmp:
            summary = train_denoiser(
                task.noisy, tmp, cfg, images_b=task.noisy_b, pixel_size=task.pixel_size
            )
            model, _ = load_model(tmp)
        record = {
            **summary["train_config"],
            "best_epoch": summary["best_epoch"],
            "train_seconds": summary["seconds"],
        }
        _MODELS[key] = (model, record)
        while len(_MODELS) > 2:
            _MODELS.popitem(last=False)
    return _MODELS[key]


def _trained(method: str, tta: bool = False, sure: bool = False):
    def factory(**params: Any):
        def run(task: DenoiseTask) -> np.ndarray:
            model, record = _train_once(method, task, params)
            run.params = {**record, "tta": tta, "sure": sure}  # type: ignore[attr-defined]
            return denoise_array(model, task.noisy, tta=tta, sure=sure)

        return run

    return factory


# Benchmark budget: small, fast networks trained on the benchmark's own noisy images, for as
# many steps per epoch as `cryosift run` trains (100); --quick: 5 epochs of 50 steps. A fixed
# budget with a cosine learning rate and averaged weights: at SNR 0.01 the validation loss is
# itself noisy (~5 %), so early stopping on it picked epochs by chance (B1, 1,000 images:
# n2v 17.24 -> 17.79 dB at SNR 0.01, 20.44 -> 20.69 at 0.05 with this budget). Whole boxes
# (crop 0) with as many pixels per step as 32 crops of 64 px (8 boxes of 128 px): the network
# learns that the box edges are background (fine-tuned n2n at SNR 0.1, against random 48-px
# crops: P10 23.8 -> 25.8 dB, B1 22.38 -> 22.72).
BENCH_TRAINING = {
    "epochs": 12, "width": 8, "depth": 4, "crop": 0, "patience": 99, "steps_per_epoch": 100,
    "schedule": "cosine", "ema": 0.99,
}
BENCH_QUICK = {"epochs": 5, "steps_per_epoch": 50}
# n2n / n2v start from the shipped general model and fine-tune it on the stack with their own
# loss (what `denoise train --init general` does); "-scratch" trains the same budget from
# random weights, as seeds 002/003 do. The general model has the bench's width and depth.
# B1 at SNR 0.01 (1,000 GroEL images): n2n 18.54 -> 18.97 dB, n2v 17.74 -> 18.66.
FINE_TUNE = {"init": "general"}

_TTA = ", averaged over the 8 rotations and flips"
_SURE = ", with the SURE-fitted output stage (cryosift.denoise.sure)"
_START = {
    "": (" (fine-tuned from the shipped general model)", FINE_TUNE),
    "-scratch": (" (from random weights)", {}),
}
#: (suffix, tta, sure) of the variants of each start: plain, +tta and, fine-tuned only, +sure
_VARIANTS = {"": (("", False, False), ("+tta", True, False), ("+sure", False, True)),
             "-scratch": (("", False, False), ("+tta", True, False))}
for _start, (_how, _init) in _START.items():
    for _variant, _tta, _sure in _VARIANTS[_start]:
        _suffix = _start + _variant
        _what = _how + (_TTA if _tta else "") + (_SURE if _sure else "")
        register(
            Method(
                "denoiser",
                "n2n" + _suffix,
                _trained("n2n", _tta, _sure),
                "Noise2Noise U-Net (seed 003) trained on the two noise realisations" + _what,
                needs=frozenset({"pairs"}),
                defaults={**BENCH_TRAINING, **_init},
                quick=BENCH_QUICK,
            )
        )
        register(
            Method(
                "denoiser",
                "n2v" + _suffix,
                _trained("n2v", _tta, _sure),
                "Noise2Void U-Net (blind-spot, single noisy images)" + _what,
                defaults={**BENCH_TRAINING, **_init},
                quick=BENCH_QUICK,
            )
        )


def _shipped(name: str, tta: bool = False, sure: bool = False):
    def factory(**params: Any):
        def run(task: DenoiseTask) -> np.ndarray:
            from cryosift.denoise.model_io import load_model

            model, meta = load_model(name)
            run.params = {  # type: ignore[attr-defined]
                "model": name, "recipe": meta.get("recipe"), "tta": tta, "sure": sure,
            }
            return denoise_array(model, task.noisy, tta=tta, sure=sure)

        return run

    return factory


for _variant, _tta, _sure in _VARIANTS[""]:
    register(
        Method(
            "denoiser",
            "general" + _variant,
            _shipped("general", _tta, _sure),
            "shipped general Noise2Noise U-Net (4 other proteins, SNR 0.01-0.5, no training "
            "here)" + (_TTA if _tta else "") + (_SURE if _sure else ""),
        )
    )


def _sure_wiener(**params: Any):
    def run(task: DenoiseTask) -> np.ndarray:
        from cryosift.denoise.sure import fit_sure_blend

        noisy = np.asarray(task.noisy, dtype=np.float32)
        blend = fit_sure_blend(np.zeros_like, noisy, seed=task.seed)
        run.params = {"sure_blend": blend.record()}  # type: ignore[attr-defined]
        return blend.apply(noisy, np.zeros_like(noisy))

    return run


register(
    Method(
        "denoiser",
        "sure_wiener",
        _sure_wiener,
        "radial Wiener filter fitted on the stack by Stein's unbiased risk estimate (the linear "
        "part of the +sure output stage alone; no network, no clean images)",
    )
)
