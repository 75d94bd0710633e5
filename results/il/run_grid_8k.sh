#!/bin/bash
# Continue every DBC grid run from its final 4000-step checkpoint to 8000 steps (--resume); results/il/8k/.
set -u
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src
PY=/work/main/.venv/bin/python
mkdir -p results/il/8k
for seed in 0 1 2; do
  for frac in 1.0 0.1; do
    for pol in dbc cdp_dbc; do
      name=${pol}_f${frac}_s${seed}
      [ -f results/il/8k/$name.json ] && continue
      $PY -m cdp.cli train --config runs/il/$name/config.yaml --steps 8000 --out runs/il/$name --resume \
        --threads 1 --no-progress > runs/il/$name.8k.log 2>&1 \
        && cp runs/il/$name/results.json results/il/8k/$name.json && cp runs/il/$name.8k.log results/il/8k/$name.log
    done
  done
done
