"""End-to-end simulation through `simulate()` and the CLI: SNR, noise, ground truth, STAR/MRC
metadata, fixed views, shifts, CTF, Poisson noise, junk, density maps.

Every dataset is small (48-64 px at 4 Å/px, a few hundred images) and built once per module.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryosift.simulate import (
    FourierProjector,
    SimulationConfig,
    electron_wavelength,
    euler_to_matrix,
    load_atomic_model,
    model_to_volume,
    simulate,
)
from cryosift.simulate.junk import JUNK_TYPES
from sim_helpers import centre_of_mass, data_file, rel_l2, ring_index, run_cli

PIXEL, BOX = 4.0, 48  # SpCas9 (radius ~88 Å) fits a 48-px box at 4 Å/px


@pytest.fixture(scope="module")
def env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        yield mp


@pytest.fixture(scope="module")
def cas9() -> Path:
    return data_file("structures", "5F9R.pdb")


def read_star(path: Path) -> tuple[dict, object]:
    blocks = starfile.read(path, always_dict=True)
    return blocks["optics"], blocks["particles"]


def read_stack(path: Path) -> np.ndarray:
    with mrcfile.open(path) as mrc:
        return np.array(mrc.data)


class Dataset:
    """The files of one simulation, read back with mrcfile/starfile."""

    def __init__(self, out: Path):
        self.out = out
        self.optics, self.star = read_star(out / "particles.star")
        self.particles = read_stack(out / "particles.mrcs")
        self.clean = read_stack(out / "clean.mrcs")
        b = out / "particles_b.mrcs"
        self.particles_b = read_stack(b) if b.exists() else None
        self.record = json.loads((out / "simulation.json").read_text())
        self.is_particle = self.star["cryosiftIsParticle"].to_numpy() == 1


@pytest.fixture(scope="module")
def main_ds(env, cas9, tmp_path_factory) -> Dataset:
    """Through the CLI: random orientations, shifts, CTF, 30 % junk of all kinds, noise pairs."""
    out = tmp_path_factory.mktemp("main")
    argv = [
        "-q", "simulate", str(cas9), "-o", str(out), "--n-images", "300", "--box", str(BOX),
        "--pixel-size", str(PIXEL), "--snr", "0.05", "--pairs", "--junk-fraction", "0.3",
        "--max-shift", "2", "--seed", "3", "--device", "cpu",
    ]  # fmt: skip
    assert run_cli(argv) == 0
    return Dataset(out)


@pytest.fixture(scope="module")
def snr1_ds(env, cas9, tmp_path_factory) -> Dataset:
    """Through the Python API: SNR 1, CTF, no junk, no shifts."""
    out = tmp_path_factory.mktemp("snr1")
    cfg = SimulationConfig(n_images=200, box=BOX, pixel_size=PIXEL, snr=1.0, seed=5)
    res = simulate(cas9, out, cfg)
    assert res.pixel_size == PIXEL and res.n_images == 200 and res.n_particles == 200
    assert res.measured_snr == pytest.approx(1.0, rel=0.02)
    return Dataset(out)


# ------------------------------------------------------------------------------ files & STAR

TRUTH_COLUMNS = [
    "rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
    "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnOpticsGroup",
    "cryosiftTrueView", "cryosiftIsParticle", "cryosiftJunkType", "cryosiftSNR",
    "cryosiftImageNameB", "cryosiftCleanImageName",
]  # fmt: skip


def test_star_and_mrc_metadata(main_ds):
    ds = main_ds
    assert set(ds.out.iterdir()) >= {ds.out / f for f in (
        "particles.star", "particles.mrcs", "clean.mrcs", "particles_b.mrcs", "simulation.json"
    )}  # fmt: skip
    assert not [p for p in ds.out.iterdir() if p.name.startswith(".")]  # no staging left
    for col in TRUTH_COLUMNS:
        assert col in ds.star.columns, col
    assert len(ds.star) == 300
    optics = ds.optics.iloc[0]
    assert float(optics["rlnImagePixelSize"]) == pytest.approx(PIXEL)
    assert int(optics["rlnImageSize"]) == BOX
    assert float(optics["rlnVoltage"]) == 300.0 and float(optics["rlnSphericalAberration"]) == 2.7
    assert float(optics["rlnAmplitudeContrast"]) == pytest.approx(0.1)
    for name in ("particles.mrcs", "clean.mrcs", "particles_b.mrcs"):
        with mrcfile.open(ds.out / name) as mrc:
            assert mrc.is_image_stack(), name
            assert mrc.data.shape == (300, BOX, BOX) and mrc.data.dtype == np.float32
            assert float(mrc.voxel_size.x) == pytest.approx(PIXEL)
            assert float(mrc.voxel_size.y) == pytest.approx(PIXEL)
    # 1-based index@path, relative to the STAR's folder
    for col, stack in (
        ("rlnImageName", "particles.mrcs"),
        ("cryosiftImageNameB", "particles_b.mrcs"),
        ("cryosiftCleanImageName", "clean.mrcs"),
    ):
        idx, path = zip(*(s.split("@") for s in ds.star[col]), strict=True)
        assert [int(i) for i in idx] == list(range(1, 301))
        assert set(path) == {stack}
    assert (ds.star["cryosiftSNR"] == 0.05).all()
    assert (ds.star["cryosiftTrueView"][ds.is_particle] == -1).all()  # no fixed views
    assert ds.star["rlnDefocusU"].between(0.8e4 - 150, 3.0e4 + 150).all()
    assert (ds.star["rlnDefocusU"] >= ds.star["rlnDefocusV"]).all()
    shift = np.hypot(ds.star["rlnOriginXAngst"], ds.star["rlnOriginYAngst"]) / PIXEL
    assert shift.max() <= 2.0 + 1e-9 and shift.max() > 0


def test_max_shift_is_in_pixels(main_ds):
    """--max-shift 2 (px), radius uniform in a disc: among 300 draws the largest radius exceeds
    1 px with probability 1 - (1/4)^300."""
    ds = main_ds
    shift = np.hypot(ds.star["rlnOriginXAngst"], ds.star["rlnOriginYAngst"]) / PIXEL
    assert 1.0 < shift.max() <= 2.0 + 1e-9


# ------------------------------------------------------------------------------------- SNR


def measured_snr(ds: Dataset) -> tuple[float, float]:
    """SPEC: mean over particle images of var(clean) / noise variance; also the brief's per-image
    ratio mean(var(clean_i) / var(noise_i))."""
    clean = ds.clean[ds.is_particle].astype(np.float64)
    noise = ds.particles[ds.is_particle].astype(np.float64) - clean
    var_c, var_n = clean.var(axis=(1, 2)), noise.var(axis=(1, 2))
    return float(var_c.mean() / var_n.mean()), float((var_c / var_n).mean())


@pytest.mark.parametrize(("name", "snr"), [("main_ds", 0.05), ("snr1_ds", 1.0)])
def test_measured_snr_matches_request(name, snr, request):
    """The noise level is set from the realised signal variance, so the SNR is off only by the
    sampling error of the noise variance: sqrt(2 / (n_images box^2)) ~ 0.2 %; the per-image
    ratio adds E[1/chi2] bias 2/box^2 ~ 0.1 %. Bound 5 %, and the recorded figure agrees with the
    files to 1 %."""
    ds = request.getfixturevalue(name)
    spec, per_image = measured_snr(ds)
    assert spec == pytest.approx(snr, rel=0.05)
    assert per_image == pytest.approx(snr, rel=0.05)
    assert ds.record["requested_snr"] == snr
    assert ds.record["measured_snr"] == pytest.approx(spec, rel=0.01)
    assert ds.record["measured_snr"] == pytest.approx(snr, rel=0.05)


# ------------------------------------------------------------------------------------ noise


def _ring_sums(a: np.ndarray, b: np.ndarray, n: int):
    """Per Fourier ring (1 .. n/2 - 1): sum Re(FA FB*), sum |FA|^2, sum |FB|^2, pixel count."""
    fa, fb = np.fft.fft2(a), np.fft.fft2(b)
    rings = ring_index(n)
    out = []
    for r in range(1, n // 2):
        m = rings == r
        out.append((
            float(np.real(fa[:, m] * np.conj(fb[:, m])).sum()),
            float((np.abs(fa[:, m]) ** 2).sum()),
            float((np.abs(fb[:, m]) ** 2).sum()),
            int(m.sum()) * a.shape[0],
        ))  # fmt: skip
    return out


def test_noise_is_additive_white_zero_mean_and_independent_between_pairs(main_ds):
    """particles = clean + n_A, particles_b = clean + n_B with n_A, n_B white, zero-mean and
    independent, of variance noise_sigma^2 (json).

    With N = 300 * 48^2 samples the mean has sd sigma / sqrt(N), the variance relative sd
    sqrt(2 / N): bounds 5 sd. Whiteness and independence per Fourier ring r: a ring holds c_r
    pixels over all images, c_r / 2 independent ones (Hermitian pairs); the ring power relative to
    box^2 sigma^2 has sd 1 / sqrt(c_r / 2) and FRC(n_A, n_B) sd 1 / sqrt(c_r / 2): bounds 5 sd and
    4 sd (the brief's 4 / sqrt(ring count), 24 rings: false alarm ~ 1e-3)."""
    ds = main_ds
    sigma = ds.record["noise_sigma"]
    na = ds.particles.astype(np.float64) - ds.clean
    nb = ds.particles_b.astype(np.float64) - ds.clean
    n_samples = na.size
    for noise in (na, nb):
        assert abs(noise.mean()) < 5 * sigma / np.sqrt(n_samples)
        assert noise.var() == pytest.approx(sigma**2, rel=5 * np.sqrt(2 / n_samples))
    assert abs(float((na * nb).mean())) < 5 * sigma**2 / np.sqrt(n_samples)
    # noise added to junk images too (particles = clean + noise for every image)
    assert na[~ds.is_particle].std() == pytest.approx(sigma, rel=0.02)

    for cross, pa, pb, count in _ring_sums(na, nb, BOX):
        c_eff = count / 2
        assert abs(pa / (count * BOX**2 * sigma**2) - 1) < 5 / np.sqrt(c_eff)
        assert abs(pb / (count * BOX**2 * sigma**2) - 1) < 5 / np.sqrt(c_eff)
        assert abs(cross / np.sqrt(pa * pb)) < 4 / np.sqrt(c_eff)

    # teeth: the two noisy stacks share the clean signal, so their FRC is far above the bound
    # at low frequency
    cross, pa, pb, count = _ring_sums(ds.particles, ds.particles_b, BOX)[1]
    assert cross / np.sqrt(pa * pb) > 10 / np.sqrt(count / 2)


# ------------------------------------------------------------------------------ reproducibility


STACKS = ("particles.mrcs", "clean.mrcs", "particles_b.mrcs")


@pytest.fixture(scope="module")
def seed_runs(env, cas9, tmp_path_factory) -> tuple[Path, Path, Path]:
    """Seed 11 twice (the second run in a later wall-clock second) and seed 12."""
    root = tmp_path_factory.mktemp("seeds")

    def run(name: str, seed: int) -> Path:
        cfg = SimulationConfig(
            n_images=24, box=BOX, pixel_size=PIXEL, snr=0.1, seed=seed, max_shift=2.0,
            junk_fraction=0.3, pairs=True, chunk_size=10,
        )  # fmt: skip
        simulate(cas9, root / name, cfg)
        return root / name

    a = run("a", 11)
    time.sleep(math.ceil(time.time()) - time.time() + 0.05)
    return a, run("b", 11), run("c", 12)


def test_same_seed_same_data_different_seed_different(seed_runs):
    """Pixels, MRC headers (apart from the free-text labels) and the STAR are identical for the
    same seed, including chunked generation (chunk_size 10 over 24 images); another seed changes
    every file."""
    a, b, c = seed_runs
    assert (a / "particles.star").read_bytes() == (b / "particles.star").read_bytes()
    assert (a / "particles.star").read_bytes() != (c / "particles.star").read_bytes()
    for name in STACKS:
        with (
            mrcfile.open(a / name) as ma,
            mrcfile.open(b / name) as mb,
            mrcfile.open(c / name) as mc,
        ):
            assert ma.data.tobytes() == mb.data.tobytes(), name
            assert not np.array_equal(ma.data, mc.data), name
            ha, hb = ma.header.copy(), mb.header.copy()
            ha["label"] = hb["label"] = b""
            assert ha.tobytes() == hb.tobytes(), name


def test_same_seed_byte_identical_stacks(seed_runs):
    """Byte for byte, headers included: no timestamp in the MRC labels (runs a and b were
    written in different wall-clock seconds)."""
    a, b, _ = seed_runs
    for name in STACKS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# ----------------------------------------------------------------------------------- junk


def test_junk_fraction_types_and_levels(main_ds):
    """Junk count ~ Binomial(300, 0.3): sd 7.9, bound 4 sd. All five kinds appear (each ~18 of
    90; P(a kind missing) < 5 * 0.8^90 ~ 1e-8). Pure-noise junk has an all-zero clean image; the
    others are scaled to 0.5-2x the particles' mean signal variance (estimated from a 64-image
    pilot), so [0.25, 4]x leaves room for the pilot's sampling error."""
    ds = main_ds
    n_junk = int((~ds.is_particle).sum())
    assert abs(n_junk - 90) < 4 * np.sqrt(300 * 0.3 * 0.7)
    kinds = ds.star["cryosiftJunkType"].to_numpy()
    assert set(kinds[ds.is_particle]) == {"none"}
    assert set(kinds[~ds.is_particle]) == set(JUNK_TYPES)
    assert (ds.star["cryosiftTrueView"][~ds.is_particle] == -1).all()
    particle_var = ds.clean[ds.is_particle].var(axis=(1, 2)).mean()
    for kind in JUNK_TYPES:
        imgs = ds.clean[kinds == kind]
        if kind == "noise":
            assert np.all(imgs == 0)
            continue
        v = imgs.var(axis=(1, 2))
        assert np.all((v > 0.25 * particle_var) & (v < 4 * particle_var)), (kind, v / particle_var)


# ------------------------------------------------------------------------- image formation


def test_clean_images_reproduce_from_the_star_ground_truth(main_ds, cas9):
    """Re-form clean particle images from the STAR alone with independent numpy shift and
    textbook CTF code (the projector itself is tested in test_simulate_projection): slice at
    A(rot, tilt, psi), particle moved to -origin / pixel, CTF(dU, dV, angle) with RELION's sign,
    crop the box from the field. float32 arithmetic throughout: rel L2 < 1e-3."""
    ds = main_ds
    field = ds.record["field_size"]
    vol = model_to_volume(load_atomic_model(cas9), PIXEL, field).data
    proj = FourierProjector(vol)
    rows = ds.star[ds.is_particle].head(12)
    idx = np.flatnonzero(ds.is_particle)[:12]
    a = euler_to_matrix(rows["rlnAngleRot"], rows["rlnAngleTilt"], rows["rlnAnglePsi"])
    spectra = proj.slices(a).numpy().astype(np.complex128)
    ky = np.fft.fftfreq(field, 1.0 / field)[:, None]
    kx = np.fft.rfftfreq(field, 1.0 / field)[None, :]
    lam, cs, q0 = electron_wavelength(300.0), 2.7e7, 0.1
    for spec, (_, row), i in zip(spectra, rows.iterrows(), idx, strict=True):
        sx, sy = -row["rlnOriginXAngst"] / PIXEL, -row["rlnOriginYAngst"] / PIXEL
        spec = spec * np.exp(-2j * np.pi * (kx * sx + ky * sy) / field)
        fx, fy = kx / (field * PIXEL), ky / (field * PIXEL)
        ang = np.deg2rad(row["rlnDefocusAngle"])
        fu, fv = fx * np.cos(ang) + fy * np.sin(ang), -fx * np.sin(ang) + fy * np.cos(ang)
        f2 = fx**2 + fy**2
        gamma = np.pi * lam * (row["rlnDefocusU"] * fu**2 + row["rlnDefocusV"] * fv**2)
        gamma -= np.pi / 2 * cs * lam**3 * f2**2
        ctf = np.sqrt(1 - q0**2) * np.sin(gamma) + q0 * np.cos(gamma)
        img = np.fft.fftshift(np.fft.irfft2(spec * ctf, s=(field, field)))
        lo = field // 2 - BOX // 2
        assert rel_l2(ds.clean[i], img[lo : lo + BOX, lo : lo + BOX]) < 1e-3, i


@pytest.fixture(scope="module")
def views_ds(env, cas9, tmp_path_factory) -> Dataset:
    out = tmp_path_factory.mktemp("views")
    argv = [
        "-q", "simulate", str(cas9), "-o", str(out), "--n-images", "400", "--box", str(BOX),
        "--pixel-size", str(PIXEL), "--views", "4", "--view-weights", "5,1,1,3", "--no-in-plane",
        "--no-ctf", "--max-shift", "0", "--snr", "0.1", "--seed", "2",
    ]  # fmt: skip
    assert run_cli(argv) == 0
    return Dataset(out)


def test_fixed_views(views_ds):
    """Four view ids; within a view the clean images are identical (same rotation, no shift, no
    CTF: the same float32 computation), between views clearly different; class sizes follow the
    weights 5:1:1:3 (multinomial sd sqrt(n p (1-p)), bound 4 sd per class)."""
    ds = views_ds
    view = ds.star["cryosiftTrueView"].to_numpy()
    assert set(view) == {0, 1, 2, 3}
    assert "rlnDefocusU" not in ds.star.columns  # --no-ctf: no CTF columns
    assert (ds.star["rlnAnglePsi"] == 0).all()
    assert (ds.star["rlnOriginXAngst"] == 0).all() and (ds.star["rlnOriginYAngst"] == 0).all()
    means = []
    for v in range(4):
        imgs = ds.clean[view == v]
        angles = ds.star.loc[view == v, ["rlnAngleRot", "rlnAngleTilt"]].to_numpy()
        assert np.all(angles == angles[0])
        scale = np.abs(imgs[0]).max()
        assert np.abs(imgs - imgs[0]).max() <= 1e-6 * scale
        means.append(imgs[0])
    for i in range(4):
        for j in range(i + 1, 4):
            assert rel_l2(means[i], means[j]) > 0.1
    p = np.array([5, 1, 1, 3]) / 10
    counts = np.bincount(view, minlength=4)
    assert np.all(np.abs(counts - 400 * p) < 4 * np.sqrt(400 * p * (1 - p))), counts


def test_shifts_move_the_particle_to_minus_origin(env, cas9, tmp_path):
    """Single view, no CTF: each clean image is the same projection moved by -origin / pixel
    (x = column, y = row). Centres of mass of the raw signed images move exactly with the
    Fourier shift as long as nothing wraps (64-px field, 22-px radius, shifts <= 6 px): 0.1 px."""
    cfg = SimulationConfig(
        n_images=12, box=64, pixel_size=PIXEL, snr=1.0, views=1, in_plane=False, ctf=False,
        max_shift=6.0, seed=8,
    )  # fmt: skip
    simulate(cas9, tmp_path, cfg)
    ds = Dataset(tmp_path)
    assert ds.record["field_size"] == 64
    row = ds.star.iloc[0]
    a = euler_to_matrix(row["rlnAngleRot"], row["rlnAngleTilt"], 0.0)
    vol = model_to_volume(load_atomic_model(cas9), PIXEL, 64).data
    ref = FourierProjector(vol).project(a)[0].numpy()
    cx0, cy0 = centre_of_mass(ref)
    origins = ds.star[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / PIXEL
    # shifts large enough to tell x from y and the signs apart
    assert np.abs(origins).max(axis=0).min() > 2.0
    for img, (ox, oy) in zip(ds.clean, origins, strict=True):
        cx, cy = centre_of_mass(img)
        assert cx - cx0 == pytest.approx(-ox, abs=0.1)
        assert cy - cy0 == pytest.approx(-oy, abs=0.1)


def test_ctf_thon_rings_in_the_power_spectrum(env, cas9, tmp_path):
    """One defocus (2 µm, no astigmatism), Cs 2.7 mm, Q0 0.1: the CTF is sin(gamma + K3), zero
    where gamma + K3 = m pi and maximal where it is (m - 1/2) pi. The radially averaged power of
    the clean images (100 random views: the structure's own spectrum is smooth) must be < 10 % at
    the first two zeros of its value at the preceding maxima (measured ~1 %); without the CTF,
    or with the zeros elsewhere, the ratio is of order 1."""
    cfg = SimulationConfig(
        n_images=100, box=BOX, pixel_size=PIXEL, snr=1.0, defocus_range=(2.0, 2.0),
        astigmatism=0.0, seed=4,
    )  # fmt: skip
    simulate(cas9, tmp_path, cfg)
    clean = read_stack(tmp_path / "clean.mrcs").astype(np.float64)
    power = (np.abs(np.fft.fft2(clean)) ** 2).mean(0)
    f = np.fft.fftfreq(BOX, PIXEL)
    kr = np.hypot(f[:, None], f[None, :])
    dk = 1.0 / (BOX * PIXEL)

    lam, cs, q0 = electron_wavelength(300.0), 2.7e7, 0.1
    k = np.linspace(0, 0.5 / PIXEL, 200001)
    phase = np.pi * lam * 2.0e4 * k**2 - np.pi / 2 * cs * lam**3 * k**4 + np.arcsin(q0)

    def radius(target: float) -> float:
        return float(k[np.argmin(np.abs(phase - target))])

    def ring_power(k0: float) -> float:
        return float(power[np.abs(kr - k0) < dk / 2].mean())

    for m in (1, 2):
        zero, peak = radius(m * np.pi), radius((m - 0.5) * np.pi)
        assert zero < 0.5 / PIXEL
        assert ring_power(zero) < 0.1 * ring_power(peak), m


def test_poisson_noise(env, cas9, tmp_path):
    """Counting noise at 50 e/Å^2 scaled to the requested SNR: its variance follows the local
    signal (1 + k clean), which moves the realised SNR by k * mean(clean) ~ 1 %; bound 10 %.
    Zero mean: bound 5 sd of the mean."""
    cfg = SimulationConfig(
        n_images=100, box=BOX, pixel_size=PIXEL, snr=0.5, noise="poisson", dose=50.0, seed=6
    )
    res = simulate(cas9, tmp_path, cfg)
    ds = Dataset(tmp_path)
    spec, _ = measured_snr(ds)
    assert spec == pytest.approx(0.5, rel=0.10)
    assert res.measured_snr == pytest.approx(0.5, rel=0.10)
    noise = ds.particles.astype(np.float64) - ds.clean
    assert abs(noise.mean()) < 5 * noise.std() / np.sqrt(noise.size)
    # not Gaussian noise under another name: the noise variance grows with the clean signal
    c = ds.clean.astype(np.float64).ravel()
    hi, lo = c > np.quantile(c, 0.9), c < np.quantile(c, 0.1)
    assert noise.ravel()[hi].var() > noise.ravel()[lo].var()


def test_simulate_from_density_map_uses_its_voxel_size(env, tmp_path):
    """EMD-3197 (20^3 at 11.4 Å) with --pixel-size omitted: images at 11.4 Å/px everywhere."""
    path = data_file("maps", "EMD-3197.map")
    out = tmp_path / "map"
    argv = ["-q", "simulate", str(path), "-o", str(out), "--n-images", "40", "--box", "32",
            "--snr", "0.5", "--seed", "1"]  # fmt: skip
    assert run_cli(argv) == 0
    ds = Dataset(out)
    assert float(ds.optics.iloc[0]["rlnImagePixelSize"]) == pytest.approx(11.4, rel=1e-5)
    assert int(ds.optics.iloc[0]["rlnImageSize"]) == 32
    with mrcfile.open(out / "particles.mrcs") as mrc:
        assert float(mrc.voxel_size.x) == pytest.approx(11.4, rel=1e-5)
        assert mrc.data.shape == (40, 32, 32)
    assert ds.clean.var(axis=(1, 2)).min() > 0
    assert measured_snr(ds)[0] == pytest.approx(0.5, rel=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_and_cpu_give_the_same_clean_images(env, cas9, tmp_path):
    """Same seed on both devices: the ground truth draws are numpy (identical), the images agree
    to float32 FFT rounding (rel L2 < 1e-4)."""
    cfg = dict(n_images=32, box=BOX, pixel_size=PIXEL, snr=0.1, seed=3, max_shift=2.0)
    simulate(cas9, tmp_path / "cpu", SimulationConfig(**cfg), device="cpu")
    simulate(cas9, tmp_path / "gpu", SimulationConfig(**cfg), device="cuda")
    a, b = Dataset(tmp_path / "cpu"), Dataset(tmp_path / "gpu")
    assert a.star["rlnAngleRot"].equals(b.star["rlnAngleRot"])
    assert rel_l2(b.clean, a.clean) < 1e-4
