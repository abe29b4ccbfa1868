#!/usr/bin/env bash
# The README's ERA5 / WeatherBench walk-through on a synthetic global archive (2 years, 6-hourly, 32x64,
# 5.625°, per-variable folders of yearly files of zonal waves that travel across 0°/360°, written by
# benchmarks/prepare_netcdf.py): prepare, train
# both tiny stages on the periodic (0°/360°) store, forecast, evaluate with plots and export to WB2, then
# copy one global error/spread map to docs/images/global-map.png. A few minutes on 2 CPU cores.
# Usage: scripts/global_map.sh [OUT_DIR]   (default: a temp dir; uses .venv/bin/dyf when present)
set -euo pipefail
out=${1:-$(mktemp -d -t dyf-global-map-XXXXXX)}
here=$(cd "$(dirname "$0")/.." && pwd)
dyf="$here/.venv/bin/dyf"
python="$here/.venv/bin/python"
[ -x "$dyf" ] || dyf=dyf
[ -x "$python" ] || python=python3
steps=${DYF_GLOBAL_MAP_STEPS:-30}  # training steps per stage
mkdir -p "$out"
set -x
# archive: $out/wb/<variable folder>/<variable>_<year>_5.625deg.nc, years 1979 and 1980
"$python" -c "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; \
from prepare_netcdf import write_archive; write_archive(Path(sys.argv[2]), 2, False, smooth=True)" "$here/benchmarks" "$out/wb"
"$dyf" prepare netcdf "$out/wb/2m_temperature/*.nc" "$out/wb/geopotential/*.nc" --var t2m,z@500 \
    --normalization pixel --train-until 1979 --val 1980-01:1980-06 --test 1980-07:1980-12 \
    --out "$out/wb.zarr" --overwrite
"$dyf" inspect "$out/wb.zarr" | grep periodic_x
"$dyf" train-interpolator --data "$out/wb.zarr" --preset tiny --set data.horizon=4 \
    --set interpolator.max_steps="$steps" --out "$out/wb-interpolator.pt" --overwrite
"$dyf" train-forecaster --data "$out/wb.zarr" --interpolator "$out/wb-interpolator.pt" --preset tiny \
    --set forecaster.max_steps="$steps" --out "$out/wb-model.pt" --overwrite
"$dyf" forecast --ckpt "$out/wb-model.pt" --init 1980-07-01T06:00,1980-08-01T12:00 --horizon 8 --ensemble 8 \
    --out "$out/wb-forecast.zarr" --overwrite
"$dyf" evaluate "$out/wb-forecast.zarr" --out "$out/wb-scores.nc" --plots "$out/wb-plots" --overwrite
"$dyf" export "$out/wb-forecast.zarr" --to wb2 --out "$out/wb-forecast-wb2.zarr" --overwrite
set +x
ls "$out/wb-plots"
# seam check: ensemble spread per longitude column (mean over inits, leads, members' std, latitudes); with
# circular padding the 0° and 354.375° columns look like the interior ones
"$python" - "$out/wb-forecast-wb2.zarr" <<'PY'
import sys
import xarray as xr
ds = xr.open_zarr(sys.argv[1])
for name in ds.data_vars:
    col = ds[name].std("realization").mean(["time", "prediction_timedelta", "latitude"]).values
    inner = col[2:-2]
    print(f"{name}: spread at lon 0: {col[0]:.4g}, at lon {float(ds.longitude[-1]):g}: {col[-1]:.4g}; "
          f"other columns {inner.mean():.4g} +- {inner.std():.2g} (min {inner.min():.4g}, max {inner.max():.4g})")
PY
map=maps_t2m.png  # truth, ensemble mean, error, spread and 3 members of t2m at the last lead (48 h)
mkdir -p "$here/docs/images"
cp "$out/wb-plots/$map" "$here/docs/images/global-map.png"
echo "copied $out/wb-plots/$map to $here/docs/images/global-map.png ($(wc -c < "$here/docs/images/global-map.png") bytes)"
