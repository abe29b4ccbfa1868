"""`dyf forecast`: run a trained model from many initial conditions into a forecast store (docs/design.md §5)."""

from __future__ import annotations

from pathlib import Path

import typer

from dyfcli.cli.app import app, run_command
from dyfcli.runtime import count_of

_INIT_HELP = (
    "Initial conditions inside the split: 'all' (every step whose whole horizon lies in the split; default "
    "for date splits), 'first' (the split's first step; default for series splits such as simulations, which "
    "start at step 0), 'every:N' (every N-th of 'all'), '0,5,10' (positions within the split, 0 = its first "
    "step) or '2020-01-01,2020-02-01T06:00' (dates or date-times, matched exactly; dated stores only)."
)


def _render(summary: dict) -> str:
    rate = summary.get("network_evals_per_s")
    return (f"forecast: {summary['out']}\n"
            f"  blocks: {summary['blocks_written']} written now, {summary['blocks_resumed']} already done, "
            f"{summary['blocks']} in all\n"
            f"  {count_of(summary['members'], 'member')} x {count_of(summary['leads'], 'lead time')} "
            f"({count_of(summary['windows'], 'window')}), "
            f"{summary['network_calls_per_member']} network calls per member\n"
            + (f"  {count_of(summary['pack'], 'block')} per pack, {count_of(summary['rows_per_call'], 'row')} per "
               f"network call\n" if summary.get("pack", 1) > 1 else "")
            + f"  {summary['seconds']} s on {summary['device']}"
            + (f", {rate} batched network calls/s" if rate else ""))


def _output_times(text: str | None) -> tuple[float, ...] | None:
    from dyfcli.errors import UsageError

    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--output-times {text!r}: expected comma-separated numbers such as 0.5,1,1.5") from None


@app.command("forecast")
def forecast_command(
    ckpt: Path = typer.Option(..., "--ckpt", help="model.pt from `dyf train-forecaster` (or a baseline)."),
    out: Path = typer.Option(..., "--out", help="The forecast store to write (Zarr)."),
    horizon: int = typer.Option(..., "--horizon", help="Lead times to forecast, in data time steps; beyond "
                                                       "the model's own horizon windows are chained."),
    ensemble: int = typer.Option(..., "--ensemble", help="Ensemble members per initial condition."),
    data: Path | None = typer.Option(None, "--data", help="Data store (default: the one the checkpoint "
                                                          "was trained on)."),
    split: str = typer.Option("test", "--split", help="Split of the data store to start from."),
    init: str | None = typer.Option(None, "--init", help=_INIT_HELP),
    steps: str | None = typer.Option(None, "--steps", help="DYffusion sampling schedule: full, only_dynamics, "
                                                           "everyN, firstN, only_dynamics_plusN (default: "
                                                           "the checkpoint's)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same forecast (whatever the ranks; on CPU bit for bit whatever --member-batch and --pack)."),
    member_batch: int | None = typer.Option(None, "--member-batch", help="Members per batch on a GPU "
                                                                         "(default: all); lower it to save memory. "
                                                                         "On CPU members run 8 at most at a time."),
    pack: int = typer.Option(1, "--pack", metavar="N", help="Blocks (series x initial time) whose members share "
                             "network batches: fewer, fuller calls for small grids and large GPUs (on a GPU "
                             "--member-batch x N rows per call). Same --seed, same forecast whatever N (on CPU "
                             "bit for bit: calls keep their rows there). Shown in the summary."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    output_times: str | None = typer.Option(None, "--output-times", help="Lead times within one window, e.g. "
                                            "0.5,1,1.5,2 (fractional ones need a model with refinement)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out (a dyf forecast store)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted forecast into --out (the default "
                                                        "when --out is an unfinished forecast made with the same "
                                                        "options)."),
    bf16: bool = typer.Option(False, "--bf16", help="Run the networks under bfloat16 autocast (CUDA only; "
                                                     "recorded in the store as dyf_precision)."),
    compile_networks: bool = typer.Option(False, "--compile", help="torch.compile the networks (CUDA only; pays "
                                                                    "off on long forecasts)."),
    compile_mode: str = typer.Option("default", "--compile-mode", metavar="MODE",
                                     help="torch.compile mode with --compile: default, reduce-overhead or "
                                          "max-autotune (both replay CUDA graphs: one launch per network call), "
                                          "max-autotune-no-cudagraphs. CUDA only, like --compile."),
    perturbation_sigma: float | None = typer.Option(
        None, "--perturbation-sigma", metavar="SIGMA",
        help="Perturbation baseline only: the noise's standard deviation (units the network sees) instead of the "
             "checkpoint's (recorded in the store as dyf_perturbation_sigma)."),
) -> None:
    """Forecast ensembles from every chosen initial condition and write them, in physical units, to a
    forecast store; run under torchrun or srun to spread initial conditions over GPUs.

    An interrupted forecast (Ctrl-C, SIGTERM: exit 130, 75) continues when the same command runs again; a
    finished --out, or one made with other options, needs --overwrite."""

    def workflow() -> dict:
        from dyfcli.forecast import ForecastRequest, run_forecast

        request = ForecastRequest(
            checkpoint=ckpt, out=out, horizon=horizon, ensemble=ensemble, data=data, split=split, init=init,
            steps=steps, seed=seed, member_batch=member_batch, device=device,
            output_times=_output_times(output_times), overwrite=overwrite, resume=resume, bf16=bf16,
            compile=compile_networks, perturbation_sigma=perturbation_sigma, pack=pack,
            compile_mode=compile_mode)
        return run_forecast(request)

    run_command("forecast", workflow, _render)
