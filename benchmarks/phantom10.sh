#!/bin/bash
# 10-view, 2,000-image, 64 px phantom without CTF (the issue-6 reference setting), SNR 0.1 / 0.01.
# Usage: bash benchmarks/phantom10.sh [OUT_DIR]   (in the cryosift environment; about 40 min on 2 cores)
# One line per (in-plane, SNR, method): ACC / NMI / ARI against the true views, wall time, peak RSS.
set -e
STRUCTURES=$(cd "$(dirname "$0")/../../shared/data/structures" && pwd)
export OMP_NUM_THREADS=1
OUT=${1:-phantom10}; mkdir -p "$OUT"; cd "$OUT"
for inplane in no-in-plane in-plane; do
for snr in 0.1 0.01; do
  d=sim_${inplane}_$snr
  [ -f $d/particles.star ] || cryosift simulate "$STRUCTURES/5F9R.pdb" -o $d --n-images 2000 --box 64 --pixel-size 3.2 --snr $snr --views 10 --$inplane --no-ctf --seed 0 >/dev/null 2>&1
  for m in "pca+kmeans" "rotinv+kmeans" "drvae" "align2d"; do
    o=cls_${inplane}_${snr}_${m/+/_}
    /usr/bin/time -f "%e s %M kB" cryosift classify $d/particles.star -k 10 --method $m -o $o --device cpu >/dev/null 2>$o.err || { echo "$o FAILED"; tail -2 $o.err; continue; }
    cryosift evaluate $o/classes.star --truth $d/particles.star -o $o.json >/dev/null 2>&1
    python -c "import json;d=json.load(open('$o.json'));c=d.get('clustering',d);print('$inplane $snr $m', {k:round(v,4) for k,v in c.items() if k in ('acc','nmi','ari')}, open('$o.err').read().strip().splitlines()[-1])"
  done
done
done
