"""Speed of `dyf prepare netcdf` (issue 9, item 8) and pre-emption of `dyf prepare sst`.

`prepare netcdf` reads its time blocks straight from the files (`netcdf.BlockReader`, no Dask graph per
block), counts infinities and sums the moments on the reading thread, and writes chunk files with one
`mkdir` per new folder; the store is the one the Dask graph describes, value for value. `prepare sst`
stops after the current block on SIGTERM with exit 75, as `prepare netcdf` does, and resumes."""

import json
import os
import signal

import numpy as np
import pytest
import xarray as xr

from dyfcli.chunks import chunk_writer
from dyfcli.errors import Interrupted
from dyfcli.sources import netcdf, oisst
from dyfcli.sources.netcdf import (BlockReader, expand_paths, field_name, open_source, prepare_netcdf,
                                   regularize_time, to_series)
from dyfcli.store import open_store, staging_path
from oisst_files import days, write_psl
from test_prepare_netcdf_speed import chunk_files, field_template

# ------------------------------------------------------------------------------------ reading blocks

LAT_NORTH_FIRST = np.linspace(20.0, -20.0, 4)
LON = np.linspace(0.0, 25.0, 6)


def _write(path, name, times, values, dims=("time", "lat", "lon"), time_attrs=None, encoding=None, **coords):
    ds = xr.Dataset({name: (dims, values, {"units": "K"})},
                    coords={"time": ("time", times, time_attrs or {}),
                            "lat": ("lat", LAT_NORTH_FIRST, {"units": "degrees_north"}),
                            "lon": ("lon", LON, {"units": "degrees_east"}), **coords})
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(path, encoding={name: encoding} if encoding else None)


def levels_in_folders(root) -> tuple[list[str], list[str], dict]:
    """`t2m/` and `z/` folders of three 'yearly' files of 10 six-hourly steps each, z on two levels; latitude
    north to south (flipped), files of 10 steps so that 8-step blocks straddle them."""
    rng = np.random.default_rng(3)
    for year in range(3):
        times = np.datetime64("2000-01-01T00") + (10 * year + np.arange(10)) * np.timedelta64(6, "h")
        _write(root / "t2m" / f"t2m_{2000 + year}.nc", "t2m", times,
               rng.normal(280, 5, (10, 4, 6)).astype(np.float32))
        _write(root / "z" / f"z_{2000 + year}.nc", "z", times, rng.normal(5e4, 1e3, (10, 2, 4, 6)).astype(np.float32),
               dims=("time", "level", "lat", "lon"), level=("level", [500, 850], {"units": "hPa"}))
    return [str(root / "t2m" / "*.nc"), str(root / "z" / "*.nc")], ["t2m", "z@850"], {}


def tiles_with_land(root) -> tuple[list[str], list[str], dict]:
    """One file cut into six tiles of 2 x 2 points, one of them all land (NaN): five series."""
    values = np.random.default_rng(4).normal(size=(30, 4, 6)).astype(np.float32)
    values[:, 2:, :2] = np.nan  # the south-west tile (the file runs north to south)
    _write(root / "f.nc", "sst", np.datetime64("2000-01-01") + np.arange(30) * np.timedelta64(1, "D"), values)
    return [str(root / "f.nc")], ["sst"], {"tile": 2}


def all_leap_packed(root) -> tuple[list[str], list[str], dict]:
    """Daily all_leap files given newest first, packed int16: converting to Gregorian dates drops 29
    February 2001, so the store's steps skip one step of the files."""
    units = {"units": "days since 2001-01-01", "calendar": "all_leap"}
    packed = {"dtype": "int16", "scale_factor": 0.01, "add_offset": 280.0, "_FillValue": -32767}
    rng = np.random.default_rng(5)
    paths = []
    for part, first in enumerate((40.0, 60.0)):  # 2001-02-10 .. 2001-03-21 (all_leap)
        values = rng.normal(280, 3, (20, 4, 6)).astype(np.float32)
        values[3, 1, 1] = np.nan
        path = root / f"t_{part}.nc"
        _write(path, "t", first + np.arange(20.0), values, time_attrs=units, encoding=packed)
        paths.append(str(path))
    return paths[::-1], ["t"], {}


def _prepared(paths: list[str], variables: list[str], tile: int | None = None):
    """The store Dataset (Dask arrays, as `prepare_netcdf` builds it) and the reader of its blocks."""
    source = open_source(expand_paths(paths), variables, {})
    regularize_time(source)
    dataset, _ = to_series(source, tile)
    fields = [field_name(v) for v in variables]
    return dataset, fields, BlockReader.of(source, fields), source


@pytest.mark.parametrize("archive", [levels_in_folders, tiles_with_land, all_leap_packed])
def test_block_reader_reads_what_the_dask_graph_computes(archive, tmp_path, monkeypatch):
    """Every block read from the files equals the store Dataset's Dask computation of it: per-variable
    folders and levels, blocks straddling files, a flipped y axis, tiles, packed values and a calendar
    conversion that drops a step."""
    monkeypatch.setattr(netcdf, "BLOCK_BYTES", 1)  # blocks of one store chunk (8 steps)
    paths, variables, flags = archive(tmp_path)
    dataset, fields, reader, source = _prepared(paths, variables, **flags)
    if archive is all_leap_packed:
        assert np.diff(source.source_steps).max() == 2  # 29 February 2001 dropped
        assert any("converted the all_leap calendar" in note for note in source.notes)
    if archive is tiles_with_land:
        assert dataset.sizes["series"] == 5
    assert source.flip_y
    bounds = np.cumsum((0, *dataset.chunks["time"]))
    assert len(bounds) > 3
    for start, stop in zip(bounds[:-1], bounds[1:]):
        block = reader.read(int(start), int(stop))
        for name, values in zip(fields, block):
            expected = dataset[name].isel(time=slice(start, stop)).values
            assert values.dtype == np.float32 and values.shape == expected.shape
            np.testing.assert_array_equal(values, expected)


def test_blocks_are_read_without_a_dask_computation(tmp_path, monkeypatch):
    """Writing 19 blocks computes no Dask graph: building, optimising and scheduling one per block cost
    more than reading the files (benchmarks/prepare_netcdf.py). The store holds the files' values."""
    import dask.threaded

    from test_prepare_netcdf_scale import six_hourly_years

    pattern, _, values = six_hourly_years(tmp_path, years=(2019, 2020))
    monkeypatch.setattr(netcdf, "BLOCK_BYTES", 8 * 8 * 4 * 160)  # 160 steps a block: 19 blocks
    computed = {"writing": False, "graphs": 0}
    real_get, real_write_blocks = dask.threaded.get, netcdf._write_blocks

    def counting_get(*args, **kwargs):
        computed["graphs"] += computed["writing"]
        return real_get(*args, **kwargs)

    def write_blocks(*args, **kwargs):
        computed["writing"] = True
        try:
            return real_write_blocks(*args, **kwargs)
        finally:
            computed["writing"] = False

    monkeypatch.setattr(dask.threaded, "get", counting_get)
    monkeypatch.setattr(netcdf, "_write_blocks", write_blocks)
    summary = prepare_netcdf([pattern], ["t2m"], tmp_path / "d.zarr", train_until="2019",
                             val="2020-01:2020-06", test="2020-07:2020-12")
    assert summary["blocks_written"] == 19 and computed["graphs"] == 0
    np.testing.assert_array_equal(open_store(tmp_path / "d.zarr").ds["t2m"].values[0], values)


def test_moments_are_those_of_the_plain_expressions():
    """`_array_moments` (one float64 copy, squared in place, NaN zeroed only when present) gives the sums of
    the straightforward expressions bit for bit, with and without missing values."""
    rng = np.random.default_rng(6)
    for missing in (False, True):
        values = rng.normal(280, 30, (2, 37, 5, 7)).astype(np.float32)
        if missing:
            values[0, 3:9, 1, 2] = np.nan
        wide = values.astype(np.float64)
        nan = np.isnan(wide)
        wide[nan] = 0.0
        plain = ((~nan).sum(axis=1), wide.sum(axis=1), np.square(wide).sum(axis=1))
        for ours, expected in zip(netcdf._array_moments(values), plain):
            assert ours.dtype == expected.dtype
            np.testing.assert_array_equal(ours, expected)


def test_read_block_sums_only_training_steps_and_counts_infinities(tmp_path):
    """The checks and sums that run on the reading thread: moments of the steps inside `train` only (none
    for a block outside it), and the count of ±inf per series and step."""
    paths, variables, _ = levels_in_folders(tmp_path)
    dataset, fields, reader, _ = _prepared(paths, variables)
    block = netcdf.read_block(reader, 8, 16, None, (8, 11))
    for name, values, moments in zip(fields, block.values, (block.moments[f] for f in fields)):
        count, total, _ = netcdf._array_moments(values[:, :3])
        np.testing.assert_array_equal(moments[0], count)
        np.testing.assert_array_equal(moments[1], total)
    assert all(infinite.shape == (1, 8) and not infinite.any() for infinite in block.infinite)
    assert netcdf.read_block(reader, 16, 24, None, (16, 16)).moments is None


# ------------------------------------------------------------------------------------- writing chunks

def test_chunk_writer_makes_each_folder_once(tmp_path, monkeypatch):
    """Two `mkdir` per chunk of a fresh store (zarr nests `c/<series>/<chunk>/0/0`) plus one per series
    folder, none repeated; rewriting the chunks (a resumed job) finds the folders there; the files are
    zarr's bytes either way."""
    import os

    ours = field_template(tmp_path / "ours.zarr")  # 2 series, 21 steps in chunks of 4: 6 chunks each
    theirs = field_template(tmp_path / "theirs.zarr")
    values = np.random.default_rng(7).normal(size=(2, 21, 3, 5)).astype(np.float32)
    made, real_mkdir = [], os.mkdir
    monkeypatch.setattr(os, "mkdir", lambda path, *args: made.append(path) or real_mkdir(path, *args))
    writer = chunk_writer(ours)
    writer[:, 0:12] = values[:, :12]
    writer[:, 12:21] = values[:, 12:]
    assert len(made) == len(set(made)) == 1 + 2 + 2 * 6 * 2  # c, c/<series>, c/<series>/<chunk>{,/0}
    monkeypatch.undo()
    chunk_writer(ours)[:, 0:21] = values  # again, into the folders there
    theirs[:, 0:21] = values
    assert chunk_files(tmp_path / "ours.zarr") == chunk_files(tmp_path / "theirs.zarr")


# --------------------------------------------------------------------------------- prepare sst signals

SST_SPLITS = ["--train-until", "2003-12-20", "--val", "2003-12-21:2003-12-31", "--test", "2004"]


@pytest.fixture(scope="module")
def short_psl(tmp_path_factory):
    """41 days (two blocks of 32 days) in two yearly PSL files, boxes 84 and 85."""
    folder = tmp_path_factory.mktemp("psl")
    write_psl(folder, days("2003-12-01", "2004-01-10"))
    return folder


@pytest.mark.parametrize("point, workers, stopped", [
    ("sst.block_written", "2", "stopped by SIGTERM after writing 1 of 2 time blocks"),
    ("sst.statistics_written", "1", "stopped by SIGTERM after writing 1 of 2 boxes' statistics")])
def test_sigterm_stops_prepare_sst_with_exit_75_and_resumes(point, workers, stopped, short_psl, dyf, tmp_path):
    """A pre-empted `prepare sst` (SIGTERM after a block, or after a box's statistics) exits 75, not 143,
    keeping what it wrote; the same command finishes the job, giving the store of an uninterrupted run."""
    out = tmp_path / "s.zarr"
    command = ["--json", "prepare", "sst", str(short_psl), "--out", str(out), "--boxes", "84-85",
               "--workers", workers, *SST_SPLITS]
    proc = dyf(*command, env={"DYF_FAULT_SIGTERM_AT": point}, check=75)
    error = json.loads(proc.stdout)["error"]
    assert error["kind"] == "interrupted" and "Traceback" not in proc.stderr
    assert stopped in error["message"] and "re-run the same `dyf prepare sst` command" in error["message"]
    assert not out.exists() and staging_path(out).exists()
    summary = json.loads(dyf(*command).stdout)
    assert summary["resumed"]
    resumed_and_written = (1, 1) if point == "sst.block_written" else (2, 0)  # 2 blocks of 32 days
    assert (summary["blocks_resumed"], summary["blocks_written"]) == resumed_and_written
    clean = oisst.prepare_sst(short_psl, tmp_path / "clean.zarr", boxes="84-85", train_until="2003-12-20",
                              val="2003-12-21:2003-12-31", test="2004", workers=1)
    assert clean["blocks_written"] == 2
    a, b = xr.open_zarr(tmp_path / "clean.zarr"), xr.open_zarr(out)
    for name in ("sst", "mask", "stats_mean_sst", "stats_std_sst"):
        np.testing.assert_array_equal(a[name].values, b[name].values)


def test_reading_processes_leave_stop_signals_to_dyf():
    """A batch system signals every process of the job: the readers ignore SIGTERM/SIGUSR1/SIGINT, so dyf
    stops after its block instead of finding its pool broken."""
    with oisst.local_processes(2) as pool:
        handlers = [pool.submit(signal.getsignal, number).result()
                    for number in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)]
    assert handlers == [signal.SIG_IGN] * 3


def test_sigterm_stops_prepare_sst_on_a_cluster_and_resumes(short_psl, tmp_path, monkeypatch):
    """With `--scheduler` too: the tasks not started are cancelled after the one that ended, exit 75 (an
    Interrupted), and the same call writes the rest."""
    distributed = pytest.importorskip("distributed")
    real_write_block, signalled = oisst.write_block, []

    def write_then_signal(*args):  # runs on the in-process cluster's worker thread
        written = real_write_block(*args)
        if not signalled:  # once: a later signal, after prepare_sst returned, would end pytest
            signalled.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return written

    flags = dict(boxes="84-85", train_until="2003-12-20", val="2003-12-21:2003-12-31", test="2004",
                 time_block=8)  # 6 blocks
    out = tmp_path / "c.zarr"
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        monkeypatch.setattr(oisst, "write_block", write_then_signal)
        with pytest.raises(Interrupted, match="stopped by SIGTERM after writing 1 of 6 time blocks"):
            oisst.prepare_sst(short_psl, out, scheduler=cluster.scheduler_address, **flags)
        monkeypatch.setattr(oisst, "write_block", real_write_block)
        summary = oisst.prepare_sst(short_psl, out, scheduler=cluster.scheduler_address, **flags)
    assert summary["resumed"] and 1 <= summary["blocks_resumed"] < 6
    assert summary["blocks_resumed"] + summary["blocks_written"] == 6
    clean = oisst.prepare_sst(short_psl, tmp_path / "clean.zarr", workers=1, **flags)
    a, b = xr.open_zarr(tmp_path / "clean.zarr"), xr.open_zarr(out)
    for name in ("sst", "mask", "stats_mean_sst", "stats_std_sst"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
