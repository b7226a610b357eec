"""Orientations in RELION's convention (ZYZ Euler angles rot, tilt, psi in degrees).

With A = euler_to_matrix(rot, tilt, psi), a point p of the volume lands at A @ p in the image frame
(x = column, y = row, z projected away), exactly as RELION's `Euler_angles2matrix`.
"""

from __future__ import annotations

import numpy as np


def euler_to_matrix(rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """RELION's Euler_angles2matrix for arrays of angles in degrees -> (N, 3, 3) float64."""
    a, b, g = (np.deg2rad(np.atleast_1d(np.asarray(x, dtype=np.float64))) for x in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = np.empty(a.shape + (3, 3))
    m[..., 0, 0] = cg * cc - sg * sa
    m[..., 0, 1] = cg * cs + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cc - cg * sa
    m[..., 1, 1] = -sg * cs + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sc
    m[..., 2, 1] = ss
    m[..., 2, 2] = cb
    return m


def matrix_to_euler(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of euler_to_matrix (RELION's Euler_matrix2angles), angles in degrees."""
    m = np.asarray(m, dtype=np.float64).reshape(-1, 3, 3)
    sb = np.hypot(m[:, 0, 2], m[:, 1, 2])
    tilt = np.arctan2(sb, m[:, 2, 2])
    regular = sb > 16 * np.finfo(np.float64).eps
    rot = np.where(regular, np.arctan2(m[:, 2, 1], m[:, 2, 0]), 0.0)
    # Gimbal lock (tilt 0 or 180): rot = 0 and psi carries the whole in-plane angle.
    locked = np.where(
        m[:, 2, 2] > 0, np.arctan2(-m[:, 1, 0], m[:, 0, 0]), np.arctan2(m[:, 1, 0], -m[:, 0, 0])
    )
    psi = np.where(regular, np.arctan2(m[:, 1, 2], -m[:, 0, 2]), locked)
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)


def random_orientations(n: int, rng: np.random.Generator, in_plane: bool = True) -> np.ndarray:
    """n orientations uniform on SO(3) (Haar measure): rot, psi uniform, cos(tilt) uniform.

    Returns an (n, 3) array of (rot, tilt, psi) in degrees; psi = 0 when `in_plane` is False
    (uniform viewing directions only).
    """
    rot = rng.uniform(0.0, 360.0, n)
    tilt = np.rad2deg(np.arccos(rng.uniform(-1.0, 1.0, n)))
    psi = rng.uniform(0.0, 360.0, n) if in_plane else np.zeros(n)
    return np.stack([rot, tilt, psi], axis=1)


def spread_view_directions(k: int, rng: np.random.Generator) -> np.ndarray:
    """k well-separated viewing directions: a randomly rotated Fibonacci lattice on the sphere.

    Returns (k, 2) (rot, tilt) in degrees. Well separated so that fixed-view datasets have K truly
    distinct classes, yet random (seeded) so that benchmarks do not favour one set of views.
    """
    i = np.arange(k) + 0.5
    z = 1.0 - 2.0 * i / k
    phi = np.pi * (1.0 + 5**0.5) * i
    r = np.sqrt(1.0 - z**2)
    pts = np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, zq = q
    rmat = np.array(
        [
            [1 - 2 * (y * y + zq * zq), 2 * (x * y - zq * w), 2 * (x * zq + y * w)],
            [2 * (x * y + zq * w), 1 - 2 * (x * x + zq * zq), 2 * (y * zq - x * w)],
            [2 * (x * zq - y * w), 2 * (y * zq + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    pts = pts @ rmat.T
    # The viewing direction of (rot, tilt) is the third row of A: (sin t cos r, sin t sin r, cos t).
    tilt = np.rad2deg(np.arccos(np.clip(pts[:, 2], -1.0, 1.0)))
    rot = np.rad2deg(np.arctan2(pts[:, 1], pts[:, 0])) % 360.0
    return np.stack([rot, tilt], axis=1)
