"""One registry of methods, shared by the CLI, `cryosift run` and `cryosift bench`.

A method is registered once, under a kind and a name, with a factory that builds it from keyword
parameters, the inputs it needs beyond the noisy images (e.g. "clean" for oracles, "pairs" for
Noise2Noise, "ctf"), its default parameters and, for benchmarks, a grid to tune it on. Adding a
method is one new module plus one `register(...)` call in it.

Denoisers (kind "denoiser") are built into callables `f(task: DenoiseTask) -> np.ndarray` that
return the denoised stack; screeners into `f(task: ScreenTask) -> np.ndarray` of particle
probabilities; clusterers into `f(task: ClusterTask) -> ClusterResult`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from cryosift.errors import CryosiftError

KINDS = ("denoiser", "screener", "clusterer")


@dataclass
class DenoiseTask:
    """What a denoiser may look at. `clean` only for oracles; `noisy_b` only with pairs."""

    noisy: np.ndarray  # (N, box, box) float32
    pixel_size: float
    metadata: pd.DataFrame | None = None  # STAR rows with optics columns merged (CTF etc.)
    clean: np.ndarray | None = None
    noisy_b: np.ndarray | None = None
    seed: int = 0


@dataclass
class ScreenTask:
    """Train on labelled images (1 = particle, 0 = junk), then score `images`."""

    train_images: np.ndarray  # (M, box, box) float32
    train_labels: np.ndarray  # (M,) int 0/1
    images: np.ndarray  # (N, box, box) float32, to score
    pixel_size: float
    seed: int = 0
    clean_templates: np.ndarray | None = None  # only for oracles


@dataclass
class ClusterTask:
    """Group `images` into `k` classes (unsupervised)."""

    images: np.ndarray  # (N, box, box) float32
    k: int
    pixel_size: float
    metadata: pd.DataFrame | None = None
    seed: int = 0
    clean: np.ndarray | None = None  # only for oracles


@dataclass
class ClusterResult:
    """Labels 0..k-1 per image; class averages; in-plane angle/shift for aligning methods."""

    labels: np.ndarray  # (N,) int
    averages: np.ndarray | None = None  # (k, box, box)
    psi: np.ndarray | None = None  # (N,) degrees, RELION _rlnAnglePsi convention
    shifts: np.ndarray | None = None  # (N, 2) Å, RELION _rlnOriginX/YAngst convention
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A registered method: how to build it and what it needs."""

    kind: str
    name: str
    factory: Callable[..., Any]
    summary: str
    needs: frozenset[str] = frozenset()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    tune: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    oracle: bool = False
    quick: Mapping[str, Any] = field(default_factory=dict)  # overrides for `bench --quick`

    def build(self, **params: Any) -> Any:
        return self.factory(**{**self.defaults, **params})


_REGISTRY: dict[str, dict[str, Method]] = {k: {} for k in KINDS}


def register(method: Method) -> Method:
    """Add a method; a second registration under the same kind and name is an error."""
    if method.kind not in _REGISTRY:
        raise ValueError(f"unknown method kind {method.kind!r}")
    if method.name in _REGISTRY[method.kind]:
        raise ValueError(f"{method.kind} {method.name!r} is registered twice")
    _REGISTRY[method.kind][method.name] = method
    return method


def _load_builtin() -> None:
    """Import the modules that register the built-in methods (idempotent)."""
    import cryosift.classify.drvae  # noqa: F401
    import cryosift.classify.methods  # noqa: F401
    import cryosift.denoise.cdae  # noqa: F401
    import cryosift.denoise.cwf  # noqa: F401
    import cryosift.denoise.methods  # noqa: F401
    import cryosift.filters.methods  # noqa: F401
    import cryosift.oracles.methods  # noqa: F401
    import cryosift.screen.methods  # noqa: F401


def get(kind: str, name: str) -> Method:
    _load_builtin()
    try:
        return _REGISTRY[kind][name]
    except KeyError:
        raise CryosiftError(
            f"unknown {kind} {name!r} (choose from {', '.join(sorted(_REGISTRY.get(kind, {})))})"
        ) from None


def available(kind: str) -> list[Method]:
    _load_builtin()
    return sorted(_REGISTRY[kind].values(), key=lambda m: m.name)
