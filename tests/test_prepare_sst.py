"""`dyf prepare sst`: OISST files in PSL, NCEI and box layouts -> a data store of 60x60 boxes.

Raw files are tiny regional cuts of the global 0.25° grid (see tests/oisst_files.py) that hold exactly
boxes 84 and 85; values are compared with what the test wrote, statistics with a direct numpy computation.
"""

import json
import shutil

import netCDF4
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from dyfcli.errors import DataError, UsageError
from dyfcli.sources import oisst
from dyfcli.splits import time_splits
from dyfcli.store import open_store, staging_path
from oisst_files import LAT, LON, days, land, synthetic_sst, write_box_file, write_ncei, write_ncei_day, write_psl

# Boxes 84 and 85 inside the test grid: one extra row to the south, two extra columns on each side.
BOX84 = (slice(1, 61), slice(2, 62))
BOX85 = (slice(1, 61), slice(62, 122))
SHORT_SPLITS = {"train_until": "2003-12-20", "val": "2003-12-21:2003-12-31", "test": "2004"}


@pytest.fixture(scope="module")
def psl_archive(tmp_path_factory):
    """2001-01-01..2003-03-31; 2002 under the old `.v2.nc` name; a decoy `.v2.nc` for 2003."""
    folder = tmp_path_factory.mktemp("psl")
    dates = days("2001-01-01", "2003-03-31")
    values = write_psl(folder, dates, v2_years=(2002,))
    write_psl(folder, days("2003-01-01", "2003-03-31"), v2_years=(2003,), offset=100.0)
    return folder, dates, values


@pytest.fixture(scope="module")
def psl_store(psl_archive, tmp_path_factory):
    folder, dates, values = psl_archive
    out = tmp_path_factory.mktemp("out") / "sst.zarr"
    summary = oisst.prepare_sst(folder, out, boxes="84-85", train_until="2002", val="2003-01:2003-02",
                                test="2003-03")
    return out, summary


@pytest.fixture(scope="module")
def short_psl(tmp_path_factory):
    """41 days across a year boundary: 2003-12-01..2004-01-10 in two yearly files."""
    folder = tmp_path_factory.mktemp("short")
    dates = days("2003-12-01", "2004-01-10")
    return folder, dates, write_psl(folder, dates)


def test_box_ids_coordinates_values_and_mask(psl_archive, psl_store):
    _, dates, values = psl_archive
    out, summary = psl_store
    store = open_store(out)
    ds = store.ds
    assert ds["series"].values.tolist() == [84, 85] and summary["series"] == [84, 85]
    np.testing.assert_allclose(ds["lat"].values[0], -14.875 + 0.25 * np.arange(60))
    np.testing.assert_allclose(ds["lon"].values[1], 195.125 + 0.25 * np.arange(60))
    assert ds["time"].values[0] == np.datetime64("2001-01-01") and ds.sizes["time"] == len(dates)
    sst = ds["sst"].values
    for series, box in enumerate((BOX84, BOX85)):
        # the .v2.nc decoy for 2003 holds values +100 °C: the v2.1 name must have won
        np.testing.assert_array_equal(sst[series], values[(slice(None), *box)])
        np.testing.assert_array_equal(ds["mask"].values[series], ~land()[box])
    assert np.isnan(sst[~np.broadcast_to(ds["mask"].values[:, None], sst.shape)]).all()
    assert ds["sst"].attrs["units"] == "degC" and ds["sst"].attrs["standard_name"] == "sea_surface_temperature"
    assert ds.attrs["dyf_time_step"] == "1D" and ds.attrs["dyf_normalization"] == "pixel-dayofyear"
    assert ds["sst"].encoding["chunks"] == (1, oisst.STORE_TIME_CHUNK, 60, 60)
    assert oisst.TIME_BLOCK % oisst.STORE_TIME_CHUNK == 0  # writers of different blocks share no chunk


def test_day_of_year_statistics_equal_numpy_over_training_years(psl_archive, psl_store):
    _, dates, values = psl_archive
    out, summary = psl_store
    ds = xr.open_zarr(out)
    training = dates <= np.datetime64("2002-12-31")
    day_of_year = pd.DatetimeIndex(dates[training]).day_of_year.to_numpy()
    box = values[training][(slice(None), *BOX84)].astype(np.float64)
    ocean = ds["mask"].values[0]
    mean = ds["stats_mean_sst"].values[:, 0]
    std = ds["stats_std_sst"].values[:, 0]
    assert ds["stats_mean_sst"].dims == ("dayofyear", "series", "y", "x") and ds.sizes["dayofyear"] == 366
    for day in (1, 59, 60, 200, 365):
        expected_mean = box[day_of_year == day].mean(axis=0)
        expected_std = np.maximum(box[day_of_year == day].std(axis=0), oisst.STD_FLOOR)
        np.testing.assert_allclose(mean[day - 1][ocean], expected_mean[ocean], rtol=1e-6)
        np.testing.assert_allclose(std[day - 1][ocean], expected_std[ocean], rtol=1e-5, atol=1e-6)
    # 2001-2002 have no day 366: it takes day 365's statistics
    np.testing.assert_array_equal(mean[365], mean[364])
    assert summary["stats_filled_days_of_year"] == [366]
    # the frozen pixel never varies: floored std, not zero
    frozen = (59, 80 - 60)
    assert ds["mask"].values[1][frozen] and np.all(ds["stats_std_sst"].values[:, 1][:, frozen[0], frozen[1]] == np.float32(0.01))
    # land: finite identity statistics
    assert np.all(mean[:, ~ocean] == 0) and np.all(std[:, ~ocean] == 1)
    assert np.isfinite(ds["stats_mean_sst"].values).all() and np.isfinite(ds["stats_std_sst"].values).all()


def test_splits_recorded_and_resolved(psl_store):
    out, summary = psl_store
    store = open_store(out)
    assert store.splits == time_splits("2002", "2003-01:2003-02", "2003-03")
    assert store.split_ranges("train") == [(0, 0, 730), (1, 0, 730)]
    assert store.split_ranges("val") == [(0, 730, 789), (1, 730, 789)]
    assert summary["split_days"] == {"train": 730, "val": 59, "test": 31}


def test_all_boxes_drop_mostly_land_and_explicit_ids_are_kept(short_psl, tmp_path):
    folder, _, _ = short_psl
    summary = oisst.prepare_sst(folder, tmp_path / "all.zarr", boxes="all", **SHORT_SPLITS)
    assert summary["series"] == [84]  # box 85 is 89 % ocean
    with pytest.raises(DataError, match=r"boxes 86-89,108-112 lie outside .* available boxes: 84-85"):
        oisst.prepare_sst(folder, tmp_path / "default.zarr", **SHORT_SPLITS)


def test_regional_file_in_other_conventions_yields_same_boxes(short_psl, tmp_path):
    """Latitude descending and longitudes -180..180: ids and values come from the coordinates."""
    folder, dates, values = short_psl
    flipped = tmp_path / "flipped"
    lon = np.where(LON > 180, LON - 360, LON)
    order = np.argsort(lon)
    write_psl(flipped, dates, lat=LAT[::-1], lon=lon[order], values=values[:, ::-1][:, :, order])
    summary = oisst.prepare_sst(flipped, tmp_path / "f.zarr", boxes="84,85", **SHORT_SPLITS)
    assert summary["series"] == [84, 85]
    sst = xr.open_zarr(tmp_path / "f.zarr")["sst"].values
    np.testing.assert_array_equal(sst[1], values[(slice(None), *BOX85)])


def test_ncei_layout_final_wins_over_preliminary_and_zlev_is_squeezed(tmp_path):
    folder = tmp_path / "ncei"
    dates = days("2003-12-29", "2004-01-03")
    values = write_ncei(folder, dates[:-1])
    # the last day exists only as preliminary; 2004-01-01 has both, the preliminary one wrong by +5 °C
    write_ncei_day(folder, dates[-1], synthetic_sst(dates[-1:])[0], preliminary=True)
    write_ncei_day(folder, np.datetime64("2004-01-01"), values[3] + 5, preliminary=True)
    summary = oisst.prepare_sst(folder, tmp_path / "n.zarr", boxes="84-85", train_until="2003",
                                val="2004-01-01:2004-01-02", test="2004-01-03")
    assert summary["layout"] == "ncei" and summary["days"] == 6
    sst = xr.open_zarr(tmp_path / "n.zarr")["sst"].values
    expected = synthetic_sst(dates)[(slice(None), *BOX84)]
    np.testing.assert_allclose(sst[0], expected, atol=1e-4)  # int16 * 0.01 in float32
    assert np.isnan(sst[0]).sum() == np.isnan(expected).sum()


def test_gaps_are_listed_or_stored_as_nan(tmp_path):
    folder = tmp_path / "gappy"
    dates = days("2003-12-28", "2004-01-06")
    keep = ~np.isin(dates, days("2003-12-31", "2004-01-01")) & (dates != np.datetime64("2004-01-04"))
    write_ncei(folder, dates[keep])
    flags = {"boxes": "84", "train_until": "2003", "val": "2004-01-01:2004-01-03", "test": "2004-01-04:2004-01-06"}
    with pytest.raises(DataError, match=r"3 day\(s\) are missing .*2003-12-31\.\.2004-01-01, 2004-01-04; .*--allow-gaps"):
        oisst.prepare_sst(folder, tmp_path / "g.zarr", **flags)
    summary = oisst.prepare_sst(folder, tmp_path / "g.zarr", allow_gaps=True, **flags)
    ds = xr.open_zarr(tmp_path / "g.zarr")
    assert summary["days"] == 10 and ds.attrs["dyf_missing_days"] == ["2003-12-31", "2004-01-01", "2004-01-04"]
    sst = ds["sst"].values[0]
    assert np.isnan(sst[~keep]).all() and not np.isnan(sst[keep][:, ds["mask"].values[0]]).any()


def test_standardized_box_files_are_kept_standardized(tmp_path):
    folder = tmp_path / "boxes"
    dates = days("2019-12-20", "2020-01-10")
    rng = np.random.default_rng(0)
    values = rng.normal(size=(2, len(dates), 60, 60)).astype(np.float32)
    values[:, :, :5, :7] = 0.0  # land
    write_box_file(folder / "sst.day.mean.box84.nc", 84, dates, values[0])
    write_box_file(folder / "sst.day.mean.60x60box108.standardized.nc", 108, dates, values[1], degrees=False)
    summary = oisst.prepare_sst(folder, tmp_path / "b.zarr", boxes="all", train_until="2019",
                                val="2020-01-01:2020-01-05", test="2020-01-06:2020-01-10")
    store = open_store(tmp_path / "b.zarr")
    ds = store.ds
    assert summary["series"] == [84, 108] and summary["values"] == "standardized"
    assert store.normalization == "global" and float(ds["stats_std_sst"]) == 1 and float(ds["stats_mean_sst"]) == 0
    assert ds.attrs["dyf_values"] == "standardized" and "STANDARDIZED" in ds.attrs["dyf_source"]
    assert ds["sst"].attrs["units"] == "1" and "standard_name" not in ds["sst"].attrs
    np.testing.assert_allclose(ds["lat"].values[1], 0.125 + 0.25 * np.arange(60))
    assert not ds["mask"].values[:, :5, :7].any() and ds["mask"].values[:, 5:, :].all()
    sst = ds["sst"].values
    assert np.isnan(sst[:, :, :5, :7]).all()
    np.testing.assert_array_equal(sst[:, :, 5:], values[:, :, 5:])


def test_bad_inputs_raise_data_errors(tmp_path, short_psl):
    folder, dates, _ = short_psl
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        oisst.prepare_sst(tmp_path / "empty", tmp_path / "x.zarr")
    with pytest.raises(DataError, match="not an existing folder"):
        oisst.prepare_sst(tmp_path / "nope", tmp_path / "x.zarr")
    coarse = tmp_path / "coarse"
    write_psl(coarse, dates[:3], lat=np.arange(-30.5, 0, 1.0), lon=np.arange(170.5, 220, 1.0))
    with pytest.raises(DataError, match="not the OISST 0.25° grid"):
        oisst.prepare_sst(coarse, tmp_path / "x.zarr", boxes="84", **SHORT_SPLITS)
    shifted = tmp_path / "shifted"
    write_psl(shifted, dates[:3])
    write_psl(shifted, dates[-3:], lon=LON + 0.25)
    with pytest.raises(DataError, match="give files of one grid"):
        oisst.prepare_sst(shifted, tmp_path / "x.zarr", boxes="84", allow_gaps=True, **SHORT_SPLITS)
    novar = tmp_path / "novar"
    novar.mkdir()
    with netCDF4.Dataset(novar / "sst.day.mean.2003.nc", "w") as dataset:
        dataset.createDimension("time", 1)
        dataset.createVariable("analysed_sst", "f4", ("time",))
    with pytest.raises(DataError, match="no variable 'sst'.*analysed_sst"):
        oisst.prepare_sst(novar, tmp_path / "x.zarr")
    with pytest.raises(DataError, match="the val split .* holds no day"):
        oisst.prepare_sst(folder, tmp_path / "x.zarr", boxes="84", train_until="2003-12-20", val="2019", test="2004")
    with pytest.raises(DataError, match="--years asks for 2002"):
        oisst.prepare_sst(folder, tmp_path / "x.zarr", boxes="84", years="2002-2004", **SHORT_SPLITS)
    with pytest.raises(UsageError, match="box ids run 0..191"):
        oisst.prepare_sst(folder, tmp_path / "x.zarr", boxes="84-300")
    assert not (tmp_path / "x.zarr").exists()


def test_two_reading_processes_write_the_same_store_as_one(short_psl, tmp_path):
    folder, _, _ = short_psl
    flags = dict(boxes="84-85", time_block=4, **SHORT_SPLITS)  # 11 blocks: several in flight at once
    one = oisst.prepare_sst(folder, tmp_path / "one.zarr", workers=1, **flags)
    two = oisst.prepare_sst(folder, tmp_path / "two.zarr", workers=2, **flags)
    assert one["workers"] == 1 and two["workers"] == 2 and one["blocks_written"] == two["blocks_written"] == 11
    a, b = xr.open_zarr(tmp_path / "one.zarr"), xr.open_zarr(tmp_path / "two.zarr")
    for name in ("sst", "mask", "stats_mean_sst", "stats_std_sst", "lat", "lon", "time"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    assert np.isfinite(b["sst"].values).any()
    with pytest.raises(UsageError, match="--workers 0"):
        oisst.prepare_sst(folder, tmp_path / "zero.zarr", workers=0, **flags)


def test_chunks_inflated_directly_equal_netcdf_reads(tmp_path):
    dates = days("2003-12-30", "2004-01-02")
    write_psl(tmp_path / "shuffled", dates, zlib=True)
    write_psl(tmp_path / "deflated", dates, zlib=True, shuffle=False)
    write_psl(tmp_path / "plain", dates)
    write_ncei(tmp_path / "ncei", dates[:1])
    ncei_file = next((tmp_path / "ncei").rglob("*.nc"))
    rows, cols = slice(1, 61), slice(2, 122)
    for path, fast_expected in ((tmp_path / "shuffled" / "sst.day.mean.2003.nc", True),
                                (tmp_path / "deflated" / "sst.day.mean.2004.nc", True),
                                (ncei_file, True), (tmp_path / "plain" / "sst.day.mean.2003.nc", False)):
        with oisst.open_netcdf(path) as dataset:
            netcdf = oisst.SstSlicer(dataset, rows, cols)
            chunks = oisst.ChunkSlicer.open(path, netcdf, rows, cols)
            assert (chunks is not None) == fast_expected, path
            if chunks is not None:
                for day in range(dataset.dimensions["time"].size):
                    np.testing.assert_array_equal(chunks.read(day), netcdf.read(day))
                    assert np.isnan(chunks.read(day)).any() and np.isfinite(chunks.read(day)).any()
                chunks.close()


def test_store_is_the_same_with_or_without_direct_chunk_reads(tmp_path, monkeypatch):
    folder = tmp_path / "zlib"
    write_psl(folder, days("2003-12-01", "2004-01-10"), zlib=True)
    flags = dict(boxes="84-85", workers=1, **SHORT_SPLITS)  # one process, so the flag below applies
    oisst.prepare_sst(folder, tmp_path / "fast.zarr", **flags)
    monkeypatch.setattr(oisst, "FAST_CHUNKS", False)
    oisst.prepare_sst(folder, tmp_path / "netcdf.zarr", **flags)
    a, b = xr.open_zarr(tmp_path / "fast.zarr"), xr.open_zarr(tmp_path / "netcdf.zarr")
    for name in ("sst", "mask", "stats_mean_sst", "stats_std_sst"):
        np.testing.assert_array_equal(a[name].values, b[name].values)


def test_decode_sst_applies_cf_packing_and_missing_values_by_hand():
    packed = np.array([[-999, 0, 1234], [-5, 32767, -999]], dtype=np.int16)
    decoded = oisst.decode_sst(packed, {"_FillValue": np.int16(-999), "scale_factor": 0.01, "add_offset": 0.0})
    np.testing.assert_array_equal(np.isnan(decoded), [[True, False, False], [False, False, True]])
    np.testing.assert_allclose(decoded[~np.isnan(decoded)], [0.0, 12.34, -0.05, 327.67], rtol=1e-6)
    assert decoded.dtype == np.float32
    psl = np.array([-9.96921e36, 21.5, np.nan, 2e30, -1.8], dtype=np.float32)
    for attrs in ({"missing_value": np.float32(-9.96921e36)}, {}):  # |x| > 1e30 is missing even without it
        np.testing.assert_array_equal(np.isnan(oisst.decode_sst(psl, attrs)), [True, False, True, True, False])
    offset = oisst.decode_sst(np.array([100, -1], dtype=np.int16), {"missing_value": np.int16(-1),
                                                                   "scale_factor": 0.5, "add_offset": 10.0})
    np.testing.assert_array_equal(offset, np.array([60.0, np.nan], dtype=np.float32))


def test_interrupted_run_resumes_and_matches_a_clean_run(short_psl, tmp_path, monkeypatch):
    folder, _, _ = short_psl
    flags = dict(boxes="84-85", time_block=4, **SHORT_SPLITS)
    clean = oisst.prepare_sst(folder, tmp_path / "clean.zarr", **flags)
    calls = {"n": 0}
    real_write_block = oisst.write_block

    def crash_after_three(*args):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("simulated crash")
        return real_write_block(*args)

    monkeypatch.setattr(oisst, "write_block", crash_after_three)
    out = tmp_path / "resumed.zarr"
    with pytest.raises(RuntimeError, match="simulated crash"):
        oisst.prepare_sst(folder, out, **flags)
    assert not out.exists() and staging_path(out).exists()
    with pytest.raises(DataError, match="does not exist"):
        open_store(out)
    monkeypatch.setattr(oisst, "write_block", real_write_block)
    summary = oisst.prepare_sst(folder, out, **flags)
    assert summary["resumed"] and summary["blocks_resumed"] >= 3
    assert summary["blocks_resumed"] + summary["blocks_written"] == clean["blocks_written"] == 11
    a, b = xr.open_zarr(tmp_path / "clean.zarr"), xr.open_zarr(out)
    for name in ("sst", "mask", "stats_mean_sst", "stats_std_sst"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    assert not staging_path(out).exists() and not (out / ".dyf-progress").exists()


def test_changed_options_discard_an_unfinished_staging_store(short_psl, tmp_path, monkeypatch):
    folder, _, _ = short_psl
    out = tmp_path / "s.zarr"
    monkeypatch.setattr(oisst, "write_block", lambda *args: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        oisst.prepare_sst(folder, out, boxes="84", **SHORT_SPLITS)
    monkeypatch.undo()
    summary = oisst.prepare_sst(folder, out, boxes="84-85", **SHORT_SPLITS)
    assert not summary["resumed"] and summary["series"] == [84, 85]
    with pytest.raises(UsageError, match="--overwrite"):
        oisst.prepare_sst(folder, out, boxes="84", **SHORT_SPLITS)
    assert oisst.prepare_sst(folder, out, boxes="84", overwrite=True, **SHORT_SPLITS)["series"] == [84]
    assert open_store(out).ds["series"].values.tolist() == [84]


def test_parse_flags_and_compress():
    assert oisst.parse_boxes("84-89,108-112") == [84, 85, 86, 87, 88, 89, 108, 109, 110, 111, 112]
    assert oisst.parse_boxes("all") is None
    for bad in ("84-", "a", "90-85", "192"):
        with pytest.raises(UsageError):
            oisst.parse_boxes(bad)
    assert oisst.parse_years("1982-2020") == (1982, 2020) and oisst.parse_years("2019") == (2019, 2019)
    assert oisst.compress_ids([84, 85, 86, 108, 110, 111]) == "84-86,108,110-111"
    assert oisst.box_coordinates(88)[1][[0, -1]].tolist() == [240.125, 254.875]


# ------------------------------------------------------------------------------------ the real command

def test_cli_writes_store_and_reports_json(dyf, short_psl, tmp_path):
    folder, _, _ = short_psl
    out = tmp_path / "cli.zarr"
    args = ["--json", "prepare", "sst", str(folder), "--out", str(out), "--boxes", "84-85",
            "--train-until", "2003-12-20", "--val", "2003-12-21:2003-12-31", "--test", "2004"]
    doc = json.loads(dyf(*args).stdout)
    assert doc["ok"] and doc["command"] == "prepare sst" and doc["series"] == [84, 85] and doc["days"] == 41
    assert open_store(out).fields == ["sst"]
    proc = dyf(*args, check=2)  # existing output without --overwrite
    assert "--overwrite" in proc.stderr and json.loads(proc.stdout)["error"]["exit_code"] == 2


@pytest.mark.parametrize("case", ["not-netcdf", "bad-boxes", "scheduler"])
def test_cli_bad_input_exit_codes(dyf, tmp_path, case):
    folder = tmp_path / "raw"
    folder.mkdir()
    extra = []
    if case == "not-netcdf":
        (folder / "sst.day.mean.2003.nc").write_text("this is not NetCDF")
    if case == "bad-boxes":
        extra = ["--boxes", "84-x"]
    if case == "scheduler":
        extra = ["--scheduler", "tcp://127.0.0.1:9"]
    expected = 2 if case in ("bad-boxes", "scheduler") else 4
    proc = dyf("prepare", "sst", str(folder), "--out", str(tmp_path / "o.zarr"), *extra, check=expected)
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    if case == "scheduler":
        import importlib.util

        wanted = "pip install distributed" if importlib.util.find_spec("distributed") is None else "cannot reach"
        assert wanted in error_lines[0]
    assert not (tmp_path / "o.zarr").exists()


def test_split_bounds_with_a_time_of_day_are_refused_not_cut_to_the_day(tmp_path, dyf):
    """OISST is daily: `--train-until 2018-06-30T12:00` used to be cut to 2018-06-30 without a word."""
    (tmp_path / "raw").mkdir()
    result = dyf("prepare", "sst", str(tmp_path / "raw"), "--out", str(tmp_path / "sst.zarr"),
                 "--train-until", "2018-06-30T12:00", "--val", "2019", "--test", "2020", check=2)
    assert "time of day" in result.stderr and "OISST is daily" in result.stderr
    assert not (tmp_path / "sst.zarr").exists()
