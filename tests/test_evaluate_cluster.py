"""`dyf evaluate --scheduler ADDRESS`: Dask workers score the blocks, the client adds their sums in block
order, so the scores equal one process's bit for bit. One LocalCluster (2 worker processes, 1 thread each)
serves the whole module."""

import json
import time

import pytest

from dyfcli.errors import DataError
from dyfcli.evaluate import ScoreOptions, evaluate
from test_evaluate import make_forecast
from test_evaluate_weights import lat_store

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="1GiB",
                                  dashboard_address=None) as local:
        yield local


@pytest.fixture(scope="module")
def client(cluster):
    with distributed.Client(cluster, set_as_default=False) as connected:
        yield connected


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    store = lat_store(folder)
    return store, make_forecast(folder / "f.zarr", store, members=4, inits=(1, 4, 7), horizon=3)


def _tasks_done(cluster) -> int:
    """`score_task` tasks the scheduler saw finish (cumulative)."""
    prefix = cluster.scheduler.task_prefixes.get("score_task")
    return 0 if prefix is None else prefix.state_counts["memory"]


def _opened_on_workers(client) -> dict:
    from dyfcli import evaluate_cluster

    return client.run(lambda: list(evaluate_cluster._OPENED))


def test_scheduler_gives_the_scores_of_one_process(dyf, cluster, client, stores, tmp_path):
    store, forecast = stores
    single = evaluate(forecast, out=tmp_path / "single.csv", options=ScoreOptions(ssr="per-series"), device="cpu")
    before = _tasks_done(cluster)
    proc = dyf("--json", "evaluate", str(forecast), "--scheduler", cluster.scheduler_address, "--ssr", "per-series",
               "--device", "cpu", "--out", str(tmp_path / "cluster.csv"), "--plots", str(tmp_path / "plots"))
    clustered = json.loads(proc.stdout)
    assert clustered["scheduler"] == cluster.scheduler_address and clustered["blocks"] == single["blocks"] == 12
    for key in ("scores", "baselines", "rank_histogram", "all", "weights", "members"):
        assert clustered[key] == single[key], key  # bit for bit (JSON floats round-trip exactly)
    assert clustered["throughput"]["bytes_read"] == single["throughput"]["bytes_read"]
    assert (tmp_path / "cluster.csv").read_text() == (tmp_path / "single.csv").read_text()
    assert (tmp_path / "plots" / "maps_v.png").exists()  # the client reads the example blocks itself
    assert "evaluate: 12/12 blocks" in proc.stderr and "Traceback" not in proc.stderr  # progress on the client
    assert _tasks_done(cluster) - before == 12  # one block per task: 12 blocks, 4 tasks per worker thread
    opened = _opened_on_workers(client)
    assert len(opened) == 2 and not any(opened.values())  # the workers let the stores go when done


def test_scheduler_from_the_environment(dyf, cluster, stores):
    _, forecast = stores
    single = evaluate(forecast, options=ScoreOptions(weights="none", units="standardized"), device="cpu", seed=3)
    proc = dyf("--json", "evaluate", str(forecast), "--weights", "none", "--units", "standardized", "--seed", "3",
               "--device", "cpu", env={"DASK_SCHEDULER_ADDRESS": cluster.scheduler_address})
    clustered = json.loads(proc.stdout)
    assert clustered["scheduler"] == cluster.scheduler_address
    assert clustered["scores"] == single["scores"] and clustered["rank_histogram"] == single["rank_histogram"]
    assert clustered["units"] == "standardized" and clustered["weights"] == "none"


def test_bad_scheduler_address_is_one_usage_line(dyf, stores, tmp_path):
    """A malformed address fails at once (it used to print a traceback after a 30 s hang at exit); a refused
    port takes the 15 s connect timeout (`cluster.connect_scheduler`, as test_prepare_sst tests it)."""
    _, forecast = stores
    proc = dyf("evaluate", str(forecast), "--scheduler", "tcp://127.0.0.1:port", "--out", str(tmp_path / "s.csv"),
               check=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--scheduler tcp://127.0.0.1:port is not a Dask scheduler address" in errors[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "s.csv").exists()


def test_scheduler_without_distributed_is_a_usage_error(dyf, stores, tmp_path):
    """CI installs `distributed` (the test extra): hide it to see the message a user without it gets."""
    _, forecast = stores
    hidden = tmp_path / "hidden" / "distributed"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    proc = dyf("evaluate", str(forecast), check=2,
               env={"PYTHONPATH": str(hidden.parent), "DASK_SCHEDULER_ADDRESS": "tcp://127.0.0.1:8786"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --scheduler tcp://127.0.0.1:8786 needs the Dask 'distributed' package: "
                      "pip install distributed"]


def test_scheduler_with_torchrun_ranks_is_a_usage_error(dyf, stores):
    _, forecast = stores
    ranks = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}  # as torchrun sets them; refused before joining
    proc = dyf("evaluate", str(forecast), "--scheduler", "tcp://127.0.0.1:9", check=2, env=ranks)
    assert "--scheduler tcp://127.0.0.1:9 cannot be combined with torchrun/srun ranks" in proc.stderr
    proc = dyf("evaluate", str(forecast), check=2, env={**ranks, "DASK_SCHEDULER_ADDRESS": "tcp://127.0.0.1:9"})
    assert "DASK_SCHEDULER_ADDRESS=tcp://127.0.0.1:9 cannot be combined" in proc.stderr


def test_a_worker_that_cannot_see_the_store_names_the_path(client, stores, tmp_path):
    from dyfcli.evaluate_cluster import Run, score_task

    store, _ = stores
    missing = tmp_path / "only-on-the-client.zarr"
    run = Run("token", str(missing), str(store), False, ScoreOptions(weights="none"), "cpu")
    with pytest.raises(DataError) as raised:  # raised on the worker, with its class
        client.submit(score_task, [("u", 0, 0)], run, pure=False).result()
    message = raised.value.message
    assert str(missing) in message and "same file system" in message and "\n" not in message


def test_task_batches_are_whole_blocks_in_order():
    from dyfcli.evaluate_cluster import MAX_BLOCKS_PER_TASK, TASKS_PER_THREAD, task_batches

    for n_blocks, n_fields, threads in [(12, 2, 2), (1, 3, 8), (1000, 1, 4), (37, 2, 1)]:
        batches = task_batches(n_blocks * n_fields, n_fields, threads)
        assert [n for batch in batches for n in batch] == list(range(n_blocks * n_fields))
        assert all(len(batch) % n_fields == 0 and len(batch) // n_fields <= MAX_BLOCKS_PER_TASK for batch in batches)
        assert len(batches) >= min(n_blocks, TASKS_PER_THREAD * threads)  # every worker thread kept busy


def test_results_come_back_in_batch_order(client):
    from dyfcli.cluster import in_order

    late_first = lambda index: (time.sleep(0.1 * (5 - index)), index)[1]  # noqa: E731 - sent by value
    assert list(in_order(client, late_first, list(range(6)), in_flight=3)) == list(range(6))
