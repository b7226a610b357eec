"""Throughput of the classic filters through `apply_filter_to_source` (read -> filter -> write).

A synthetic 10,000 x 128 px stack (smooth random images: Gaussian blobs + low-passed noise +
white noise, 1.5 Å/px) with a RELION 3.1 STAR carrying CTF columns is generated once; each filter
then streams the whole stack from disk to a new stack + STAR, as `cryosift filter` does. Reported:
images/s over the whole call (wall clock), the process CPU seconds (on a shared machine CPU time /
wall time shows how much of the 2 cores the run actually got), and the load average around it.
Writes benchmarks/results/filters.json and .md.

    python benchmarks/bench_filters.py                  # all filters, N = 10,000
    python benchmarks/bench_filters.py --n 2000 --only bilateral histeq
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryosift.filters import apply_filter_to_source, make_filter
from cryosift.io import MrcsWriter, image_names, make_optics_table, write_star

ROOT = Path(__file__).resolve().parents[1]
BOX, PX = 128, 1.5

#: (label, registry name, parameters, target images/s or None)
CASES = [
    ("lowpass gaussian 8 Å", "lowpass", {"cutoff_A": 8.0, "kind": "gaussian"}, 2000),
    ("lowpass butterworth 8 Å", "lowpass", {"cutoff_A": 8.0, "kind": "butterworth"}, 2000),
    ("gaussian σ=2 px", "gaussian", {"sigma_px": 2.0}, 2000),
    ("median 3", "median", {"size_px": 3}, None),
    ("bilateral σs=2 px (13 px window)", "bilateral", {}, 200),
    ("histeq", "histeq", {}, None),
    ("clahe", "clahe", {}, None),
    ("normalize (RELION, ramp)", "normalize", {}, 2000),
    ("phaseflip", "phaseflip", {}, None),
    ("wiener snr=0.1", "wiener", {"snr": 0.1}, None),
]


def make_dataset(folder: Path, n: int, seed: int = 0) -> Path:
    """Smooth random particle-like images + noise, and a STAR with CTF columns."""
    rng = np.random.default_rng(seed)
    ky = np.fft.fftfreq(BOX)[:, None]
    kx = np.fft.rfftfreq(BOX)[None, :]
    envelope = np.exp(-(kx**2 + ky**2) / (2 * 0.03**2))
    yy, xx = np.mgrid[:BOX, :BOX] - BOX / 2
    chunk = 500
    with MrcsWriter(folder / "particles.mrcs", n, BOX, PX) as writer:
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            smooth = np.fft.irfft2(
                np.fft.rfft2(rng.normal(size=(k, BOX, BOX))) * envelope, s=(BOX, BOX)
            )
            cx, cy = rng.normal(scale=5, size=(2, k, 1, 1))
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 15.0**2))
            imgs = 5 * smooth + blob + rng.normal(scale=1.0, size=(k, BOX, BOX))
            writer.append(imgs.astype(np.float32))
    df = rng.uniform(8000, 30000, n)
    parts = pd.DataFrame(
        {
            "rlnImageName": image_names(n, "particles.mrcs"),
            "rlnDefocusU": df + 100,
            "rlnDefocusV": df - 100,
            "rlnDefocusAngle": rng.uniform(0, 180, n),
            "rlnPhaseShift": 0.0,
            "rlnCtfBfactor": 0.0,
            "rlnOpticsGroup": 1,
        }
    )
    star = folder / "particles.star"
    write_star(star, parts, make_optics_table(PX, BOX))
    return star


def run_case(star: Path, out: Path, name: str, params: dict, chunk_size: int) -> dict:
    filt = make_filter(name, **params)
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    apply_filter_to_source(star, filt, out, chunk_size=chunk_size)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    for p in (out, out.with_suffix(".mrcs"), out.with_name(out.stem + "_filter.json")):
        p.unlink(missing_ok=True)
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "load_before": round(load0, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--only", nargs="*", default=None, help="registry names to run")
    ap.add_argument(
        "-o", "--out", type=Path, default=ROOT / "benchmarks" / "results" / "filters.json"
    )
    args = ap.parse_args()
    os.environ.setdefault("CRYOSIFT_NO_PROGRESS", "1")
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks" / "results") as tmp:
        t0 = time.perf_counter()
        star = make_dataset(Path(tmp), args.n)
        gen_s = time.perf_counter() - t0
        print(f"dataset: {args.n} x {BOX} px in {gen_s:.1f} s")
        # warm up (imports, FFT plans, caches) on the copy route, outside the timings
        apply_filter_to_source(
            star, make_filter("invert"), Path(tmp) / "warm.star", chunk_size=args.chunk_size
        )
        base = run_case(star, Path(tmp) / "copy.star", "invert", {}, args.chunk_size)
        rows.append(
            {
                "filter": "invert (I/O baseline: read + x -> -x + write)",
                "name": "invert",
                "params": {},
                "target_img_s": None,
                **base,
                "images_per_s": round(args.n / base["wall_s"], 1),
                "images_per_cpu_s": round(args.n / max(base["cpu_s"], 1e-9), 1),
            }
        )
        print(json.dumps(rows[-1], ensure_ascii=False))
        for label, name, params, target in CASES:
            if args.only and name not in args.only:
                continue
            res = run_case(star, Path(tmp) / "out.star", name, params, args.chunk_size)
            rate = args.n / res["wall_s"]
            rows.append(
                {
                    "filter": label,
                    "name": name,
                    "params": params,
                    "target_img_s": target,
                    **res,
                    "images_per_s": round(rate, 1),
                    "images_per_cpu_s": round(args.n / max(res["cpu_s"], 1e-9), 1),
                    "meets_target": None if target is None else rate >= target,
                }
            )
            print(json.dumps(rows[-1], ensure_ascii=False))
    result = {
        "benchmark": f"apply_filter_to_source on {args.n} x {BOX} px float32 images "
        f"({PX} Å/px), chunk size {args.chunk_size}, STAR + MRC in and out",
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "note": "wall-clock rates on a shared 2-core machine: the 1-minute load average before "
        "and after each run shows the competition from other jobs; images per CPU-second is the "
        "rate per fully available core, nearly independent of that load",
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    lines = [
        "| filter | images/s | target | wall s | CPU s | images per CPU-s | load before/after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = (
            ""
            if r["target_img_s"] is None
            else (f"≥ {r['target_img_s']} {'✓' if r['meets_target'] else '✗'}")
        )
        lines.append(
            f"| {r['filter']} | {r['images_per_s']:.0f} | {target} | {r['wall_s']} | "
            f"{r['cpu_s']} | {r['images_per_cpu_s']:.0f} | "
            f"{r['load_before']} / {r['load_after']} |"
        )
    text = "\n".join([result["benchmark"], "", *lines, "", result["note"]]) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
