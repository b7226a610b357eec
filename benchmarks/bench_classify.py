"""Speed of `cryosift classify --method align2d` on this machine: images/s per iteration, peak RSS.

    python benchmarks/bench_classify.py                      # 5,000 and 20,000 images, K = 50
    python benchmarks/bench_classify.py --n 20000 --iterations 5 --threads 1

SpCas9 (5F9R), 64 px at 3.2 Å/px, K fixed views (default 50) with uniform in-plane rotations
and shifts up to 3 px, SNR 0.05, no CTF. Each run is a fresh `cryosift classify` process (so
peak RSS is its own) with `--threads` torch/OpenMP threads; per-iteration times come from the
run's provenance (classify.json). The machine may be shared: the load average (1 min) is
recorded before and after every run. Writes benchmarks/results/classify_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from _runner import run_cli

ROOT = Path(__file__).resolve().parents[1]
STRUCTURE = ROOT.parent / "shared" / "data" / "structures" / "5F9R.pdb"
RESULTS = ROOT / "benchmarks" / "results"


def simulate(folder: Path, n: int, views: int) -> Path:
    run_cli(
        "simulate", str(STRUCTURE), "-o", str(folder), "--n-images", str(n), "--box", "64",
        "--pixel-size", "3.2", "--snr", "0.05", "--views", str(views), "--in-plane",
        "--max-shift", "3", "--no-ctf", "--seed", "1", "--device", "cpu",
    )
    return folder / "particles.star"


def run(star: Path, out: Path, k: int, iterations: int, psi_step: float) -> dict:
    from cryosift.io import read_star
    from cryosift.metrics import clustering_metrics

    load_start = os.getloadavg()
    wall, rss = run_cli(
        "classify", str(star), "-k", str(k), "--method", "align2d", "--iterations",
        str(iterations), "--psi-step", str(psi_step), "--device", "cpu", "-o", str(out),
    )
    load_end = os.getloadavg()
    prov = json.loads((out / "classify.json").read_text())
    truth = read_star(star).particles["cryosiftTrueView"].to_numpy()
    labels = read_star(out / "classes.star").particles["rlnClassNumber"].to_numpy()
    scores = clustering_metrics(truth, labels)
    p = prov["parameters"]
    return {
        "n_images": len(labels),
        "k": k,
        "psi_step": p["psi_step"],
        "align_box": p["align_box"],
        "candidates": p.get("candidates"),
        "assignment": p.get("assignment"),
        "chunk_images": p["chunk_images"],
        "iterations": prov["history"],
        "classify_seconds": p["seconds"],
        "images_per_second_total": p["images_per_second_total"],
        "wall_seconds_process": wall,
        "peak_rss_mb": rss,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in load_end],
        "acc": scores["acc"],
        "nmi": scores["nmi"],
    }


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# align2d speed (`cryosift classify --method align2d`)",
        "",
        f"Command: `python benchmarks/bench_classify.py {meta['argv']}`; {meta['machine']}, "
        f"{meta['threads']} torch/OpenMP thread(s) per run, {meta['time']}.",
        f"SpCas9, 64 px, {meta['k']} fixed views, uniform in-plane rotations, shifts <= 3 px, "
        "SNR 0.05, no CTF; search on images Fourier-cropped to 32 px, rotations every 10°.",
        "The machine is shared with other jobs: load average (1/5/15 min) at the start and end "
        "of each run in the last columns.",
        "",
        "| N | K | searched classes | assignment | iterations | s/iteration (classify, mean) | "
        "images/s per iteration | total s | N / total s | peak RSS MB | ACC | NMI | "
        "load start | load end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cls = [h for h in r["iterations"] if h["phase"] == "classify"]
        sec = sum(h["seconds"] for h in cls) / max(len(cls), 1)
        lines.append(
            f"| {r['n_images']} | {r['k']} | {r['candidates']} | {r['assignment']} | "
            f"{len(r['iterations'])} ({len(cls)} classify) | {sec:.1f} | "
            f"{r['n_images'] / sec:.0f} | {r['classify_seconds']:.0f} | "
            f"{r['images_per_second_total']:.0f} | {r['peak_rss_mb']:.0f} | {r['acc']:.3f} | "
            f"{r['nmi']:.3f} | {' / '.join(f'{x:.1f}' for x in r['load_average_start'])} | "
            f"{' / '.join(f'{x:.1f}' for x in r['load_average_end'])} |"
        )
    lines += ["", "Per iteration (seconds, fraction of images changing class):", ""]
    for r in rows:
        its = ", ".join(
            f"{h['iteration']}{'i' if h['phase'] == 'init' else ''}: {h['seconds']:.1f} s "
            f"({h['changed_fraction']:.3f})"
            for h in r["iterations"]
        )
        lines.append(f"- N = {r['n_images']}: {its}")
    lines += [
        "",
        "(i = initial passes that align each image to its own class only; the total includes "
        "reading, the rotation-invariant features and k-means++ of the initial classes, and the "
        "full-size averages.)",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[5000, 20000])
    ap.add_argument("-k", type=int, default=50)
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument("--psi-step", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch/OpenMP threads of each classify process")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the classify processes
    meta = {
        "argv": f"--n {' '.join(map(str, args.n))} -k {args.k} --iterations {args.iterations} "
                f"--threads {args.threads}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "threads": args.threads,
        "k": args.k,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="cryosift-bench-classify-") as tmp:
        for n in args.n:
            star = simulate(Path(tmp) / f"sim{n}", n, args.k)
            rows.append(run(star, Path(tmp) / f"cls{n}", args.k, args.iterations, args.psi_step))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "iterations"}),
                  flush=True)
            # results after every size, so a long run that is stopped keeps the finished ones
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "classify_speed.json").write_text(
                json.dumps({"meta": meta, "runs": rows}, indent=1))
            (args.out / "classify_speed.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
