"""Oracles registered as denoisers: they read the clean stack, so benchmarks mark them as such."""

from __future__ import annotations

import numpy as np

from cryosift.oracles.denoise import wiener_ensemble, wiener_oracle
from cryosift.registry import DenoiseTask, Method, register


def _ctf_function(task: DenoiseTask):
    meta = task.metadata
    if meta is None or "rlnDefocusU" not in meta:
        return None
    from cryosift.filters.ctf import batch_ctf

    box = task.noisy.shape[-1]
    return lambda a, b: batch_ctf(meta.iloc[a:b], box, task.pixel_size).numpy()


def _wiener(**_: object):
    def run(task: DenoiseTask) -> np.ndarray:
        return wiener_oracle(task.noisy, task.clean)

    return run


def _wiener_ensemble(**_: object):
    def run(task: DenoiseTask) -> np.ndarray:
        return wiener_ensemble(task.noisy, task.clean, _ctf_function(task))

    return run


register(
    Method(
        "denoiser",
        "wiener_oracle",
        _wiener,
        "per-image Wiener filter with each image's true ring spectrum (beats every low-pass)",
        needs=frozenset({"clean"}),
        oracle=True,
    )
)
register(
    Method(
        "denoiser",
        "wiener_ensemble_oracle",
        _wiener_ensemble,
        "Wiener filter with the stack's true ring spectrum and each image's CTF",
        needs=frozenset({"clean"}),
        oracle=True,
    )
)
