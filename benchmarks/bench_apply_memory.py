"""Peak RSS of `cryosift denoise apply` against the stack's size (issue 4: "peak RSS during apply
independent of stack size").

    python benchmarks/bench_apply_memory.py [--sizes 2000,10000,50000] [--work DIR]

Writes stacks of N noisy 64-px images (a Gaussian blob in white noise; what the images hold does
not change the memory) and runs `denoise apply --model general --no-sure` on each in a fresh
process: `--scheduler threads` (this process does the work) at every N, and the default
scheduler (`auto`: a local Dask cluster from 20,000 images) at the largest. Reported: the main
process's peak RSS (VmHWM: anonymous and file-backed pages) and the peak of the RSS summed over
the process and its workers (sampled every 0.2 s).
Results: benchmarks/results/apply_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

OUT = Path(__file__).resolve().parent / "results"
_MAIN = "import sys; from cryosift.cli.main import main; sys.exit(main(sys.argv[1:]))"


def write_stack(path: Path, n: int, box: int = 64) -> None:
    from cryosift.io import MrcsWriter

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:box, :box] - box / 2
    blob = np.exp(-(yy**2 + xx**2) / (2 * (box / 6) ** 2)).astype(np.float32)
    with MrcsWriter(path, n, box, 3.0) as writer:
        for start in range(0, n, 1000):
            k = min(1000, n - start)
            writer.append(blob + 3 * rng.standard_normal((k, box, box)).astype(np.float32))


def measure(stack: Path, out: Path, scheduler: str) -> dict:
    """Run apply on `stack`; the main process's VmHWM and the process tree's peak RSS (MB)."""
    env = {**os.environ, "CRYOSIFT_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-c", _MAIN, "-q", "denoise", "apply", str(stack), "--model",
           "general", "--no-sure", "--scheduler", scheduler, "-o", str(out)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env)
    main = psutil.Process(proc.pid)
    hwm = tree = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            hwm = max(hwm, next(int(line.split()[1]) for line in status.splitlines()
                                if line.startswith("VmHWM:")) // 1024)
            rss = main.memory_info().rss + sum(
                c.memory_info().rss for c in main.children(recursive=True))
            tree = max(tree, rss // 2**20)
        except (OSError, StopIteration, psutil.Error):
            pass
        time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with code {proc.returncode}")
    return {"main_peak_rss_mb": hwm, "tree_peak_rss_mb": tree,
            "seconds": round(time.time() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="2000,10000,50000")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cryosift-rss-", dir=args.work) as tmp:
        for n in sizes:
            stack = Path(tmp) / f"stack{n}.mrcs"
            write_stack(stack, n)
            runs = ["threads"] + (["auto"] if n == max(sizes) else [])
            for scheduler in runs:
                row = {"n_images": n, "box": 64, "scheduler": scheduler,
                       **measure(stack, Path(tmp) / "out.star", scheduler)}
                rows.append(row)
                print(row, flush=True)
            stack.unlink()
    record = {"command": " ".join(sys.argv), "machine": platform.platform(),
              "cpus": os.cpu_count(), "rows": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / "apply_memory.json").write_text(json.dumps(record, indent=1))
    lines = [
        "# Peak RSS of `cryosift denoise apply --model general --no-sure` vs stack size",
        "",
        f"Command: `python {' '.join(sys.argv)}` ({platform.platform()}, {os.cpu_count()} CPUs)",
        "",
        "| N images (64 px) | scheduler | main process peak RSS MB | process tree peak RSS MB "
        "| s |",
        "|---|---|---|---|---|",
        *(f"| {r['n_images']} | {r['scheduler']} | {r['main_peak_rss_mb']} | "
          f"{r['tree_peak_rss_mb']} | {r['seconds']} |" for r in rows),
        "",
    ]
    (OUT / "apply_memory.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
