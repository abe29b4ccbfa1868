"""`dyf evaluate` spread over torchrun ranks: rank 0 gathers every block's sums and adds them in block
order, so the scores equal one process's bit for bit; only rank 0 writes and prints."""

import json
import os
import subprocess
import sys

import xarray as xr

from dyfcli.evaluate import ScoreOptions, evaluate
from storefactory import make_store
from test_evaluate_weights import lat_store
from test_evaluate import make_forecast


def _torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DYF_EVALUATE_WORKERS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "dyfcli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_ranks_give_the_scores_of_one_process(tmp_path):
    store = lat_store(tmp_path)
    forecast = make_forecast(tmp_path / "f.zarr", store, members=4, inits=(1, 4, 7), horizon=3)
    single = evaluate(forecast, options=ScoreOptions(ssr="per-series"), device="cpu")
    proc = _torchrun("--json", "evaluate", str(forecast), "--ssr", "per-series", "--device", "cpu",
                     "--out", str(tmp_path / "scores.nc"), "--plots", str(tmp_path / "plots"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    documents = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(documents) == 1  # rank 0's summary only
    ranked = json.loads(documents[0])
    assert ranked["ranks"] == 2 and ranked["rank"] == 0 and ranked["blocks"] == single["blocks"]
    for key in ("scores", "baselines", "rank_histogram", "all", "weights"):
        assert ranked[key] == single[key], key  # bit for bit (JSON floats round-trip exactly)
    assert ranked["throughput"]["bytes_read"] == single["throughput"]["bytes_read"]
    written = xr.open_dataset(tmp_path / "scores.nc")
    assert float(written["crps_lead_mean"].sel(source="forecast", field="u")) == single["scores"]["u"]["crps"]["mean"]
    assert (tmp_path / "plots" / "maps_v.png").exists()  # rank 0 reads the example blocks it did not score


def test_ties_are_drawn_the_same_on_two_ranks(tmp_path):
    """A forecast equal to the truth: every point ties, the rank histogram is all random draws."""
    store = make_store(tmp_path / "truth.zarr", steps=12)
    forecast = make_forecast(tmp_path / "f.zarr", store, members=3, inits=(1, 3), horizon=2, spread=0.0)
    single = evaluate(forecast, device="cpu", seed=5)
    proc = _torchrun("--json", "evaluate", str(forecast), "--device", "cpu", "--seed", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranked = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][0])
    assert ranked["rank_histogram"] == single["rank_histogram"]
    assert len(set(single["rank_histogram"]["u"]["total"])) > 1  # spread over the bins at random
