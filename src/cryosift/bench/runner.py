"""Run benchmarks: simulate (cached), apply every registered method, score against the truth."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd

from cryosift.bench.protocol import BENCHMARKS, DatasetSpec, benchmark_settings, structure_path
from cryosift.io import merged_metadata, open_source, read_star
from cryosift.metrics import (
    FRC_CLEAN,
    FrcAccumulator,
    class_size_balance,
    clustering_metrics,
    frc_resolution,
    screening_metrics,
)
from cryosift.metrics.image import cc, psnr, scale_invariant_psnr, ssim
from cryosift.oracles import matched_filter_scores, nearest_clean_view
from cryosift.registry import DenoiseTask, Method, available
from cryosift.simulate import SimulationConfig, simulate

log = logging.getLogger("cryosift")


@dataclass
class BenchData:
    """A simulated benchmark dataset, in memory (benchmark sizes are bounded)."""

    spec: DatasetSpec
    noisy: np.ndarray
    clean: np.ndarray
    metadata: pd.DataFrame
    pixel_size: float
    noisy_b: np.ndarray | None = None  # the second noise realisation (for Noise2Noise)

    @property
    def is_particle(self) -> np.ndarray:
        return self.metadata["cryosiftIsParticle"].to_numpy().astype(bool)

    @property
    def noise_var(self) -> float:
        p = self.is_particle
        return float(np.var(self.noisy[p].astype(np.float64) - self.clean[p]))


def _slug(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def load_dataset(spec: DatasetSpec, folder: Path, device: str = "cpu") -> BenchData:
    """Simulate `spec` into `folder` unless a finished simulation with the same spec is there."""
    cfg = SimulationConfig(
        n_images=spec.n_images,
        box=spec.box,
        pixel_size=spec.pixel_size,
        snr=spec.snr,
        views=spec.views,
        view_weights=spec.view_weights,
        in_plane=spec.in_plane,
        max_shift=spec.max_shift,
        ctf=spec.ctf,
        junk_fraction=spec.junk_fraction,
        junk_types=spec.junk_types,
        seed=spec.seed,
        pairs="denoise" in spec.tasks,
    )
    marker = folder / "bench_spec.json"
    junk = structure_path(spec.junk_structure) if spec.junk_structure else None
    wanted = json.dumps({**asdict(cfg), "junk_structure": spec.junk_structure}, sort_keys=True,
                        default=str)
    if not (
        marker.is_file() and marker.read_text() == wanted and (folder / "particles.star").is_file()
    ):
        simulate(structure_path(spec.structure), folder, cfg, junk_structure=junk, device=device,
                 command="bench")
        marker.write_text(wanted)
    table = read_star(folder / "particles.star")
    noisy = open_source(folder / "particles.star")
    clean = open_source(folder / "clean.mrcs")
    pair = folder / "particles_b.mrcs"
    return BenchData(
        spec,
        noisy.images(slice(None)),
        clean.images(slice(None)),
        merged_metadata(table),
        float(noisy.pixel_size),
        open_source(pair).images(slice(None)) if pair.is_file() else None,
    )


def image_scores(pred: np.ndarray, ref: np.ndarray, pixel_size: float) -> dict[str, float]:
    """PSNR, SI-PSNR, CC, SSIM (means over images) and pooled FRC-0.5 resolution vs clean."""
    pred = pred.astype(np.float64)
    ref = ref.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        vals = {
            "psnr": psnr(pred, ref),
            "si_psnr": scale_invariant_psnr(pred, ref),
            "cc": cc(pred, ref),
            "ssim": ssim(pred, ref),
        }
    out = {k: float(np.nanmean(v[np.isfinite(v)])) for k, v in vals.items()}
    acc = FrcAccumulator(pred.shape[-1])
    acc.add(pred, ref)
    freq, curve = acc.result()
    out["frc_resolution_A"] = frc_resolution(freq, curve, FRC_CLEAN, pixel_size)
    return out


def _task(data: BenchData, method: Method, rows: slice | np.ndarray = slice(None)) -> DenoiseTask:
    meta = data.metadata.iloc[rows]
    return DenoiseTask(
        noisy=data.noisy[rows],
        pixel_size=data.pixel_size,
        metadata=meta.reset_index(drop=True),
        clean=data.clean[rows] if (method.oracle or "clean" in method.needs) else None,
        noisy_b=data.noisy_b[rows] if data.noisy_b is not None else None,
        seed=data.spec.seed,
    )


def _usable(method: Method, data: BenchData) -> bool:
    if "ctf" in method.needs and not data.spec.ctf:
        return False
    return "pairs" not in method.needs or data.noisy_b is not None


def score_denoisers(
    data: BenchData, tune_images: int = 256, quick: bool = False, only: list[str] | None = None
) -> dict[str, dict]:
    """Every registered denoiser at its defaults, and tuned on the clean images ('<name>_best')."""
    results: dict[str, dict] = {}
    parts = data.is_particle
    for method in available("denoiser"):
        if not _usable(method, data) or (only is not None and method.name not in only):
            continue
        runs = [(method.name, dict(method.quick) if quick else {})]
        if method.tune:
            tune_rows = np.flatnonzero(parts)[:tune_images]
            best, best_psnr = {}, -np.inf
            for combo in product(*method.tune.values()):
                params = dict(zip(method.tune, combo, strict=True))
                fn = method.build(**params)
                out = fn(_task(data, method, tune_rows))
                with np.errstate(divide="ignore", invalid="ignore"):
                    vals = psnr(out.astype(np.float64), data.clean[tune_rows].astype(np.float64))
                value = float(np.nanmean(vals[np.isfinite(vals)]))
                if value > best_psnr:
                    best, best_psnr = params, value
            runs.append((f"{method.name}_best", best))
        for label, params in runs:
            fn = method.build(**params)
            t0 = time.time()
            out = fn(_task(data, method))
            seconds = time.time() - t0
            scores = image_scores(out[parts], data.clean[parts], data.pixel_size)
            resolved = getattr(fn, "params", None)
            scores.update(
                kind="denoiser",
                oracle=method.oracle or label.endswith("_best"),
                params=resolved if resolved is not None else {**method.defaults, **params},
                images_per_second=len(out) / max(seconds, 1e-9),
            )
            if label.endswith("_best"):
                scores["tuned_on"] = "PSNR against the clean images (oracle-tuned)"
            results[label] = scores
            log.info("  %-22s PSNR %6.2f  CC %.3f", label, scores["psnr"], scores["cc"])
    return results


def score_views_oracle(data: BenchData) -> dict[str, dict]:
    views = data.metadata["cryosiftTrueView"].to_numpy()
    labels, templates = nearest_clean_view(data.noisy, data.clean, views)
    keep = views >= 0
    scores: dict = dict(clustering_metrics(views[keep], labels[keep]))
    balance = class_size_balance(labels[keep])
    scores["min_max_class_ratio"] = balance["min_max_ratio"]
    ids = np.unique(views[keep])
    res = []
    for j, vid in enumerate(ids):
        members = keep & (labels == vid)
        if members.sum() < 2:
            continue
        avg = data.noisy[members].astype(np.float64).mean(0)
        acc = FrcAccumulator(avg.shape[-1])
        acc.add(avg[None], templates[j][None].astype(np.float64))
        freq, curve = acc.result()
        res.append(frc_resolution(freq, curve, FRC_CLEAN, data.pixel_size))
    scores["class_average_frc_resolution_A"] = float(np.mean(res)) if res else float("nan")
    scores.update(kind="clusterer", oracle=True, params={})
    return {"nearest_view_oracle": scores}


def score_screen_oracle(data: BenchData) -> dict[str, dict]:
    truth = data.is_particle
    score = matched_filter_scores(
        data.noisy, data.clean, truth, data.noise_var, seed=data.spec.seed
    )
    scores = screening_metrics(truth.astype(int), score, threshold=0.0)
    scores.update(kind="screener", oracle=True, params={})
    return {"matched_filter_oracle": scores}


def run_benchmarks(
    ids: list[str],
    out_dir: Path,
    quick: bool = False,
    device: str = "cpu",
    methods: list[str] | None = None,
) -> dict:
    """Run the named benchmarks; returns {bench: {setting: {method: scores}}}."""
    results: dict = {}
    for bid in ids:
        results[bid] = {}
        for key, spec in benchmark_settings(bid, quick).items():
            log.info("%s %s: simulating %d images", bid, key, spec.n_images)
            data = load_dataset(spec, out_dir / "data" / bid / _slug(key), device)
            entry: dict = {}
            if "denoise" in spec.tasks:
                entry.update(score_denoisers(data, 128 if quick else 256, quick, methods))
            if "views" in spec.tasks:
                entry.update(score_views_oracle(data))
                from cryosift.bench.clustering import score_clusterers

                entry.update(score_clusterers(data, quick, methods))
            if "classes" in spec.tasks:
                from cryosift.bench.clustering import score_classes_realistic

                entry.update(score_classes_realistic(data, quick, methods))
            if "screen" in spec.tasks:
                entry.update(score_screen_oracle(data))
                from cryosift.bench.screening import score_screeners

                train_dir = out_dir / "data" / bid / (_slug(key) + "_train")
                entry.update(score_screeners(data, train_dir, quick, methods, device))
            results[bid][key] = entry
    return results


def protocol_record(ids: list[str], quick: bool) -> dict:
    """The dataset specs actually run, for the results folder."""
    return {
        bid: {
            "title": BENCHMARKS[bid].title,
            "reproduces": BENCHMARKS[bid].reproduces,
            "settings": {k: asdict(v) for k, v in benchmark_settings(bid, quick).items()},
            **({"references": BENCHMARKS[bid].references} if BENCHMARKS[bid].references else {}),
        }
        for bid in ids
    }
