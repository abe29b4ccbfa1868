"""`dyf prepare netcdf` at speed (issue 9, item 8): field chunks written as files without zarr's codec
pipeline (`chunks.chunk_writer`), blocks checked and summed as numpy arrays, the next block read on a helper
thread; and SIGTERM stops at a block boundary with exit 75, resumable."""

import json
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from dyfcli.chunks import ChunkFileWriter, chunk_writer, verify_chunks
from dyfcli.errors import DataError
from dyfcli.sources import netcdf
from dyfcli.sources.netcdf import prepare_netcdf
from dyfcli.store import encoding_for, open_store
from test_prepare_netcdf_scale import ONE_THREAD, six_hourly_years


def field_template(path, steps=21, time_chunk=4, grid=(3, 5), series=2, **encoding):
    """An empty store with one field `f` (series, time, y, x) in the chunks a data store has."""
    import dask.array

    ds = xr.Dataset({"f": (("series", "time", "y", "x"),
                           dask.array.zeros((series, steps, *grid), dtype=np.float32, chunks=-1))})
    entries = encoding_for(ds, time_chunk)
    entries["f"].update(encoding)
    ds.to_zarr(path, mode="w", compute=False, encoding=entries, consolidated=False)
    return zarr.open_array(store=str(path), path="f", mode="r+")


def chunk_files(path) -> dict:
    root = path / "f"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "zarr.json"}


def test_chunk_files_are_the_bytes_zarr_writes(tmp_path):
    """Same files, byte for byte, as zarr's own writes: raw little-endian values, CRC-32C, and the last
    (partial) chunk padded with NaN; zarr reads them back and their checksums verify."""
    values = np.random.default_rng(3).normal(size=(2, 21, 3, 5)).astype(np.float32)
    values[1, 7, 2, 4] = np.nan
    ours, theirs = field_template(tmp_path / "ours.zarr"), field_template(tmp_path / "zarr.zarr")
    writer = chunk_writer(ours)
    assert isinstance(writer, ChunkFileWriter)
    for start, stop in ((0, 8), (8, 16), (16, 21)):  # blocks of whole chunks, then the end of the array
        writer[:, start:stop] = values[:, start:stop]
        theirs[:, start:stop] = values[:, start:stop]
    assert chunk_files(tmp_path / "ours.zarr") == chunk_files(tmp_path / "zarr.zarr")
    assert len(chunk_files(tmp_path / "ours.zarr")) == 2 * 6  # 2 series x ceil(21 / 4) chunks
    np.testing.assert_array_equal(zarr.open_array(store=str(tmp_path / "ours.zarr"), path="f")[:], values)
    assert verify_chunks(tmp_path / "ours.zarr", ["f"])["chunks"] == 12


def test_a_changed_byte_fails_the_checksum(tmp_path):
    array = field_template(tmp_path / "s.zarr")
    chunk_writer(array)[:, 0:21] = np.ones((2, 21, 3, 5), dtype=np.float32)
    path = tmp_path / "s.zarr" / "f" / array.metadata.encode_chunk_key((1, 2, 0, 0))
    raw = bytearray(path.read_bytes())
    raw[5] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"1 chunk\(s\): f/c/1/2/0/0"):
        verify_chunks(tmp_path / "s.zarr", ["f"])


def test_other_layouts_are_left_to_zarr(tmp_path):
    """Compressed or sharded arrays (not what prepare writes) keep zarr's own writes."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    compressed = field_template(tmp_path / "c.zarr", compressors=[ZstdCodec(level=0), Crc32cCodec()])
    assert chunk_writer(compressed) is compressed
    sharded = field_template(tmp_path / "s.zarr", shards=(1, 8, 3, 5))
    assert chunk_writer(sharded) is sharded


def test_writes_start_on_a_chunk_boundary(tmp_path):
    writer = chunk_writer(field_template(tmp_path / "s.zarr"))
    with pytest.raises(AssertionError):
        writer[:, 2:8] = np.zeros((2, 6, 3, 5), dtype=np.float32)


def test_prepare_writes_fields_without_zarr_and_exactly(tmp_path, monkeypatch):
    """Every field chunk goes through the chunk-file writer (zarr's array writes are never called for
    them), in many blocks, and the store holds the files' values and the training statistics."""
    pattern, _, values = six_hourly_years(tmp_path, years=(2019, 2020))
    monkeypatch.setattr(netcdf, "BLOCK_BYTES", 8 * 8 * 4 * 160)  # 160 steps a block: 19 blocks
    written = []
    real_write = ChunkFileWriter._write
    monkeypatch.setattr(ChunkFileWriter, "_write",
                        lambda self, *args: written.append(args[:2]) or real_write(self, *args))

    real_setitem = zarr.Array.__setitem__

    def refuse_fields(array, key, value):
        assert array.basename != "t2m", "a field was written through zarr"
        real_setitem(array, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", refuse_fields)
    summary = prepare_netcdf([pattern], ["t2m"], tmp_path / "d.zarr", train_until="2019",
                             val="2020-01:2020-06", test="2020-07:2020-12")
    monkeypatch.undo()
    assert summary["blocks_written"] == 19 and len(written) == len(set(written)) == -(-len(values) // 8)
    ds = open_store(tmp_path / "d.zarr").ds
    np.testing.assert_array_equal(ds["t2m"].values[0], values)
    train = values[:1460].astype(np.float64)
    with warnings.catch_warnings():  # the land points have no value: NaN statistics
        warnings.simplefilter("ignore", RuntimeWarning)
        np.testing.assert_allclose(ds["stats_mean_t2m"].values[0], np.nanmean(train, axis=0), rtol=1e-6)
        np.testing.assert_allclose(ds["stats_std_t2m"].values[0], np.nanstd(train, axis=0), rtol=1e-5)
    assert verify_chunks(tmp_path / "d.zarr", ["t2m"])["ok"]


def test_infinity_in_a_late_block_names_its_file(tmp_path, monkeypatch):
    """An error in a block read ahead surfaces with that block, naming the file and the time."""
    pattern, times, _ = six_hourly_years(tmp_path, years=(2019, 2020))
    path = tmp_path / "t2m" / "t2m_2020.nc"
    ds = xr.load_dataset(path)
    ds["t2m"][1000, 3, 4] = np.inf
    path.unlink()
    ds.to_netcdf(path)
    monkeypatch.setattr(netcdf, "BLOCK_BYTES", 8 * 8 * 4 * 160)  # the infinity is in block 15 of 19
    when = np.datetime_as_string(times[1460 + 1000], unit="s")
    with pytest.raises(DataError, match=rf"'t2m' holds 1 infinite value .* in \S*t2m_2020.nc, the first at "
                                        rf"time {when}, series 0, y 4, x 4"):  # y counts from the south
        prepare_netcdf([pattern], ["t2m"], tmp_path / "d.zarr", train_until="2019", val="2020-01:2020-06",
                       test="2020-07:2020-12")


def test_sigterm_stops_after_a_block_with_exit_75_and_resumes(dyf, tmp_path):
    """A pre-empted job (SIGTERM at a block boundary) exits 75, not 143, leaving its blocks; the same
    command writes the rest and gives the same store as an uninterrupted run."""
    pattern, _, values = six_hourly_years(tmp_path, years=(2019, 2020), grid=(64, 64))  # 3 blocks of 16 MB
    out = tmp_path / "r.zarr"
    command = ["--json", "prepare", "netcdf", pattern, "--var", "t2m", "--out", str(out),
               "--train-until", "2019", "--val", "2020-01:2020-06", "--test", "2020-07:2020-12"]
    stopped = dyf(*command, env={**ONE_THREAD, "DYF_FAULT_SIGTERM_AT": "netcdf.block_written"}, check=75)
    doc = json.loads(stopped.stdout)
    assert doc["error"]["kind"] == "interrupted" and "Traceback" not in stopped.stderr
    assert "stopped by SIGTERM after writing 1 of" in doc["error"]["message"]
    assert "re-run the same `dyf prepare netcdf` command" in doc["error"]["message"]
    assert not out.exists()
    summary = json.loads(dyf(*command, env=ONE_THREAD).stdout)
    assert summary["resumed"] and summary["blocks_resumed"] == 1 and summary["blocks_written"] == 2
    np.testing.assert_array_equal(open_store(out).ds["t2m"].values[0], values)
    fresh = tmp_path / "fresh.zarr"
    dyf(*[str(fresh) if part == str(out) else part for part in command], env=ONE_THREAD)
    for name in ("stats_mean_t2m", "stats_std_t2m"):
        np.testing.assert_array_equal(open_store(out).ds[name].values, open_store(fresh).ds[name].values)
