#!/usr/bin/env bash
# dyf's checks on a GPU machine: benchmarks/gpu.py's figures (bf16 and compile speed-ups, model FLOP
# utilisation) and the CUDA tests (`pytest -m gpu`), in parts, each under its own time limit:
#   forecast            11 SST boxes x 50 members, fp32 / bf16 / bf16 + compile      (at most 220 s)
#   train-forecaster    the forecaster stage's training step, same modes             (at most 220 s)
#   tests               the CUDA tests but the slow pipeline test (run that alone)    (at most 110 s)
#   train-interpolator  the interpolator stage's training step, same modes           (at most 150 s)
# All four (the default) take up to 11.7 minutes, about 10 on one H200; name fewer to fit a shorter call.
# Figures of a part cut short by its limit are kept in its JSON file up to that point.
#
#   bash scripts/gpu_checks.sh [OUT_DIR [PART ...]]     (PYTHON=... to choose the interpreter; default python3)
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
shift || true
parts=${*:-forecast train-forecaster tests train-interpolator}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dyf-site \
        "$WHEELS"/*.whl || exit 3
    export PYTHONPATH="/tmp/dyf-site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true

train() {  # train STAGE LIMIT
    echo "== training step of the $1 stage"
    timeout "$2" "$py" benchmarks/gpu.py --parts train --stages "$1" --json "$out/train-$1.json" \
        >"$out/train-$1.log" 2>&1
    grep -E "part=|Error" "$out/train-$1.log"
}

for part in $parts; do
    case $part in
    forecast)
        echo "== forecast: 11 SST boxes x 50 members, fp32 / bf16 / bf16 + compile"
        timeout 220 "$py" benchmarks/gpu.py --parts forecast --inits 1 --json "$out/forecast.json" \
            >"$out/forecast.log" 2>&1
        grep -E "part=|Error" "$out/forecast.log" ;;
    train-forecaster) train forecaster 220 ;;
    train-interpolator) train interpolator 150 ;;
    tests)
        echo "== CUDA tests"
        timeout 110 "$py" -m pytest -q -m gpu tests/test_gpu.py -k "not pipeline" -p no:cacheprovider 2>&1 \
            | tee "$out/pytest.log" | tail -5 ;;
    *) echo "unknown part '$part' (forecast, train-forecaster, tests, train-interpolator)"; exit 2 ;;
    esac
done
