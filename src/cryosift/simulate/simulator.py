"""Particle-stack simulation with ground truth: the engine behind `cryosift simulate`.

Two streaming passes keep memory independent of the number of images:
1. noise-free images (projection or junk -> shift -> CTF in a field large enough for the whole
   structure -> crop to the box) are written to clean.mrcs while the particle signal variance is
   accumulated;
2. the noise level follows exactly from that variance and the requested SNR (SPEC: mean over the
   particle images of the clean image's variance over the whole box, divided by the noise variance);
   the clean stack is read back chunk by chunk, noise is added and particles.mrcs (and with pairs
   particles_b.mrcs) written.
Outputs are assembled in a hidden staging folder and moved into place only when complete.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryosift.errors import CryosiftError, InputError
from cryosift.io.atomic import atomic_write_json
from cryosift.io.mrc import MrcsWriter
from cryosift.io.source import MrcStackSource
from cryosift.io.star import image_names, make_optics_table, write_star
from cryosift.progress import progress
from cryosift.provenance import provenance_record
from cryosift.simulate.ctf import Optics, ctf_2d
from cryosift.simulate.junk import JUNK_TYPES, junk_spectra
from cryosift.simulate.orientations import (
    euler_to_matrix,
    random_orientations,
    spread_view_directions,
)
from cryosift.simulate.projector import (
    FourierProjector,
    rfft_frequencies,
    shift_phase,
)
from cryosift.simulate.structure import (
    Volume,
    is_atomic_model,
    is_density_map,
    load_atomic_model,
    load_density_map,
    model_to_volume,
    pad_volume,
)

log = logging.getLogger("cryosift")


@dataclass
class SimulationConfig:
    """Everything that decides a simulated dataset (recorded in simulation.json)."""

    n_images: int = 1000
    box: int = 128
    pixel_size: float | None = 1.5  # Å; None for a map means "the map's own voxel size"
    snr: float = 0.1
    views: int | None = None  # K fixed views, or None for uniform random orientations
    view_weights: tuple[float, ...] | None = None
    view_angles: tuple[tuple[float, float], ...] | None = None  # given (rot, tilt) per view
    in_plane: bool = True
    max_shift: float = 0.0  # pixels, uniform in a disc
    ctf: bool = True
    defocus_range: tuple[float, float] = (0.8, 3.0)  # µm
    astigmatism: float = 300.0  # Å, max |dU - dV|
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    ctf_bfactor: float = 0.0  # Å^2 envelope
    bfactor: float = 0.0  # extra blur of the atomic model, Å^2
    junk_fraction: float = 0.0
    junk_types: tuple[str, ...] = JUNK_TYPES
    pairs: bool = False
    noise: str = "gaussian"  # or "poisson"
    dose: float = 40.0  # e/Å^2 for Poisson noise
    seed: int = 0
    chunk_size: int = 256

    def validate(self) -> None:
        if self.n_images < 1:
            raise CryosiftError("--n-images must be at least 1")
        if self.box < 8 or self.box % 2:
            raise CryosiftError(f"--box must be an even number of pixels >= 8, got {self.box}")
        if self.pixel_size is not None and not self.pixel_size > 0:
            raise CryosiftError("--pixel-size must be positive")
        if not (self.snr > 0 and math.isfinite(self.snr)):
            raise CryosiftError("--snr must be a positive number")
        if self.views is not None and self.views < 1:
            raise CryosiftError("--views must be at least 1")
        if self.view_weights is not None:
            if self.views is None or len(self.view_weights) != self.views:
                raise CryosiftError("--view-weights needs one weight per view (and --views)")
            if min(self.view_weights) < 0 or sum(self.view_weights) <= 0:
                raise CryosiftError("--view-weights must be non-negative and not all zero")
        if self.view_angles is not None and (
            self.views is None or len(self.view_angles) != self.views
        ):
            raise CryosiftError("--view-angles needs one (rot, tilt) pair per view")
        if self.max_shift < 0:
            raise CryosiftError("--max-shift must be >= 0")
        lo, hi = self.defocus_range
        if not 0 < lo <= hi:
            raise CryosiftError("--defocus-range must be two positive values, low <= high (µm)")
        if not 0 <= self.amplitude_contrast < 1:
            raise CryosiftError("--amplitude-contrast must lie in [0, 1)")
        if not 0 <= self.junk_fraction <= 1:
            raise CryosiftError("--junk-fraction must lie in [0, 1]")
        bad = [t for t in self.junk_types if t not in JUNK_TYPES]
        if bad or not self.junk_types:
            raise CryosiftError(f"unknown --junk-types {bad}; choose from {','.join(JUNK_TYPES)}")
        if self.noise not in ("gaussian", "poisson"):
            raise CryosiftError("--noise must be gaussian or poisson")
        if self.noise == "poisson" and not self.dose > 0:
            raise CryosiftError("--dose must be positive for Poisson noise")


@dataclass
class SimulationResult:
    """Paths and measured figures of one simulation."""

    star: Path
    particles: Path
    clean: Path
    particles_b: Path | None
    requested_snr: float
    measured_snr: float
    noise_sigma: float
    pixel_size: float
    box: int
    n_images: int
    n_particles: int
    seconds: float
    extra: dict = field(default_factory=dict)


def field_size(radius: float, pixel_size: float, box: int, max_shift: float = 0.0) -> int:
    """The square field projections are formed in before the box is cropped out of it.

    Fourier-space imaging is periodic: content beyond the field's edge wraps to the opposite
    side. With the structure's projection reaching r px (plus the largest shift) from the centre,
    wrapped content stays outside the central box as long as field > r + box/2 (plus a margin).
    """
    need = int(math.ceil(radius / pixel_size + max_shift + box / 2.0)) + 2
    return max(box, need + need % 2)


def check_fits(radius: float, pixel_size: float, box: int, path: str | Path) -> None:
    """Refuse a box far too small for the structure (diameter over twice the box); warn when
    some views will be cropped (radius beyond half the box)."""
    if radius > box * pixel_size:
        raise InputError(
            f"box of {box} px at {pixel_size:.3g} Å/px ({box * pixel_size:.0f} Å) is too small for "
            f"a structure of radius {radius:.0f} Å; use a larger --box or --pixel-size",
            path,
        )
    if radius > box * pixel_size / 2.0:
        log.warning(
            "structure radius %.0f Å exceeds half the box (%.0f Å): some views will be cropped",
            radius,
            box * pixel_size / 2.0,
        )


def load_structure(
    path: str | Path, pixel_size: float | None, box: int, max_shift: float = 0.0
) -> Volume:
    """Atomic model or density map -> volume at the simulation pixel size, in a field large
    enough for `box` px images (checked to fit before any volume is computed)."""
    path = Path(path)
    if not path.exists():
        raise InputError("structure file not found", path)
    if is_atomic_model(path):
        if pixel_size is None:
            raise CryosiftError("--pixel-size is required for an atomic model")
        model = load_atomic_model(path)
        check_fits(model.radius, pixel_size, box, path)
        return model_to_volume(
            model, pixel_size, field_size(model.radius, pixel_size, box, max_shift)
        )
    if is_density_map(path):
        vol = load_density_map(path, pixel_size)
        check_fits(vol.radius, vol.pixel_size, box, path)
        size = field_size(vol.radius, vol.pixel_size, box, max_shift)
        return pad_volume(vol, max(vol.size, size))
    raise InputError(
        "unknown structure format (expected .pdb/.cif[.gz] atomic model or .mrc/.map density)", path
    )


def _draw_parameters(
    cfg: SimulationConfig, rng: np.random.Generator, pixel_size: float
) -> pd.DataFrame:
    """Per-image ground truth, drawn up front (a few floats per image)."""
    n = cfg.n_images
    is_particle = rng.random(n) >= cfg.junk_fraction
    junk = np.where(is_particle, "none", rng.choice(np.array(cfg.junk_types), n))
    if cfg.views is None:
        angles = random_orientations(n, rng, in_plane=cfg.in_plane)
        view = np.full(n, -1)
    else:
        dirs = (
            np.asarray(cfg.view_angles, dtype=float)
            if cfg.view_angles is not None
            else spread_view_directions(cfg.views, rng)
        )
        w = np.ones(cfg.views) if cfg.view_weights is None else np.asarray(cfg.view_weights, float)
        view = rng.choice(cfg.views, n, p=w / w.sum())
        psi = rng.uniform(0.0, 360.0, n) if cfg.in_plane else np.zeros(n)
        angles = np.column_stack([dirs[view, 0], dirs[view, 1], psi])
    r = cfg.max_shift * np.sqrt(rng.random(n))
    phi = rng.uniform(0, 2 * np.pi, n)
    shift = np.column_stack(
        [r * np.cos(phi), r * np.sin(phi)]
    )  # particle centre, pixels from box centre
    df = rng.uniform(*cfg.defocus_range, n) * 1e4
    astig = rng.uniform(0.0, cfg.astigmatism, n)
    table = pd.DataFrame(
        {
            "rlnAngleRot": angles[:, 0],
            "rlnAngleTilt": angles[:, 1],
            "rlnAnglePsi": angles[:, 2],
            "rlnOriginXAngst": -shift[:, 0] * pixel_size,  # RELION: the shift that recentres
            "rlnOriginYAngst": -shift[:, 1] * pixel_size,
            "rlnDefocusU": df + astig / 2,
            "rlnDefocusV": df - astig / 2,
            "rlnDefocusAngle": rng.uniform(0.0, 180.0, n),
            "rlnCtfBfactor": np.full(n, cfg.ctf_bfactor),
            "rlnCtfScalefactor": np.ones(n),
            "rlnPhaseShift": np.zeros(n),
            "cryosiftTrueView": np.where(is_particle, view, -1),
            "cryosiftIsParticle": is_particle.astype(int),
            "cryosiftJunkType": junk,
        }
    )
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"):
        table.loc[~is_particle, col] = 0.0
    return table


class _ImageFormer:
    """Shift, CTF and crop shared by particles and junk: spectra on the field grid -> box images."""

    def __init__(
        self, field: int, box: int, pixel_size: float, cfg: SimulationConfig, device: torch.device
    ):
        self.field, self.box, self.cfg = field, box, cfg
        kx, ky = rfft_frequencies(field, device)
        self.kx, self.ky = kx / (field * pixel_size), ky / (field * pixel_size)
        # (-1)^(kx+ky) moves the origin from pixel 0 to the field centre (the fftshift), folded
        # into the spectrum so the box is cropped straight from the inverse transform.
        self.centre = (1.0 - 2.0 * ((kx + ky).abs().long() % 2)).to(torch.float32)
        self.optics = Optics(cfg.voltage, cfg.cs, cfg.amplitude_contrast)
        self.pixel_size = pixel_size
        self.device = device

    def __call__(
        self, spectra: torch.Tensor, params: pd.DataFrame, shift: bool, apply_ctf: bool = True
    ) -> torch.Tensor:
        dev = self.device
        if shift:
            s = (
                -np.column_stack([params["rlnOriginXAngst"], params["rlnOriginYAngst"]])
                / self.pixel_size
            )
            spectra = spectra * shift_phase(torch.as_tensor(s, device=dev), self.field)
        if self.cfg.ctf and apply_ctf:

            def col(name: str) -> torch.Tensor:
                return torch.as_tensor(
                    params[name].to_numpy(dtype=np.float64, copy=True), device=dev
                )

            spectra = spectra * ctf_2d(
                self.kx,
                self.ky,
                col("rlnDefocusU"),
                col("rlnDefocusV"),
                col("rlnDefocusAngle"),
                self.optics,
                bfactor=col("rlnCtfBfactor"),
            )
        img = torch.fft.irfft2(spectra * self.centre, s=(self.field, self.field))
        lo = self.field // 2 - self.box // 2
        return img[:, lo : lo + self.box, lo : lo + self.box]


def simulate(
    structure: str | Path,
    out_dir: str | Path,
    cfg: SimulationConfig,
    junk_structure: str | Path | None = None,
    device: torch.device | str = "cpu",
    command: str = "simulate",
) -> SimulationResult:
    """Simulate a particle stack from `structure` into `out_dir` (see module docstring)."""
    cfg.validate()
    t0 = time.time()
    device = torch.device(device)
    out_dir = Path(out_dir)
    structure = Path(structure)
    vol = load_structure(structure, cfg.pixel_size, cfg.box, cfg.max_shift)
    pixel_size = vol.pixel_size
    field = vol.size
    projector = FourierProjector(vol.data, device=device)
    frag_projector = projector
    if junk_structure is not None and cfg.junk_fraction > 0 and "fragment" in cfg.junk_types:
        jvol = pad_volume(load_structure(junk_structure, pixel_size, cfg.box), field)
        frag_projector = FourierProjector(jvol.data, device=device)
    radius_px = vol.radius / pixel_size
    setup_seconds = time.time() - t0

    rng = np.random.default_rng(cfg.seed)
    params = _draw_parameters(cfg, rng, pixel_size)
    if not cfg.ctf:
        params = params.drop(
            columns=[
                "rlnDefocusU",
                "rlnDefocusV",
                "rlnDefocusAngle",
                "rlnCtfBfactor",
                "rlnCtfScalefactor",
                "rlnPhaseShift",
            ]
        )
    former = _ImageFormer(field, cfg.box, pixel_size, cfg, device)

    # Reference signal level for scaling junk: a pilot of particle images drawn like the stack.
    pilot_rng = np.random.default_rng([cfg.seed, 7])
    pilot = _draw_parameters(
        SimulationConfig(**{**asdict(cfg), "n_images": 64, "junk_fraction": 0.0}),
        pilot_rng,
        pixel_size,
    )
    pilot_img = former(projector.slices(_rotations(pilot)), pilot, shift=True)
    ref_var = float(pilot_img.var(dim=(-2, -1)).mean())

    staging = out_dir / f".cryosift-simulate-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True, exist_ok=False)
    try:
        clean_path = staging / "clean.mrcs"
        image_var = np.zeros(cfg.n_images)
        chunks = range(0, cfg.n_images, cfg.chunk_size)
        n_chunks = len(chunks)
        with MrcsWriter(clean_path, cfg.n_images, cfg.box, pixel_size) as writer:
            for ci, start in enumerate(
                progress(chunks, total=n_chunks, desc="projecting", unit="chunk")
            ):
                stop = min(start + cfg.chunk_size, cfg.n_images)
                chunk = params.iloc[start:stop]
                gen = torch.Generator().manual_seed(
                    int(np.random.SeedSequence([cfg.seed, 1, ci]).generate_state(1)[0])
                )
                crng = np.random.default_rng([cfg.seed, 2, ci])
                imgs = _clean_chunk(
                    chunk, projector, frag_projector, former, radius_px, ref_var, crng, gen
                )
                image_var[start:stop] = imgs.var(dim=(-2, -1)).double().cpu().numpy()
                writer.append(imgs.cpu().numpy())
        is_p = params["cryosiftIsParticle"].to_numpy().astype(bool)
        signal_var = float(image_var[is_p].mean()) if is_p.any() else float(image_var.mean())
        if not signal_var > 0:
            raise CryosiftError("the simulated images carry no signal (all pure-noise junk?)")
        sigma = math.sqrt(signal_var / cfg.snr)
        noise_var_sum = _add_noise(clean_path, staging, cfg, sigma, signal_var, pixel_size)
        measured_snr = signal_var / noise_var_sum
        params["cryosiftSNR"] = cfg.snr
        params["cryosiftImageSNR"] = image_var / sigma**2

        names = image_names(cfg.n_images, "particles.mrcs")
        star = pd.DataFrame({"rlnImageName": names})
        if cfg.pairs:
            star["cryosiftImageNameB"] = image_names(cfg.n_images, "particles_b.mrcs")
        star["cryosiftCleanImageName"] = image_names(cfg.n_images, "clean.mrcs")
        star["rlnMicrographName"] = [
            f"simulated/mic{i // 100 + 1:06d}.mrc" for i in range(cfg.n_images)
        ]
        star["rlnOpticsGroup"] = 1
        star = pd.concat([star, params], axis=1)
        optics = make_optics_table(
            pixel_size,
            cfg.box,
            voltage=cfg.voltage,
            cs=cfg.cs,
            amplitude_contrast=cfg.amplitude_contrast,
        )
        write_star(staging / "particles.star", star, optics)
        seconds = time.time() - t0
        record = provenance_record(
            command,
            {
                **asdict(cfg),
                "structure": str(structure),
                "junk_structure": junk_structure,
                "pixel_size": pixel_size,
                "device": str(device),
            },
            requested_snr=cfg.snr,
            measured_snr=measured_snr,
            signal_variance=signal_var,
            noise_sigma=sigma,
            field_size=field,
            structure_radius_A=vol.radius,
            n_particles=int(is_p.sum()),
            seconds=seconds,
            setup_seconds=setup_seconds,
            snr_convention="mean over particle images of var(clean image over the whole box)"
            " / noise variance",
        )
        atomic_write_json(staging / "simulation.json", record)
        out_names = ["clean.mrcs", "particles.mrcs", "simulation.json"]
        if cfg.pairs:
            out_names.append("particles_b.mrcs")
        for name in out_names + ["particles.star"]:  # the STAR last: it marks a finished dataset
            (staging / name).replace(out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return SimulationResult(
        star=out_dir / "particles.star",
        particles=out_dir / "particles.mrcs",
        clean=out_dir / "clean.mrcs",
        particles_b=out_dir / "particles_b.mrcs" if cfg.pairs else None,
        requested_snr=cfg.snr,
        measured_snr=measured_snr,
        noise_sigma=sigma,
        pixel_size=pixel_size,
        box=cfg.box,
        n_images=cfg.n_images,
        n_particles=int(is_p.sum()),
        seconds=seconds,
    )


def _rotations(params: pd.DataFrame) -> np.ndarray:
    return euler_to_matrix(
        params["rlnAngleRot"].to_numpy(),
        params["rlnAngleTilt"].to_numpy(),
        params["rlnAnglePsi"].to_numpy(),
    )


def _clean_chunk(
    chunk: pd.DataFrame,
    projector: FourierProjector,
    frag_projector: FourierProjector,
    former: _ImageFormer,
    radius_px: float,
    ref_var: float,
    rng: np.random.Generator,
    gen: torch.Generator,
) -> torch.Tensor:
    """Noise-free box images of one chunk: particles projected, junk generated, all imaged alike."""
    out = torch.empty(len(chunk), former.box, former.box, device=projector.device)
    is_p = chunk["cryosiftIsParticle"].to_numpy().astype(bool)
    if is_p.any():
        sub = chunk[is_p]
        out[torch.as_tensor(np.flatnonzero(is_p))] = former(
            projector.slices(_rotations(sub)), sub, shift=True
        )
    kinds = chunk["cryosiftJunkType"].to_numpy()
    for kind in np.unique(kinds[~is_p]):
        idx = np.flatnonzero(kinds == kind)
        sub = chunk.iloc[idx]
        spectra = junk_spectra(kind, len(idx), projector, frag_projector, radius_px, rng, gen)
        # Ice thickness changes show through amplitude contrast (electrons lost to inelastic
        # scattering), not through the phase-contrast CTF; everything else is imaged with the CTF.
        imgs = former(spectra, sub, shift=False, apply_ctf=kind != "ice")
        if kind != "noise":
            # Junk as strong as the particles (0.5-2x their mean signal variance), so that the
            # image variance alone does not give it away.
            target = ref_var * torch.as_tensor(rng.uniform(0.5, 2.0, len(idx)), dtype=imgs.dtype)
            imgs = imgs - imgs.mean(dim=(-2, -1), keepdim=True)
            imgs = (
                imgs * torch.sqrt(target / imgs.var(dim=(-2, -1)).clamp_min(1e-30))[:, None, None]
            )
        out[torch.as_tensor(idx)] = imgs
    return out


def _add_noise(
    clean_path: Path,
    staging: Path,
    cfg: SimulationConfig,
    sigma: float,
    signal_var: float,
    pixel_size: float,
) -> float:
    """Second pass: noisy copies of the clean stack. Returns the realised noise variance."""
    outputs = ["particles.mrcs"] + (["particles_b.mrcs"] if cfg.pairs else [])
    total, count = 0.0, 0
    clean = MrcStackSource(clean_path)
    with contextlib.ExitStack() as stack:
        writers = [
            stack.enter_context(MrcsWriter(staging / name, cfg.n_images, cfg.box, pixel_size))
            for name in outputs
        ]
        n_chunks = -(-cfg.n_images // cfg.chunk_size)
        stream = progress(
            clean.chunks(cfg.chunk_size), total=n_chunks, desc="adding noise", unit="chunk"
        )
        for ci, (_, chunk) in enumerate(stream):
            img = torch.from_numpy(chunk)
            for k, w in enumerate(writers):
                seed = np.random.SeedSequence([cfg.seed, 3 + k, ci]).generate_state(1)[0]
                gen = torch.Generator().manual_seed(int(seed))
                noise = _noise(img, cfg, sigma, signal_var, pixel_size, gen)
                if k == 0:
                    total += float(noise.double().pow(2).sum())
                    count += noise.numel()
                w.append((img + noise).numpy())
    return total / count


def _noise(
    clean: torch.Tensor,
    cfg: SimulationConfig,
    sigma: float,
    signal_var: float,
    pixel_size: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """White Gaussian noise of std sigma, or Poisson counting noise at the dose that gives the SNR.

    Poisson: counts ~ Poisson(D p^2 (1 + k * clean)) with k = sqrt(SNR / (D p^2 var_signal)); the
    image is (counts - D p^2) / (D p^2 k) so that it sits on the clean scale with noise variance
    ~ var_signal / SNR, as for Gaussian noise.
    """
    if cfg.noise == "gaussian":
        return torch.randn(clean.shape, generator=gen) * sigma
    mean_counts = cfg.dose * pixel_size**2
    k = math.sqrt(cfg.snr / (mean_counts * signal_var))
    rate = (mean_counts * (1.0 + k * clean)).clamp_min(0.0)
    counts = torch.poisson(rate.double(), generator=gen).float()
    return (counts - mean_counts) / (mean_counts * k) - clean
