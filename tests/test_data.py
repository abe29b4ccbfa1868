"""Training windows and normalisation (dyfcli/data.py)."""

import pickle

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from dyfcli.data import ChunkFileReader, Normalizer, WindowDataset, chunk_reader, window_starts
from dyfcli.errors import DataError
from dyfcli.splits import time_splits
from dyfcli.store import open_store, provenance_attrs, write_store
from storefactory import make_store


def raw_window(store_path, series, start, length):
    """The physical values of a window, read through xarray: the oracle for the fast reader."""
    ds = xr.open_zarr(store_path)
    return np.stack([ds[name].isel(series=series, time=slice(start, start + length)).values
                     for name in ds.attrs["dyf_fields"]], axis=1)


def dayofyear_store(path, steps=370):
    """A dated store from 2000-01-01 with pixel-dayofyear statistics: mean = day + 100 * series, std = 2 + field."""
    rng = np.random.default_rng(0)
    times = np.datetime64("2000-01-01") + np.arange(steps).astype("timedelta64[D]")
    ds = xr.Dataset(coords={"series": [0, 1], "time": times, "y": np.arange(4), "x": np.arange(5)})
    mask = np.ones((2, 4, 5), dtype=bool)
    mask[:, 0, 0] = False
    day = np.arange(1, 367, dtype=np.float32)[:, None, None, None]
    series = np.arange(2, dtype=np.float32)[None, :, None, None]
    for f_index, name in enumerate(("u", "v")):
        values = rng.normal(200, 50, size=(2, steps, 4, 5)).astype(np.float32)
        values[:, :, ~mask[0]] = np.nan
        ds[name] = (("series", "time", "y", "x"), values)
        mean = np.broadcast_to(day + 100 * series, (366, 2, 4, 5)).astype(np.float32)
        ds[f"stats_mean_{name}"] = (("dayofyear", "series", "y", "x"), mean)
        ds[f"stats_std_{name}"] = (("dayofyear", "series", "y", "x"), np.full_like(mean, 2.0 + f_index))
    ds["mask"] = (("series", "y", "x"), mask)
    ds.attrs.update(provenance_attrs("test", {}))
    ds.attrs.update({"dyf_fields": ["u", "v"], "dyf_normalization": "pixel-dayofyear", "dyf_time_step": "1D",
                     "dyf_splits": time_splits("2000-10", "2000-11", "2000-12:")})
    return write_store(ds, path, time_chunk=64)


@pytest.fixture(scope="module")
def doy_path(tmp_path_factory):
    return dayofyear_store(tmp_path_factory.mktemp("doy") / "doy.zarr")


# ----------------------------------------------------------------------------------------------- windows

def test_window_starts_count_formula_example():
    windows = window_starts([(0, 0, 10), (1, 3, 7), (2, 5, 6)], length=3, stride=2)
    assert windows.tolist() == [[0, 0], [0, 2], [0, 4], [0, 6], [1, 3]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 30), st.integers(0, 30)), max_size=5),
       st.integers(1, 8), st.integers(1, 4))
def test_windows_stay_inside_their_range(raw_ranges, length, stride):
    ranges = [(s, min(a, b), max(a, b)) for s, a, b in raw_ranges]
    windows = window_starts(ranges, length, stride)
    expected = sum(max(0, (stop - start - length) // stride + 1) for _, start, stop in ranges)
    assert len(windows) == expected
    for series, first in windows:
        assert any(s == series and start <= first and first + length <= stop for s, start, stop in ranges)


def test_dated_windows_respect_split_and_series_boundaries(tmp_path):
    path = make_store(tmp_path / "s.zarr", dated=True, series=3, steps=30)
    store = open_store(path)
    for split in ("train", "val", "test"):
        ranges = store.split_ranges(split)
        dataset = WindowDataset(path, split, length=4)
        assert len(dataset) == sum(stop - start - 3 for _, start, stop in ranges)
        for series, start, stop in ranges:
            starts = dataset.windows[dataset.windows[:, 0] == series, 1]
            assert starts.min() == start and starts.max() == stop - 4  # first and last window
        last = dataset[len(dataset) - 1]
        assert (last["series"], last["start"]) == tuple(dataset.windows[-1])


def test_series_split_windows_use_only_their_series(tmp_path):
    path = make_store(tmp_path / "s.zarr", series=8, steps=10)
    dataset = WindowDataset(path, "val", length=10, stride=3)
    assert dataset.windows.tolist() == [[4, 0], [5, 0]]  # exactly one window per series of 10 steps
    item = dataset[1]
    assert item["dynamics"].shape == (10, 2, 8, 12) and item["dynamics"].dtype == torch.float32
    assert item["series"] == 5 and item["start"] == 0


def test_split_too_short_names_split_and_length(tmp_path):
    path = make_store(tmp_path / "s.zarr", dated=True, steps=12)  # 4 steps per split
    with pytest.raises(DataError, match=r"'val' split .* no window of 5 .* has 4"):
        WindowDataset(path, "val", length=5)


def test_item_is_normalised_window_with_nan_filled(tmp_path):
    path = make_store(tmp_path / "s.zarr", series=4, steps=12, land=True, normalization="pixel")
    dataset = WindowDataset(path, "train", length=3)
    index = 7
    series, start = dataset.windows[index]
    item = dataset[index]
    raw = raw_window(path, series, start, 3)
    ds = xr.open_zarr(path)
    mean = np.stack([ds[f"stats_mean_{n}"].values[series] for n in ("u", "v")])
    std = np.stack([ds[f"stats_std_{n}"].values[series] for n in ("u", "v")])
    expected = np.nan_to_num((raw - mean) / std, nan=0.0)
    np.testing.assert_allclose(item["dynamics"].numpy(), expected, rtol=1e-6, atol=1e-6)
    land = ~ds["mask"].values[series]
    assert land.any() and (item["dynamics"].numpy()[:, :, land] == 0).all()
    assert not torch.isnan(item["dynamics"]).any()


def test_condition_attached_in_sorted_order(tmp_path):
    path = make_store(tmp_path / "c.zarr", cond=("walls", "obstacle"))
    dataset = WindowDataset(path, "train", length=2)
    item = dataset[5]
    ds = xr.open_zarr(path)
    expected = np.stack([ds["cond_obstacle"].values[item["series"]], ds["cond_walls"].values[item["series"]]])
    assert dataset.cond_names == ["cond_obstacle", "cond_walls"]
    np.testing.assert_array_equal(item["condition"].numpy(), expected)
    plain = WindowDataset(make_store(tmp_path / "p.zarr"), "train", length=2)
    assert plain[0]["condition"].shape == (0, 8, 12)


def test_pickles_without_open_handles_and_reads_the_same(tmp_path):
    dataset = WindowDataset(make_store(tmp_path / "s.zarr"), "train", length=4)
    before = dataset[3]
    assert dataset._arrays is not None
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._arrays is None
    torch.testing.assert_close(clone[3]["dynamics"], before["dynamics"])


def test_dataloader_with_two_workers(tmp_path):
    dataset = WindowDataset(make_store(tmp_path / "s.zarr", series=4, steps=12), "train", length=4)
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=2, shuffle=False)
    batches = list(loader)
    dynamics = torch.cat([batch["dynamics"] for batch in batches])
    assert dynamics.shape == (len(dataset), 4, 2, 8, 12)
    assert torch.cat([batch["start"] for batch in batches]).tolist() == dataset.windows[:, 1].tolist()
    torch.testing.assert_close(dynamics[-1], dataset[len(dataset) - 1]["dynamics"])


# ------------------------------------------------------------------------------------------ fast reads

def test_chunk_file_reader_matches_zarr_with_missing_chunks_and_partial_last_chunk(tmp_path):
    path = make_store(tmp_path / "s.zarr", series=2, steps=10, grid=(3, 4))
    ds = xr.open_zarr(path).load()
    for variable in ds.variables.values():
        variable.encoding = {}
    ds["u"][1, 4:8] = np.nan  # whole chunks of fill value: zarr 3 skips them, dyf writes them (integrity)
    out = write_store(ds, tmp_path / "k4.zarr", time_chunk=4)
    array = zarr.open_group(str(out), mode="r")["u"]
    reader = chunk_reader(array)
    assert isinstance(reader, ChunkFileReader)
    assert (out / "u" / "c" / "1" / "1" / "0" / "0").exists()
    for cache_size in (reader.cache_size, 0):
        reader.cache_size = cache_size
        for series in (0, 1):
            for start in range(10):
                for stop in range(start + 1, 11):
                    np.testing.assert_array_equal(reader[series, start:stop], array[series, start:stop])
    assert len(reader.cache) == 6  # 2 series x 3 chunks, decoded once


# ------------------------------------------------------------------------------------------ normalisation

@pytest.mark.parametrize("mode", ["global", "pixel"])
def test_normalize_round_trip_and_matches_store_statistics(tmp_path, mode):
    path = make_store(tmp_path / "s.zarr", series=3, normalization=mode)
    store = open_store(path)
    normalizer = Normalizer.from_store(store)
    x = raw_window(path, 2, 5, 4)
    times = np.arange(5, 9)
    z = normalizer.normalize(x, 2, times)
    ds = store.ds
    mean = ds["stats_mean_v"].values if mode == "global" else ds["stats_mean_v"].values[2]
    std = ds["stats_std_v"].values if mode == "global" else ds["stats_std_v"].values[2]
    np.testing.assert_allclose(z[:, 1], (x[:, 1] - mean) / std, rtol=1e-5)
    np.testing.assert_allclose(normalizer.denormalize(z, 2, times), x, rtol=1e-5, atol=1e-5)
    tensor = normalizer.normalize(torch.from_numpy(x), 2, times)
    assert torch.is_tensor(tensor) and tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor.numpy(), z, rtol=1e-6)


def test_dayofyear_normalisation_uses_each_steps_day(doy_path):
    store = open_store(doy_path)
    normalizer = Normalizer.from_store(store)
    assert normalizer.mean.shape == (366, 2, 2, 4, 5)
    # store starts 2000-01-01 (a leap year): index 59 is 29 Feb (day 60), index 366 is 2001-01-01 (day 1)
    times = np.array([0, 59, 60, 365, 366])
    days = store.ds["time"].dt.dayofyear.values[times]
    assert days.tolist() == [1, 60, 61, 366, 1]
    x = np.ones((5, 2, 4, 5), dtype=np.float32) * 500
    z = normalizer.normalize(x, 1, times)
    expected_u = (500 - (days + 100)) / 2.0
    np.testing.assert_allclose(z[:, 0, 0, 0], expected_u)
    np.testing.assert_allclose(z[:, 1, 0, 0], (500 - (days + 100)) / 3.0)
    np.testing.assert_allclose(normalizer.denormalize(z, 1, times), x, rtol=1e-6)
    at = normalizer.normalize_at(torch.from_numpy(x), 1, days)
    np.testing.assert_allclose(at.numpy(), z, rtol=1e-6)
    np.testing.assert_allclose(normalizer.denormalize_at(at, 1, days).numpy(), x, rtol=1e-6)
    with pytest.raises(DataError, match="1..366"):
        normalizer.normalize_at(x, 1, np.array([0, 1, 2, 3, 4]))


def test_dayofyear_windows_dataset(doy_path):
    path = doy_path
    dataset = WindowDataset(path, "train", length=3)
    series, start = dataset.windows[70]
    item = dataset[70]
    raw = raw_window(path, series, start, 3)
    days = open_store(path).ds["time"].dt.dayofyear.values[start:start + 3]
    expected = (raw[:, 0] - (days[:, None, None] + 100 * series)) / 2.0
    np.testing.assert_allclose(item["dynamics"][:, 0].numpy(), np.nan_to_num(expected), rtol=1e-5, atol=1e-5)


def test_state_round_trip_through_a_weights_only_checkpoint(doy_path, tmp_path):
    normalizer = Normalizer.from_store(open_store(doy_path))
    torch.save(normalizer.get_state(), tmp_path / "n.pt")
    state = torch.load(tmp_path / "n.pt", weights_only=True)
    restored = Normalizer.from_state(state)
    assert restored.mode == "pixel-dayofyear" and restored.fields == ("u", "v")
    x = np.random.default_rng(0).normal(size=(2, 2, 4, 5)).astype(np.float32)
    days = np.array([10, 300])
    np.testing.assert_array_equal(restored.normalize_at(x, 0, days), normalizer.normalize_at(x, 0, days))
    with pytest.raises(DataError, match="normalize_at"):
        restored.normalize(x, 0, np.array([0, 1]))
    with_times = Normalizer.from_state(state, time_dayofyear=normalizer.time_dayofyear)
    np.testing.assert_array_equal(with_times.normalize(x, 0, [3, 4]), normalizer.normalize(x, 0, [3, 4]))


def test_zero_std_is_not_a_division_by_zero(tmp_path):
    normalizer = Normalizer("global", ("a",), np.zeros(1, np.float32), np.zeros(1, np.float32))
    assert np.isfinite(normalizer.normalize(np.ones((1, 1, 2, 2), np.float32), 0, [0])).all()
