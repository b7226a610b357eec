"""The shipped general Noise2Noise model: what it was trained on, how, and how to retrain it.

Like Topaz-Denoise's general model, it lets users denoise a stack offline with no training
(`cryosift denoise apply --model general`). It is a small seed-003 U-Net trained with Noise2Noise
on pairs of noise realisations simulated by `cryosift simulate` from four structures of
shared/data/structures (TRPV1 3J5P, 20S proteasome 3J9I, 4V1W, SpCas9 5F9R) at several pixel
sizes, random orientations, SNR 0.01-0.5 (log-spaced), two thirds of the runs with CTF and
one third without (recipe: :class:`GeneralRecipe`). It is conditioned on the stack's SNR
(estimated from the images' corners, :func:`cryosift.denoise.cwf.estimate_snr`, when it is
applied; per simulated run when it is trained), fed as a constant input plane, so the one model
blurs an SNR-0.01 stack more than an SNR-0.5 one. GroEL (1AON) is deliberately left out: it
is the structure of benchmark B1 and of `cryosift demo`, so the figures there measure
generalisation to an unseen protein.

`scripts/train_general_model.py` calls `train_general_model` and copies the result into the
package (src/cryosift/data/models/general.pt); the training record travels in the model's
metadata.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cryosift.denoise.training import TrainConfig, train_denoiser
from cryosift.io import open_source

log = logging.getLogger("cryosift")

# (structure file in shared/data/structures, pixel size in Å, box): particle diameters of
# ~30-100 px, pixel sizes 1.5-3.5 Å, so the model sees features at several sizes in pixels, and
# boxes up to twice the stored crop so that crops hold particle centres, edges and background.
GENERAL_CONFIGS: tuple[tuple[str, float, int], ...] = (
    ("3J5P_refined_locscale.pdb", 1.5, 128),
    ("3J5P_refined_locscale.pdb", 3.5, 64),
    ("3j9i.pdb.gz", 1.5, 128),
    ("3j9i.pdb.gz", 2.0, 128),
    ("3j9i.pdb.gz", 3.0, 64),
    ("4v1w.cif.gz", 2.2, 96),
    ("4v1w.cif.gz", 3.2, 64),
    ("5F9R.pdb", 1.8, 96),
    ("5F9R.pdb", 3.2, 64),
)
GENERAL_SNRS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


@dataclass(frozen=True)
class GeneralRecipe:
    """Everything that determines the general model (recorded in its metadata).

    Version 3 (this one) is version 2 conditioned on the SNR of each simulated run as
    estimated from its noisy images (what the model is given when applied), with Gaussian
    noise of s.d. 0.2 (a factor ~1.5 in SNR) on the condition at every training step. Without
    the condition, a standardised crop does not tell the network its SNR, and v2 traded
    mid-SNR quality for low-SNR quality (B1 at SNR 0.2: 22.52 dB after 4 epochs, 22.21 at the
    end) and still under-smoothed at SNR 0.01. Without the jitter, the network saw only the
    six training SNRs and its output jumped between them: on B1 at SNR 0.1 (estimated 0.099)
    it scored 20.2 dB at the right condition and 22.3 at condition 0.05 (first 200 images),
    worse than v2 (21.4); with the jitter its PSNR varies smoothly with the condition and
    beats v2 at every B1 SNR but 0.02 (first 200 images: +0.1, -0.02, +0.2, +0.7, +0.8, +0.2
    dB at SNR 0.01 ... 0.5). 30 epochs: the validation loss moves by < 0.03 % after 25.

    Version 2 against version 1: three times the images (768 per run instead of
    256), crops at random positions of boxes up to 128 px instead of the central 48 px (v1
    never showed a particle's edge or the background at 1.5-2 Å/px), every image's loss
    weighted by 1 / its input variance (v1's loss, in the images' own units, was ruled by the
    noise of the SNR-0.01 images: its validation moved by 0.2% in all), weight averaging, and
    up to 15,000 steps instead of v1's 1,700 (the shipped one stopped early after 14,000).
    """

    configs: tuple[tuple[str, float, int], ...] = GENERAL_CONFIGS
    snrs: tuple[float, ...] = GENERAL_SNRS
    n_per_run: int = 768
    store: int = 64  # px: each image is kept as one crop of this size at a random position
    crop: int = 48  # px: training crops, taken at random inside the stored ones
    width: int = 8
    depth: int = 4
    epochs: int = 30
    steps_per_epoch: int = 250
    patience: int = 8
    batch_size: int = 32
    per_image_weight: bool = True
    ema: float = 0.999
    swap_pairs: bool = False  # 41k pairs: plenty of inputs without using each pair both ways
    schedule: str = "plateau"
    conditions: int = 1  # the stack's SNR as an input plane (v3); 0 for v2's plain U-Net
    condition_jitter: float = 0.2  # noise on the condition during training (see TrainConfig)
    seed: int = 0

    @property
    def pixel_size_range(self) -> tuple[float, float]:
        sizes = [c[1] for c in self.configs]
        return min(sizes), max(sizes)


def random_crops(
    stacks: tuple[np.ndarray, ...], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, ...]:
    """One crop of ``size`` px per image, at a random position that is the same in every stack
    (the two noise realisations of a pair stay aligned)."""
    n, box = stacks[0].shape[0], stacks[0].shape[-1]
    if size >= box:
        return tuple(np.ascontiguousarray(s) for s in stacks)
    y0 = rng.integers(0, box - size + 1, n)
    x0 = rng.integers(0, box - size + 1, n)
    rows = (y0[:, None] + np.arange(size))[:, :, None]
    cols = (x0[:, None] + np.arange(size))[:, None, :]
    return tuple(s[np.arange(n)[:, None, None], rows, cols] for s in stacks)


def simulate_training_pairs(
    recipe: GeneralRecipe, structures_dir: Path, work_dir: Path, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simulate every (structure, pixel size, SNR) run with pairs, keeping one random crop of
    `recipe.store` px per image.

    Returns two (N, store, store) float32 stacks, the two noise realisations of the same
    images, and (N,) each image's SNR as estimated from its run's whole noisy boxes.
    """
    from cryosift.denoise.cwf import estimate_snr
    from cryosift.simulate import SimulationConfig, simulate

    a_parts, b_parts, snr_parts = [], [], []
    rng = np.random.default_rng(recipe.seed)
    run = 0
    for structure, pixel_size, box in recipe.configs:
        for snr in recipe.snrs:
            folder = work_dir / f"run{run:03d}"
            cfg = SimulationConfig(
                n_images=recipe.n_per_run, box=box, pixel_size=pixel_size, snr=snr,
                ctf=run % 3 != 2, pairs=True, seed=recipe.seed * 1000 + run,
            )
            log.info("general model data %d: %s %.2f Å/px box %d SNR %g CTF %s", run,
                     structure, pixel_size, box, snr, cfg.ctf)
            simulate(structures_dir / structure, folder, cfg, device=device, command="general")
            full_a = open_source(folder / "particles.star").images(slice(None))
            estimated = estimate_snr(full_a)
            log.info("  estimated SNR %.4g", estimated)
            a, b = random_crops(
                (full_a, open_source(folder / "particles_b.mrcs").images(slice(None))),
                recipe.store, rng,
            )
            a_parts.append(a)
            b_parts.append(b)
            snr_parts.append(np.full(len(a), estimated))
            shutil.rmtree(folder)
            run += 1
    return np.concatenate(a_parts), np.concatenate(b_parts), np.concatenate(snr_parts)


def train_general_model(
    recipe: GeneralRecipe, structures_dir: Path, work_dir: Path, device: str = "cpu"
) -> Path:
    """Simulate the training pairs and train the general N2N model; returns its model.pt."""
    work_dir = Path(work_dir)
    a, b, snr = simulate_training_pairs(recipe, structures_dir, work_dir / "data", device)
    log.info("training the general model on %d pairs of %d px", len(a), a.shape[-1])
    cfg = TrainConfig(
        method="n2n", epochs=recipe.epochs, batch_size=recipe.batch_size, crop=recipe.crop,
        patience=recipe.patience, width=recipe.width, depth=recipe.depth, seed=recipe.seed,
        steps_per_epoch=recipe.steps_per_epoch, per_image_weight=recipe.per_image_weight,
        ema=recipe.ema, swap_pairs=recipe.swap_pairs, schedule=recipe.schedule,
        conditions=recipe.conditions, condition_jitter=recipe.condition_jitter,
    )
    model_dir = work_dir / "model"
    summary = train_denoiser(a, model_dir, cfg, images_b=b, device=device, snr=snr)
    _stamp_general_meta(model_dir / "model.pt", recipe, summary)
    return model_dir / "model.pt"


def _stamp_general_meta(path: Path, recipe: GeneralRecipe, summary: dict) -> None:
    """Record the recipe and the pixel-size range the model may be applied at."""
    import torch

    from cryosift.denoise.model_io import load_model, save_model

    model, meta = load_model(path)
    lo, hi = recipe.pixel_size_range
    meta = {
        **meta,
        "name": "general",
        "pixel_size": None,
        "pixel_size_range": [lo, hi],
        "recipe": asdict(recipe),
        "best_epoch": summary["best_epoch"],
        "best_val_loss": summary["best_val_loss"],
        "train_seconds": summary["seconds"],
        "history": summary["history"],
        "torch": str(torch.__version__),
    }
    save_model(path, model, meta)
