"""The whole pipeline through the real `dyf` command: simulate, train both stages, forecast, evaluate."""

import json

import xarray as xr


def test_spring_mesh_pipeline_end_to_end(dyf, tmp_path):
    data, interpolator, model = tmp_path / "sm.zarr", tmp_path / "i.pt", tmp_path / "m.pt"
    forecast, scores, plots = tmp_path / "f.zarr", tmp_path / "scores.nc", tmp_path / "plots"
    quick = ["--set", "training.validate_every=4", "--set", "training.val_max_batches=1"]

    dyf("prepare", "spring-mesh", "--out", str(data), "--trajectories", "3,1,1", "--seed", "1")
    dyf("train-interpolator", "--data", str(data), "--preset", "tiny", "--out", str(interpolator),
        "--set", "interpolator.max_steps=4", *quick)
    dyf("train-forecaster", "--data", str(data), "--interpolator", str(interpolator), "--out", str(model),
        "--set", "forecaster.max_steps=4", *quick)
    # 10 leads with h = 4: three chained windows
    dyf("forecast", "--ckpt", str(model), "--horizon", "10", "--ensemble", "3", "--seed", "5",
        "--out", str(forecast))
    doc = json.loads(dyf("--json", "evaluate", str(forecast), "--out", str(scores), "--plots", str(plots)).stdout)

    written = xr.open_zarr(forecast)
    assert written["qx"].dims == ("series", "init", "member", "lead", "y", "x")
    assert written["qx"].shape == (1, 1, 3, 10, 10, 10)
    # pinned top row: zero momentum and the initial positions in every member and lead
    truth = xr.open_zarr(data)
    top = written["px"].isel(y=-1).values
    assert (top == 0).all()
    initial_qx = truth["qx"].sel(series=written["series"].values).isel(time=0, y=-1).values
    assert abs(written["qx"].isel(y=-1).values - initial_qx[:, None, None, None, :]).max() < 1e-5

    assert doc["ok"] and set(doc["scores"]) == {"px", "py", "qx", "qy"}
    crps = doc["scores"]["qx"]["crps"]
    assert len(crps["per_lead"]) == 10 and crps["mean"] > 0
    assert set(doc["baselines"]) == {"persistence", "climatology"}
    assert scores.exists() and any(plots.glob("*.png"))
