"""Apply a trained denoiser to a stack of any size, chunk by chunk, keeping pixel size and STAR."""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryosift.denoise.networks import snr_condition
from cryosift.denoise.sure import WHITE_TOLERANCE, SureBlend, fit_sure_blend
from cryosift.errors import CryosiftError
from cryosift.filters.base import BatchContext, Filter
from cryosift.filters.parallel import in_worker, run_on_threads, single_threaded_torch
from cryosift.malloc import keep_freed_memory

log = logging.getLogger("cryosift")

# A model applied at another sampling sees features of another size in pixels: refuse factors
# beyond this (resample the stack first, or train on it).
MAX_PIXEL_SIZE_RATIO = 1.5
#: pixels per forward pass of a denoiser (the U-Net's activations are ~20x this in floats): 16
#: images of 64 px, 4 of 128 px. Small enough for the activations to stay in cache and in the
#: heap (cryosift.malloc): the general model, one thread, 128 px, runs at 131 images/s in
#: batches of 4 against 99 in batches of 16 (benchmarks/results/scale.md).
BATCH_PIXELS = 4 * 128 * 128


class NetworkFilter(Filter):
    """A trained network as a stack filter, so it streams through the same writer as filters."""

    name = "denoise"
    threaded = False  # parallel over fixed batches instead (see apply)

    def __init__(
        self,
        model: torch.nn.Module,
        meta: dict[str, Any],
        device: torch.device,
        batch: int | None = None,
        tta: bool = False,
        snr: float | None = None,
        blend: SureBlend | None = None,
    ) -> None:
        """``batch``: images per forward pass; default :data:`BATCH_PIXELS` pixels' worth (16
        images of 64 px, 4 of 128 px), which bounds the activations' memory. ``tta``: average
        the network's output over the 8 rotations and flips of each image
        (:func:`dihedral_average`; 8x the compute). ``snr``: the stack's SNR, which a
        conditioned model (the general one) needs (:func:`stack_snr` estimates it). ``blend``:
        a SURE-fitted output stage (:func:`fit_blend`), applied to the network's output."""
        self.model, self.meta, self.device, self.batch = model, meta, device, batch
        self.tta = bool(tta)
        self.snr = snr
        self.blend = blend
        self.net = model
        if is_conditioned(model):
            if snr is None:
                raise CryosiftError("this model is conditioned on the stack's SNR: give it one")
            self.net = partial(model, condition=snr_condition(snr))
        keep_freed_memory()

    def batch_size(self, box: int) -> int:
        if self.batch is not None:
            return max(1, int(self.batch))
        return max(1, min(64, BATCH_PIXELS // (int(box) * int(box))))

    def params(self) -> dict[str, Any]:
        return {"model": self.meta, "device": str(self.device), "tta": self.tta,
                **({"snr": self.snr} if self.snr is not None else {}),
                **({"sure_blend": self.blend.record()} if self.blend is not None else {})}

    def check(self, pixel_size: float | None, box: int) -> None:
        span = self.meta.get("pixel_size_range")  # models trained across pixel sizes
        if span and pixel_size:
            lo, hi = float(span[0]) / MAX_PIXEL_SIZE_RATIO, float(span[1]) * MAX_PIXEL_SIZE_RATIO
            if not lo <= pixel_size <= hi:
                raise CryosiftError(
                    f"the model was trained at {span[0]:.3g}-{span[1]:.3g} Å/px and accepts "
                    f"{lo:.3g}-{hi:.3g} Å/px; the images are at {pixel_size:.3g} Å/px: "
                    "resample the stack or train on it"
                )
        trained = self.meta.get("pixel_size")
        if trained and pixel_size:
            ratio = max(trained / pixel_size, pixel_size / trained)
            if ratio > MAX_PIXEL_SIZE_RATIO:
                raise CryosiftError(
                    f"the model was trained at {trained:.3g} Å/px and the images are at "
                    f"{pixel_size:.3g} Å/px (factor {ratio:.2f} > {MAX_PIXEL_SIZE_RATIO}); "
                    "resample the stack or train on it"
                )
        depth = int(self.meta.get("architecture", {}).get("depth", 4))
        if box < 2 ** (depth - 1) * 2:
            raise CryosiftError(f"box of {box} px is too small for a U-Net of depth {depth}")

    def apply(self, images: np.ndarray, ctx: BatchContext) -> np.ndarray:
        """Batches of ``self.batch`` images at fixed offsets of the chunk; on the CPU each batch
        runs single-threaded, batches in parallel threads (serially inside a worker of
        cryosift.filters.parallel or a Dask task). oneDNN's results for small batches depend
        on the thread count, so fixing both the batches and the threads per batch makes the
        output the same wherever it runs; it is also faster than intra-op threads."""
        out = np.empty_like(images)
        batch = self.batch_size(images.shape[-1])
        starts = list(range(0, len(images), batch))

        def run(start: int) -> None:
            with torch.no_grad():  # grad mode is per thread
                x = torch.from_numpy(images[start : start + batch])[:, None]
                x = x.to(self.device)
                y = dihedral_average(self.net, x) if self.tta else self.net(x)
                out[start : start + batch] = y[:, 0].float().cpu().numpy()

        if self.device.type != "cpu":
            for start in starts:
                run(start)
        else:
            with single_threaded_torch() as threads:
                n_threads = 1 if in_worker() else max(1, min(threads, len(starts)))
                run_on_threads(run, list(starts), n_threads)
        if self.meta.get("histeq"):  # a CDAE fine-tuned with 004's histogram equalisation
            from cryosift.denoise.cdae import histeq_keep_range

            out = histeq_keep_range(out)
        if self.blend is not None:
            out = self.blend.apply(images, out)
        return out


#: images of a stack the SURE blend is fitted on (spread evenly over it)
SURE_FIT_IMAGES = 1000


def fit_blend(filt: NetworkFilter, source: Any, max_images: int = SURE_FIT_IMAGES,
              seed: int = 0, sure: bool | str = True) -> SureBlend | None:
    """The SURE-fitted output stage (:mod:`cryosift.denoise.sure`) of ``filt`` on up to
    ``max_images`` images spread evenly over ``source`` (an array or an ImageSource): per
    radial frequency band, the mix of the network's output and the noisy image with the
    lowest estimated error against the (unseen) clean images.

    ``sure``: True fits it; False returns None; "auto" fits it only when the noise in the
    image corners is white within :data:`cryosift.denoise.sure.WHITE_TOLERANCE` (SURE's
    assumption), and otherwise says why in the log and returns None."""
    from cryosift.denoise.cwf import corner_statistics

    sure = check_sure(sure)
    if sure is False:
        return None
    n = len(source)
    idx = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(np.int64))
    pick = np.asarray(source.images(idx) if hasattr(source, "images") else
                      np.asarray(source)[idx], dtype=np.float32)
    if sure == "auto" and len(pick) < SURE_MIN_IMAGES:
        log.info("SURE output stage skipped: %d images are too few to fit it on (at least %d)",
                 len(pick), SURE_MIN_IMAGES)
        return None
    plain = NetworkFilter(filt.model, filt.meta, filt.device, filt.batch, tta=filt.tta,
                          snr=filt.snr)
    ctx = BatchContext(pixel_size=getattr(source, "pixel_size", None))
    plain.check(ctx.pixel_size, pick.shape[-1])  # a model that does not fit the images is an error
    blend, why = None, None
    try:
        corners = corner_statistics(pick)  # one pass: the noise's variance and colour
        if sure == "auto" and abs(corners.colour) > WHITE_TOLERANCE:
            why = (f"the noise is not white (its power changes by {100 * corners.colour:+.0f}% "
                   "from 0.3-0.4 to 0.4-0.5 cycles/px in the image corners; SURE assumes white "
                   "noise)")
        else:
            blend = fit_sure_blend(lambda y: plain(y, ctx), pick, noise_var=corners.noise_var,
                                   seed=seed)
    except CryosiftError as exc:  # e.g. corners without noise: an error only when forced
        if sure is True:
            raise
        why = str(exc)
    if blend is None:
        log.warning("SURE output stage skipped: %s. --sure fits it anyway, --no-sure "
                    "silences this.", why)
        return None
    log.info("%s", blend.summary())
    return blend


#: fewest images on which ``sure="auto"`` fits the stage (two halves for its cross-validation)
SURE_MIN_IMAGES = 16


def check_sure(sure: bool | str) -> bool | str:
    """``sure`` as True, False or "auto" (what ``denoise apply --sure/--no-sure`` passes)."""
    if isinstance(sure, bool) or sure == "auto":
        return sure
    raise CryosiftError(f"sure must be True, False or 'auto', got {sure!r}")


def dihedral_average(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The mean of ``T⁻¹(model(T(x)))`` over the 8 rotations by 90° and flips T of (B, 1, H, W)
    square images: test-time augmentation.

    A particle has no preferred in-plane orientation, so each of the 8 outputs is an equally
    good estimate and their errors (the network's own, and noise it passes through) differ;
    the mean is better than any one of them and exactly equivariant (rotating the input
    rotates the output).
    """
    total = torch.zeros_like(x)
    for flip in (False, True):
        xf = torch.flip(x, dims=(-1,)) if flip else x
        for k in range(4):
            y = torch.rot90(model(torch.rot90(xf, k, dims=(-2, -1))), -k, dims=(-2, -1))
            total += torch.flip(y, dims=(-1,)) if flip else y
    return total / 8


def is_conditioned(model: Any) -> bool:
    """Whether a network takes the stack's SNR as a condition (the general model)."""
    return int(getattr(getattr(model, "config", None), "conditions", 0) or 0) > 0


def stack_snr(model: Any, source: Any, snr: float | None = None) -> float | None:
    """The SNR to condition ``model`` on: ``snr`` if given, else estimated from the stack
    (:func:`cryosift.denoise.cwf.estimate_snr`) for a conditioned model, else None."""
    if snr is not None:
        if not (math.isfinite(snr) and snr > 0):
            raise CryosiftError(f"--snr must be a positive number, got {snr}")
        return float(snr)
    if not is_conditioned(model):
        return None
    from cryosift.denoise.cwf import estimate_snr

    est = estimate_snr(source)
    log.info("estimated SNR of the stack: %.4g (from the corners' noise level)", est)
    return est


def denoise_array(
    model: torch.nn.Module,
    images: np.ndarray,
    device: torch.device | str = "cpu",
    batch: int | None = None,
    tta: bool = False,
    snr: float | None = None,
    sure: bool | str = False,
) -> np.ndarray:
    """Denoise an in-memory stack (N, box, box) -> float32 array of the same shape (``tta``:
    average over the 8 rotations and flips, :func:`dihedral_average`; ``snr``: for a
    conditioned model, the stack's SNR, estimated from the images when not given; ``sure``:
    add the SURE-fitted output stage, :func:`fit_blend`; "auto": when the noise is white)."""
    images = np.asarray(images, dtype=np.float32)
    snr = stack_snr(model, images, snr)
    filt = NetworkFilter(model, {}, torch.device(device), batch, tta=tta, snr=snr)
    filt.blend = fit_blend(filt, images, sure=sure)
    return filt(images, BatchContext(pixel_size=None))


def denoise_source(
    model_ref: str | Path,
    source: Any,
    out_star: str | Path,
    device: torch.device | str = "cpu",
    chunk_size: int = 256,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    tta: bool = False,
    snr: float | None = None,
    sure: bool | str = "auto",
) -> Path:
    """Stream `source` (.star/.mrcs/array) through a saved model into OUT.star + OUT.mrcs.

    ``scheduler`` / ``workers``: where the chunks run (None: in this process; see
    :mod:`cryosift.engine`); on a cluster every worker loads the model from its path once.
    ``tta``: average over the 8 rotations and flips of each image (8x the compute).
    ``snr``: for a conditioned model (the general one), the stack's SNR; estimated from up to
    2,000 of its images when not given. ``sure``: fit the SURE output stage on up to
    :data:`SURE_FIT_IMAGES` images first (:func:`fit_blend`) and apply it to every image;
    "auto" (the default): only when the noise in the image corners is white.
    """
    from cryosift.denoise.model_io import load_model, resolve_model_path
    from cryosift.engine import DenoiseOp
    from cryosift.filters.base import apply_filter_to_source
    from cryosift.io import open_source

    model, meta = load_model(model_ref, device)
    source = open_source(source)
    snr = stack_snr(model, source, snr)
    filt = NetworkFilter(model, meta, torch.device(device), tta=tta, snr=snr)
    filt.blend = fit_blend(filt, source, sure=sure)
    task = DenoiseOp(
        str(resolve_model_path(model_ref).resolve()), str(torch.device(device)), tta=tta, snr=snr,
        blend=filt.blend,
    )
    return apply_filter_to_source(
        source, filt, out_star, chunk_size,
        scheduler=scheduler, workers=workers, task=task,
    )
