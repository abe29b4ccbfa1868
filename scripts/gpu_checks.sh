#!/usr/bin/env bash
# dyf's checks on a GPU machine in one run of at most 9.7 minutes (so that it fits a 10-minute lease call), most
# wanted first: benchmarks/gpu.py's forecast (bf16 and compile speed-ups, model FLOP utilisation), its training
# step of the forecaster stage, the CUDA tests (`pytest -m gpu`, the slow pipeline test left out: run it on its
# own), then the interpolator stage's training step. Each part has its own time limit; the figures of a part
# cut short up to that point are kept in its JSON file.
#
#   bash scripts/gpu_checks.sh [OUT_DIR]          (PYTHON=... to choose the interpreter; default python3)
#
# The interpreter needs dyf's dependencies. On a machine that cannot download (a lent device), bring them
# as wheels built for its Python, e.g. for CPython 3.12 on x86-64, from the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl zarr numcodecs donfig google-crc32c dask partd locket xarray pandas typer click shellingham \
#     rich pydantic pydantic-core annotated-types typing-inspection typing-extensions netCDF4 cftime
# and set WHEELS=.whl: they are installed into /tmp/dyf-site first.
set -u
out=${1:-gpu-checks}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dyf-site \
        "$WHEELS"/*.whl || exit 3
    export PYTHONPATH="/tmp/dyf-site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

echo "== forecast: 11 SST boxes x 50 members, fp32 / bf16 / bf16 + compile"
timeout 220 "$py" benchmarks/gpu.py --parts forecast --inits 1 --json "$out/forecast.json" >"$out/forecast.log" 2>&1
grep -E "part=|Error" "$out/forecast.log"

echo "== training step of the forecaster stage"
timeout 140 "$py" benchmarks/gpu.py --parts train --stages forecaster --json "$out/train-forecaster.json" \
    >"$out/train-forecaster.log" 2>&1
grep -E "part=|Error" "$out/train-forecaster.log"

echo "== CUDA tests"
timeout 110 "$py" -m pytest -q -m gpu tests/test_gpu.py -k "not pipeline" -p no:cacheprovider 2>&1 \
    | tee "$out/pytest.log" | tail -5

echo "== training step of the interpolator stage"
timeout 100 "$py" benchmarks/gpu.py --parts train --stages interpolator --json "$out/train-interpolator.json" \
    >"$out/train-interpolator.log" 2>&1
grep -E "part=|Error" "$out/train-interpolator.log"
