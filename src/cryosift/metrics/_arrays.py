"""Shape handling shared by the metrics: every image metric works on (N, H, W) stacks."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def as_stack(x: ArrayLike, name: str = "images") -> np.ndarray:
    """Return `x` as a floating (N, H, W) array; a single (H, W) image becomes N = 1.

    Floating inputs keep their dtype (no float64 copy of a float32 stack); other dtypes
    become float64. Reductions in the metrics accumulate in float64 regardless.
    """
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise ValueError(
            f"{name}: expected an (N, H, W) stack or an (H, W) image, got shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"{name}: empty array of shape {arr.shape}")
    return arr


def as_pair(
    a: ArrayLike, b: ArrayLike, names: tuple[str, str] = ("pred", "ref")
) -> tuple[np.ndarray, np.ndarray]:
    """Return two stacks of equal shape; a single image is broadcast against a stack.

    Broadcasting is a read-only view (no copy), so comparing N images with one reference
    costs no extra memory.
    """
    x = as_stack(a, names[0])
    y = as_stack(b, names[1])
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"{names[0]} and {names[1]} have different image shapes: {x.shape[1:]} vs {y.shape[1:]}"
        )
    if x.shape[0] != y.shape[0]:
        if x.shape[0] == 1:
            x = np.broadcast_to(x, y.shape)
        elif y.shape[0] == 1:
            y = np.broadcast_to(y, x.shape)
        else:
            raise ValueError(
                f"{names[0]} and {names[1]} hold different numbers of images: "
                f"{x.shape[0]} vs {y.shape[0]}"
            )
    return x, y


def per_image_range(ref: np.ndarray) -> np.ndarray:
    """max - min of each image of an (N, H, W) stack, as float64 of shape (N,)."""
    return ref.max(axis=(1, 2)).astype(np.float64) - ref.min(axis=(1, 2)).astype(np.float64)


def resolve_range(data_range: ArrayLike | None, ref: np.ndarray) -> np.ndarray:
    """The data range per image: the reference's own range by default, else the given value(s)."""
    if data_range is None:
        return per_image_range(ref)
    rng = np.asarray(data_range, dtype=np.float64)
    if rng.ndim > 1 or (rng.ndim == 1 and rng.shape[0] not in (1, ref.shape[0])):
        raise ValueError(
            f"data_range must be a scalar or hold one value per image ({ref.shape[0]}), "
            f"got shape {rng.shape}"
        )
    return np.broadcast_to(rng, (ref.shape[0],)).astype(np.float64)
