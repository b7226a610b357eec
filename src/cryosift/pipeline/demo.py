"""`cryosift demo`: the whole pipeline on a dataset simulated from the structure in the package.

GroEL-GroES (PDB 1AON, CC0, shipped) is projected into a few distinct views with in-plane
rotations, shifts, CTF and noise, and mixed with structured junk (ice gradients, carbon edges,
aggregates, broken pieces of the complex, pure noise; the package ships one structure only, so
`cryosift bench B5` is where fragments of another protein are screened out). A second, smaller
simulation with its particle/junk labels stands for what a user labels by hand (or takes from the
best and worst classes of a first round): it trains the screener. Then `cryosift run` does the
rest: normalise, denoise with the shipped general model, screen, classify with `align2d`, score
every stage against the ground truth, and write the HTML report. Offline, CPU, about a minute here.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from cryosift.pipeline.config import RunConfig
from cryosift.pipeline.run import RunResult, check_output_folder, run_pipeline
from cryosift.simulate import SimulationConfig, simulate

__all__ = ["DEMO_STRUCTURE", "demo_headline", "run_demo", "shipped_structure"]

DEMO_STRUCTURE = "1aon.pdb.gz"


def shipped_structure() -> Path:
    """Path of the atomic model shipped inside the package (GroEL-GroES, PDB 1AON, CC0)."""
    return Path(str(resources.files("cryosift") / "data" / DEMO_STRUCTURE))


def demo_simulation(n_images: int, snr: float, views: int, seed: int) -> SimulationConfig:
    """The demo dataset: 96 px at 2.5 Å/px (240 Å box), K views, 25 % structured junk."""
    return SimulationConfig(n_images=n_images, box=96, pixel_size=2.5, snr=snr, views=views,
                            in_plane=True, max_shift=3.0, ctf=True, junk_fraction=0.25,
                            seed=seed)


def run_demo(
    out_dir: str | Path,
    n_images: int = 2000,
    snr: float = 0.05,
    views: int = 8,
    n_train: int = 1000,
    seed: int = 0,
    device: torch.device | str = "cpu",
    command: str | None = None,
) -> RunResult:
    """Simulate into ``out_dir/simulated`` (+ ``training``), run the pipeline into
    ``out_dir/run``; returns the pipeline's result (metrics, report path)."""
    out_dir = Path(out_dir)
    run_dir = out_dir / "run"
    data_star = out_dir / "simulated" / "particles.star"
    check_output_folder(run_dir, data_star)  # refuse before simulating anything
    t0 = time.time()
    data = simulate(shipped_structure(), out_dir / "simulated",
                    demo_simulation(n_images, snr, views, seed), device=device,
                    command="demo")
    train = simulate(shipped_structure(), out_dir / "training",
                     demo_simulation(n_train, snr, views, seed + 1), device=device,
                     command="demo")
    cfg = RunConfig(input=str(data.star), out=str(run_dir), denoise="general",
                    screen_labels=str(train.star), screen_method="cnn", classes=views,
                    classify_method="align2d", seed=seed, device=str(device))
    result = run_pipeline(cfg, command=command)
    result.seconds = time.time() - t0
    return result


def demo_headline(result: RunResult) -> list[str]:
    """The few lines `cryosift demo` prints: scores of each stage against ground truth."""
    m: dict[str, Any] = result.metrics or {}
    lines = []
    den = m.get("denoise", {})
    if "denoised" in den:
        raw, out = den["raw"], den["denoised"]
        lines.append(
            f"denoising (general model), true particles vs clean: CC {raw['cc']:.3f} -> "
            f"{out['cc']:.3f}, PSNR (scale-invariant) {raw['si_psnr']:.1f} -> "
            f"{out['si_psnr']:.1f} dB"
        )
    scr = m.get("screen")
    if scr:
        lines.append(
            f"screening (CNN): accuracy {scr['accuracy']:.3f}, ROC-AUC {scr['roc_auc']:.3f}; "
            f"kept {scr['tp'] + scr['fp']} images of which {scr['fp']} junk, lost "
            f"{scr['fn']} of {scr['n_pos']} particles"
        )
    cls = m.get("classify")
    if cls:
        lines.append(
            f"2D classification (align2d): ACC {cls['acc']:.3f}, NMI {cls['nmi']:.3f} "
            f"against the true views"
        )
    lines.append(f"total {result.seconds:.0f} s")
    return lines
