#!/bin/bash
# DBC vs CDP-DBC grid on PushT low-dim (docs/results_il.md). One process at a time, 1 thread.
set -u
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src
PY=/work/main/.venv/bin/python
ZARR=/work/shared/data/pusht/pusht_cchi_v7_replay.zarr
STEPS=${STEPS:-4000}
for seed in 0 1 2; do
  for frac in 1.0 0.1; do
    for pol in dbc cdp_dbc; do
      name=${pol}_f${frac}_s${seed}
      [ -f results/il/$name.json ] && continue
      $PY -m cdp.cli train --task pusht --policy $pol --fraction $frac --seed $seed --steps $STEPS \
        --batch-size 256 --eval-episodes 25 --eval-max-steps 300 --zarr $ZARR --out runs/il/$name \
        --threads 1 --no-progress --ckpt-every 0 > runs/il/$name.log 2>&1 \
        && cp runs/il/$name/results.json results/il/$name.json && cp runs/il/$name.log results/il/$name.log
    done
  done
done
