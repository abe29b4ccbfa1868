"""`dyf train-interpolator` and `dyf train-forecaster`: parse flags, call one workflow of `dyfcli.train`.

Re-running an interrupted command (exit 75 or 130, a crash or a kill -9) continues from `<out>.state.pt`; a finished
`--out` is only replaced with `--overwrite`. Multi-GPU: `torchrun --nproc_per_node N -m dyfcli train-...`
or the same command under `srun` (one task per GPU).

`--dry-run` resolves everything a run would (preset and its `extends` chain, `--set`, the interpolator
checkpoint, the data store) and prints the config as YAML on stdout, then exits 0: a user sees the settings
before spending GPU hours, and nothing is trained, written or locked.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from dyfcli.cli.app import OPTIONS, app, run_command
from dyfcli.runtime import count_of

if TYPE_CHECKING:
    from dyfcli.config import RunConfig

_PRESET_HELP = ("Preset name (`dyf presets` lists them) or a YAML file: complete, or naming a base with "
                "`extends: NAME` or `extends: ./base.yaml`.")

# The options both stages take, declared once.
_DATA = typer.Option(..., "--data", help="Data store made by `dyf prepare`.")
_SETS = typer.Option([], "--set", help="Override a setting, e.g. --set training.seed=3 --set interpolator.lr=1e-4 "
                     "(repeatable).")
_DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N (under torchrun/srun: this rank's GPU).")
_OVERWRITE = typer.Option(False, "--overwrite", help="Replace a finished --out and start again.")
_DRY_RUN = typer.Option(False, "--dry-run", help="Print the resolved config as YAML on stdout (with --json: in the "
                        "JSON document) and exit 0 without training, writing or locking anything.")


def _render(summary: dict) -> str:
    crps = summary.get("best_val_crps")
    best = f"best validation CRPS {crps:.5g} at step {summary.get('best_step')}" if crps is not None else \
        "no validation split: final weights kept"
    resumed = f", resumed from step {summary['resumed_from_step']}" if summary.get("resumed_from_step") else ""
    sigma = summary.get("perturbation_sigma")
    chosen = (f"\n  perturbation sigma {sigma['sigma']:g} chosen on the validation split (grid "
              f"{', '.join(f'{s:g}' for s in sigma['grid'])})" if sigma else "")
    return (f"{summary['kind']} -> {summary['out']}: {count_of(summary['steps'], 'step')} ({count_of(summary['epochs'], 'epoch')}){resumed}, "
            f"{best}, {summary['parameters']:,} parameters, {summary['seconds']} s on {summary['device']}"
            f" x{summary['world_size']}{chosen}\n  run log: {summary['run_dir']}/metrics.jsonl")


def dry_run(kind: str, config: RunConfig, data: Path, out: Path) -> dict:
    """What a run of `kind` would use, read without writing or locking: the resolved config and the values
    it takes from the data store (fields, grid, conditioning, training windows)."""
    from dyfcli.data import window_starts
    from dyfcli.store import open_store

    store = open_store(data)  # a missing or damaged store fails here (exit 4), before any GPU time is booked
    train_ranges = store.split_ranges("train") if "train" in store.splits else []
    windows = len(window_starts(train_ranges, config.data.horizon + 1))  # as training slices them
    return {"dry_run": True, "kind": kind, "data": str(data), "out": str(out),
            "store": {"fields": store.fields, "grid": list(store.grid), "conditioning": store.cond_names,
                      "series": int(store.ds.sizes["series"]), "train_windows": windows},
            "config": config.to_dict()}


def _render_dry_run(summary: dict) -> str:
    """The resolved config as YAML on stdout (a complete preset: save it and pass it to --preset), preceded
    by comments giving the store's values; under --json the JSON document carries both instead."""
    if not OPTIONS.json:
        import yaml

        store = summary["store"]
        print(f"# dyf train-{summary['kind']} --dry-run: nothing trained, written or locked\n"
              f"# data {summary['data']}: fields {', '.join(store['fields'])}; grid {store['grid'][0]} x "
              f"{store['grid'][1]}; conditioning {', '.join(store['conditioning']) or 'none'}; "
              f"{store['series']} series, {store['train_windows']} training windows\n"
              + yaml.safe_dump(summary["config"], sort_keys=False, default_flow_style=None), end="")
        sys.stdout.flush()
    return f"dry run: {summary['kind']} config resolved; nothing trained (drop --dry-run to train)"


def baseline_preset(method: str, data: Path) -> str | None:
    """The preset a baseline trains with when no --preset is given: the one the store's system calls for
    (`config.method_preset`: `sst-dropout`, `spring-mesh-perturbation`, ...), logged; a store that names no
    system is refused with the choices. None for DYffusion, which takes its interpolator's settings."""
    import logging

    from dyfcli.checkpoint import BASELINE_KINDS
    from dyfcli.config import method_preset, preset_names
    from dyfcli.errors import UsageError
    from dyfcli.store import SYSTEMS, open_store

    if method not in BASELINE_KINDS:
        return None
    system = open_store(data).system
    if system is None:
        raise UsageError(f"--method {method} needs --preset: the store {data} holds none of the systems with shipped "
                         f"settings ({', '.join(SYSTEMS)}); pass --preset NAME (one of {', '.join(preset_names())}) "
                         "or a YAML file")
    name = method_preset(system, method)
    logging.getLogger("dyf").info("no --preset given: using preset %s, the %s settings for %s stores", name,
                                  "official baseline" if name != system else "paper's DYffusion", system)
    return name


@app.command("train-interpolator")
def train_interpolator_command(
    data: Path = _DATA,
    out: Path = typer.Option(..., "--out", help="Interpolator checkpoint to write (e.g. interpolator.pt)."),
    preset: str = typer.Option(None, "--preset", help=_PRESET_HELP + " Default: tiny."),
    sets: list[str] = _SETS,
    device: str = _DEVICE,
    overwrite: bool = _OVERWRITE,
    dry: bool = _DRY_RUN,
) -> None:
    """Train DYffusion's stochastic interpolator (stage 1); keeps the best by validation CRPS.

    SIGTERM/SIGUSR1 save OUT.state.pt and exit 75 (Ctrl-C: 130); running the same command again resumes from it.
    """

    def workflow() -> dict:
        from dyfcli.config import load_config, require_stochastic_interpolator

        config = load_config(preset, sets)  # before importing torch: a bad setting fails at once
        require_stochastic_interpolator(config)
        if dry:
            return dry_run("interpolator", config, data, out)
        from dyfcli.train import train_interpolator

        return train_interpolator(data, out, config, device=device, overwrite=overwrite)

    run_command("train-interpolator", workflow, _render_dry_run if dry else _render)


@app.command("train-forecaster")
def train_forecaster_command(
    data: Path = _DATA,
    out: Path = typer.Option(..., "--out", help="Model checkpoint to write (e.g. model.pt)."),
    interpolator: Path = typer.Option(None, "--interpolator", help="Checkpoint from `dyf train-interpolator` "
                                      "(needed by --method dyffusion)."),
    method: str = typer.Option("dyffusion", "--method",
                               help="dyffusion, or a baseline: dropout, perturbation, ddpm, mcvd."),
    preset: str = typer.Option(None, "--preset", help=_PRESET_HELP + " Default: the interpolator's settings; for a "
                               "baseline, the preset of the store's system (`sst-dropout`, `spring-mesh-perturbation`, "
                               "...; refused for stores of no known system)."),
    sets: list[str] = _SETS,
    device: str = _DEVICE,
    overwrite: bool = _OVERWRITE,
    dry: bool = _DRY_RUN,
) -> None:
    """Train DYffusion's forecaster with the interpolator frozen (stage 2), or a baseline forecaster.

    SIGTERM/SIGUSR1 save OUT.state.pt and exit 75 (Ctrl-C: 130); running the same command again resumes from it.
    """

    def workflow() -> dict:
        from dyfcli.train import resolve_forecaster, train_forecaster

        chosen = preset if preset is not None else baseline_preset(method, data)
        if dry:
            config, _ = resolve_forecaster(method, interpolator, chosen, sets)
            return {**dry_run("forecaster", config, data, out), "method": method, "preset": chosen}
        summary = train_forecaster(data, out, interpolator=interpolator, method=method, preset=chosen,
                                   overrides=sets, device=device, overwrite=overwrite)
        return {**summary, "preset": chosen}

    run_command("train-forecaster", workflow, _render_dry_run if dry else _render)
