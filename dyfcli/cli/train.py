"""`dyf train-interpolator` and `dyf train-forecaster`: parse flags, call one workflow of `dyfcli.train`.

Re-running an interrupted command (exit 75 or 130, a crash or a kill -9) continues from `<out>.state.pt`; a finished
`--out` is only replaced with `--overwrite`. Multi-GPU: `torchrun --nproc_per_node N -m dyfcli train-...`
or the same command under `srun` (one task per GPU).
"""

from __future__ import annotations

from pathlib import Path

import typer

from dyfcli.cli.app import app, run_command

_PRESET_HELP = "Preset name (tiny, sst, navier-stokes, spring-mesh) or a YAML file."

# The options both stages take, declared once.
_DATA = typer.Option(..., "--data", help="Data store made by `dyf prepare`.")
_SETS = typer.Option([], "--set", help="Override a setting, e.g. --set training.seed=3 --set interpolator.lr=1e-4 "
                     "(repeatable).")
_DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (under torchrun/srun: this rank's GPU).")
_OVERWRITE = typer.Option(False, "--overwrite", help="Replace a finished --out and start again.")


def _render(summary: dict) -> str:
    crps = summary.get("best_val_crps")
    best = f"best validation CRPS {crps:.5g} at step {summary.get('best_step')}" if crps is not None else \
        "no validation split: final weights kept"
    resumed = f", resumed from step {summary['resumed_from_step']}" if summary.get("resumed_from_step") else ""
    return (f"{summary['kind']} -> {summary['out']}: {summary['steps']} steps ({summary['epochs']} epochs){resumed}, "
            f"{best}, {summary['parameters']:,} parameters, {summary['seconds']} s on {summary['device']}"
            f" x{summary['world_size']}\n  run log: {summary['run_dir']}/metrics.jsonl")


@app.command("train-interpolator")
def train_interpolator_command(
    data: Path = _DATA,
    out: Path = typer.Option(..., "--out", help="Interpolator checkpoint to write (e.g. interpolator.pt)."),
    preset: str = typer.Option(None, "--preset", help=_PRESET_HELP + " Default: tiny."),
    sets: list[str] = _SETS,
    device: str = _DEVICE,
    overwrite: bool = _OVERWRITE,
) -> None:
    """Train DYffusion's stochastic interpolator (stage 1); keeps the best by validation CRPS.

    SIGTERM/SIGUSR1 save OUT.state.pt and exit 75 (Ctrl-C: 130); running the same command again resumes from it.
    """

    def workflow() -> dict:
        from dyfcli.config import load_config

        config = load_config(preset, sets)  # before importing torch: a bad setting fails at once
        from dyfcli.train import train_interpolator

        return train_interpolator(data, out, config, device=device, overwrite=overwrite)

    run_command("train-interpolator", workflow, _render)


@app.command("train-forecaster")
def train_forecaster_command(
    data: Path = _DATA,
    out: Path = typer.Option(..., "--out", help="Model checkpoint to write (e.g. model.pt)."),
    interpolator: Path = typer.Option(None, "--interpolator", help="Checkpoint from `dyf train-interpolator` "
                                      "(needed by --method dyffusion)."),
    method: str = typer.Option("dyffusion", "--method", help="dyffusion, or a baseline: dropout, perturbation, ddpm."),
    preset: str = typer.Option(None, "--preset", help=_PRESET_HELP + " Default: the interpolator's settings."),
    sets: list[str] = _SETS,
    device: str = _DEVICE,
    overwrite: bool = _OVERWRITE,
) -> None:
    """Train DYffusion's forecaster with the interpolator frozen (stage 2), or a baseline forecaster.

    SIGTERM/SIGUSR1 save OUT.state.pt and exit 75 (Ctrl-C: 130); running the same command again resumes from it.
    """

    def workflow() -> dict:
        from dyfcli.train import train_forecaster

        return train_forecaster(data, out, interpolator=interpolator, method=method, preset=preset,
                                overrides=sets, device=device, overwrite=overwrite)

    run_command("train-forecaster", workflow, _render)
