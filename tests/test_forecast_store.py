"""The forecast store schema (docs/design.md §5): created empty, written block by block, completed, read back."""

import json

import numpy as np
import pytest
import xarray as xr

from dyfcli import forecast_store
from dyfcli.attrs import decode
from dyfcli.errors import DataError
from dyfcli.store import open_store
from storefactory import make_store


def _layout(store, members=3, leads=(1.0, 2.0, 3.0), series=(0, 1), init_indices=(16, 18)):
    ds = store.ds
    init_time = ds["time"].values[list(init_indices)]
    lead = np.asarray(leads)
    lead_time = (lead * np.timedelta64(86400, "s")).astype("timedelta64[ns]")
    return forecast_store.ForecastLayout(
        fields=store.fields, field_attrs={name: dict(ds[name].attrs) for name in store.fields},
        series=ds["series"].values[list(series)], init_time=init_time, members=members, lead=lead,
        lead_time=lead_time, valid_time=init_time[:, None] + lead_time[None, :],
        mask=ds["mask"].isel(series=list(series)).load(), identity={"seed": 7, "horizon": 3},
        attrs={"dyf_truth": str(store.path), "dyf_seed": 7})


@pytest.fixture(scope="module")
def dated_store(tmp_path_factory):
    return open_store(make_store(tmp_path_factory.mktemp("fs") / "s.zarr", dated=True, land=True))


def test_created_schema_is_empty_and_readable(dated_store, tmp_path):
    layout = _layout(dated_store)
    forecast_store.create(tmp_path / "f.zarr", layout)
    ds = xr.open_zarr(tmp_path / "f.zarr")
    assert ds["u"].dims == ("series", "init", "member", "lead", "y", "x")
    assert ds["u"].dtype == np.float32 and ds["u"].shape == (2, 2, 3, 3, 8, 12)
    assert ds["u"].encoding["chunks"] == (1, 1, 3, 3, 8, 12)  # one chunk per (series, init) block
    assert np.isnan(ds["u"].values).all()
    assert not ds["done"].values.any()
    np.testing.assert_array_equal(ds["mask"].values, dated_store.ds["mask"].values[:2])
    assert ds["valid_time"].dims == ("init", "lead")
    assert ds["valid_time"].values[1, 2] == np.datetime64("2000-01-19") + np.timedelta64(3, "D")
    assert ds["lead_time"].values[0] == np.timedelta64(1, "D")
    attrs = decode(ds.attrs)  # bools and nested values are JSON strings on disk (dyfcli.attrs)
    assert attrs["dyf_format"] == "dyf-forecast" and attrs["dyf_complete"] is False
    assert attrs["dyf_identity"] == {"seed": 7, "horizon": 3}
    assert ds["u"].attrs["units"] == "1"


def test_blocks_then_complete_then_open(dated_store, tmp_path):
    path = tmp_path / "f.zarr"
    forecast_store.create(path, _layout(dated_store))
    writer = forecast_store.BlockWriter(path)
    rng = np.random.default_rng(0)
    blocks = {(s, i): rng.normal(size=(3, 3, 2, 8, 12)).astype(np.float32) for s in range(2) for i in range(2)}
    for (s, i), block in list(blocks.items())[:3]:
        writer.write(s, i, block)
    assert writer.done().sum() == 3
    with pytest.raises(DataError, match="incomplete.*re-run the same"):
        forecast_store.open_forecast(path)
    with pytest.raises(DataError, match="1 of 4 blocks"):
        forecast_store.mark_complete(path)
    summary = forecast_store.describe(path)
    assert summary["complete"] is False and summary["blocks"] == {"done": 3, "total": 4}
    writer.write(1, 1, blocks[1, 1])
    forecast_store.mark_complete(path, {"dyf_extra": 1})
    opened = forecast_store.open_forecast(path)
    assert opened.fields == ["u", "v"] and opened.members == 3 and opened.truth == dated_store.path
    for (s, i), block in blocks.items():
        np.testing.assert_array_equal(opened.ds["v"].values[s, i], block[:, :, 1])
    assert opened.ds.attrs["dyf_complete"] is True and opened.ds.attrs["dyf_extra"] == 1


def test_block_writer_writes_the_chunk_files_zarr_writes(dated_store, tmp_path):
    """Blocks go straight to their chunk files (chunks.whole_chunk_files), the same bytes as zarr's writes."""
    import zarr

    block = np.random.default_rng(3).normal(size=(3, 3, 2, 8, 12)).astype(np.float32)
    for name in ("direct", "zarr"):
        forecast_store.create(tmp_path / f"{name}.zarr", _layout(dated_store))
    writer = forecast_store.BlockWriter(tmp_path / "direct.zarr")
    writer.write(1, 0, block)
    assert all(files is not None for _, files in writer._targets)  # the direct path was taken
    group = zarr.open_group(str(tmp_path / "zarr.zarr"), mode="r+")
    for channel, name in enumerate(writer.fields):
        group[name][1, 0] = block[:, :, channel]
    group["done"][1, 0] = True
    for key in ("u/c/1/0/0/0/0/0", "v/c/1/0/0/0/0/0", "done/c/1/0"):
        assert (tmp_path / "direct.zarr" / key).read_bytes() == (tmp_path / "zarr.zarr" / key).read_bytes()
    assert forecast_store.BlockWriter(tmp_path / "direct.zarr").done().tolist() == [[False, False], [True, False]]


def test_open_forecast_refuses_other_things(dated_store, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        forecast_store.open_forecast(tmp_path / "none.zarr")
    with pytest.raises(DataError, match="not a dyf forecast store"):
        forecast_store.open_forecast(dated_store.path)
    assert forecast_store.read_attrs(dated_store.path) is None


def test_inspect_describes_forecast(dyf, dated_store, tmp_path):
    path = tmp_path / "f.zarr"
    forecast_store.create(path, _layout(dated_store, members=2, leads=(1.0,), series=(0,), init_indices=(20,)))
    doc = json.loads(dyf("--json", "inspect", str(path)).stdout)
    assert doc["kind"] == "forecast" and doc["complete"] is False
    assert doc["blocks"] == {"done": 0, "total": 1}
    assert doc["sizes"]["member"] == 2 and doc["seed"] == 7


class _RecordingWriter:
    """A BlockWriter stand-in: records blocks in order, fails on the block numbered `fail_at`."""

    def __init__(self, fail_at=None, delay=0.0):
        self.written, self.fail_at, self.delay = [], fail_at, delay

    def write(self, series_position, init_position, block):
        import time

        time.sleep(self.delay)
        if init_position == self.fail_at:
            raise OSError(f"disk full at block {init_position}")
        self.written.append((series_position, init_position, float(block.sum())))


def test_background_writer_writes_every_block_in_order_before_leaving():
    recorder = _RecordingWriter(delay=0.01)
    with forecast_store.BackgroundWriter(recorder) as writer:
        for i in range(6):
            writer.write(0, i, np.full(3, float(i)))
    assert recorder.written == [(0, i, 3.0 * i) for i in range(6)]


def test_background_writer_raises_the_first_error_and_writes_nothing_after_it():
    recorder = _RecordingWriter(fail_at=2)
    with pytest.raises(OSError, match="disk full at block 2"):
        with forecast_store.BackgroundWriter(recorder) as writer:
            for i in range(5):
                writer.write(0, i, np.zeros(1))
    assert [w[1] for w in recorder.written] == [0, 1]


def test_background_writer_flushes_when_the_loop_stops_with_an_exception():
    recorder = _RecordingWriter(delay=0.02)
    with pytest.raises(KeyError):
        with forecast_store.BackgroundWriter(recorder) as writer:
            for i in range(3):
                writer.write(1, i, np.zeros(1))
            raise KeyError("stopped")
    assert [w[1] for w in recorder.written] == [0, 1, 2]  # blocks handed over before the stop are on disk
