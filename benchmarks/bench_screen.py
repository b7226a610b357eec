"""Throughput and memory of `cryosift screen apply` at 128 px (RBM, CNN; with/without the chain).

A synthetic 128 px stack (1.5 Å/px) is generated once: half "particles" (an elongated Gaussian
blob at a random angle and offset, plus low-passed texture) and half pure noise, with a
`_cryosiftIsParticle` column. Small RBM and CNN models are trained on 600 of its images through
`cryosift screen train` (accuracy is not the point here), then `cryosift screen apply` scores the
whole stack in a fresh process. Reported per model: images/s over the scoring call itself
(read -> Fourier-crop to the working box (64 px by default, 32 px with --work-box 32) ->
[bilateral + histeq] -> network, from screen_apply.json), images/s with the STAR files and
figures written, images/s over the whole command (interpreter start and model loading
included), peak RSS, and the load average around the run. Peak RSS at N and at N/5 shows that
memory does not grow with the dataset. In-process, per CPU-second (much less dependent on the
machine's load): the scoring pass over the whole stack, and preprocessing and the network
separately.
Writes benchmarks/results/screen.json and .md.

    python benchmarks/bench_screen.py                 # N = 10,000, 1 torch thread
    python benchmarks/bench_screen.py --threads 2 -o benchmarks/results/screen_2threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runner import run_cli  # noqa: E402

BOX, PX = 128, 1.5
TARGETS = {"rbm": 2000, "cnn": 500}


def make_dataset(folder: Path, n: int, seed: int = 0) -> Path:
    """Half blobs + texture + noise, half noise; STAR with a label column."""
    from cryosift.io import MrcsWriter, image_names, make_optics_table, write_star

    rng = np.random.default_rng(seed)
    ky = np.fft.fftfreq(BOX)[:, None]
    kx = np.fft.rfftfreq(BOX)[None, :]
    envelope = np.exp(-(kx**2 + ky**2) / (2 * 0.03**2))
    yy, xx = np.mgrid[:BOX, :BOX] - BOX / 2
    labels = (rng.random(n) < 0.5).astype(int)
    chunk = 500
    with MrcsWriter(folder / "particles.mrcs", n, BOX, PX) as writer:
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            lab = labels[start : start + k][:, None, None]
            smooth = np.fft.irfft2(
                np.fft.rfft2(rng.normal(size=(k, BOX, BOX))) * envelope, s=(BOX, BOX)
            )
            cx, cy = rng.normal(scale=5, size=(2, k, 1, 1))
            ang = rng.uniform(0, np.pi, (k, 1, 1))
            u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)
            v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
            blob = np.exp(-(u**2) / (2 * 18.0**2) - v**2 / (2 * 9.0**2))
            imgs = lab * (0.6 * blob + 0.05 * smooth) + rng.normal(scale=1.0, size=(k, BOX, BOX))
            writer.append(imgs.astype(np.float32))
    parts = pd.DataFrame(
        {"rlnImageName": image_names(n, "particles.mrcs"), "cryosiftIsParticle": labels}
    )
    star = folder / "particles.star"
    write_star(star, parts, make_optics_table(PX, BOX))
    small = folder / "first_fifth.star"
    write_star(small, parts.iloc[: max(1, n // 5)], make_optics_table(PX, BOX))
    train = folder / "train.star"
    write_star(train, parts.iloc[:600], make_optics_table(PX, BOX))
    return star


def breakdown(model_dir: Path, star: Path, n: int = 2048) -> dict:
    """Per CPU-second rates (in this process): preprocessing and the network alone on n images,
    and the whole scoring pass of `screen apply` (read in chunks of 1,024, crop, chain,
    network) over the full stack — what one core does when it is not shared."""
    from cryosift.io import open_source
    from cryosift.screen.apply import score_source
    from cryosift.screen.model_io import load_screener

    s = load_screener(model_dir)
    src = open_source(star)
    imgs = src.images(slice(0, n))
    s.predict_proba(imgs[:64])  # warm-up
    c0 = time.process_time()
    x = s.prepare(imgs)
    c1 = time.process_time()
    s.logits_prepared(x)
    c2 = time.process_time()
    score_source(s, src, 1024)
    c3 = time.process_time()
    return {
        "preprocess_images_per_cpu_s": round(n / max(c1 - c0, 1e-9), 1),
        "network_images_per_cpu_s": round(n / max(c2 - c1, 1e-9), 1),
        "scoring_images_per_cpu_s": round(len(src) / max(c3 - c2, 1e-9), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS)")
    ap.add_argument(
        "-o", "--out", type=Path, default=ROOT / "benchmarks" / "results" / "screen.json"
    )
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("CRYOSIFT_NO_PROGRESS", "1")
    import torch

    torch.set_num_threads(args.threads)
    rbm = ["--hidden", "256", "--epochs", "3"]
    cases = [
        ("rbm", "rbm", rbm),  # the chain at the default 64 px working box
        ("rbm --work-box 32", "rbm", [*rbm, "--work-box", "32"]),  # σ_s scales to 1 px
        ("rbm --no-preprocess", "rbm", [*rbm, "--no-preprocess"]),
        ("cnn", "cnn", ["--epochs", "2"]),  # default: no chain
        ("cnn --preprocess", "cnn", ["--epochs", "2", "--preprocess"]),
    ]
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks" / "results") as tmp:
        folder = Path(tmp)
        star = make_dataset(folder, args.n)
        for label, method, extra in cases:
            model = folder / f"model_{len(rows)}"
            run_cli("-q", "screen", "train", "--labels", str(folder / "train.star"),
                    "--method", method, *extra, "-o", str(model), "--device", "cpu")
            prep = json.loads((model / "model.json").read_text())["preprocess"]
            row: dict = {"model": label, "method": method, "target_img_s": TARGETS[method],
                         "work_box": prep["work_box"], "chain": prep["chain"]}
            for key, inp in (("small", folder / "first_fifth.star"), ("full", star)):
                out = folder / f"out_{len(rows)}_{key}"
                load0 = os.getloadavg()[0]
                wall, rss = run_cli("-q", "screen", "apply", str(inp), "--model", str(model),
                                    "-o", str(out), "--device", "cpu")
                rec = json.loads((out / "screen_apply.json").read_text())
                n = rec["n_images"]
                row[f"{key}_n"] = n
                row[f"{key}_peak_rss_mb"] = round(rss, 1)
                if key == "full":
                    row.update(
                        images_per_s=round(rec["scoring_images_per_second"], 1),
                        images_per_s_with_outputs=round(n / rec["seconds"], 1),
                        images_per_s_whole_command=round(n / wall, 1),
                        wall_s=round(wall, 2),
                        load_before=round(load0, 2),
                        load_after=round(os.getloadavg()[0], 2),
                        meets_target=rec["scoring_images_per_second"] >= TARGETS[method],
                    )
            row.update(breakdown(model, star))
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "benchmark": f"cryosift screen apply on {args.n} x {BOX} px images ({PX} Å/px), "
        f"{args.threads} torch thread(s), CPU",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "note": "images/s: scoring (read in chunks, crop, preprocess, network) from "
        "screen_apply.json; 'with outputs' adds writing the three STAR files, the histogram and "
        "the montage; 'whole command' adds interpreter start and model loading. Wall-clock "
        "rates on a shared machine depend on its load (1-minute "
        "load average before/after shown); per-CPU-second rates (in-process: the scoring pass "
        "of screen apply, and its two stages on 2,048 images) much less so.",
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    lines = [
        "| model | working box | images/s | target | with outputs | whole command | "
        "peak RSS MB (N/5 → N) | scoring images/CPU-s | preprocess images/CPU-s | "
        "network images/CPU-s | load before/after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = "✓" if r["meets_target"] else "✗"
        lines.append(
            f"| {r['model']} | {r['work_box']} px | {r['images_per_s']:.0f} | "
            f"≥ {r['target_img_s']} {ok} | "
            f"{r['images_per_s_with_outputs']:.0f} | {r['images_per_s_whole_command']:.0f} | "
            f"{r['small_peak_rss_mb']:.0f} → "
            f"{r['full_peak_rss_mb']:.0f} | {r['scoring_images_per_cpu_s']:.0f} | "
            f"{r['preprocess_images_per_cpu_s']:.0f} | "
            f"{r['network_images_per_cpu_s']:.0f} | {r['load_before']} / {r['load_after']} |"
        )
    text = "\n".join([result["benchmark"], "", *lines, "", result["note"]]) + "\n"
    args.out.with_suffix(".md").write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
