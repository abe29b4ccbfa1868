"""Stores other tools open (dyfcli/attrs.py): nested attribute values as JSON strings, CF coordinates,
`xr.open_zarr(store).to_netcdf(path)` for data stores, forecast stores and scores; old stores still open."""

import json

import numpy as np
import xarray as xr
import zarr

from dyfcli import forecast_store
from dyfcli.attrs import JSON_ATTRS, decode, encode, netcdf_safe
from dyfcli.evaluate import evaluate
from dyfcli.store import open_store, store_id
from storefactory import make_store
from test_export import tiled_store


def _forecast(store, path, time_units=None):
    """A complete forecast store of truth + noise written by the real writer (no model needed)."""
    ds = store.ds
    inits, lead = [2, 4], np.arange(1.0, 4.0)
    times = ds["time"].values
    if store.is_dated:
        lead_time = (lead * np.timedelta64(1, "D")).astype("timedelta64[ns]")
    else:
        lead_time = lead * float(ds.attrs["dyf_time_step"])
    layout = forecast_store.ForecastLayout(
        fields=store.fields, field_attrs={name: dict(ds[name].attrs) for name in store.fields},
        series=ds["series"].values, init_time=times[inits], members=3, lead=lead, lead_time=lead_time,
        valid_time=times[inits][:, None] + lead_time[None, :], mask=ds["mask"].load(),
        identity={"seed": 1, "steps": [1, 2]}, attrs={"dyf_truth": str(store.path), "dyf_truth_id": store_id(store),
                                                      "dyf_network_calls": {"per_window": 3}},
        time_units=time_units)
    forecast_store.create(path, layout)
    writer = forecast_store.BlockWriter(path)
    rng = np.random.default_rng(0)
    for series in range(ds.sizes["series"]):
        for position, init in enumerate(inits):
            truth = np.stack([ds[f].values[series, init + 1:init + 4] for f in store.fields], axis=1)
            writer.write(series, position, (truth + rng.normal(size=(3, *truth.shape))).astype(np.float32))
    forecast_store.mark_complete(path, {"dyf_extra": {"nested": True}})
    return path


def _to_netcdf_and_back(path, tmp_path):
    """What a user of another tool does: open the Zarr store with xarray and save it as NetCDF."""
    target = tmp_path / (path.stem + ".nc")
    xr.open_zarr(path).to_netcdf(target)
    return xr.open_dataset(target)


# ----------------------------------------------------------------------------------------------- values

def test_encode_writes_json_only_what_netcdf_cannot_take_and_decode_undoes_it():
    attrs = {"name": "x", "count": 3, "scale": 0.5, "fields": ["u", "v"], "leads": [1, 2.5], "flag": True,
             "none": None, "empty": [], "splits": {"train": {"time": [None, "2000-01-08"]}}, "mixed": [1, "a"],
             "nested": [[1, 2]], "numpy": np.float32(1.5), "tuple": (1, 2)}
    encoded = encode(attrs)
    assert encoded[JSON_ATTRS] == ["empty", "flag", "mixed", "nested", "none", "splits"]
    assert encoded["fields"] == ["u", "v"] and encoded["count"] == 3 and encoded["tuple"] == [1, 2]
    assert encoded["flag"] == "true" and json.loads(encoded["splits"]) == attrs["splits"]
    assert all(netcdf_safe(value) for value in encoded.values())
    assert decode(encoded) == {**attrs, "numpy": 1.5, "tuple": [1, 2]}
    old = {"dyf_splits": {"train": {"series": [0]}}, "dyf_complete": True}  # written before: no marker
    assert decode(old) == old and decode(encode(decode(encode(attrs)))) == decode(encoded)


def test_single_name_marker_from_netcdf_decodes():
    """NetCDF hands a one-item list of strings back as a string."""
    assert decode({JSON_ATTRS: "flag", "flag": "false"}) == {"flag": False}


# ----------------------------------------------------------------------------------------------- stores

def test_data_stores_write_json_attrs_and_cf_time_and_go_to_netcdf(tmp_path):
    for dated in (True, False):
        path = make_store(tmp_path / f"s{dated}.zarr", dated=dated)
        raw = xr.open_zarr(path)
        assert isinstance(raw.attrs["dyf_splits"], str) and isinstance(raw.attrs["dyf_recipe"], str)
        assert raw.attrs["dyf_fields"] == ["u", "v"] and "dyf_splits" in raw.attrs[JSON_ATTRS]
        store = open_store(path)
        assert store.splits["train"] and store.ds.attrs["dyf_recipe"] == {"seed": 0}
        assert raw["time"].attrs["axis"] == "T"
        if dated:
            assert raw["time"].attrs["standard_name"] == "time"
            assert raw["time"].encoding["calendar"] == "proleptic_gregorian"
        else:
            assert raw["time"].attrs["units"] == "1"  # nothing better is known of simulated time here
        back = _to_netcdf_and_back(path, tmp_path)
        assert decode(back.attrs)["dyf_splits"] == store.splits
        np.testing.assert_array_equal(back["u"].values, store.ds["u"].values)


def test_sst_store_goes_to_netcdf(tmp_path):
    from dyfcli.sources.oisst import prepare_sst
    from oisst_files import days, write_psl

    write_psl(tmp_path / "raw", days("2003-12-01", "2004-01-10"))
    prepare_sst(tmp_path / "raw", tmp_path / "sst.zarr", boxes="84-85", train_until="2003-12-20",
                val="2003-12-21:2003-12-31", test="2004")
    raw = xr.open_zarr(tmp_path / "sst.zarr")
    assert raw.attrs["dyf_missing_days"] == "[]" and "dyf_missing_days" in raw.attrs[JSON_ATTRS]  # NetCDF: no []
    assert open_store(tmp_path / "sst.zarr").ds.attrs["dyf_missing_days"] == []
    back = _to_netcdf_and_back(tmp_path / "sst.zarr", tmp_path)
    assert back["lat"].attrs["standard_name"] == "latitude" and back["time"].attrs["standard_name"] == "time"
    np.testing.assert_array_equal(back["sst"].values, raw["sst"].values)


def test_geographic_store_and_its_forecast_carry_cf_coordinates(tmp_path):
    import cf_xarray  # noqa: F401 - the test extra; registers the `.cf` accessor

    store = open_store(tiled_store(tmp_path))
    assert store.ds["lat"].attrs["standard_name"] == "latitude" and store.ds["lon"].attrs["units"] == "degrees_east"
    path = _forecast(store, tmp_path / "f.zarr")
    raw = xr.open_zarr(path)
    assert set(raw.cf.standard_names["time"]) == {"init_time", "valid_time"}
    assert raw.cf.standard_names["latitude"] == ["lat"] and raw.cf.standard_names["longitude"] == ["lon"]
    assert raw["lat"].attrs["units"] == "degrees_north" and raw["lon"].attrs["units"] == "degrees_east"
    assert raw["lead_time"].dtype.kind == "m" and raw["lead_time"].encoding["units"] == "days"
    assert raw["init_time"].encoding["calendar"] == "proleptic_gregorian"
    assert raw.attrs["dyf_complete"] == "true" and isinstance(raw.attrs["dyf_network_calls"], str)
    opened = forecast_store.open_forecast(path)
    assert opened.ds.attrs["dyf_complete"] is True and opened.ds.attrs["dyf_extra"] == {"nested": True}
    assert forecast_store.read_attrs(path)["dyf_identity"] == {"seed": 1, "steps": [1, 2]}
    back = _to_netcdf_and_back(path, tmp_path)
    assert back["lat"].attrs["standard_name"] == "latitude" and back["init_time"].dtype.kind == "M"
    assert decode(back.attrs)["dyf_network_calls"] == {"per_window": 3}
    np.testing.assert_array_equal(back["t2m"].values, opened.ds["t2m"].values)


def test_simulated_forecast_times_take_the_store_time_units(tmp_path):
    store = open_store(make_store(tmp_path / "s.zarr"))
    path = _forecast(store, tmp_path / "f.zarr", time_units="s")
    raw = xr.open_zarr(path)
    assert raw["lead_time"].attrs["units"] == "s" and raw["init_time"].attrs["units"] == "s"
    assert raw["valid_time"].attrs["standard_name"] == "time" and raw["lead"].attrs["units"] == "1"
    back = _to_netcdf_and_back(path, tmp_path)
    np.testing.assert_allclose(back["valid_time"].values, raw["valid_time"].values)


def test_scores_go_to_netcdf_and_inspect_reads_them(dyf, tmp_path):
    store = open_store(make_store(tmp_path / "s.zarr", dated=True, land=True))
    path = _forecast(store, tmp_path / "f.zarr")
    evaluate(path, out=tmp_path / "scores.zarr")
    back = _to_netcdf_and_back(tmp_path / "scores.zarr", tmp_path)
    np.testing.assert_allclose(back["crps"].values, xr.open_zarr(tmp_path / "scores.zarr")["crps"].values)
    doc = json.loads(dyf("--json", "inspect", str(tmp_path / "scores.zarr")).stdout)
    assert doc["ok"] and JSON_ATTRS not in doc["attrs"]


# ----------------------------------------------------------------------------------------------- old stores

def _rewrite_the_old_way(path):
    """Put the attributes back as dyf wrote them before JSON encoding: nested values, bools, no marker."""
    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    group.attrs.put(decode(group.attrs.asdict()))
    zarr.consolidate_metadata(str(path))
    assert JSON_ATTRS not in xr.open_zarr(path).attrs


def test_stores_written_before_json_attrs_still_open(dyf, tmp_path):
    store = open_store(make_store(tmp_path / "s.zarr", dated=True))
    forecast = _forecast(store, tmp_path / "f.zarr")
    _rewrite_the_old_way(store.path)
    _rewrite_the_old_way(forecast)
    assert isinstance(xr.open_zarr(store.path).attrs["dyf_splits"], dict)
    old = open_store(store.path)
    assert old.splits == store.splits and old.split_ranges("test") == store.split_ranges("test")
    assert forecast_store.open_forecast(forecast).ds.attrs["dyf_complete"] is True
    assert forecast_store.read_attrs(forecast)["dyf_identity"] == {"seed": 1, "steps": [1, 2]}
    doc = json.loads(dyf("--json", "inspect", str(store.path)).stdout)
    assert doc["recipe"] == {"seed": 0}
    assert json.loads(dyf("--json", "evaluate", str(forecast)).stdout)["ok"]
