"""Do the learned denoisers beat the tuned low-pass on settings the protocol does not hold?

    python benchmarks/bench_generalisation.py  # -> benchmarks/results/generalisation.json, .md

The issue asks that nothing be tuned to one dataset and that every learned denoiser beat raw,
the default filters and the best-cutoff low-pass at SNR <= 0.1. The B1/B2/P10 benchmarks use
GroEL, SpCas9 and T20S without CTF; this runs the same scoring (`cryosift.bench.runner`,
`<filter>_best` tuned on the clean images) on other settings: T20S and apoferritin with CTF
(defocus 0.8-3 µm) and shifts, SpCas9 at another SNR and sampling, 500 images each. Rows: the
shipped general model alone (`denoise apply --no-sure`) and with the SURE output stage (what
`denoise apply` does by default on white noise): 5 minutes on this 2-core CPU. `--methods` adds
others, e.g. n2v,n2v+sure (Noise2Void fine-tuned on each stack: ~10 minutes per setting here).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["raw", "lowpass", "general", "general+sure"]


def settings() -> dict:
    from cryosift.bench.protocol import DatasetSpec

    t20s, apof, cas9 = "3j9i.pdb.gz", "4v1w.cif.gz", "5F9R.pdb"
    return {
        "T20S, CTF, SNR 0.01": DatasetSpec(t20s, 500, 96, 2.0, 0.01, ctf=True, max_shift=3.0,
                                           seed=71),
        "T20S, CTF, SNR 0.05": DatasetSpec(t20s, 500, 96, 2.0, 0.05, ctf=True, max_shift=3.0,
                                           seed=72),
        "T20S, CTF, SNR 0.1": DatasetSpec(t20s, 500, 96, 2.0, 0.1, ctf=True, max_shift=3.0,
                                          seed=73),
        "apoferritin, CTF, SNR 0.01": DatasetSpec(apof, 500, 128, 1.5, 0.01, ctf=True, seed=74),
        "apoferritin, CTF, SNR 0.1": DatasetSpec(apof, 500, 128, 1.5, 0.1, ctf=True, seed=75),
        "SpCas9, no CTF, SNR 0.02": DatasetSpec(cas9, 500, 64, 3.0, 0.02, seed=76),
    }


def main() -> None:
    from cryosift.bench.runner import load_dataset, score_denoisers

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "-o", "--out", type=Path, default=ROOT / "benchmarks" / "results" / "generalisation.json"
    )
    args = ap.parse_args()
    os.environ.setdefault("CRYOSIFT_NO_PROGRESS", "1")
    only = args.methods.split(",")
    results: dict[str, dict] = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, spec) in enumerate(settings().items()):
            data = load_dataset(spec, Path(tmp) / str(i))
            scores = score_denoisers(data, only=only)
            results[name] = {"spec": spec.__dict__ | {"junk_types": list(spec.junk_types)},
                             "scores": {k: {m: v[m] for m in ("psnr", "cc", "si_psnr")}
                                        for k, v in scores.items()}}
            print(name, {k: round(v["psnr"], 2) for k, v in scores.items()}, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seconds": time.time() - t0, "results": results},
                                   indent=1, default=str) + "\n")
    rows = ["raw", "lowpass", "lowpass_best", *[m for m in only if m not in ("raw", "lowpass")]]
    names = list(results)
    lines = ["PSNR (dB) / CC against the clean images; `lowpass_best` is tuned on them (oracle).",
             "", "| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in rows:
        cells = []
        for name in names:
            s = results[name]["scores"].get(row)
            cells.append(f"{s['psnr']:.2f} / {s['cc']:.3f}" if s else "")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
