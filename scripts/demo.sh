#!/usr/bin/env bash
# The README demo: simulate a small spring-mesh data set, train both DYffusion stages with the tiny preset,
# forecast a 16-member ensemble and score it with plots. About 2-5 minutes on 2 CPU cores.
# Usage: scripts/demo.sh [OUT_DIR]     (uses .venv/bin/dyf when present, else `dyf` on PATH)
set -euo pipefail
out=${1:-demo}
here=$(cd "$(dirname "$0")/.." && pwd)
dyf="$here/.venv/bin/dyf"
[ -x "$dyf" ] || dyf=dyf
mkdir -p "$out"
set -x
"$dyf" prepare spring-mesh --out "$out/data.zarr" --trajectories 12,2,2 --seed 0 --overwrite
"$dyf" train-interpolator --data "$out/data.zarr" --preset tiny --out "$out/interpolator.pt" --overwrite
"$dyf" train-forecaster --data "$out/data.zarr" --interpolator "$out/interpolator.pt" --preset tiny \
    --out "$out/model.pt" --overwrite
"$dyf" forecast --ckpt "$out/model.pt" --horizon 32 --ensemble 16 --out "$out/forecast.zarr" --overwrite
"$dyf" evaluate "$out/forecast.zarr" --out "$out/scores.nc" --plots "$out/plots" --overwrite
