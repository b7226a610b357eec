"""Apply a trained denoiser to a stack of any size, chunk by chunk, keeping pixel size and STAR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryosift.errors import CryosiftError
from cryosift.filters.base import BatchContext, Filter

# A model applied at another sampling sees features of another size in pixels: refuse factors
# beyond this (resample the stack first, or train on it).
MAX_PIXEL_SIZE_RATIO = 1.5


class NetworkFilter(Filter):
    """A trained network as a stack filter, so it streams through the same writer as filters."""

    name = "denoise"
    threaded = False  # torch already uses every core

    def __init__(
        self, model: torch.nn.Module, meta: dict[str, Any], device: torch.device, batch: int = 64
    ) -> None:
        self.model, self.meta, self.device, self.batch = model, meta, device, batch

    def params(self) -> dict[str, Any]:
        return {"model": self.meta, "device": str(self.device)}

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

    @torch.no_grad()
    def apply(self, images: np.ndarray, ctx: BatchContext) -> np.ndarray:
        out = np.empty_like(images)
        for start in range(0, len(images), self.batch):
            x = torch.from_numpy(images[start : start + self.batch])[:, None].to(self.device)
            out[start : start + self.batch] = self.model(x)[:, 0].float().cpu().numpy()
        if self.meta.get("histeq"):  # a CDAE fine-tuned with 004's histogram equalisation
            from cryosift.denoise.cdae import histeq_keep_range

            out = histeq_keep_range(out)
        return out


def denoise_array(
    model: torch.nn.Module, images: np.ndarray, device: torch.device | str = "cpu", batch: int = 64
) -> np.ndarray:
    """Denoise an in-memory stack (N, box, box) -> float32 array of the same shape."""
    filt = NetworkFilter(model, {}, torch.device(device), batch)
    return filt(np.asarray(images, dtype=np.float32), BatchContext(pixel_size=None))


def denoise_source(
    model_ref: str | Path,
    source: Any,
    out_star: str | Path,
    device: torch.device | str = "cpu",
    chunk_size: int = 256,
) -> Path:
    """Stream `source` (.star/.mrcs/array) through a saved model into OUT.star + OUT.mrcs."""
    from cryosift.denoise.model_io import load_model
    from cryosift.filters.base import apply_filter_to_source

    model, meta = load_model(model_ref, device)
    return apply_filter_to_source(
        source, NetworkFilter(model, meta, torch.device(device)), out_star, chunk_size
    )
