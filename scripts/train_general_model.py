"""Train the general Noise2Noise model shipped in the package (`--model general`).

    python scripts/train_general_model.py [--work /tmp/general] [--install]

Simulates the training pairs described in `cryosift.denoise.general` from the structures in
../shared/data/structures, trains the U-Net, and with --install copies model.pt (weights +
architecture + recipe) to src/cryosift/data/models/general.pt. Deterministic for a given seed on
one machine; about 25 min on one CPU thread (simulation ~3 min, then 30 epochs of ~40 s).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cryosift-general"))
    ap.add_argument("--structures", type=Path, default=None, help="shared/data/structures")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--n-per-run", type=int, default=None)
    ap.add_argument("--install", action="store_true", help="copy into the package data")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from cryosift.denoise.general import GeneralRecipe, train_general_model
    from cryosift.device import select_device

    structures = args.structures or next(
        (p / "shared" / "data" / "structures" for p in ROOT.parents
         if (p / "shared" / "data" / "structures").is_dir()), None)
    if structures is None:
        print("shared/data/structures not found; pass --structures", file=sys.stderr)
        return 2
    recipe = GeneralRecipe()
    if args.epochs:
        recipe = replace(recipe, epochs=args.epochs)
    if args.n_per_run:
        recipe = replace(recipe, n_per_run=args.n_per_run)
    path = train_general_model(recipe, structures, args.work, str(select_device(args.device)))
    print(path)
    if args.install:
        dest = ROOT / "src" / "cryosift" / "data" / "models" / "general.pt"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        print("installed", dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
