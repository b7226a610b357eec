"""Oracles registered as denoisers: they read the clean stack, so benchmarks mark them as such."""

from __future__ import annotations

import numpy as np

from cryosift.oracles.denoise import wiener_oracle
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
        return wiener_oracle(task.noisy, task.clean, _ctf_function(task))

    return run


register(
    Method(
        "denoiser",
        "wiener_oracle",
        _wiener,
        "Wiener filter with the true signal and noise spectra (CTF-aware)",
        needs=frozenset({"clean"}),
        oracle=True,
    )
)
