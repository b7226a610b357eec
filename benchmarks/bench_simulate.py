"""Speed and memory of `cryosift simulate` on GroEL (PDB 1AON, ~58,000 atoms).

Runs the real CLI in a fresh process per size (so peak RSS is that run's own), 128-px images at
1.5 Å/px, uniform random orientations, CTF and Gaussian noise, and writes
benchmarks/results/simulate.json (+ .md). Throughput is reported over the whole command and over
the imaging passes only (total minus the one-off volume and projector set-up, read from the log).

    python benchmarks/bench_simulate.py                 # N = 2,000 and 10,000
    python benchmarks/bench_simulate.py --sizes 10000   # just one size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

from _runner import run_cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "data" / "structures" / "1aon.pdb.gz"
if not MODEL.exists():
    MODEL = ROOT / "src" / "cryosift" / "data" / "1aon.pdb.gz"


def run_once(n: int, out: Path) -> dict:
    wall, rss = run_cli(
        "simulate",
        str(MODEL),
        "-o",
        str(out),
        "--n-images",
        str(n),
        "--box",
        "128",
        "--pixel-size",
        "1.5",
        "--snr",
        "0.05",
        "--device",
        "cpu",
        "--seed",
        "1",
    )
    record = json.loads((out / "simulation.json").read_text())
    setup = record.get("setup_seconds", 0.0)
    return {
        "n_images": n,
        "wall_seconds": round(wall, 2),
        "setup_seconds": round(setup, 2),
        "images_per_second_total": round(n / wall, 1),
        "images_per_second_imaging": round(n / max(record["seconds"] - setup, 1e-9), 1),
        "peak_rss_mb": round(rss, 1),
        "measured_snr": record["measured_snr"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument(
        "-o", "--out", type=Path, default=ROOT / "benchmarks" / "results" / "simulate.json"
    )
    args = ap.parse_args()
    rows = []
    for n in sorted(args.sizes):
        with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks" / "results") as tmp:
            rows.append(run_once(n, Path(tmp) / "sim"))
            print(json.dumps(rows[-1]))
    result = {
        "benchmark": "cryosift simulate, GroEL 1AON, 128 px, 1.5 Å/px, random orientations, "
        "CTF, noise",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "target": ">= 500 images/s, peak RSS independent of N",
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| N | wall s | set-up s | img/s (total) | img/s (imaging) | peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['n_images']} | {r['wall_seconds']} | {r['setup_seconds']} | "
        f"{r['images_per_second_total']} | {r['images_per_second_imaging']} | {r['peak_rss_mb']} |"
        for r in rows
    ]
    args.out.with_suffix(".md").write_text("\n".join([result["benchmark"], ""] + lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
