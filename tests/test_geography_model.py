"""Issue 10 items 1-2: periodic longitude in the networks, calendar conditioning channels.

A store whose longitudes span 360 degrees records `dyf_periodic_x`; networks built for it pad x circularly
(so a circular shift of the input shifts the output), the choice travels in the checkpoint's network config
and is checked against the store at forecast time. `data.calendar` adds sin/cos channels of the day of year
and the hour of day of each window's input state.
"""

import json

import numpy as np
import pytest
import torch
import xarray as xr

from dyfcli.checkpoint import load_checkpoint
from dyfcli.config import load_config
from dyfcli.data import Normalizer, WindowDataset, calendar_features
from dyfcli.errors import ConfigError
from dyfcli.forecast import StoreInputs, window_start_times
from dyfcli.networks import build_network, supports_periodic_x
from dyfcli.sources.netcdf import prepare_netcdf
from dyfcli.store import open_store
from storefactory import make_store, make_untrained_checkpoint

# Each kind with spatial padding, small, and its coarsest stride (the unet halves the grid twice).
PADDED = [("unet", {"dim": 8, "attn_heads": 2, "attn_dim_head": 8}, 4),
          ("cnn", {"dim": 16, "kernel_sizes": (5, 3, 3)}, 1)]


def global_file(path, steps=64, lon_start=0.0, lon_count=16):
    """6-hourly t2m on a whole-globe 22.5-degree grid (8 x 16) from 2020-01-01 00 UTC: a wave travelling
    east across the 0/360 seam plus a diurnal cycle."""
    lat = np.linspace(-78.75, 78.75, 8)
    lon = lon_start + 22.5 * np.arange(lon_count)
    hours = 6.0 * np.arange(steps)
    phase = np.deg2rad(lon)[None, None, :] - 2 * np.pi * hours[:, None, None] / 96.0
    t2m = 280 + 10 * np.cos(np.deg2rad(lat))[None, :, None] * np.sin(phase) \
        + 3 * np.sin(2 * np.pi * hours / 24.0)[:, None, None]
    ds = xr.Dataset({"t2m": (("time", "lat", "lon"), t2m.astype(np.float32), {"units": "K"})},
                    coords={"time": ("time", hours, {"units": "hours since 2020-01-01", "standard_name": "time"}),
                            "lat": ("lat", lat, {"units": "degrees_north"}),
                            "lon": ("lon", lon, {"units": "degrees_east"})})
    ds.to_netcdf(path)
    return path


# ------------------------------------------------------------------------------------------ networks

@pytest.mark.parametrize("kind,hyper,stride", PADDED)
def test_periodic_network_commutes_with_circular_shift_along_x(kind, hyper, stride):
    x, cond = torch.randn(2, 2, 12, 16), torch.randn(2, 1, 12, 16)
    time = torch.tensor([0.5, 2.0])
    for periodic in (True, False):
        torch.manual_seed(0)
        net = build_network(kind, in_channels=2, cond_channels=1, out_channels=2, periodic_x=periodic, **hyper)
        net.eval()
        for shift in (stride, 3 * stride):
            with torch.no_grad():
                shifted_input = net(torch.roll(x, shift, -1), time, torch.roll(cond, shift, -1))
                shifted_output = torch.roll(net(x, time, cond), shift, -1)
            assert torch.allclose(shifted_input, shifted_output, atol=1e-5) is periodic, (kind, periodic, shift)


@pytest.mark.parametrize("kind,hyper,stride", PADDED)
def test_periodic_network_keeps_weights_and_any_grid(kind, hyper, stride):
    torch.manual_seed(0)
    plain = build_network(kind, in_channels=2, cond_channels=0, out_channels=2, **hyper)
    torch.manual_seed(0)
    periodic = build_network(kind, in_channels=2, cond_channels=0, out_channels=2, periodic_x=True, **hyper)
    assert plain.state_dict().keys() == periodic.state_dict().keys()
    periodic.load_state_dict(plain.state_dict())  # same parameters: a checkpoint loads either way
    out = periodic.eval()(torch.randn(1, 2, 7, 13), torch.tensor([1.0]))  # x not a multiple of the stride
    assert out.shape == (1, 2, 7, 13) and torch.isfinite(out).all()


def test_unet_pads_x_to_its_multiple_by_wrapping_around():
    """The U-Net's input padding continues the globe (columns 0, 1, 2 after the last), not the edge value."""
    torch.manual_seed(0)
    net = build_network("unet", in_channels=1, cond_channels=0, out_channels=1, periodic_x=True, dim=8,
                        attn_heads=2, attn_dim_head=8)
    x = torch.arange(13.0).repeat(1, 1, 4, 1)
    padded = net._pad(x)
    assert padded.shape[-1] == 16
    assert padded[0, 0, 0, 13:].tolist() == [0.0, 1.0, 2.0]


def test_unet_ns_has_no_periodic_padding():
    assert supports_periodic_x("unet") and supports_periodic_x("cnn") and not supports_periodic_x("unet-ns")
    with pytest.raises(ValueError, match="periodic_x"):
        build_network("unet-ns", in_channels=2, cond_channels=0, out_channels=1, periodic_x=True)


# ------------------------------------------------------------------------------------------ prepare

def test_prepare_records_periodic_x_only_for_an_untiled_whole_globe(tmp_path):
    whole = global_file(tmp_path / "global.nc", steps=24)
    prepare_netcdf([str(whole)], ["t2m"], tmp_path / "global.zarr")
    assert open_store(tmp_path / "global.zarr").periodic_x
    prepare_netcdf([str(whole)], ["t2m"], tmp_path / "tiles.zarr", tile=4)
    assert not open_store(tmp_path / "tiles.zarr").periodic_x
    # -180..157.5 crosses the date line: still the whole globe
    shifted = global_file(tmp_path / "shifted.nc", steps=24, lon_start=-180.0)
    prepare_netcdf([str(shifted)], ["t2m"], tmp_path / "shifted.zarr")
    assert open_store(tmp_path / "shifted.zarr").periodic_x
    regional = global_file(tmp_path / "regional.nc", steps=24, lon_count=12)  # 0..247.5 degrees
    prepare_netcdf([str(regional)], ["t2m"], tmp_path / "regional.zarr")
    assert not open_store(tmp_path / "regional.zarr").periodic_x


# ------------------------------------------------------------------------------------------ calendar

def test_calendar_features_are_sin_cos_of_day_of_year_and_hour():
    times = np.array(["2020-01-01T00", "2020-01-01T12", "2020-12-31T18"], dtype="datetime64[ns]")
    features = calendar_features(times, ("dayofyear", "hourofday"))
    day = np.array([1, 1, 366]) * 2 * np.pi / 365.25
    hour = np.array([0, 12, 18]) * 2 * np.pi / 24
    expected = np.stack([np.sin(day), np.cos(day), np.sin(hour), np.cos(hour)], axis=1)
    np.testing.assert_allclose(features, expected, atol=1e-6)
    assert calendar_features(times, ("hourofday",)).shape == (3, 2)


def test_window_starts_are_the_init_time_then_each_previous_window_end():
    init = np.datetime64("2020-01-01T00", "ns")
    # 3 windows of leads 1..4 steps of 6 h
    valid = init + (6 * np.arange(1, 13)).astype("timedelta64[h]")
    starts = window_start_times(init, valid.astype("datetime64[ns]"), 4)
    expected = np.array(["2020-01-01T00", "2020-01-02T00", "2020-01-03T00"], dtype="datetime64[ns]")
    np.testing.assert_array_equal(starts, expected)


@pytest.fixture
def six_hourly(tmp_path):
    path = tmp_path / "six.zarr"
    prepare_netcdf([str(global_file(tmp_path / "six.nc"))], ["t2m"], path, normalization="global")
    return path


def test_training_windows_carry_the_calendar_of_their_first_step(six_hourly):
    windows = WindowDataset(six_hourly, "train", 5, calendar=("dayofyear", "hourofday"))
    plain = WindowDataset(six_hourly, "train", 5)
    assert windows.condition_channels == 4 and plain.condition_channels == 0
    times = open_store(six_hourly).ds["time"].values
    midnight, noon = (next(i for i, (_, start) in enumerate(windows.windows)
                           if str(times[start]).endswith(f"T{hour}:00:00.000000000")) for hour in ("00", "12"))
    at_midnight, at_noon = windows[midnight]["condition"], windows[noon]["condition"]
    assert at_midnight.shape == (4, 8, 16)
    assert (at_midnight == at_midnight[:, :1, :1]).all()  # constant over the grid
    assert at_midnight[3, 0, 0] == pytest.approx(1.0) and at_noon[3, 0, 0] == pytest.approx(-1.0)  # cos(hour)
    assert not torch.equal(at_midnight, at_noon)
    assert plain[midnight]["condition"].shape == (0, 8, 16)  # without the key: no channel, as before
    assert torch.equal(plain[midnight]["dynamics"], windows[midnight]["dynamics"])


def test_calendar_needs_dated_sub_daily_times(tmp_path):
    undated = make_store(tmp_path / "undated.zarr")
    with pytest.raises(ConfigError, match="dated"):
        WindowDataset(undated, "train", 5, calendar=("dayofyear",))
    daily = make_store(tmp_path / "daily.zarr", dated=True, series=1, steps=30)
    assert WindowDataset(daily, "train", 5, calendar=("dayofyear",)).condition_channels == 2
    with pytest.raises(ConfigError, match="hourofday"):
        WindowDataset(daily, "train", 5, calendar=("dayofyear", "hourofday"))


def test_calendar_key_is_validated():
    assert load_config("tiny").data.calendar == ()
    assert load_config("tiny", ["data.calendar=[hourofday]"]).data.calendar == ("hourofday",)
    for bad in ("[weekday]", "[hourofday, hourofday]", "hourofday"):
        with pytest.raises(ConfigError, match="data.calendar"):
            load_config("tiny", [f"data.calendar={bad}"])


# ------------------------------------------------------------------------------------------ end to end

def test_periodic_calendar_model_trains_records_and_forecasts(dyf, tmp_path):
    raw = global_file(tmp_path / "global.nc")
    store = tmp_path / "global.zarr"
    dyf("prepare", "netcdf", str(raw), "--var", "t2m", "--out", str(store), "--normalization", "global")
    calendar = ["--set", "data.calendar=[dayofyear, hourofday]", "--set", "interpolator.max_steps=4",
                "--set", "forecaster.max_steps=4"]
    stage1 = dyf("train-interpolator", "--data", str(store), "--preset", "tiny", *calendar,
                 "--out", str(tmp_path / "interpolator.pt"))
    assert "pads x circularly" in stage1.stderr
    dyf("train-forecaster", "--data", str(store), "--interpolator", str(tmp_path / "interpolator.pt"),
        "--out", str(tmp_path / "model.pt"))
    model = load_checkpoint(tmp_path / "model.pt")
    assert model.calendar == ["dayofyear", "hourofday"] and model.condition_channels == 4
    assert model.periodic_x and model.interpolator.periodic_x
    assert model.config["forecaster"]["network"]["hyper"]["periodic_x"] is True
    described = json.loads(dyf("--json", "inspect", str(tmp_path / "model.pt")).stdout)
    assert described["calendar"] == ["dayofyear", "hourofday"] and described["periodic_x"] is True

    out = tmp_path / "forecast.zarr"
    dyf("forecast", "--ckpt", str(tmp_path / "model.pt"), "--data", str(store), "--init", "0,2",
        "--horizon", "8", "--ensemble", "2", "--out", str(out))
    forecast = xr.open_zarr(out)
    assert np.isfinite(forecast["t2m"].values).all()
    assert [str(t)[11:13] for t in forecast["init_time"].values] == ["00", "12"]

    # The forecast builds the channels itself: 00 and 12 UTC initial conditions get different ones,
    # and every window of a block its own start time's.
    opened = open_store(store)
    inputs = StoreInputs(opened, Normalizer.from_state(model.normalizer), "cpu", model.calendar, 4)
    times = opened.ds["time"].values
    first = opened.split_ranges("test")[0][1]
    valid = times[first] + (6 * np.arange(1, 9)).astype("timedelta64[h]")
    midnight = inputs(0, first, valid)
    noon = inputs(0, first + 2, valid + np.timedelta64(12, "h"))
    assert midnight.condition(0, 3).shape == (3, 4, 8, 16)
    assert not torch.equal(midnight.condition(0, 1), noon.condition(0, 1))
    assert not torch.equal(midnight.condition(0, 1)[:, :2], midnight.condition(1, 1)[:, :2])  # next day

    # A store without dates cannot give the channels; a grid that does not wrap cannot take the network.
    undated = make_store(tmp_path / "undated.zarr", fields=("t2m",), series=3)
    refused = dyf("forecast", "--ckpt", str(tmp_path / "model.pt"), "--data", str(undated), "--horizon", "4",
                  "--ensemble", "1", "--out", str(tmp_path / "f2.zarr"), check=5)
    assert "calendar" in refused.stderr and "dated" in refused.stderr and "Traceback" not in refused.stderr
    tiles = tmp_path / "tiles.zarr"
    dyf("prepare", "netcdf", str(raw), "--var", "t2m", "--out", str(tiles), "--tile", "8", "--normalization", "global")
    refused = dyf("forecast", "--ckpt", str(tmp_path / "model.pt"), "--data", str(tiles), "--horizon", "4",
                  "--ensemble", "1", "--out", str(tmp_path / "f3.zarr"), check=5)
    assert "pads x circularly" in refused.stderr and "not periodic" in refused.stderr


def test_model_without_the_keys_is_unchanged_and_noted_on_a_periodic_store(dyf, tmp_path, six_hourly):
    opened = open_store(six_hourly)
    plain = make_untrained_checkpoint(opened, tmp_path / "plain.pt")
    model = load_checkpoint(plain)
    assert model.calendar == [] and model.condition_channels == 0 and not model.periodic_x
    inputs = StoreInputs(opened, Normalizer.from_store(opened), "cpu")
    block = inputs(0, 0, opened.ds["time"].values[1:9])
    assert block.calendar is None and torch.equal(block.condition(1, 2)[1], block.static_cond)
    proc = dyf("forecast", "--ckpt", str(plain), "--data", str(six_hourly), "--init", "0", "--horizon", "4",
               "--ensemble", "1", "--out", str(tmp_path / "f.zarr"))
    assert "seam" in proc.stderr  # a non-periodic network on a periodic store is noted, not silent


def test_periodic_networks_fills_only_unset_supported_sections(caplog):
    from dyfcli.model import periodic_networks

    tiny = load_config("tiny")
    periodic = periodic_networks(tiny, True, ("interpolator",))
    assert periodic.interpolator.network.hyper["periodic_x"] is True
    assert "periodic_x" not in periodic.forecaster.network.hyper  # only the section being trained
    assert periodic_networks(tiny, False, ("interpolator", "forecaster")) == tiny  # nothing to add
    declined = load_config("tiny", ["forecaster.network.hyper.periodic_x=false"])
    with caplog.at_level("WARNING", logger="dyf"):
        assert periodic_networks(declined, True, ("forecaster",)) == declined  # as the user set it, noted
    assert "kept as set" in caplog.text
    caplog.clear()
    ns = load_config("tiny", ["forecaster.network.kind=unet-ns", "forecaster.network.hyper={dim: 8}"])
    with caplog.at_level("WARNING", logger="dyf"):
        assert periodic_networks(ns, True, ("forecaster",)) == ns
    assert "cannot pad x circularly" in caplog.text


def test_stage_two_keeps_the_interpolators_calendar(tmp_path, six_hourly):
    from dyfcli.train import forecaster_config

    plain = make_untrained_checkpoint(open_store(six_hourly), tmp_path / "plain.pt")
    interpolator = load_checkpoint(plain).interpolator
    assert forecaster_config(interpolator, None, []).data.calendar == ()
    with pytest.raises(ConfigError, match="data.calendar"):
        forecaster_config(interpolator, None, ["data.calendar=[dayofyear]"])
