#!/bin/bash
# DP-UNet vs CDP-UNet, 10 % demos, seed 0, tiny budget (docs/results_il.md).
set -u
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src
PY=/work/main/.venv/bin/python
ZARR=/work/shared/data/pusht/pusht_cchi_v7_replay.zarr
STEPS=${STEPS:-150}
for pol in dp_unet cdp_unet; do
  name=${pol}_f0.1_s0_${STEPS}
  [ -f results/il/unet/$name.json ] && continue
  $PY -m cdp.cli train --task pusht --policy $pol --fraction 0.1 --seed 0 --steps $STEPS --batch-size 256 \
    --log-every 10 --eval-episodes 10 --eval-max-steps 300 --diag-obs 1 --diag-samples 1 --zarr $ZARR \
    --out runs/il/$name --threads 1 --no-progress --ckpt-every 0 > runs/il/$name.log 2>&1 \
    && mkdir -p results/il/unet && cp runs/il/$name/results.json results/il/unet/$name.json \
    && cp runs/il/$name.log runs/il/$name/metrics.jsonl results/il/unet/ && mv results/il/unet/metrics.jsonl results/il/unet/$name.metrics.jsonl
done
