"""The benchmark protocol: which datasets each benchmark simulates and what it scores.

Every dataset is simulated by the same code as `cryosift simulate` from the real atomic models in
shared/data/structures (or the structure shipped in the package for GroEL). `--quick` keeps the
settings but shrinks the number and size of images so a benchmark runs in minutes on a laptop CPU;
the full mode is what results are reported from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from cryosift.errors import CryosiftError

# Tasks a dataset is scored on: "denoise" (image quality of every registered denoiser against
# the clean stack), "views" (nearest-clean-view clustering oracle and every clusterer), "screen"
# (matched filter), "classes" (2D class averages against clean projections, bench/clustering.py).


@dataclass(frozen=True)
class DatasetSpec:
    """One simulated benchmark dataset (arguments of `cryosift simulate`)."""

    structure: str  # file name in shared/data/structures
    n_images: int
    box: int
    pixel_size: float
    snr: float
    views: int | None = None
    view_weights: tuple[float, ...] | None = None
    in_plane: bool = True
    max_shift: float = 0.0
    ctf: bool = False
    junk_fraction: float = 0.0
    junk_types: tuple[str, ...] = ("noise",)
    seed: int = 0
    tasks: tuple[str, ...] = ("denoise",)
    junk_structure: str | None = None  # "fragment" junk from this other structure


@dataclass(frozen=True)
class Benchmark:
    id: str
    title: str
    reproduces: str
    settings: dict[str, DatasetSpec] = field(default_factory=dict)
    quick: dict[str, DatasetSpec] = field(default_factory=dict)
    # figures other tools reached in the same setting, run elsewhere (not by this benchmark):
    # {setting: {tool: {metric: value}}}, printed beside the results for comparison
    references: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)


def _geometric(k: int, ratio: float) -> tuple[float, ...]:
    """Unequal class sizes: weights ratio^0 .. ratio^(k-1) (largest / smallest = ratio^(k-1))."""
    return tuple(ratio**i for i in range(k))


def _b1() -> Benchmark:
    snrs = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
    full = {
        f"snr={s}": DatasetSpec("1aon.pdb.gz", 1000, 128, 1.5, s, seed=i)
        for i, s in enumerate(snrs)
    }
    quick = {k: replace(v, n_images=200, box=64, pixel_size=3.0) for k, v in full.items()}
    return Benchmark(
        "B1",
        "GroEL (1AON), random views, no CTF: denoising across SNR",
        "003 (Noise2Noise / Noise2Void / low-pass vs SNR)",
        full,
        quick,
    )


def _b2() -> Benchmark:
    tests = {"groel": "1aon.pdb.gz", "spcas9": "5F9R.pdb", "t20s": "3j9i.pdb.gz"}
    full = {
        f"test={k}": DatasetSpec(
            v, 4000, 64, 3.0, 0.1, views=4, in_plane=False, seed=10 + i, tasks=("denoise", "views")
        )
        for i, (k, v) in enumerate(tests.items())
    }
    quick = {k: replace(v, n_images=400) for k, v in full.items()}
    return Benchmark(
        "B2",
        "4 views, SNR 0.1, three test proteins (train on TRPV1 3J5P)",
        "004 (CDAE denoising and clustering)",
        full,
        quick,
    )


def _b3() -> Benchmark:
    snrs = (0.0625, 0.0312, 0.0156, 0.0078)
    full = {
        f"snr={s}": DatasetSpec(
            "5F9R.pdb",
            10000,
            64,
            3.2,
            s,
            junk_fraction=0.5,
            junk_types=("noise",),
            seed=20 + i,
            tasks=("screen",),
        )
        for i, s in enumerate(snrs)
    }
    quick = {k: replace(v, n_images=1000) for k, v in full.items()}
    return Benchmark(
        "B3",
        "SpCas9 (5F9R) particles vs noise images, 50/50",
        "000 (RBM screening, Table 1)",
        full,
        quick,
    )


def _b4() -> Benchmark:
    full = {}
    for k in (10, 50):
        for s in (0.05, 0.01):
            full[f"K={k},snr={s}"] = DatasetSpec(
                "5F9R.pdb",
                100 * k,
                64,
                3.2,
                s,
                views=k,
                view_weights=_geometric(k, 4 ** (1 / (k - 1))),
                in_plane=False,
                seed=30 + k + int(s * 1000),
                tasks=("denoise", "views"),
            )
    quick = {k: replace(v, n_images=v.n_images // 4) for k, v in full.items()}
    return Benchmark(
        "B4",
        "SpCas9, K = 10 / 50 fixed views, unequal class sizes (4:1)",
        "001 (DRVAE + BSK-means++)",
        full,
        quick,
    )


def _b5() -> Benchmark:
    spec = DatasetSpec(
        "1aon.pdb.gz",
        2000,
        96,
        2.0,
        0.05,
        max_shift=4.0,
        ctf=True,
        junk_fraction=0.3,
        junk_types=("noise", "ice", "carbon", "aggregate", "fragment"),
        seed=50,
        tasks=("denoise", "screen", "classes"),
        junk_structure="5F9R.pdb",  # fragments of another protein (SpCas9), as real stacks hold
    )
    return Benchmark(
        "B5",
        "Realistic GroEL: random poses, shifts, CTF 0.8-3 µm, structured junk",
        "beyond the seeds",
        {"realistic": spec},
        {"realistic": replace(spec, n_images=400)},
    )


def _p10() -> Benchmark:
    snrs = (0.1, 0.01)
    full = {
        f"snr={s}": DatasetSpec("5F9R.pdb", 2000, 64, 3.2, s, views=10, in_plane=False, seed=0)
        for s in snrs
    }
    quick = {k: replace(v, n_images=500) for k, v in full.items()}
    # PSNR reached by other tools on a 10-view, 2,000-image, 64 px phantom without CTF, as
    # issue 4 gives them (Noise2Void: CAREamics, 5 epochs; Topaz: its general model; Cov2D:
    # ASPIRE's covariance Wiener filter)
    tools = ("Topaz-Denoise general", "ASPIRE Cov2D", "CAREamics Noise2Void", "BM3D",
             "Gaussian blur")
    figures = {
        "snr=0.1": (23.7, 29.5, 27.1, 26.3, 23.6),
        "snr=0.01": (17.7, 24.6, 19.0, 19.0, 15.7),
    }
    return Benchmark(
        "P10",
        "10-view SpCas9 (5F9R) phantom, 2,000 images of 64 px at 3.2 Å/px, no CTF, no "
        "in-plane rotation: denoising at SNR 0.1 and 0.01",
        "the side-by-side setting of issue 4 (Topaz-Denoise, ASPIRE Cov2D, CAREamics "
        "Noise2Void, BM3D)",
        full,
        quick,
        references={
            k: {t: {"psnr": v} for t, v in zip(tools, vals, strict=True)}
            for k, vals in figures.items()
        },
    )


BENCHMARKS: dict[str, Benchmark] = {
    b.id: b for b in (_b1(), _b2(), _b3(), _b4(), _b5(), _p10())
}


def benchmark_settings(bench_id: str, quick: bool) -> dict[str, DatasetSpec]:
    if bench_id not in BENCHMARKS:
        raise CryosiftError(
            f"unknown benchmark {bench_id!r} (choose from {', '.join(BENCHMARKS)}, all)"
        )
    b = BENCHMARKS[bench_id]
    return dict(b.quick if quick else b.settings)


def structure_path(name: str) -> Path:
    """Find a benchmark structure: shared/data/structures beside the checkout, else the package."""
    from importlib import resources

    here = Path(__file__).resolve()
    candidates = [p / "shared" / "data" / "structures" / name for p in here.parents]
    candidates.append(Path(str(resources.files("cryosift") / "data" / name)))
    for c in candidates:
        if c.is_file():
            return c
    raise CryosiftError(
        f"benchmark structure {name} not found (looked in shared/data/structures "
        "next to the checkout and in the package)"
    )
