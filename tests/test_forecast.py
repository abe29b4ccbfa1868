"""`dyf forecast`: initial conditions, lead plans, the block loop (with an analytic stand-in model),
resume/overwrite, and the real command end to end."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dyfcli import forecast
from dyfcli.checkpoint import Checkpoint, save_checkpoint, store_identity
from dyfcli.data import Normalizer
from dyfcli.errors import DataError, DyfError, UsageError
from dyfcli.forecast_store import open_forecast
from dyfcli.runtime import Ranks
from dyfcli.store import open_store
from storefactory import make_store, make_untrained_checkpoint


# ----------------------------------------------------------------------------------------------- stand-ins

class FakeModel:
    """An analytic sampler: lead t of a window is x0 + t (+ 0.1 * per-member noise when stochastic).

    With identity units a deterministic rollout gives exactly x_init + lead, so autoregressive chaining is
    checkable by arithmetic. It records the x0 of every call to check what is fed back.
    """

    def __init__(self, horizon: int = 3, stochastic: bool = True):
        self.horizon = horizon
        self.stochastic = stochastic
        self.inputs: list[torch.Tensor] = []

    def sample_window(self, x0, static_cond, noise, output_times=None, **options):
        assert len(noise) == x0.shape[0] and static_cond.shape[0] == x0.shape[0]
        self.inputs.append(x0.clone())
        times = output_times or tuple(float(t) for t in range(1, self.horizon + 1))
        outputs = []
        for t in times:
            out = x0 + t
            if self.stochastic:
                out = out + 0.1 * noise.fold(int(t * 100)).normal(tuple(x0.shape[1:]))
            outputs.append(out)
        return torch.stack(outputs, dim=1)

    def network_calls(self, **options):
        return {"forecaster": self.horizon, "interpolator": 2 * self.horizon - 1}


class IdentityNormalizer:
    mode = "global"

    def normalize_at(self, x, series_index, dayofyear=None):
        return x

    def denormalize_at(self, x, series_index, dayofyear=None):
        return x


class RowBoundary:
    """Sets row 0 of field 0 to the valid time, in physical units (like an inflow profile)."""

    def apply(self, x, times):
        out = x.clone()
        out[:, :, 0, 0, :] = torch.as_tensor(np.asarray(times, dtype=np.float32))[None, :, None]
        return out


# Tiny networks on a shared 2-core machine: one thread avoids oversubscription (10x faster under load).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("forecast")
    return {"series": open_store(make_store(root / "series.zarr", land=True)),
            "dated": open_store(make_store(root / "dated.zarr", dated=True, normalization="pixel"))}


def _run_fake(store, model, tmp_path, *, members=4, member_batch=None, horizon=7, selection=None,
              output_times=None, normalizer=None, boundary=None, seed=3, name="f.zarr"):
    """Forecast into a new store with the real loop and writer, but a stand-in model."""
    init = forecast.select_initial_conditions(store, "test", selection, horizon)
    plan = forecast.plan_leads(horizon, model.horizon, output_times)
    options = {"output_times": plan.window_times} if plan.window_times else {}
    method = forecast.Method("fake", model, options)
    factory = forecast.StoreInputs(store, normalizer or IdentityNormalizer(), "cpu")
    if boundary is not None:
        inner = factory
        factory = lambda *args: replace(inner(*args), boundary=boundary)  # noqa: E731
    layout = forecast.forecast_layout(store, init, plan, members, {"seed": seed}, {"dyf_truth": str(store.path)})
    out = tmp_path / name
    done = forecast.prepare_output(out, layout, overwrite=False, resume=False, ranks=Ranks())
    blocks = [(s, i) for s in range(done.shape[0]) for i in range(done.shape[1])]
    forecast.run_blocks(forecast.Collaborators(method, factory, torch.device("cpu")),
                        forecast.forecast_store.BlockWriter(out), blocks, init, plan,
                        forecast.window_valid_times(store, init, plan), seed=seed, members=members,
                        member_batch=member_batch or members)
    forecast.forecast_store.mark_complete(out)
    return open_forecast(out).ds, init


# ----------------------------------------------------------------------------------------------- selection

def test_parse_init_selection():
    assert forecast.parse_init_selection("all") == ("all", None)
    assert forecast.parse_init_selection("first") == ("first", None)
    assert forecast.parse_init_selection("every:7") == ("every", 7)
    assert forecast.parse_init_selection("0, 5,10") == ("positions", [0, 5, 10])
    kind, dates = forecast.parse_init_selection("2020-01-01,2020-02-01")
    assert kind == "dates" and dates[1] == np.datetime64("2020-02-01")
    for bad in ("every:0", "sometimes", "1,x", "2020-13-45"):
        with pytest.raises(UsageError, match="--init"):
            forecast.parse_init_selection(bad)


def test_select_initial_conditions(stores):
    series = forecast.select_initial_conditions(stores["series"], "test", None, 7)
    assert series.series_indices == (3,) and series.time_indices == (0,)  # simulations start at step 0
    dated = stores["dated"]
    every = forecast.select_initial_conditions(dated, "test", None, 3)  # the test split is days 16..23
    assert every.series_indices == (0, 1, 2, 3) and every.time_indices == (16, 17, 18, 19, 20)
    assert forecast.select_initial_conditions(dated, "test", "every:2", 3).time_indices == (16, 18, 20)
    assert forecast.select_initial_conditions(dated, "test", "7,1", 3).time_indices == (17, 23)
    chosen = forecast.select_initial_conditions(dated, "val", "2000-01-10", 3)
    assert chosen.time_indices == (9,) and chosen.init_time[0] == np.datetime64("2000-01-10")
    with pytest.raises(DataError, match="outside the 'test' split"):
        forecast.select_initial_conditions(dated, "test", "8", 3)
    with pytest.raises(DataError, match="not a time of the 'test' split"):
        forecast.select_initial_conditions(dated, "test", "2000-01-02", 3)
    with pytest.raises(DataError, match="too few"):
        forecast.select_initial_conditions(dated, "test", "all", 8)
    with pytest.raises(DataError, match="no 'holdout' split"):
        forecast.select_initial_conditions(dated, "holdout", None, 3)


def test_plan_leads_and_coordinates():
    plan = forecast.plan_leads(7, 3, None)
    assert plan.windows == 3 and plan.leads.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert plan.take == ((0, 1, 2), (0, 1, 2), (0,))
    sub = forecast.plan_leads(5, 2, (0.5, 1.0))
    assert sub.window_times == (0.5, 1.0, 2.0)  # h is always sampled: it seeds the next window
    assert sub.leads.tolist() == [0.5, 1.0, 2.5, 3.0, 4.5, 5.0]
    with pytest.raises(UsageError, match="model's horizon"):
        forecast.plan_leads(5, 2, (2.5,))
    lead_time, valid = forecast.lead_coordinates("1D", np.array(["2020-12-30"], dtype="datetime64[ns]"),
                                                 np.array([1.0, 2.5]))
    assert lead_time[1] == np.timedelta64(60, "h") and valid[0, 0] == np.datetime64("2020-12-31")
    _, monthly = forecast.lead_coordinates("1MS", np.array(["2020-01-01"], dtype="datetime64[ns]"),
                                           np.array([1.0, 2.0]))
    assert monthly[0, 1] == np.datetime64("2020-03-01")
    lead_time, valid = forecast.lead_coordinates(0.5, np.array([1.0]), np.array([1.0, 2.0]))
    assert lead_time.tolist() == [0.5, 1.0] and valid.tolist() == [[1.5, 2.0]]


def test_member_ids_are_unique_and_batch_free():
    a = forecast.member_ids(3, 17, range(0, 5))
    b = torch.cat([forecast.member_ids(3, 17, range(0, 2)), forecast.member_ids(3, 17, range(2, 5))])
    assert torch.equal(a, b) and len(set(a.tolist())) == 5
    assert not set(forecast.member_ids(3, 18, range(5)).tolist()) & set(a.tolist())
    assert not set(forecast.member_ids(4, 17, range(5)).tolist()) & set(a.tolist())


# ----------------------------------------------------------------------------------------------- the loop

def test_autoregressive_rollout_continues_each_member(stores, tmp_path):
    store = stores["series"]
    ds, init = _run_fake(store, FakeModel(horizon=3, stochastic=False), tmp_path, horizon=7, members=2)
    truth0 = store.ds["u"].isel(series=3, time=0).values
    mask = store.ds["mask"].isel(series=3).values
    forecast_u = ds["u"].values[0, 0]  # (member, lead, y, x)
    assert forecast_u.shape == (2, 7, 8, 12)
    for lead in range(1, 8):
        for member in range(2):
            np.testing.assert_allclose(forecast_u[member, lead - 1][mask], (truth0 + lead)[mask], rtol=1e-6)
    assert np.isnan(forecast_u[:, :, ~mask]).all()  # invalid points hold NaN in the forecast
    assert ds["lead"].values.tolist() == list(range(1, 8))
    np.testing.assert_allclose(ds["valid_time"].values[0], 0.5 * np.arange(1, 8))


def test_same_seed_same_forecast_whatever_member_batch(stores, tmp_path):
    store = stores["dated"]
    normalizer = Normalizer.from_store(store)
    kwargs = dict(members=5, horizon=4, selection="0,3", normalizer=normalizer, seed=11)
    one, _ = _run_fake(store, FakeModel(horizon=3), tmp_path, member_batch=1, name="a.zarr", **kwargs)
    all_, _ = _run_fake(store, FakeModel(horizon=3), tmp_path, member_batch=5, name="b.zarr", **kwargs)
    two, _ = _run_fake(store, FakeModel(horizon=3), tmp_path, member_batch=2, name="c.zarr", **kwargs)
    np.testing.assert_array_equal(one["v"].values, all_["v"].values)
    np.testing.assert_array_equal(two["u"].values, all_["u"].values)
    members = all_["u"].values[0, 0]
    assert members.std(axis=0).mean() > 0.01  # members differ
    other, _ = _run_fake(store, FakeModel(horizon=3), tmp_path, member_batch=5, name="d.zarr",
                         **{**kwargs, "seed": 12})
    assert not np.allclose(other["u"].values, all_["u"].values)


def test_units_are_physical_and_fed_back_normalised(stores, tmp_path):
    store = stores["dated"]
    normalizer = Normalizer.from_store(store)
    model = FakeModel(horizon=2, stochastic=False)
    ds, init = _run_fake(store, model, tmp_path, members=1, horizon=4, selection="2", normalizer=normalizer)
    s, t = init.series_indices[0], init.time_indices[0]
    physical0 = np.stack([store.ds[f].isel(series=s, time=t).values for f in store.fields])
    x0 = normalizer.normalize_at(physical0[None], s)[0]
    std = normalizer.std[s]
    expected = normalizer.denormalize_at((x0 + 4.0)[None], s)[0]  # normalised x0 + lead, then physical
    np.testing.assert_allclose(ds["u"].values[0, 0, 0, 3], expected[0], rtol=1e-5, atol=1e-5 * std[0].max())
    np.testing.assert_allclose(model.inputs[1][0].numpy(), x0 + 2.0, rtol=1e-5, atol=1e-5)


class DayRecordingNormalizer(IdentityNormalizer):
    """Records the days of year it is asked to use, as a pixel-dayofyear normaliser would need them."""

    mode = "pixel-dayofyear"

    def __init__(self):
        self.normalized, self.denormalized = [], []

    def normalize_at(self, x, series_index, dayofyear=None):
        self.normalized.append(np.asarray(dayofyear).tolist())
        return x

    def denormalize_at(self, x, series_index, dayofyear=None):
        self.denormalized.append(np.asarray(dayofyear).tolist())
        return x


def test_day_of_year_units_follow_valid_times(stores, tmp_path):
    store = stores["dated"]  # days 2000-01-01 ..; the init at position 1 of the test split is 2000-01-18
    normalizer = DayRecordingNormalizer()
    _run_fake(store, FakeModel(horizon=3, stochastic=False), tmp_path, members=2, horizon=5, selection="1",
              normalizer=normalizer)
    block = 0  # every series records the same days; look at the first block
    assert normalizer.normalized[2 * block] == [18]  # the initial condition, at its own day
    assert normalizer.denormalized[2 * block] == [19, 20, 21] * 2  # window 1, two members
    assert normalizer.normalized[2 * block + 1] == [21, 21]  # x_h fed back at its valid day
    assert normalizer.denormalized[2 * block + 1] == [22, 23, 24] * 2


def test_boundary_applied_to_every_member_before_feedback(stores, tmp_path):
    store = stores["series"]
    model = FakeModel(horizon=3)
    ds, _ = _run_fake(store, model, tmp_path, members=3, horizon=6, boundary=RowBoundary())
    valid = ds["valid_time"].values[0]  # 0.5 .. 3.0
    row = ds["u"].values[0, 0, :, :, 0, :]  # (member, lead, x)
    mask_row = store.ds["mask"].isel(series=3).values[0]
    np.testing.assert_allclose(row[:, :, mask_row], np.broadcast_to(valid[None, :, None], row[:, :, mask_row].shape))
    # the second window starts from each member's boundary-corrected x_h
    second = model.inputs[1]
    np.testing.assert_allclose(second[:, 0, 0, mask_row].numpy(), np.full((3, mask_row.sum()), valid[2]))
    assert not torch.allclose(second[0], second[1])  # ... and from its own trajectory


def test_sub_step_output_times(stores, tmp_path):
    store = stores["series"]
    ds, _ = _run_fake(store, FakeModel(horizon=2, stochastic=False), tmp_path, members=1, horizon=4,
                      output_times=(0.5, 1.0))
    assert ds["lead"].values.tolist() == [0.5, 1.0, 2.5, 3.0]
    truth0 = store.ds["v"].isel(series=3, time=0).values
    mask = store.ds["mask"].isel(series=3).values
    np.testing.assert_allclose(ds["v"].values[0, 0, 0, 2][mask], (truth0 + 2.5)[mask], rtol=1e-6)


# ----------------------------------------------------------------------------------------------- the workflow

def _fake_checkpoint(store, path: Path, kind: str = "forecaster", fields=None) -> Path:
    checkpoint = Checkpoint(
        kind=kind, method="dyffusion", config={"sampling": {"schedule": "full"}},
        fields=list(fields or store.fields), grid=store.grid, cond_names=store.cond_names,
        normalizer=Normalizer.from_store(store).get_state(), store=store_identity(store),
        state_dict={"w": torch.zeros(2)})
    save_checkpoint(path, checkpoint)
    return path


class Interrupting(FakeModel):
    """Raises KeyboardInterrupt on its n-th window, like a user pressing Ctrl-C mid-forecast."""

    def __init__(self, after_windows: int, **kwargs):
        super().__init__(**kwargs)
        self.after_windows = after_windows

    def sample_window(self, *args, **kwargs):
        if len(self.inputs) >= self.after_windows:
            raise KeyboardInterrupt
        return super().sample_window(*args, **kwargs)


def test_resume_overwrite_and_refusals(stores, tmp_path, monkeypatch):
    store = stores["dated"]
    ckpt = _fake_checkpoint(store, tmp_path / "model.pt")
    models = []

    def fake_method(checkpoint, device, steps):
        return forecast.Method("forecaster", models[-1], {}, schedule=steps or "full")

    monkeypatch.setattr(forecast, "load_method", fake_method)
    request = forecast.ForecastRequest(checkpoint=ckpt, out=tmp_path / "f.zarr", horizon=4, ensemble=3,
                                       data=store.path, init="every:2", seed=5, member_batch=2, device="cpu")
    models.append(FakeModel(horizon=3))
    reference = forecast.run_forecast(replace(request, out=tmp_path / "ref.zarr"))
    assert reference["blocks"] == 4 * 2 and reference["blocks_written"] == 8
    assert reference["network_calls_per_member"] == 2 * (3 + 5)

    # 3 blocks of 2 windows; on CPU the 3 members run as one group whatever --member-batch (member_groups)
    models.append(Interrupting(after_windows=2 * 3, horizon=3))
    with pytest.raises(KeyboardInterrupt):
        forecast.run_forecast(request)
    with pytest.raises(DataError, match="incomplete"):
        open_forecast(request.out)
    with pytest.raises(UsageError, match="other seed"):  # the same command resumes: tests/test_resume_outputs.py
        forecast.run_forecast(replace(request, seed=6))
    with pytest.raises(UsageError, match="other seed"):
        forecast.run_forecast(replace(request, resume=True, seed=6))
    with pytest.raises(UsageError, match="other horizon"):
        forecast.run_forecast(replace(request, resume=True, horizon=5))

    models.append(FakeModel(horizon=3))
    resumed = forecast.run_forecast(replace(request, resume=True))
    assert resumed["blocks_resumed"] == 3 and resumed["blocks_written"] == 5
    np.testing.assert_array_equal(open_forecast(request.out).ds["u"].values,
                                  open_forecast(tmp_path / "ref.zarr").ds["u"].values)
    again = forecast.run_forecast(replace(request, resume=True))
    assert again["blocks_written"] == 0

    overwritten = forecast.run_forecast(replace(request, overwrite=True, seed=6))
    assert overwritten["blocks_written"] == 8
    assert open_forecast(request.out).ds.attrs["dyf_seed"] == 6
    with pytest.raises(UsageError, match="contradict"):
        forecast.run_forecast(replace(request, overwrite=True, resume=True))
    with pytest.raises(UsageError, match="is also an input"):  # --overwrite never deletes a data store
        forecast.run_forecast(replace(request, out=store.path, overwrite=True))
    assert open_store(store.path).fields == ["u", "v"]
    ds = open_forecast(request.out).ds
    assert ds.attrs["dyf_truth_absolute"] == str(Path(store.path).resolve())
    assert len(ds.attrs["dyf_checkpoint_sha256"]) == 64 and ds.attrs["dyf_network_calls"]["per_member"] == 16
    assert ds.attrs["dyf_config"] == {"sampling": {"schedule": "full"}} and ds.attrs["dyf_schedule"] == "full"


# ----------------------------------------------------------------------------------------------- the command

def test_bad_inputs_raise_documented_errors(stores, tmp_path):
    store = stores["dated"]
    good = _fake_checkpoint(store, tmp_path / "model.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    request = forecast.ForecastRequest(checkpoint=good, out=tmp_path / "f.zarr", horizon=2, ensemble=2,
                                       data=store.path, device="cpu")
    cases = [
        (dict(horizon=0), 2, "--horizon"), (dict(ensemble=0), 2, "--ensemble"),
        (dict(member_batch=0), 2, "--member-batch"), (dict(out=tmp_path / "corrupt.pt" / "f.zarr"), 2, "not a folder"),
        (dict(checkpoint=tmp_path / "missing.pt"), 5, "does not exist"),
        (dict(checkpoint=tmp_path / "corrupt.pt"), 5, "cannot be read"),
        (dict(checkpoint=_fake_checkpoint(store, tmp_path / "interp.pt", kind="interpolator")), 5, "interpolator"),
        (dict(checkpoint=_fake_checkpoint(store, tmp_path / "other.pt", fields=("sst", "v"))), 5, "fields"),
        (dict(split="holdout"), 4, "no 'holdout' split"), (dict(init="99"), 4, "outside"),
        (dict(data=tmp_path / "none.zarr"), 4, "does not exist"),
    ]
    for change, code, message in cases:
        with pytest.raises(DyfError) as caught:
            forecast.run_forecast(replace(request, **change))
        assert getattr(caught.value, "exit_code", None) == code, (change, caught.value)
        assert message in caught.value.message, (change, caught.value.message)


def test_command_exit_code_and_json_error(dyf, stores, tmp_path):
    store = stores["dated"]
    good = _fake_checkpoint(store, tmp_path / "model.pt")
    proc = dyf("--json", "forecast", "--data", str(store.path), "--out", str(tmp_path / "f.zarr"), "--ckpt", str(good),
               "--init", "99", "--horizon", "2", "--ensemble", "2", check=4, env=ONE_THREAD)
    assert json.loads(proc.stdout)["error"]["kind"] == "data"
    assert "Traceback" not in proc.stderr and "outside" in proc.stderr


# ----------------------------------------------------------------------------------------------- real model

def _real_checkpoint(store, path: Path, seed: int = 0) -> Path:
    """An (untrained) tiny-preset DYffusion checkpoint, saved the way train-forecaster saves one."""
    return make_untrained_checkpoint(store, path, seed)


def test_real_model_end_to_end(dyf, stores, tmp_path):
    store = stores["dated"]
    ckpt = _real_checkpoint(store, tmp_path / "model.pt")
    out = tmp_path / "f.zarr"
    args = ["--ckpt", str(ckpt), "--data", str(store.path), "--init", "0,2", "--horizon", "6",
            "--ensemble", "3", "--seed", "4", "--device", "cpu"]
    doc = json.loads(dyf("--json", "forecast", *args, "--member-batch", "1", "--out", str(out), env=ONE_THREAD).stdout)
    assert doc["ok"] and doc["windows"] == 2 and doc["blocks"] == 8  # tiny h = 4: two windows cover 6 leads
    ds = open_forecast(out).ds
    assert ds["u"].dims == ("series", "init", "member", "lead", "y", "x") and ds["u"].shape == (4, 2, 3, 6, 8, 12)
    assert ds["u"].dtype == np.float32 and np.isfinite(ds["u"].values).all()
    assert ds.attrs["dyf_schedule"] == "full" and ds.attrs["dyf_network_calls"]["per_window"] == 6 + 9
    assert ds.attrs["dyf_config"]["forecaster"]["extra_steps"] == 2
    assert ds["init_time"].values.tolist() == store.ds["time"].values[[16, 18]].tolist()
    assert ds["u"].values.std(axis=2).mean() > 0  # MC dropout makes members differ
    # the same seed gives the same forecast with all members in one batch, in-process
    request = forecast.ForecastRequest(checkpoint=ckpt, out=tmp_path / "g.zarr", horizon=6, ensemble=3,
                                       data=store.path, init="0,2", seed=4, device="cpu")
    forecast.run_forecast(request)
    np.testing.assert_allclose(open_forecast(tmp_path / "g.zarr").ds["u"].values, ds["u"].values,
                               rtol=1e-6, atol=1e-6)
    # a faster schedule needs fewer network calls
    summary = forecast.run_forecast(replace(request, steps="only_dynamics", overwrite=True, init="0", ensemble=1))
    assert summary["network_calls_per_member"] == 2 * (4 + 5)


def test_bf16_and_compile_are_ignored_off_cuda(stores, tmp_path, caplog):
    store = stores["dated"]
    ckpt = _real_checkpoint(store, tmp_path / "model.pt")
    request = forecast.ForecastRequest(checkpoint=ckpt, out=tmp_path / "plain.zarr", horizon=4, ensemble=2,
                                       data=store.path, init="0", seed=1, device="cpu")
    forecast.run_forecast(request)
    with caplog.at_level("INFO", logger="dyf"):
        forecast.run_forecast(replace(request, out=tmp_path / "fast.zarr", bf16=True, compile=True))
    assert "apply on CUDA only" in caplog.text
    plain, fast = open_forecast(tmp_path / "plain.zarr").ds, open_forecast(tmp_path / "fast.zarr").ds
    assert fast.attrs["dyf_precision"] == plain.attrs["dyf_precision"] == "float32"
    np.testing.assert_array_equal(fast["u"].values, plain["u"].values)


def test_bf16_rollout_runs_the_sampler_under_autocast_and_returns_float32(stores, tmp_path):
    """The bf16 path of the block loop, on CPU autocast: network outputs in bf16, everything after float32."""
    from dyfcli.checkpoint import load_checkpoint
    from dyfcli.model import dyffusion_from_checkpoint
    from dyfcli.noise import MemberNoise

    store = stores["dated"]
    checkpoint = load_checkpoint(_real_checkpoint(store, tmp_path / "model.pt"))
    model = dyffusion_from_checkpoint(checkpoint, "cpu")
    seen = []
    hook = model.interpolator.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    plan = forecast.plan_leads(4, model.horizon, None)
    init = forecast.select_initial_conditions(store, "test", "0", 4)
    block_inputs = forecast.StoreInputs(store, Normalizer.from_state(checkpoint.normalizer), "cpu")
    inputs = block_inputs(0, init.time_indices[0], forecast.window_valid_times(store, init, plan)[0])
    noise = MemberNoise.for_members(0, [0, 1])
    outputs = {}
    for bf16 in (False, True):
        seen.clear()
        outputs[bf16] = forecast.rollout(model, {}, inputs, plan, noise, forecast.Counter(), 1, bf16=bf16)
        assert set(seen) == {torch.bfloat16 if bf16 else torch.float32}
    hook.remove()
    assert outputs[True].dtype == torch.float32
    valid = inputs.mask.expand_as(outputs[False])
    difference = (outputs[True] - outputs[False])[valid].abs().max().item()
    assert 0 < difference < 0.1 * outputs[False][valid].abs().max().item()


def test_real_model_boundary_conditions(tmp_path):
    import zarr

    path = make_store(tmp_path / "mesh.zarr", fields=("px", "py", "qx", "qy"), cond=("fixed",))
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["dyf_boundary"] = {"kind": "spring-mesh"}
    zarr.consolidate_metadata(str(path))
    store = open_store(path)
    ckpt = _real_checkpoint(store, tmp_path / "model.pt")
    forecast.run_forecast(forecast.ForecastRequest(checkpoint=ckpt, out=tmp_path / "f.zarr", horizon=6,
                                                   ensemble=3, data=path, device="cpu"))
    ds = open_forecast(tmp_path / "f.zarr").ds
    pinned = store.ds["cond_fixed"].isel(series=3).values != 0
    assert pinned.any()
    first = store.ds["qx"].isel(series=3, time=0).values
    px, qx = ds["px"].values[0, 0], ds["qx"].values[0, 0]  # (member, lead, y, x)
    assert np.all(px[:, :, pinned] == 0)
    np.testing.assert_allclose(qx[:, :, pinned], np.broadcast_to(first[pinned], qx[:, :, pinned].shape), rtol=1e-6)
    assert np.abs(px[:, :, ~pinned]).max() > 0


@pytest.mark.slow
def test_torchrun_two_ranks_write_one_store(stores, tmp_path):
    """Two CPU ranks share the blocks of one store and give the single-process forecast; rank 0 alone reports."""
    import os
    import subprocess
    import sys

    store = stores["dated"]
    ckpt = _real_checkpoint(store, tmp_path / "model.pt")
    args = ["forecast", "--ckpt", str(ckpt), "--data", str(store.path), "--init", "every:2", "--horizon", "3",
            "--ensemble", "2", "--device", "cpu"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, **ONE_THREAD}
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", "-m", "dyfcli",
                           "--json", *args, "--out", str(tmp_path / "ddp.zarr")], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["rank"] == 0 and summaries[0]["world_size"] == 2
    assert summaries[0]["blocks"] == 12 and summaries[0]["blocks_written"] == 6  # 4 series x 3 inits, round-robin
    assert proc.stderr.count("written now") == 1  # one text summary as well
    forecast.run_forecast(forecast.ForecastRequest(checkpoint=ckpt, out=tmp_path / "one.zarr", horizon=3,
                                                   ensemble=2, data=store.path, init="every:2", device="cpu"))
    np.testing.assert_allclose(open_forecast(tmp_path / "ddp.zarr").ds["u"].values,
                               open_forecast(tmp_path / "one.zarr").ds["u"].values, rtol=1e-6, atol=1e-6)


def test_stop_request_ends_after_the_current_block_with_exit_75(stores, tmp_path):
    store = stores["series"]
    init = forecast.select_initial_conditions(store, "test", "0,1,2", 3)
    plan = forecast.plan_leads(3, 3, None)
    layout = forecast.forecast_layout(store, init, plan, 2, {}, {"dyf_truth": str(store.path)})
    out = tmp_path / "f.zarr"
    forecast.prepare_output(out, layout, overwrite=False, resume=False, ranks=Ranks())
    collaborators = forecast.Collaborators(forecast.Method("fake", FakeModel(horizon=3)),
                                           forecast.StoreInputs(store, IdentityNormalizer(), "cpu"),
                                           torch.device("cpu"))
    with pytest.raises(forecast.Interrupted) as caught:
        forecast.run_blocks(collaborators, forecast.forecast_store.BlockWriter(out), [(0, 0), (0, 1), (0, 2)],
                            init, plan, forecast.window_valid_times(store, init, plan), seed=0, members=2,
                            member_batch=2, stop_requested=lambda: True)
    assert caught.value.exit_code == 75 and "re-run the same `dyf forecast` command" in caught.value.message
    assert forecast.forecast_store.BlockWriter(out).done().tolist() == [[True, False, False]]


def test_baseline_checkpoint_forecasts_through_the_same_workflow(stores, tmp_path):
    from dyfcli.baselines import training_method
    from dyfcli.config import load_config

    store = stores["series"]
    torch.manual_seed(0)
    config = load_config("tiny")
    method = training_method("dropout", config, len(store.fields), len(store.cond_names))
    save_checkpoint(tmp_path / "dropout.pt", Checkpoint(
        kind="dropout", method="dropout", config=config.to_dict(), fields=store.fields, grid=store.grid,
        cond_names=store.cond_names, normalizer=Normalizer.from_store(store).get_state(),
        store=store_identity(store), state_dict=method.network.state_dict()))
    request = forecast.ForecastRequest(checkpoint=tmp_path / "dropout.pt", out=tmp_path / "f.zarr", horizon=6,
                                       ensemble=3, data=store.path, device="cpu")
    summary = forecast.run_forecast(request)
    assert summary["windows"] == 2 and summary["network_calls_per_member"] == 2 * 4
    ds = open_forecast(tmp_path / "f.zarr").ds
    assert ds.attrs["dyf_method"] == "dropout" and ds["u"].shape == (1, 1, 3, 6, 8, 12)
    mask = store.ds["mask"].isel(series=3).values
    values = ds["u"].values[0, 0][:, :, mask]
    assert np.isfinite(values).all() and values.std(axis=0).mean() > 0
    with pytest.raises(UsageError, match="--steps"):
        forecast.run_forecast(replace(request, steps="only_dynamics", overwrite=True))


def _any_block_written(out: Path) -> bool:
    try:
        return bool(forecast.forecast_store.BlockWriter(out).done().any())
    except (KeyError, FileNotFoundError):  # the forecasting process is still creating the store
        return False


@pytest.mark.slow
def test_sigterm_exits_75_and_resume_finishes(dyf, stores, tmp_path):
    """A pre-empted job (SIGTERM) stops after a block with exit 75; the same command with --resume finishes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    store = stores["dated"]
    ckpt = _real_checkpoint(store, tmp_path / "model.pt")
    out = tmp_path / "f.zarr"
    args = ["forecast", "--ckpt", str(ckpt), "--data", str(store.path), "--horizon", "3", "--ensemble", "16",
            "--device", "cpu", "--out", str(out)]
    exe = Path(sys.executable).with_name("dyf")
    child = subprocess.Popen([str(exe), *args], stderr=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if _any_block_written(out):
            child.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 75, stderr[-2000:]
    done = forecast.forecast_store.BlockWriter(out).done()
    assert 0 < done.sum() < done.size
    dyf(*args, "--resume", env=ONE_THREAD)
    assert open_forecast(out).ds.attrs["dyf_complete"] is True
