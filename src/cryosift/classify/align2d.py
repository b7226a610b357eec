"""Reference-free, alignment-aware 2D classification (multi-reference alignment, `align2d`).

Real particles come with unknown in-plane rotations and shifts, which clustering of raw pixels
ignores. This classifier aligns every image to every class average, as RELION's and
cryoSPARC's 2D classification do, with hard assignment (each image to its single best class,
rotation and shift: the maximum-likelihood pose under white Gaussian noise):

1. Initial classes: k-means++ on rotation-invariant Fourier-Bessel features
   (:func:`cryosift.classify.features.rotinv_features`); each class starts from the image nearest
   its centre, and ``init_iterations`` passes align every image to its own class only, so the
   first averages are sharp (not rotationally blurred) before classes compete.
2. Iterations: the K averages are rotated over a psi grid (``psi_step`` degrees) and every image
   is cross-correlated with all K x R rotated averages at once by FFT, which scores every shift
   in one go; shifts are limited to ``max_shift`` px. The score is the least-squares fit
   x.b - |b|^2 / 2 (Gaussian log-likelihood up to a constant). The best (class, rotation, shift)
   wins, refined below the grid by parabolic interpolation of the peak in x, y and psi. The
   averages are Gaussian low-passed for the search (gain 1/2 at ``lowpass`` cycles per pixel of
   the search grid) in the initial passes and the first ``lowpass_iterations`` iterations:
   averages of a few hundred noisy images otherwise keep enough of their own members' noise that
   those members cling to them, and wrong initial classes never dissolve; the later iterations
   use the full search band so that similar views separate (coarse to fine, as RELION does).
3. Averages are rebuilt from the aligned images, centred on their centre of mass (of the squared
   average, so the sign of the contrast does not matter) and masked; an empty class is reseeded
   with the worst-fitting image. Stop when fewer than ``tol`` of the images change class.

Everything is batched in torch over images x classes x rotations, in chunks of images sized so
that the correlation volume stays within ``mem_mb``: peak memory is set by the chunk, not by N
(the stack itself is held once, Fourier-cropped to ``align_box`` px, N x align_box^2 floats).
Alignment runs on images Fourier-cropped to ``align_box`` px (optional downsampling); the final
class averages are built from the full-size images with the found poses.

Conventions (RELION): with psi and origin o (px) per particle, the image is the class average
turned by RELION's in-plane Euler rotation psi (a point p of the average lands at
[[cos psi, sin psi], [-sin psi, cos psi]] p, x = column, y = row, centre pixel box//2) and then
moved by -o, i.e. the particle sits at -o from the box centre (`_rlnOriginXAngst` = o_x * pixel
size). This is how :mod:`cryosift.simulate` images a view with `_rlnAnglePsi` and the origins.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cryosift.classify.cluster import check_k, kmeans_pp
from cryosift.classify.features import disk_mask, fourier_crop, rotinv_features, standardise
from cryosift.errors import InputError
from cryosift.progress import progress

log = logging.getLogger("cryosift")

__all__ = ["Align2DResult", "align2d", "align_to_references", "rotate", "shift"]


@dataclass
class Align2DResult:
    """Labels 0..k-1, psi (deg, RELION), origins (N, 2) px (RELION), full-size averages."""

    labels: np.ndarray
    psi: np.ndarray
    origins: np.ndarray
    averages: np.ndarray
    scores: np.ndarray
    history: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)


def rotate(images: torch.Tensor, psi: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Turn images (B, n, n) by RELION's in-plane rotation psi (degrees, (B,)) about box//2.

    out(q) = in(R(psi)^T q) with R(psi) = [[cos, sin], [-sin, cos]] on (x = column, y = row):
    the content at p moves to R(psi) p. Bilinear (or bicubic: sharper, for the final
    averages) interpolation, zeros outside.
    """
    b, n = images.shape[0], images.shape[-1]
    c = n // 2
    a = torch.deg2rad(psi.to(images.dtype)).to(images.device)
    cos, sin = torch.cos(a), torch.sin(a)
    # p = R^T q: p_x = cos x - sin y, p_y = sin x + cos y; to grid_sample units (align_corners).
    off = (2.0 * c) / (n - 1) - 1.0  # pixel c in normalised units
    theta = torch.zeros(b, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    # affine_grid maps normalised output coords u to theta[:, :, :2] u + t; with u = s q + off
    # (q relative to the centre) we need s R^T q + off: t = off - R^T off.
    t0 = off - (cos * off - sin * off)
    t1 = off - (sin * off + cos * off)
    theta[:, 0, 2], theta[:, 1, 2] = t0, t1
    grid = F.affine_grid(theta, [b, 1, n, n], align_corners=True)
    out = F.grid_sample(images[:, None], grid, mode=mode, align_corners=True,
                        padding_mode="zeros")
    return out[:, 0]


def shift(images: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Move image content by d (B, 2) = (dx, dy) px (circular, by Fourier phase): out(q)=in(q-d)."""
    from cryosift.simulate.projector import shift_phase

    n = images.shape[-1]
    f = torch.fft.rfft2(images) * shift_phase(d.to(images.device), n)
    return torch.fft.irfft2(f, s=(n, n))


def _parabola(cm: torch.Tensor, c0: torch.Tensor, cp: torch.Tensor) -> torch.Tensor:
    """Vertex offset in (-0.5, 0.5) of the parabola through (-1, cm), (0, c0), (1, cp)."""
    den = cm - 2.0 * c0 + cp
    off = torch.where(den < 0, 0.5 * (cm - cp) / torch.where(den < 0, den, -1.0), 0.0)
    return off.clamp(-0.5, 0.5)


class _Aligner:
    """Scores a chunk of images against K references over R rotations and a window of shifts.

    The cross-correlation c(s) = sum_q x(q) b(q + s) = IDFT(conj(X) B)(s) is needed only for
    |s| <= max_shift, so instead of full inverse FFTs the inverse DFT is evaluated on the
    (2S+3)^2 window as two matrix products (over ky, then over kx with the rfft's Hermitian
    weights): one batched complex GEMM (B x n) @ (n x K R (2S+3)) per kx column, the shape
    BLAS runs fastest, and the references' side (B_kr(ky, kx) e^{2 pi i ky sy / n}) is computed
    once per iteration. The window is one pixel wider than the search so that the peak's
    neighbours are there for sub-pixel refinement.
    """

    def __init__(self, box: int, psi_step: float, max_shift: float, device: torch.device) -> None:
        self.n, self.h, self.device = box, box // 2 + 1, device
        self.n_rot = max(1, int(round(360.0 / psi_step)))
        self.step = 360.0 / self.n_rot
        self.psis = torch.arange(self.n_rot, dtype=torch.float32) * self.step
        s = int(min(math.floor(max_shift + 1e-6), (box - 3) // 2))
        self.win = torch.arange(-s - 1, s + 2, dtype=torch.float32)  # shifts of the window
        w = len(self.win)
        self.w = w
        allowed = (self.win[:, None] ** 2 + self.win[None, :] ** 2) <= max_shift**2 + 1e-6
        allowed[0, :] = allowed[-1, :] = allowed[:, 0] = allowed[:, -1] = False
        self.allowed = allowed.reshape(-1).to(device)
        ky = torch.fft.fftfreq(box, 1.0 / box)
        kx = torch.fft.rfftfreq(box, 1.0 / box)
        two_pi = 2.0 * math.pi / box
        self.ey = torch.polar(torch.ones(w, box), two_pi * self.win[:, None] * ky[None]).to(device)
        weight = torch.full((self.h,), 2.0)
        weight[0] = 1.0
        if box % 2 == 0:
            weight[-1] = 1.0
        ex = torch.polar(weight[None].expand(w, -1), two_pi * self.win[:, None] * kx[None])
        self.ex_t = (ex / box**2).T.contiguous().to(device)  # (h, w)
        self.mask = torch.as_tensor(disk_mask(box), device=device)
        self.g: torch.Tensor | None = None  # (h, n, K*R*w) complex
        self.norms: torch.Tensor | None = None  # (K, R)
        self.k = 0

    def set_references(self, refs: torch.Tensor) -> None:
        """Rotate the K references over the psi grid; precompute their side of the DFT."""
        k, n, r, w = refs.shape[0], self.n, self.n_rot, self.w
        rr = refs.to(self.device).repeat_interleave(r, 0)  # (K*R, n, n): k-major
        rot = rotate(rr, self.psis.to(self.device).repeat(k)) * self.mask
        self.norms = (rot**2).sum((-2, -1)).reshape(k, r)
        bf = torch.fft.rfft2(rot)  # (KR, ky, kx)
        g = bf[:, None, :, :] * self.ey[None, :, :, None]  # (KR, sy, ky, kx)
        self.g = g.permute(3, 2, 0, 1).reshape(self.h, n, k * r * w).contiguous()
        self.k = k

    def chunk_size(self, n_refs: int, mem_mb: float) -> int:
        per_image = n_refs * self.n_rot * self.w * (self.h + self.w) * 8 * 2
        return max(1, int(mem_mb * 2**20 // per_image))

    def _correlate(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """c(s) for images x (B, n, n) and reference columns g (h, n, M): (B, M/w, w, w)."""
        xf = torch.fft.rfft2(x.to(self.device)).conj().permute(2, 0, 1)  # (h, B, ky)
        hh = torch.bmm(xf, g)  # (h, B, M): sum over ky
        b, mm = x.shape[0], g.shape[-1]
        hh = hh.permute(1, 2, 0).reshape(b * mm, self.h)  # (B*M, h)
        return (hh @ self.ex_t).real.reshape(b, mm // self.w, self.w, self.w)

    def align(
        self, x: torch.Tensor, cand: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Best (class, psi deg, origin (B, 2) px, score) of masked images x (B, n, n).

        `cand` (B,) restricts every image to one class (its own), else all K compete.
        """
        assert self.g is not None and self.norms is not None
        r, w, dev = self.n_rot, self.w, self.device
        b = x.shape[0]
        x = x.to(dev)
        if cand is None:
            corr = self._correlate(x, self.g).reshape(b, self.k, r, w, w)
        else:  # one GEMM per class present in the chunk (a loop over classes, not images)
            cand = cand.to(dev)
            corr = torch.empty(b, 1, r, w, w, device=dev)
            g = self.g.reshape(self.h, self.n, self.k, r * w)
            for j in torch.unique(cand).tolist():
                sel = torch.nonzero(cand == j).squeeze(1)
                cj = self._correlate(x[sel], g[:, :, j].contiguous())
                corr[sel] = cj.reshape(len(sel), 1, r, w, w)
        kk_n = corr.shape[1]
        norms = self.norms if cand is None else self.norms[cand][:, None, :]
        flat = corr.reshape(b, kk_n, r, w * w)
        score = flat[..., self.allowed] - 0.5 * norms.reshape(-1, kk_n, r, 1)
        n_allowed = score.shape[-1]
        best = score.reshape(b, -1).argmax(1)
        rows = torch.arange(b, device=dev)
        top = score.reshape(b, -1)[rows, best]
        kk, rest = best // (r * n_allowed), best % (r * n_allowed)
        rr, a = rest // n_allowed, rest % n_allowed
        pix = torch.nonzero(self.allowed).squeeze(1)[a]
        iy, ix = pix // w, pix % w
        c0 = corr[rows, kk, rr, iy, ix]
        dx = _parabola(corr[rows, kk, rr, iy, ix - 1], c0, corr[rows, kk, rr, iy, ix + 1])
        dy = _parabola(corr[rows, kk, rr, iy - 1, ix], c0, corr[rows, kk, rr, iy + 1, ix])
        if r > 2:
            dpsi = _parabola(
                corr[rows, kk, (rr - 1) % r, iy, ix], c0, corr[rows, kk, (rr + 1) % r, iy, ix]
            )
        else:
            dpsi = torch.zeros_like(dx)
        win = self.win.to(dev)
        origin = torch.stack([win[ix] + dx, win[iy] + dy], 1)
        psi = self.psis.to(dev)[rr] + dpsi * self.step
        labels = kk if cand is None else cand
        return labels, psi, origin, top


def _aligned(
    x: torch.Tensor, psi: torch.Tensor, origin: torch.Tensor, mode: str = "bilinear"
) -> torch.Tensor:
    """Undo the pose: move content by +origin, then turn by -psi (into the average's frame)."""
    return rotate(shift(x, origin), -psi, mode)


def _lowpass(images: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Gaussian low-pass, gain 1/2 at `cutoff` cycles/px (references: less noise to fit)."""
    n = images.shape[-1]
    ky = torch.fft.fftfreq(n)[:, None]
    kx = torch.fft.rfftfreq(n)[None, :]
    h = torch.exp(-math.log(2.0) * (kx**2 + ky**2) / cutoff**2).to(images.device)
    return torch.fft.irfft2(torch.fft.rfft2(images) * h, s=(n, n))


def _centre(avgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Move every average's centre of mass (weights avg^2 inside the mask) to the box centre."""
    n = avgs.shape[-1]
    c = torch.arange(n, dtype=avgs.dtype, device=avgs.device) - n // 2
    w = (avgs * mask) ** 2
    tot = w.sum((-2, -1)).clamp_min(1e-20)
    com = torch.stack([(w.sum(-2) * c).sum(-1) / tot, (w.sum(-1) * c).sum(-1) / tot], 1)
    return shift(avgs, -com) * mask


def align_to_references(
    images: np.ndarray | torch.Tensor,
    references: np.ndarray | torch.Tensor,
    psi_step: float = 5.0,
    max_shift: float = 5.0,
    mem_mb: float = 256.0,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Align images (N, n, n) to fixed references (K, n, n): (class, psi deg, origin px, score).

    Same search and conventions as :func:`align2d` (see the module docstring), at full size.
    """
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    refs = torch.as_tensor(np.asarray(references, dtype=np.float32))
    n = x.shape[-1]
    al = _Aligner(n, psi_step, max_shift, torch.device(device))
    mask = disk_mask(n)
    al.set_references(standardise(refs, mask))
    xs = standardise(x, mask)
    out = [[], [], [], []]
    step = al.chunk_size(len(refs), mem_mb)
    for s in range(0, len(x), step):
        for lst, v in zip(out, al.align(xs[s : s + step]), strict=True):
            lst.append(v.cpu())
    lab, psi, org, sc = (torch.cat(v).numpy() for v in out)
    return lab.astype(np.int64), _wrap_psi(psi), org.astype(np.float64), sc


def _wrap_psi(psi: np.ndarray) -> np.ndarray:
    """Degrees in (-180, 180], as RELION writes _rlnAnglePsi."""
    p = np.asarray(psi, dtype=np.float64) % 360.0
    return np.where(p > 180.0, p - 360.0, p)


def _as_array_reader(images: Any) -> tuple[Any, int, int]:
    """(reader with .images(slice) or array, N, box) for arrays and ImageSources alike."""
    if hasattr(images, "images") and hasattr(images, "box"):
        return images, len(images), int(images.box)
    arr = np.asarray(images)
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2] or not len(arr):
        raise InputError(f"images must be a non-empty stack (N, box, box), got shape {arr.shape}")
    return arr, len(arr), int(arr.shape[-1])


def _read(src: Any, s: int, e: int, flip: tuple[Any, float] | None = None) -> np.ndarray:
    """Images s:e as float32, CTF phase-flipped when `flip` = (metadata, pixel size)."""
    x = np.asarray(src[s:e], np.float32) if isinstance(src, np.ndarray) else src.images(
        slice(s, e))
    if flip is not None:
        from cryosift.classify.features import phase_flip

        x = phase_flip(x, flip[0].iloc[s:e], flip[1])
    return x


def align2d(
    images: Any,
    k: int,
    iterations: int = 15,
    min_iterations: int = 3,
    init_iterations: int = 2,
    psi_step: float = 10.0,
    max_shift: float | None = None,
    align_box: int | None = 32,
    tol: float = 0.005,
    center: bool = True,
    mem_mb: float = 256.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    read_chunk: int = 2048,
    lowpass: float | None = 0.2,
    lowpass_iterations: int = 3,
    metadata: Any = None,
    pixel_size: float | None = None,
) -> Align2DResult:
    """Reference-free 2D classification of `images` (array or ImageSource) into `k` classes.

    `max_shift` is in pixels of the input (default 10 % of the box); `align_box` is the size the
    images are Fourier-cropped to for the search (None or >= box: no downsampling). With
    `metadata` holding CTF parameters (and `pixel_size`), every image is CTF phase-flipped as it
    is read, for the search and for the averages.
    """
    from cryosift.classify.features import has_ctf

    src, n_img, box = _as_array_reader(images)
    flip = None
    if has_ctf(metadata):
        if pixel_size is None:
            raise InputError("phase flipping needs the pixel size")
        if len(metadata) != n_img:
            raise InputError(f"metadata has {len(metadata)} rows for {n_img} images")
        flip = (metadata.reset_index(drop=True), float(pixel_size))
    k = check_k(k, n_img)
    if psi_step <= 0 or psi_step > 360:
        raise InputError(f"psi step must lie in (0, 360] degrees, got {psi_step}")
    dev = torch.device(device)
    m = box if not align_box or align_box >= box else int(align_box) - int(align_box) % 2
    scale = box / m
    max_shift = 0.1 * box if max_shift is None else float(max_shift)
    if max_shift < 0:
        raise InputError(f"max shift must be >= 0 px, got {max_shift}")
    mask_m = disk_mask(m)
    t_start = time.time()
    # The search stack: Fourier-cropped, standardised, masked; held once (N x m^2 floats).
    xs = torch.empty(n_img, m, m, dtype=torch.float32)
    for s in range(0, n_img, read_chunk):
        x = _read(src, s, s + read_chunk, flip)
        xs[s : s + read_chunk] = standardise(fourier_crop(x, m), mask_m)
    # 1. initial classes from rotation-invariant features
    feats = rotinv_features(xs.numpy(), size=m, n_components=min(50, n_img - 1), seed=seed)
    labels_np, centres = kmeans_pp(feats, k, seed=seed, n_init=10)
    f64 = feats.astype(np.float64)
    dist = (f64**2).sum(1)[:, None] - 2.0 * f64 @ centres.T.astype(np.float64)
    seeds = np.argmin(dist, 0)  # the image nearest each centre
    refs = xs[torch.as_tensor(seeds)].clone()
    al = _Aligner(m, psi_step, max_shift / scale, dev)
    mask_t = torch.as_tensor(mask_m, device=dev)
    chunk = al.chunk_size(k, mem_mb)
    labels = torch.as_tensor(labels_np)
    psi = torch.zeros(n_img)
    origin = torch.zeros(n_img, 2)
    score = torch.zeros(n_img)
    history: list[dict[str, Any]] = []
    total_iters = init_iterations + iterations
    for it in range(total_iters):
        fixed = it < init_iterations
        t0 = time.time()
        coarse = lowpass and (fixed or it - init_iterations < lowpass_iterations)
        al.set_references(_lowpass(refs, lowpass) if coarse else refs)
        sums = torch.zeros(k, m, m, device=dev)
        new_labels = torch.empty_like(labels)
        bar = progress(range(0, n_img, chunk), total=math.ceil(n_img / chunk),
                       desc=f"align2d iteration {it + 1}/{total_iters}", unit="chunk")
        for s in bar:
            x = xs[s : s + chunk].to(dev)
            cand = labels[s : s + chunk].to(dev) if fixed else None
            lab, p, o, sc = al.align(x, cand)
            sums.index_add_(0, lab, _aligned(x, p, o))
            new_labels[s : s + chunk], psi[s : s + chunk] = lab.cpu(), p.cpu()
            origin[s : s + chunk], score[s : s + chunk] = o.cpu(), sc.cpu()
        changed = float((new_labels != labels).float().mean())
        labels = new_labels
        counts = torch.bincount(labels, minlength=k)
        refs = (sums / counts.clamp_min(1).to(dev)[:, None, None].float()).cpu()
        empty = torch.nonzero(counts == 0).squeeze(1)
        if len(empty):  # reseed with the worst-fitting images
            worst = torch.argsort(score)[: len(empty)]
            refs[empty] = _aligned(xs[worst].to(dev), psi[worst].to(dev), origin[worst].to(dev))
            labels[worst] = empty
        if center:
            refs = _centre(refs.to(dev), mask_t).cpu()
        secs = time.time() - t0
        history.append(
            {
                "iteration": it + 1,
                "phase": "init" if fixed else "classify",
                "changed_fraction": changed,
                "empty_classes_reseeded": int(len(empty)),
                "mean_score": float(score.mean()),
                "seconds": secs,
                "images_per_second": n_img / max(secs, 1e-9),
            }
        )
        log.debug("align2d iteration %d: %.2f %% changed class, %.1f s", it + 1, 100 * changed,
                  secs)
        done = it + 1 - init_iterations >= max(min_iterations, lowpass_iterations + 1)
        if not fixed and done and changed < tol:
            break
    # final averages at full size with the found poses (origins scaled to input pixels)
    origin_full = origin * scale
    sums = torch.zeros(k, box, box, dtype=torch.float64)
    for s in range(0, n_img, read_chunk):
        x = torch.as_tensor(_read(src, s, s + read_chunk, flip)).to(dev)
        a = _aligned(x, psi[s : s + read_chunk].to(dev), origin_full[s : s + read_chunk].to(dev),
                     "bicubic")
        sums.index_add_(0, labels[s : s + read_chunk], a.cpu().double())
    counts = torch.bincount(labels, minlength=k).clamp_min(1)
    averages = (sums / counts[:, None, None]).float().numpy()
    total = time.time() - t_start
    params = {
        "k": k,
        "iterations_run": len(history),
        "init_iterations": init_iterations,
        "psi_step": al.step,
        "max_shift_px": max_shift,
        "align_box": m,
        "tol": tol,
        "lowpass_cycles_per_px": lowpass,
        "lowpass_iterations": lowpass_iterations,
        "center": center,
        "ctf_phase_flip": flip is not None,
        "chunk_images": chunk,
        "seed": seed,
        "seconds": total,
        "images_per_second_total": n_img / max(total, 1e-9),
    }
    return Align2DResult(
        labels=labels.numpy().astype(np.int64),
        psi=_wrap_psi(psi.numpy()),
        origins=origin_full.numpy().astype(np.float64),
        averages=averages,
        scores=score.numpy(),
        history=history,
        params=params,
    )
