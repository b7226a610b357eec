"""Scaling on Dask: peak memory and throughput of the per-image stages with 1 and 2 workers.

    python benchmarks/bench_scale.py            # N = 10,000 and 50,000 (about an hour on 2 cores)
    python benchmarks/bench_scale.py --quick    # N = 2,000 and 5,000, to check it works

A 128 px stack of N images (1.5 Å/px; 50,000 images = 3.3 GB) is streamed through three stages,
each run as `cryosift ... --scheduler local --workers W` (W single-threaded worker processes) in
a fresh process:

* filter: `cryosift filter --bilateral --normalize` (bilateral: the CPU-heavy one);
* denoise apply: the shipped `general` U-Net;
* screen apply: an RBM screener (seed 000's preprocessing: Fourier crop to 64 px, bilateral,
  histogram equalisation) trained here on 512 simulated images, loaded from its folder.

While a command runs, the RSS of its whole process tree (client and scheduler, worker processes)
is polled every 0.2 s; the table gives the peak of the sum (conservative: pages shared between
processes, such as torch's libraries, count once per process) and the largest single process.
Throughput is N / wall time of the command, cluster start-up and model loading included. The
stack is simulated cheaply: 512 noisy SpCas9 projections (half pure-noise junk) from
`cryosift.simulate`, tiled with fresh Gaussian noise, written chunk by chunk (the generator's
memory is bounded too). Big files are deleted at the end (--keep keeps them).

Results: benchmarks/results/scale.json and scale.md (scale_quick.* with --quick), with the load
average of the machine before and after every run: the 2-worker speed-up needs two idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
STRUCTURE = ROOT.parent / "shared" / "data" / "structures" / "5F9R.pdb"
RESULTS = ROOT / "benchmarks" / "results"
BOX, PX = 128, 1.5
STAGES = ("filter", "denoise", "screen")


def _cli(*args: str) -> None:
    """Run a set-up command of the CLI in-process-like (a subprocess, no monitoring)."""
    env = {**os.environ, "CRYOSIFT_NO_PROGRESS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cryosift.cli.main", "-q", *args], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"cryosift {' '.join(args)} failed:\n{proc.stderr}")


def make_templates(tmp: Path) -> Path:
    """512 noisy projections (half junk) with labels; returns their STAR file."""
    out = tmp / "templates"
    if not (out / "particles.star").exists():
        _cli("simulate", str(STRUCTURE), "-o", str(out), "--n-images", "512", "--box", str(BOX),
             "--pixel-size", str(PX), "--snr", "0.1", "--no-ctf", "--junk-fraction", "0.5",
             "--junk-types", "noise", "--device", "cpu", "--seed", "0")
    return out / "particles.star"


def train_screener(templates: Path, tmp: Path) -> Path:
    model = tmp / "screener"
    if not (model / "model.pt").exists():
        _cli("screen", "train", "--labels", str(templates), "--method", "rbm", "--epochs", "10",
             "--hidden", "64", "--device", "cpu", "-o", str(model))
    return model


def make_stack(templates: Path, path: Path, n: int, chunk: int = 1024) -> Path:
    """N images: the templates in turn plus fresh noise (σ = 0.5 of the templates'), written
    chunk by chunk."""
    from cryosift.io import MrcsWriter, open_source

    if path.exists():
        return path
    base = open_source(templates).images(slice(None))
    sigma = 0.5 * float(base.std())
    rng = np.random.default_rng(1)
    with MrcsWriter(path, n, BOX, PX) as writer:
        for start in range(0, n, chunk):
            idx = np.arange(start, min(start + chunk, n)) % len(base)
            noise = rng.standard_normal((len(idx), BOX, BOX), dtype=np.float32)
            writer.append(base[idx] + sigma * noise)
    return path


def monitored(argv: list[str], poll: float = 0.2) -> dict:
    """Run argv; wall time, peak RSS (sum over the process tree, largest single process)."""
    env = {**os.environ, "CRYOSIFT_NO_PROGRESS": "1"}
    load0 = os.getloadavg()
    t0 = time.time()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    root = psutil.Process(proc.pid)
    peak_sum = peak_one = 0
    most = 0
    cpu: dict[int, float] = {}  # last CPU seconds seen per process of the tree
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        rss = []
        for p in procs:
            try:
                rss.append(p.memory_info().rss)
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        if rss:
            peak_sum = max(peak_sum, sum(rss))
            peak_one = max(peak_one, max(rss))
            most = max(most, len(rss))
        time.sleep(poll)
    out, err = proc.communicate()
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{err}")
    return {
        "wall_seconds": round(wall, 2),
        "peak_rss_tree_mb": round(peak_sum / 2**20, 1),
        "peak_rss_largest_process_mb": round(peak_one / 2**20, 1),
        "processes": most,
        "cpu_seconds": round(sum(cpu.values()), 1),
        "load_before": [round(x, 2) for x in load0],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }


def stage_argv(stage: str, stack: Path, out: Path, model: Path, workers: int) -> list[str]:
    base = [sys.executable, "-m", "cryosift.cli.main", "-q"]
    engine = ["--scheduler", "local", "--workers", str(workers)]
    if stage == "filter":
        return [*base, "filter", str(stack), "-o", str(out / "filtered.star"), "--bilateral",
                "--normalize", *engine]
    if stage == "denoise":
        return [*base, "denoise", "apply", str(stack), "--model", "general", "-o",
                str(out / "denoised.star"), "--device", "cpu", *engine]
    if stage == "screen":
        return [*base, "screen", "apply", str(stack), "--model", str(model), "-o",
                str(out / "screened"), "--device", "cpu", *engine]
    raise ValueError(stage)


def _best(rows: list[dict], field: str, pick) -> dict:
    """(stage, N, workers) -> pick (max or min) of `field` over the runs of that configuration."""
    out: dict = {}
    for r in rows:
        key = (r["stage"], r["n_images"], r["workers"])
        out[key] = r[field] if key not in out else pick(out[key], r[field])
    return out


def markdown(res: dict) -> str:
    rows = res["runs"]
    lines = [
        "# Scaling on Dask: bounded memory and throughput (`benchmarks/bench_scale.py`)",
        "",
        f"Machine: {res['machine']['cpus']} cores, {res['machine']['memory_gb']} GB RAM, "
        f"{res['machine']['platform']}; torch {res['machine']['torch']}, dask "
        f"{res['machine']['dask']}. Load average at start {res['load_start']}, at end "
        f"{res['load_end']}. Stack: {BOX} px float32 images at {PX} Å/px "
        f"({BOX * BOX * 4 / 1e3:.1f} kB each; 50,000 images = 3.3 GB). Each run: "
        "`--scheduler local --workers W`, one thread per worker, a fresh process.",
        "",
        "Peak RSS: the largest sum over the process tree (client + scheduler, worker "
        "processes), polled every 0.2 s; shared pages (torch's libraries) count once per "
        "process, so the true footprint is lower. Throughput: N / wall time, cluster start-up "
        "and model loading included.",
        "",
        "CPU: user + system seconds of the whole tree (sampled every 0.2 s, so the last "
        "fraction of a second of each process is missed); images per CPU-second equal for 1 "
        "and 2 workers means the work divides without overhead, so the wall-clock speed-up "
        "is bounded only by the idle cores (see the load average: other jobs shared this "
        "machine).",
        "",
        "| stage | N | workers | wall (s) | images/s | speed-up vs best 1-worker run | CPU (s) | "
        "images / CPU-s | peak RSS, tree (MB) | peak RSS, largest process (MB) | "
        "load before → after (1 min) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    ips = _best(rows, "images_per_second", max)  # the best run of each configuration
    for r in rows:
        one = ips.get((r["stage"], r["n_images"], 1))
        speed = f"{r['images_per_second'] / one:.2f}×" if one and r["workers"] != 1 else ""
        lines.append(
            f"| {r['stage']} | {r['n_images']:,} | {r['workers']} | {r['wall_seconds']:.1f} | "
            f"{r['images_per_second']:.1f} | {speed} | {r.get('cpu_seconds', float('nan')):.0f}"
            f" | {r.get('images_per_cpu_second', float('nan')):.1f} | "
            f"{r['peak_rss_tree_mb']:.0f} | "
            f"{r['peak_rss_largest_process_mb']:.0f} | {r['load_before'][0]:.2f} → "
            f"{r['load_after'][0]:.2f} |"
        )
    lines += ["", "RSS against N (same stage and workers):", ""]
    sizes = sorted({r["n_images"] for r in rows})
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        rss = _best(rows, "peak_rss_tree_mb", max)  # the largest peak of each configuration
        for (stage, n, w), v in sorted(rss.items()):
            if n == lo and (stage, hi, w) in rss:
                lines.append(f"- {stage}, {w} worker(s): {v:.0f} MB at N = {lo:,}, "
                             f"{rss[(stage, hi, w)]:.0f} MB at N = {hi:,}")
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        wall = _best(rows, "wall_seconds", min)  # the fastest run of each configuration
        marginal = {
            (stage, w): (hi - lo) / (wall[(stage, hi, w)] - v)
            for (stage, n, w), v in wall.items()
            if n == lo and (stage, hi, w) in wall and wall[(stage, hi, w)] > v
        }
        if marginal:
            lines += ["", f"Marginal throughput between N = {lo:,} and N = {hi:,}: "
                      f"({hi:,} - {lo:,}) / (wall at {hi:,} - wall at {lo:,}), i.e. without the "
                      "fixed costs (cluster start-up, model loading, the last chunk's tail):", ""]
            for (stage, w), v in sorted(marginal.items()):
                one = marginal.get((stage, 1))
                gain = f" ({v / one:.2f}× one worker)" if one and w != 1 else ""
                lines.append(f"- {stage}, {w} worker(s): {v:.1f} images/s{gain}")
    if res.get("notes"):
        lines += ["", *res["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 2,000 and 5,000")
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 10000,50000)")
    ap.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--denoise-plan", default=None, metavar="N:W,...",
                    help="only these (N, workers) pairs for denoise, e.g. 10000:1,10000:2,50000:2")
    ap.add_argument("--tmp", default=None, help="folder for the stacks (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the stacks and outputs")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every (stage, N, workers) this many times, interleaved")
    ap.add_argument("--name", default=None,
                    help="results file name (default scale, or scale_quick with --quick)")
    args = ap.parse_args()

    import dask
    import torch

    sizes = [int(s) for s in (args.sizes or ("2000,5000" if args.quick else "10000,50000"))
             .split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    plan = None
    if args.denoise_plan:
        plan = {tuple(int(v) for v in p.split(":")) for p in args.denoise_plan.split(",")}
    name = args.name or ("scale_quick" if args.quick else "scale")
    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="cryosift-scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "machine": {
            "cpus": psutil.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "dask": dask.__version__,
        },
        "load_start": [round(x, 2) for x in os.getloadavg()],
        "box": BOX,
        "pixel_size": PX,
        "runs": [],
        "notes": [],
    }
    if plan is not None:
        pairs = ", ".join(f"N = {n:,} with {w} worker(s)" for n, w in sorted(plan))
        res["notes"].append(f"Denoise apply was run only for {pairs} (time budget).")
    try:
        templates = make_templates(tmp)
        model = train_screener(templates, tmp)
        for n in sizes:
            t = time.time()
            stack = make_stack(templates, tmp / f"stack_{n}.mrcs", n)
            print(f"stack of {n} images in {time.time() - t:.1f} s", flush=True)
            for stage in stages:
                for w in [w for _ in range(args.repeat) for w in workers]:  # interleaved
                    if stage == "denoise" and plan is not None and (n, w) not in plan:
                        continue
                    out = tmp / f"out_{stage}_{n}_{w}"
                    row = {"stage": stage, "n_images": n, "workers": w,
                           **monitored(stage_argv(stage, stack, out, model, w))}
                    row["images_per_second"] = round(n / row["wall_seconds"], 1)
                    row["images_per_cpu_second"] = round(n / max(row["cpu_seconds"], 1e-9), 1)
                    res["runs"].append(row)
                    print(json.dumps(row), flush=True)
                    if not args.keep:
                        shutil.rmtree(out, ignore_errors=True)
                    res["load_end"] = [round(x, 2) for x in os.getloadavg()]
                    RESULTS.mkdir(parents=True, exist_ok=True)  # partial results as we go
                    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
                    (RESULTS / f"{name}.md").write_text(markdown(res))
            if not args.keep:
                stack.unlink(missing_ok=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    res["load_end"] = [round(x, 2) for x in os.getloadavg()]
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
