#!/usr/bin/env bash
# dyf's checks on a GPU machine, as ONE call of at most 9.7 minutes, the most wanted figure first; each
# part runs under its own time limit and keeps its figures (JSON, rewritten after each one) when cut short:
#   forecast   the SST preset's 11 boxes x 4 inits x 50 members with bf16 + compile, packed
#              (`dyf forecast --pack 4`: 200 rows per call): time per block, MFU, the paper's test set
#              projected; then one pack under torch.profiler (top kernels, kernels per network call,
#              device busy share = 1 - CPU launch gaps, share of the dropout masks' hash kernels) (200 s)
#   train      training step MFU of both stages at batch 64, bf16 + compile              (at most 180 s)
#   loader     DataLoader windows/s against the windows/s those steps consume            (at most 50 s)
#   modes      8 boxes x 50 members, packed: CUDA graphs (--compile-mode reduce-overhead), fp32, bf16
#                                                                                          (at most 150 s)
#   tests      the CUDA tests but the slow pipeline test (not in the default list)       (at most 110 s)
# Compiling is most of each part's time (about 100 s per compiled pair of networks on an H200).
#
#   bash scripts/gpu_checks.sh [OUT_DIR [PART ...]]     (PYTHON=... to choose the interpreter; default python3)
#   bash scripts/gpu_checks.sh --cpu-smoke [OUT_DIR [PART ...]]   the same parts on the CPU, tiny sizes
#                                                       (a dry run of this script: about a minute)
#
# The interpreter needs dyf's dependencies. On a machine that cannot download (a lent device), bring them
# as wheels built for its Python, e.g. for CPython 3.12 on x86-64, from the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl zarr numcodecs donfig google-crc32c dask partd locket xarray pandas typer click shellingham \
#     rich pydantic pydantic-core annotated-types typing-inspection typing-extensions netCDF4 cftime
# and set WHEELS=.whl: they are installed into /tmp/dyf-site first.
set -u
smoke=0
if [ "${1:-}" = "--cpu-smoke" ]; then
    smoke=1
    shift
fi
out=${1:-gpu-checks}
shift || true
parts=${*:-forecast train loader modes}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dyf-site \
        "$WHEELS"/*.whl || exit 3
    export PYTHONPATH="/tmp/dyf-site:$PYTHONPATH"
fi
if [ $smoke = 1 ]; then
    # tiny networks, grids and counts on the CPU: the same code paths, seconds instead of minutes
    sizes=(--device cpu --preset tiny --grid 12 --boxes 2 --inits 2 --members 3 --pack 2 --batch 4 --steps 2
           --warmup 1 --loader-days 60 --loader-batches 3 --loader-workers 0)
else
    sizes=()
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
fi

bench() {  # bench NAME LIMIT ARGS...: benchmarks/gpu.py under a time limit, its figure lines shown
    name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$py" benchmarks/gpu.py "$@" ${sizes[@]+"${sizes[@]}"} --json "$out/$name.json" \
        >"$out/$name.log" 2>&1
    status=$?
    grep -E "part=|Error" "$out/$name.log"
    [ $status = 0 ] || echo "($name ended with status $status; see $out/$name.log)"
    return $status
}

failed=0
for part in $parts; do
    case $part in
    forecast) bench forecast 200 --parts forecast --modes bf16+compile --inits 4 --profile || failed=1 ;;
    train) bench train 180 --parts train --modes bf16+compile --stages interpolator,forecaster || failed=1 ;;
    loader) bench loader 50 --parts loader --step-json "$out/train.json" || failed=1 ;;
    modes) bench modes 150 --parts forecast --modes bf16+compile:reduce-overhead,fp32,bf16 --boxes 8 --inits 1 \
        || failed=1 ;;
    tests)
        echo "== CUDA tests"
        timeout 110 "$py" -m pytest -q -m gpu tests/test_gpu.py -k "not pipeline and not dry_run" -p no:cacheprovider 2>&1 \
            | tee "$out/pytest.log" | tail -5 ;;
    *) echo "unknown part '$part' (forecast, train, loader, modes, tests)"; exit 2 ;;
    esac
done
exit $failed
