"""Pre-train the CDAE / single-DAE phase-1 weights shipped in the package (seed 004).

    python scripts/train_cdae_weights.py [--kind cdae|cdae_plain|dae] [--install]

Runs phase 1 with the benchmark defaults (`cryosift.denoise.cdae.BENCH_DEFAULTS`: TRPV1 3J5P
simulated at 64 px, 3 Å/px, 4 views x 1,000 images, SNR 0.1 / 0.4 / 0.6 / clean, 6 epochs per
block, seed 0) and with --install writes src/cryosift/data/models/<kind>-trpv1-box64-px3.pt
(+ .json): ``cdae`` is the cascade with identity skips around blocks 2 and 3 (the default),
``cdae_plain`` 004's plain cascade, ``dae`` the single-DAE baseline (SNR 0.1 -> clean).
These are the weights `cryosift bench` B2 and `denoise train --method cdae --pretrained NAME`
use. Deterministic for a given seed on one machine; a few minutes per kind on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kind", choices=("cdae", "cdae_plain", "dae"), default="cdae")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--install", action="store_true", help="write into the package data")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from cryosift.bench.protocol import structure_path
    from cryosift.denoise.cdae import (
        BENCH_DEFAULTS,
        TRAINING_STRUCTURE,
        load_cdae,
        pretrain_cdae,
        pretrain_single_dae,
        save_cdae,
    )

    b = BENCH_DEFAULTS
    box, pixel_size = 64, 3.0
    common = dict(box=box, pixel_size=pixel_size, n_per_view=b["n_per_view"], views=b["views"],
                  epochs=b["pretrain_epochs"], seed=b["pretrain_seed"], widths=b["widths"],
                  device=args.device)
    structure = structure_path(TRAINING_STRUCTURE)
    name = f"{args.kind}-trpv1-box{box}-px{pixel_size:g}"
    with tempfile.TemporaryDirectory(prefix="cryosift-cdae-") as tmp:
        if args.kind == "dae":
            record = pretrain_single_dae(structure, tmp, snr=b["snrs"][0], **common)
        else:
            record = pretrain_cdae(structure, tmp, snrs=b["snrs"], skip=args.kind == "cdae",
                                   **common)
        model, meta = load_cdae(tmp)
    meta = {k: v for k, v in meta.items() if k not in ("architecture", "n_blocks", "skip")}
    meta["name"] = name
    meta["pretrain"]["structure"] = structure.name  # no path of this machine in the package
    meta["pretrain_blocks"] = [
        {k: blk[k] for k in ("block", "input_snr", "target", "best_epoch", "best_val_loss")}
        for blk in record["blocks"]
    ]
    print(json.dumps(meta["pretrain_blocks"], indent=1))
    if args.install:
        out = ROOT / "src" / "cryosift" / "data" / "models" / f"{name}.pt"
        save_cdae(out, model, meta)
        print(f"installed {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
