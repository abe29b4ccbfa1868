"""Issue 13, items 7 and 8: the conventions of a Unix command line and the progress a user reads.

Item 7: `--version`, `-h` on every command, shell completion, global flags after the subcommand,
commands in pipeline order, usage lines without Python type names, `--out` parents created (and left
behind by no refused command). Item 8: plurals, ETA in log lines, the loss on the terminal bar,
forecast progress per window, one final line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dyfcli import __version__, runtime
from dyfcli.cli import main
from storefactory import make_store, make_untrained_checkpoint

DYF = Path(sys.executable).with_name("dyf")
FORECAST_ARGS = ("--horizon", "8", "--ensemble", "2", "--init", "0,1", "--seed", "1", "--device", "cpu")


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """The real entry point, in this process (help and version need no subprocess)."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def command_paths() -> list[list[str]]:
    """Every group and command of `dyf`, found from the app (commands added later are covered too)."""
    import typer

    from dyfcli.cli import app

    found = []

    def walk(command, path: list[str]) -> None:
        found.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from dyfcli.store import open_store

    root = tmp_path_factory.mktemp("conventions")
    store = make_store(root / "s.zarr", steps=12)
    return {"root": root, "store": store, "model": make_untrained_checkpoint(open_store(store), root / "model.pt")}


@pytest.fixture(scope="module")
def forecast_run(inputs, tmp_path_factory) -> dict:
    """One CLI forecast into a folder that does not exist yet, logging every progress step."""
    work = tmp_path_factory.mktemp("forecast")
    out = work / "new" / "deeper" / "f.zarr"
    proc = subprocess.run([str(DYF), "forecast", "--ckpt", str(inputs["model"]), "--data", str(inputs["store"]),
                           "--out", str(out), *FORECAST_ARGS], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DYF_PROGRESS_INTERVAL": "0"})
    return {"proc": proc, "out": out}


# ----------------------------------------------------------------------------------------------- item 7

def test_version_prints_the_package_version(capsys):
    code, out, _ = run_main(capsys, "--version")
    assert code == 0 and out.strip() == f"dyf {__version__}"


def test_every_command_takes_h_and_its_usage_names_no_python_types(capsys):
    paths = command_paths()
    assert ["evaluate"] in paths and ["prepare", "netcdf"] in paths
    for path in paths:
        code, out, err = run_main(capsys, *path, "-h")
        assert code == 0, (path, err)
        usage = out.splitlines()[0]
        assert usage.startswith(f"Usage: {' '.join(['dyf', *path])} "), usage
        assert "{" not in usage and "<" not in usage, usage
        assert not re.search(r"<(path|str|int|float|bool|list\[\w+\])>", out), (path, out)
    _, out, _ = run_main(capsys, "evaluate", "-h")
    assert out.splitlines()[0] == "Usage: dyf evaluate [OPTIONS] FORECAST"
    _, out, _ = run_main(capsys, "prepare", "netcdf", "--help")
    assert out.splitlines()[0] == "Usage: dyf prepare netcdf [OPTIONS] PATHS..."
    assert "--out PATH" in out and "--var NAME[@LEVEL][,...]" in out


def test_help_lists_commands_in_pipeline_order(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    listed = [line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.startswith("  ")
              and not line.startswith("   ")]
    assert sorted(listed) == sorted(path[0] for path in command_paths() if len(path) == 1)
    pipeline = ["prepare", "train-interpolator", "train-forecaster", "forecast", "evaluate", "export", "inspect"]
    assert listed[:len(pipeline)] == pipeline


def test_shell_completion_is_offered():
    shown = subprocess.run([str(DYF), "--show-completion", "bash"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "_dyf_completion" in shown.stdout
    completed = subprocess.run([str(DYF)], capture_output=True, text=True, timeout=60,
                               env={**os.environ, "_DYF_COMPLETE": "complete_bash", "COMP_WORDS": "dyf ev",
                                    "COMP_CWORD": "1"})
    assert completed.returncode == 0 and completed.stdout.split() == ["evaluate"]
    assert "--install-completion" in subprocess.run([str(DYF), "--help"], capture_output=True, text=True).stdout


@pytest.mark.parametrize("args", [
    ("evaluate", "missing.zarr", "--json"),
    ("evaluate", "missing.zarr", "--verbose", "--json"),
    ("prepare", "netcdf", "missing.nc", "--var", "u", "--out", "x.zarr", "--json", "-v"),
])
def test_global_flags_work_after_the_subcommand(tmp_path, args):
    proc = subprocess.run([str(DYF), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr  # the missing input, not a usage error
    document = json.loads(proc.stdout)
    assert document["ok"] is False and document["error"]["exit_code"] == 4
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_out_parents_are_created_like_plots(forecast_run):
    proc, out = forecast_run["proc"], forecast_run["out"]
    assert proc.returncode == 0, proc.stderr
    assert (out / "zarr.json").is_file()
    assert sorted(path.name for path in out.parent.iterdir()) == ["f.zarr"]  # no lock or staging left


def _tree(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_a_refused_command_leaves_no_parent_folder_behind(inputs, tmp_path, dyf):
    from dyfcli.errors import CheckpointError, DataError
    from dyfcli.evaluate import evaluate
    from dyfcli.forecast import ForecastRequest, run_forecast

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError):  # refused after --out was claimed (its parents created)
        run_forecast(ForecastRequest(checkpoint=garbage, out=tmp_path / "a" / "b" / "f.zarr", horizon=2,
                                     ensemble=2, data=inputs["store"], init="0", device="cpu"))
    assert _tree(tmp_path) == before
    with pytest.raises(DataError):
        evaluate(tmp_path / "missing.zarr", out=tmp_path / "c" / "d" / "scores.nc")
    assert _tree(tmp_path) == before
    dyf("forecast", "--ckpt", str(garbage), "--data", str(inputs["store"]), "--out",
        str(tmp_path / "e" / "f.zarr"), *FORECAST_ARGS, check=5)
    assert _tree(tmp_path) == before


def test_an_out_below_a_file_is_refused(inputs, tmp_path, dyf):
    (tmp_path / "file.txt").write_text("mine")
    proc = dyf("forecast", "--ckpt", str(inputs["model"]), "--data", str(inputs["store"]), "--out",
               str(tmp_path / "file.txt" / "sub" / "f.zarr"), *FORECAST_ARGS, check=2)
    assert "file.txt, which is not a folder" in proc.stderr
    assert _tree(tmp_path) == ["file.txt"]


# ----------------------------------------------------------------------------------------------- item 8

@pytest.fixture
def log_lines(monkeypatch):
    """Plain progress (not a terminal), every advance logged; returns the list the lines go to."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    monkeypatch.setattr(runtime, "stderr_is_terminal", lambda: False)
    monkeypatch.setattr(runtime, "PLAIN_PROGRESS_INTERVAL_S", 0.0)
    handler = Collect()
    logger = logging.getLogger("dyf")
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "level", logging.INFO)
    yield lines
    logger.removeHandler(handler)


def test_counts_are_spelled_with_plurals():
    assert runtime.count_of(1, "step") == "1 step" and runtime.count_of(150, "step") == "150 steps"
    assert runtime.count_of(1, "steps") == "1 step" and runtime.count_of(2, "boxes") == "2 boxes"
    assert runtime.count_of(1, "trajectories") == "1 trajectory" and runtime.count_of(0, "block") == "0 blocks"


def test_summaries_are_spelled_with_plurals():
    from dyfcli.cli.forecast import _render as forecast_text
    from dyfcli.cli.train import _render as train_text

    trained = train_text({"kind": "interpolator", "out": "i.pt", "steps": 150, "epochs": 1, "parameters": 5,
                          "seconds": 1.0, "device": "cpu", "world_size": 1, "run_dir": "i.pt.run",
                          "best_val_crps": None})
    assert "150 steps (1 epoch)" in trained
    forecast = forecast_text({"out": "f.zarr", "blocks_written": 1, "blocks_resumed": 0, "blocks": 1, "members": 1,
                              "leads": 8, "windows": 1, "network_calls_per_member": 3, "seconds": 1.0,
                              "device": "cpu"})
    assert "1 member x 8 lead times (1 window)" in forecast


def test_plain_lines_have_plurals_an_eta_the_loss_and_one_final_line(log_lines):
    with runtime.progress("train interpolator", 150, "step") as bar:
        for step in range(150):
            bar.advance(1, loss=1.0 / (step + 1))
    assert log_lines[0] == "train interpolator: started (150 steps)"
    assert re.fullmatch(r"train interpolator: 1/150 steps \(.* steps/s, .*, ETA .*\) loss=1", log_lines[1])
    finals = [line for line in log_lines if line.startswith("train interpolator: 150/150 steps")]
    assert len(finals) == 1 and "ETA" not in finals[0] and finals[0].endswith("loss=0.006667")
    log_lines.clear()
    with runtime.progress("evaluate", 1, "blocks") as bar:
        bar.advance(1)
    assert log_lines[0] == "evaluate: started (1 block)" and log_lines[1].startswith("evaluate: 1/1 block (")
    assert len(log_lines) == 2


def test_the_terminal_bar_shows_the_loss(monkeypatch, capfd):
    monkeypatch.setattr(runtime, "stderr_is_terminal", lambda: True)
    with runtime.progress("train forecaster", 3, "step") as bar:
        for step in range(3):
            bar.advance(1, loss=0.5 / (step + 1))
    err = capfd.readouterr().err
    assert "3/3" in err and "steps" in err and "loss=0.1667" in err


def test_forecast_progress_counts_windows(forecast_run):
    """2 blocks x 1 member group x 2 windows (horizon 8 of a horizon-4 model): a line per window."""
    err = forecast_run["proc"].stderr
    assert "forecast: started (4 windows)" in err
    for done in (1, 2, 3, 4):
        assert re.search(rf"forecast: {done}/4 windows \(", err), err
    assert len(re.findall(r"forecast: 4/4 windows", err)) == 1


# ----------------------------------------------------------------------------------------------- item 9

def _summary(leads: int, members: int, unit: str) -> dict:
    """An evaluate summary as `plots` reads it, with made-up scores."""
    per_lead = [float(1 + lead) for lead in range(leads)]
    metrics = {name: {"per_lead": per_lead, "mean": 1.0}
               for name in ("crps", "crps_fair", "mse", "rmse", "spread", "ssr", "ssr_unbiased")}
    ranks = [[lead + 1] * (members + 1) for lead in range(leads)]
    return {"fields": ["u"], "members": members, "lead_time": [float(lead + 1) for lead in range(leads)],
            "lead_time_units": unit, "scores": {"u": metrics},
            "baselines": {ref: {"u": metrics} for ref in ("persistence", "climatology")},
            "rank_histogram": {"u": {"per_lead": ranks, "total": [sum(col) for col in zip(*ranks)]}}}


@pytest.fixture
def figures(monkeypatch):
    """The figures `plots` makes, kept open (it closes each after saving)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    kept, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda figure=None: kept.append(figure))
    yield kept
    for figure in kept:
        close(figure)


def _legends_below_the_data(figure) -> None:
    renderer = figure.canvas.get_renderer()
    assert all(axis.get_legend() is None for axis in figure.axes)  # no legend drawn over a panel
    assert figure.legends
    lowest = min(axis.get_tightbbox(renderer).y0 for axis in figure.axes)
    for legend in figure.legends:
        assert legend.get_window_extent(renderer).y1 <= lowest + 1


def test_rank_histograms_per_lead_with_integer_ticks(tmp_path, figures):
    from dyfcli import plots

    plots.plot_rank_histogram(tmp_path / "r.png", _summary(leads=12, members=2, unit="days"), "u")
    (figure,) = figures
    pooled, *per_lead = figure.axes
    assert len(per_lead) == plots.LEADS_SHOWN
    assert [axis.get_title() for axis in (per_lead[0], per_lead[-1])] == ["lead time 1 days", "lead time 12 days"]
    for axis in figure.axes:
        low, high = axis.get_xlim()
        ticks = [tick for tick in axis.get_xticks() if low <= tick <= high]
        assert ticks == [0, 1, 2], ticks  # ranks 0..members, no 0.5 steps
    _legends_below_the_data(figure)
    assert (tmp_path / "r.png").stat().st_size > 0


@pytest.mark.parametrize("unit, label", [("days", "lead time [days]"), ("", "lead time [data time units]")])
def test_score_axes_name_the_lead_time_unit_and_legends_leave_the_data_free(tmp_path, figures, unit, label):
    from dyfcli import plots

    plots.plot_scores(tmp_path / "s.png", _summary(leads=5, members=4, unit=unit), "u", "K")
    (figure,) = figures
    assert {axis.get_xlabel() for axis in figure.axes} == {label}
    _legends_below_the_data(figure)
