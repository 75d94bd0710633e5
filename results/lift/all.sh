#!/bin/bash
# pass 2 (after the construction-seed fix): data, 200-demo runs, 20-demo 3-seed runs
export OMP_NUM_THREADS=1 PYTHONPATH=/work/wt-lift/src
cd /work/wt-lift/runs_lift
C="/work/main/.venv/bin/python -m cdp.cli"
echo "=== gen start $(date +%T)"
( time $C data lift --n-demos 200 --out lift200.hdf5 --no-progress ) 2>&1 | grep -v "robosuite WARNING"
for pol in dbc cdp_dbc; do
  echo "=== $pol start $(date +%T)"
  $C train --task lift --hdf5 lift200.hdf5 --max-episodes none --policy $pol --steps 20000 --seed 0 \
    --eval-episodes 50 --out runs/$pol --threads 1 --no-progress 2>&1 | grep -v "robosuite WARNING"
  echo "=== $pol end $(date +%T)"
done
for seed in 0 1 2; do for pol in dbc cdp_dbc; do
  echo "=== $pol seed $seed start $(date +%T)"
  $C train --task lift --hdf5 lift200.hdf5 --max-episodes none --fraction 0.1 --policy $pol --steps 2000 \
    --seed $seed --eval-episodes 50 --out runs/${pol}_f0.1_s$seed --threads 1 --no-progress 2>&1 | grep -v "robosuite WARNING"
  echo "=== $pol seed $seed end $(date +%T)"
done; done
