"""Features for 2D clustering: masked pixels, randomised PCA, denoised images, rotation invariants.

Every feature extractor takes a stack (N, box, box) and returns an (N, D) float32 matrix:

- ``raw``: the pixels inside a disk (radius 0.45 box), each image standardised to mean 0 and
  standard deviation 1 inside the disk, so that clusters follow shape, not brightness or contrast.
- ``pca``: the raw features reduced by scikit-learn's randomised PCA (seed 004's "PCA + k-means").
- ``rotinv``: rotation-invariant Fourier-Bessel features for data with in-plane rotations. An
  image's steerable coefficients z_kq (angular frequency k, radial index q; the basis of
  :mod:`cryosift.denoise.cwf`) pick up a phase e^{-ik alpha} when the image turns by alpha, so the
  products z_kq conj(z_kq') of one angular frequency do not change: for every k <= ``max_k`` the
  upper triangle of that Hermitian matrix (real and imaginary parts) over the first ``max_q``
  radial functions, signed square roots to tame their quadratic noise, then PCA.
- ``denoised:NAME``: the raw features of the images after the registered denoiser NAME (e.g.
  ``denoised:cwf``), so any denoiser of the benchmark doubles as a feature extractor.

Images are Fourier-cropped to at most ``size`` px first (default 64; 32 for ``rotinv``): the
classes differ at low resolution and the cost falls with the square of the size.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from cryosift.errors import InputError

__all__ = [
    "FEATURE_KINDS",
    "CHUNKED_KINDS",
    "ROTINV_BLOCK",
    "check_feature_kind",
    "chunk_features",
    "compute_features",
    "disk_mask",
    "features_on_engine",
    "finish_features",
    "fourier_crop",
    "has_ctf",
    "phase_flip",
    "pca_features",
    "raw_features",
    "rotinv_features",
    "rotinv_invariants",
    "standardise",
]

FEATURE_KINDS = ("raw", "pca", "rotinv", "denoised:NAME")
MASK_FRACTION = 0.45  # disk radius / box: the particle, not the corners' noise


def disk_mask(box: int, radius: float | None = None, edge: float = 2.0) -> np.ndarray:
    """Soft disk (box, box) float32 centred at pixel box//2: 1 inside `radius`, cosine edge."""
    radius = MASK_FRACTION * box if radius is None else float(radius)
    c = np.arange(box) - box // 2
    r = np.hypot(c[:, None], c[None, :])
    t = np.clip((r - radius) / max(edge, 1e-6), 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * t))).astype(np.float32)


def fourier_crop(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Downsample (N, n, n) images centred at n//2 to (N, size, size) by cropping the spectrum.

    Keeps the centre at pixel size//2 and the pixel values' scale (a constant image stays
    constant). Returns the input (as float32 tensor) when size >= n.
    """
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    x = x.to(torch.float32)
    n = x.shape[-1]
    if size >= n:
        return x
    f = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1))), dim=(-2, -1))
    lo = n // 2 - size // 2
    f = f[..., lo : lo + size, lo : lo + size]
    out = torch.fft.ifft2(torch.fft.ifftshift(f, dim=(-2, -1))).real
    return torch.fft.fftshift(out, dim=(-2, -1)) * (size / n) ** 2


def standardise(images: np.ndarray | torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    """Per image: mean 0, standard deviation 1 inside the mask (weights), then times the mask."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images)
    x = x.to(torch.float32)
    w = torch.as_tensor(mask, dtype=torch.float32)
    ws = w.sum()
    mean = (x * w).sum((-2, -1), keepdim=True) / ws
    var = (((x - mean) ** 2) * w).sum((-2, -1), keepdim=True) / ws
    return (x - mean) / var.clamp_min(1e-12).sqrt() * w


def has_ctf(metadata: pd.DataFrame | None) -> bool:
    """Whether the particle rows carry RELION CTF parameters."""
    return metadata is not None and {"rlnDefocusU", "rlnVoltage"} <= set(metadata.columns)


def phase_flip(
    images: np.ndarray, metadata: pd.DataFrame, pixel_size: float, chunk: int = 1024
) -> np.ndarray:
    """Multiply every image's spectrum by the sign of its CTF (RELION's CTF of its STAR row).

    Images of one view taken at different defoci then agree in the sign of every frequency, so
    that averaging and correlating them add up instead of cancelling between CTF zeros.
    """
    from cryosift.filters.ctf import batch_ctf
    from cryosift.filters.parallel import single_threaded_torch

    out = np.empty(images.shape, dtype=np.float32)
    n = images.shape[-1]
    # single-threaded: MKL's multi-threaded inverse FFT rounds differently, and a Dask worker
    # (one thread) must give the same features as this process
    with single_threaded_torch():
        for s in range(0, len(images), chunk):
            ctf = batch_ctf(metadata.iloc[s : s + chunk], n, pixel_size)
            f = torch.fft.rfft2(torch.as_tensor(np.asarray(images[s : s + chunk], np.float32)))
            out[s : s + chunk] = torch.fft.irfft2(f * torch.sign(ctf), s=(n, n)).numpy()
    return out


def _check_stack(images: np.ndarray) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2] or arr.shape[0] == 0:
        raise InputError(f"images must be a non-empty stack (N, box, box), got shape {arr.shape}")
    return arr


def raw_features(images: np.ndarray, size: int = 64, chunk: int = 2048) -> np.ndarray:
    """Standardised pixels inside the disk of every image, Fourier-cropped to <= `size` px."""
    images = _check_stack(images)
    m = min(size, images.shape[-1])
    mask = disk_mask(m)
    keep = torch.as_tensor(mask.reshape(-1) > 0)
    out = np.empty((len(images), int(keep.sum())), dtype=np.float32)
    for s in range(0, len(images), chunk):
        x = standardise(fourier_crop(images[s : s + chunk], m), mask)
        out[s : s + chunk] = x.reshape(len(x), -1)[:, keep].numpy()
    return out


def pca_features(features: np.ndarray, n_components: int = 50, seed: int = 0) -> np.ndarray:
    """Randomised PCA (scikit-learn) to at most `n_components` dimensions."""
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float32)
    n_comp = int(min(n_components, x.shape[0] - 1, x.shape[1]))
    if n_comp < 1:
        return x
    pca = PCA(n_components=n_comp, svd_solver="randomized", random_state=seed)
    return pca.fit_transform(x).astype(np.float32)


#: rotinv expands images on the basis in blocks of this many (a matrix product whose float
#: rounding depends on the number of rows): chunked runs split stacks at multiples of it
ROTINV_BLOCK = 1024


def rotinv_invariants(
    images: np.ndarray,
    size: int = 32,
    max_k: int = 12,
    max_q: int = 8,
    chunk: int = ROTINV_BLOCK,
) -> np.ndarray:
    """The per-image part of ``rotinv``: signed square roots of the invariant products (N, D)."""
    from cryosift.denoise.cwf import steerable_basis

    images = _check_stack(images)
    m = min(size, images.shape[-1])
    m -= m % 2
    basis = steerable_basis(m, 0.9)
    mask = disk_mask(m)
    ks = [b for b, k in enumerate(basis.ks) if k <= max_k]
    iu = {}
    feats = []
    for s in range(0, len(images), chunk):
        x = standardise(fourier_crop(images[s : s + chunk], m), mask)
        z = basis.to_blocks(basis.expand(x))  # (blocks, B, n_max) complex128
        parts = []
        for b in ks:
            q = min(max_q, basis.sizes[b])
            zb = z[b, :, :q]
            g = zb[:, :, None] * zb.conj()[:, None, :]  # (B, q, q) Hermitian, invariant
            if q not in iu:
                iu[q] = torch.triu_indices(q, q)
            r, c = iu[q]
            v = g[:, r, c]
            parts.append(v.real)
            if basis.ks[b]:
                off = r != c
                parts.append(v.imag[:, off])
        f = torch.cat(parts, 1)
        feats.append((torch.sign(f) * f.abs().sqrt()).to(torch.float32).numpy())
    return np.concatenate(feats)


def _rotinv_finish(
    invariants: np.ndarray, n_components: int | None = 50, seed: int = 0
) -> np.ndarray:
    """The whole-stack part of ``rotinv``: standardise every column, then PCA."""
    out = np.asarray(invariants, dtype=np.float32)
    out = (out - out.mean(0)) / np.maximum(out.std(0), 1e-12)
    if n_components:
        out = pca_features(out, n_components, seed)
    return out.astype(np.float32)


def rotinv_features(
    images: np.ndarray,
    size: int = 32,
    max_k: int = 12,
    max_q: int = 8,
    n_components: int | None = 50,
    seed: int = 0,
    chunk: int = ROTINV_BLOCK,
) -> np.ndarray:
    """Rotation-invariant Fourier-Bessel products (see the module docstring), then PCA."""
    return _rotinv_finish(rotinv_invariants(images, size, max_k, max_q, chunk), n_components,
                          seed)


#: feature kinds whose per-image part can run chunk by chunk (e.g. on a Dask cluster)
CHUNKED_KINDS = ("raw", "pca", "rotinv")


def chunk_features(images: np.ndarray, kind: str) -> np.ndarray:
    """The per-image part of features ``kind`` (one of CHUNKED_KINDS) for a chunk of images.

    Concatenating the chunks of a stack and passing them to :func:`finish_features` gives
    exactly :func:`compute_features` of the whole stack.
    """
    kind = kind.strip()
    if kind in ("raw", "pca"):
        return raw_features(images)
    if kind == "rotinv":
        return rotinv_invariants(images)
    raise ValueError(f"features {kind!r} are not computed chunk by chunk")


def finish_features(
    parts: np.ndarray, kind: str, n_components: int = 50, seed: int = 0
) -> np.ndarray:
    """The whole-stack part of features ``kind`` from the concatenated :func:`chunk_features`."""
    kind = kind.strip()
    if kind == "raw":
        return np.asarray(parts, dtype=np.float32)
    if kind == "pca":
        return pca_features(parts, n_components, seed)
    if kind == "rotinv":
        return _rotinv_finish(parts, n_components, seed)
    raise ValueError(f"features {kind!r} are not computed chunk by chunk")


def features_on_engine(
    src: Any,
    kind: str,
    engine: Any,
    phase_flip: bool = False,
    n_components: int = 50,
    seed: int = 0,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Features ``kind`` (one of CHUNKED_KINDS) of the file-backed source ``src``, the per-image
    part run chunk by chunk on a Dask ``engine`` (:mod:`cryosift.engine`).

    ``phase_flip``: CTF phase-flip every image with its STAR row first (as the in-process path
    does before :func:`compute_features`). Equal to :func:`compute_features` of the (flipped)
    images; the client holds only the (N, D) features. For ``rotinv`` the chunk size is rounded
    up to a multiple of :data:`ROTINV_BLOCK`, so that the matrix products see the same rows.
    """
    from cryosift.engine import FeatureOp, SourceSpec

    kind = kind.strip()
    if kind not in CHUNKED_KINDS:
        raise ValueError(f"features {kind!r} are not computed chunk by chunk")
    if kind == "rotinv":
        chunk_size = -(-int(chunk_size) // ROTINV_BLOCK) * ROTINV_BLOCK
    op = FeatureOp(kind, phase_flip=phase_flip)
    parts = [f for _, f in engine.map_results(
        SourceSpec.of(src), op, len(src), int(chunk_size), desc=f"features {kind}")]
    return finish_features(np.concatenate(parts), kind, n_components, seed)


def denoise_stack(
    images: np.ndarray,
    name: str,
    pixel_size: float,
    metadata: pd.DataFrame | None = None,
    seed: int = 0,
    params: dict | None = None,
) -> np.ndarray:
    """Run the registered denoiser `name` (e.g. cwf, cdae) on the stack (`params`: overrides)."""
    from cryosift.errors import CryosiftError
    from cryosift.registry import DenoiseTask, get

    method = get("denoiser", name)
    if method.oracle or method.needs - {"ctf"}:
        raise CryosiftError(
            f"denoiser {name!r} needs {', '.join(sorted(method.needs)) or 'the clean images'}; "
            "features need a denoiser that works from the noisy images alone"
        )
    task = DenoiseTask(
        noisy=np.asarray(images, dtype=np.float32),
        pixel_size=pixel_size,
        metadata=metadata,
        seed=seed,
    )
    return np.asarray(method.build(**(params or {}))(task), dtype=np.float32)


def check_feature_kind(kind: str) -> str:
    """Refuse an unknown feature kind or denoiser before any image is read."""
    from cryosift.errors import CryosiftError
    from cryosift.registry import get

    kind = kind.strip()
    if kind in ("raw", "pca", "rotinv"):
        return kind
    if kind.startswith("denoised:"):
        name, _, post = kind[len("denoised:") :].partition("+")
        get("denoiser", name)  # raises for an unknown name
        if post not in ("", "pca"):
            raise CryosiftError(f"unknown feature suffix '+{post}' in {kind!r} (only +pca)")
        return kind
    raise CryosiftError(
        f"unknown features {kind!r} (choose from {', '.join(FEATURE_KINDS)}, or a .npy file)"
    )


def compute_features(
    images: np.ndarray,
    kind: str = "pca",
    pixel_size: float = 1.0,
    metadata: pd.DataFrame | None = None,
    seed: int = 0,
    n_components: int = 50,
) -> np.ndarray:
    """Features of `kind` (raw, pca, rotinv, denoised:NAME, denoised:NAME+pca) for a stack."""
    from cryosift.errors import CryosiftError

    kind = kind.strip()
    if kind == "raw":
        return raw_features(images)
    if kind == "pca":
        return pca_features(raw_features(images), n_components, seed)
    if kind == "rotinv":
        return rotinv_features(images, n_components=n_components, seed=seed)
    if kind.startswith("denoised:"):
        name, _, post = kind[len("denoised:") :].partition("+")
        den = denoise_stack(images, name, pixel_size, metadata, seed)
        feats = raw_features(den)
        if post == "pca":
            return pca_features(feats, n_components, seed)
        if post:
            raise CryosiftError(f"unknown feature suffix '+{post}' in {kind!r} (only +pca)")
        return feats
    raise CryosiftError(
        f"unknown features {kind!r} (choose from {', '.join(FEATURE_KINDS)}, or a .npy file)"
    )
