"""Speed of the learned denoisers on this machine: apply throughput and peak RSS, training speed.

    python benchmarks/bench_denoise.py            # writes benchmarks/results/denoise.json (+ .md)

Apply: the U-Net at several widths/depths on 64 px and 128 px images streamed through
`cryosift denoise apply` (a fresh process per run, so peak RSS is that run's own), N = 2,000 and
10,000 images of 64 px to show RSS does not grow with the stack, and the general model with
`--tta` (8 passes per image). These rows run with `--no-sure`: the network alone, as Topaz's
U-Net is measured. The rows marked "sure" run `denoise apply`'s default, which first fits the
SURE output stage on up to 1,000 images (two more passes of each, a fixed cost per stack).
Training: N2N on 10,000 pairs of 64 px images (SpCas9, SNR 0.1), validation PSNR against the
clean images after every epoch, to see how long it takes to get within 0.1 dB of the final value.
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
import torch
from _runner import run_cli

ROOT = Path(__file__).resolve().parents[1]
STRUCTURE = ROOT.parent / "shared" / "data" / "structures" / "5F9R.pdb"


def simulate(folder: Path, n: int, box: int, pixel: float, pairs: bool = False) -> Path:
    args = [
        "simulate",
        str(STRUCTURE),
        "-o",
        str(folder),
        "--n-images",
        str(n),
        "--box",
        str(box),
        "--pixel-size",
        str(pixel),
        "--snr",
        "0.1",
        "--no-ctf",
        "--device",
        "cpu",
    ]
    run_cli(*(args + (["--pairs"] if pairs else [])))
    return folder / "particles.star"


def apply_runs(tmp: Path) -> list[dict]:
    from cryosift.denoise.model_io import save_model
    from cryosift.denoise.networks import UNet, UNetConfig

    rows = []
    stacks = {(64, n): simulate(tmp / f"s64_{n}", n, 64, 3.0) for n in (2000, 10000)}
    stacks[(128, 2000)] = simulate(tmp / "s128", 2000, 128, 1.5)
    torch.manual_seed(0)
    wide = tmp / "unet_4_16.pt"  # the CLI's default width, for the trade-off
    save_model(wide, UNet(UNetConfig(4, 16)),
               {"architecture": {"depth": 4, "width": 16}, "method": "n2n"})
    nets = (("general", 4, 8), (str(wide), 4, 16))
    runs = [(m, d, w, box, n, False, False) for m, d, w in nets for box, n in stacks]
    runs += [("general", 4, 8, box, 2000, True, False) for box in (64, 128)]  # --tta: 8 passes
    runs += [("general", 4, 8, box, n, False, True) for box, n in stacks]  # the default stage
    for model, depth, width, box, n, tta, sure in runs:
        star = stacks[(box, n)]
        wall, rss = run_cli(
            "denoise", "apply", str(star), "--model", model,
            "-o", str(tmp / f"out_{depth}_{width}_{box}_{n}_{int(tta)}_{int(sure)}.star"),
            "--device", "cpu", *(["--tta"] if tta else []), *([] if sure else ["--no-sure"]),
        )
        rows.append(
            {
                "model": "general" if model == "general" else "untrained",
                "depth": depth,
                "width": width,
                "tta": tta,
                "sure": sure,
                "box": box,
                "n_images": n,
                "wall_seconds": round(wall, 2),
                "images_per_second": round(n / wall, 1),
                "peak_rss_mb": round(rss, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def training_run(tmp: Path, width: int, depth: int, epochs: int) -> dict:
    from cryosift.denoise.apply import denoise_array
    from cryosift.denoise.model_io import load_model
    from cryosift.denoise.training import TrainConfig, train_denoiser
    from cryosift.io import open_source
    from cryosift.metrics import psnr

    star = simulate(tmp / "train", 10000, 64, 3.0, pairs=True)
    a = open_source(star).images(slice(None))
    b = open_source(tmp / "train" / "particles_b.mrcs").images(slice(None))
    clean = open_source(tmp / "train" / "clean.mrcs").images(slice(None))
    val = np.arange(0, 10000, 20)  # 500 images to score (a subset of the training set's pairs)
    curve = []
    cfg = TrainConfig(method="n2n", epochs=1, width=width, depth=depth, crop=64, patience=99)
    t0 = time.time()
    for epoch in range(epochs):
        cfg.epochs = epoch + 1
        train_denoiser(a, tmp / "model", cfg, images_b=b, resume=epoch > 0)
        model, _ = load_model(tmp / "model")
        score = float(np.mean(psnr(denoise_array(model, a[val]), clean[val])))
        curve.append({"epoch": epoch + 1, "seconds": round(time.time() - t0, 1), "psnr": score})
        print(json.dumps(curve[-1]), flush=True)
    final = curve[-1]["psnr"]
    within = next(c for c in curve if c["psnr"] >= final - 0.1)
    return {
        "width": width,
        "depth": depth,
        "curve": curve,
        "final_psnr": final,
        "seconds_to_within_0.1dB": within["seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument(
        "-o", "--out", type=Path, default=ROOT / "benchmarks" / "results" / "denoise.json"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        apply_rows = apply_runs(Path(tmp))
        training = None if args.skip_training else training_run(Path(tmp), 8, 4, args.epochs)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_at_end": os.getloadavg(),
        },
        "apply": apply_rows,
        "training_n2n_10k_pairs_64px": training,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"Load average at the end: {result['machine']['load_average_at_end']}",
        "",
        "| model | depth | width | tta | sure | box | N | img/s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['depth']} | {r['width']} | {'yes' if r['tta'] else 'no'} | "
        f"{'yes' if r.get('sure') else 'no'} | {r['box']} | {r['n_images']} | "
        f"{r['images_per_second']} | {r['peak_rss_mb']} |"
        for r in apply_rows
    ]
    if training:
        lines += [
            "",
            f"N2N training on 10,000 pairs of 64 px (width {training['width']}, depth "
            f"{training['depth']}): final PSNR {training['final_psnr']:.2f} dB, within 0.1 dB "
            f"after {training['seconds_to_within_0.1dB']} s",
        ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
