"""`dyf prepare navier-stokes` and `dyf prepare spring-mesh`: nn-benchmark systems, read or simulated."""

from __future__ import annotations

from pathlib import Path

import typer

from dyfcli.cli.app import parse_csv_ints, prepare_app, run_command

FROM_HELP = ("Read the original nn-benchmark files instead of simulating: the data folder (containing "
             "{archive}/run/data_gen/), that data_gen folder, or a folder of split folders, each with "
             "trajectories.npz and system_meta.json.")
DEVICE_HELP = "Where to simulate: auto (a GPU when there is one), cpu, cuda or cuda:N."
NORMALIZATION_HELP = ("global: networks see z-scores of each field (training mean and std); none: raw units, as "
                      "the official code trains this system (recorded in the store; the statistics are kept).")


def _counts(text: str | None, splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, int] | None:
    if text is None:
        return None
    return dict(zip(splits, parse_csv_ints(text, "--trajectories", count=len(splits))))


def _render(summary: dict) -> str:
    splits = ", ".join(f"{name} {count}" for name, count in summary["splits"].items())
    lines = [f"wrote {summary['out']}: {summary['system']}, {summary['series']} series ({splits}), "
             f"{summary['steps']} steps of {summary['time_step']:g}, grid {summary['grid'][0]} × {summary['grid'][1]} "
             f"(y, x), fields {', '.join(summary['fields'])}",
             f"  source: {summary['source']}; normalization {summary.get('normalization', 'global')}"]
    lines += [f"  {name}: mean {stat['mean']:.4g}, std {stat['std']:.4g} (train)"
              for name, stat in summary["statistics"].items()]
    return "\n".join(lines)


@prepare_app.command("navier-stokes")
def navier_stokes_command(
    out: Path = typer.Option(..., "--out", help="The data store to write (Zarr folder)."),
    source: Path | None = typer.Option(None, "--from", help=FROM_HELP.format(archive="navier-stokes-multi")),
    trajectories: str | None = typer.Option(
        None, "--trajectories", metavar="TRAIN,VAL,TEST",
        help="Trajectories per split; simulated default 100,2,5 (the paper's). With --from: keep the first "
             "ones of each split (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the obstacle placement; same seed, same store."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    resolution: int = typer.Option(
        1, "--resolution", help="Solver cells per 0.01 output spacing: 1 (h = 0.01) or 2 (h = 0.005, ~8× slower)."),
    snapshots: int = typer.Option(65, "--snapshots", hidden=True, help="Simulate only the first N snapshots."),
    normalization: str = typer.Option("global", "--normalization", help=NORMALIZATION_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
) -> None:
    """Flow past four random cylinders in the DFG channel (nn-benchmark "navier-stokes-multi").

    Fields u, v (m s-1) and p (Pa, density 1) at t = 0.08 … 5.2 on 42 (y) × 221 (x) nodes of spacing
    0.01; nodes inside obstacles are masked. Conditioning: cond_fixed (walls, inlet, obstacles) and
    cond_obstacle. The built-in solver (MAC projection) gives data statistically similar to the
    original PolyFEM runs, not identical; use --from to read the originals.
    """
    def workflow() -> dict:
        from dyfcli.sources.navier_stokes import prepare_navier_stokes

        return prepare_navier_stokes(out, source=source, counts=_counts(trajectories), seed=seed, device=device,
                                     overwrite=overwrite, snapshots=snapshots, resolution=resolution,
                                     normalization=normalization)

    run_command("prepare navier-stokes", workflow, _render)


@prepare_app.command("spring-mesh")
def spring_mesh_command(
    out: Path = typer.Option(..., "--out", help="The data store to write (Zarr folder)."),
    source: Path | None = typer.Option(None, "--from", help=FROM_HELP.format(archive="spring-mesh")),
    trajectories: str | None = typer.Option(
        None, "--trajectories", metavar="TRAIN,VAL,TEST",
        help="Trajectories per split; simulated default 100,3,15 (the paper's). With --from: keep the first "
             "ones of each split (default: all)."),
    ood: bool = typer.Option(
        False, "--ood",
        help="Also write the out-of-distribution test split 'test_ood' (as many series as 'test', initial "
             "displacements of radius 0.35-0.45; with --from, the archive's _eval-outdist- folder)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial displacements; same seed, same store."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    substeps: int = typer.Option(1, "--substeps", help="RK4 steps per output step of 0.00781."),
    snapshots: int = typer.Option(805, "--snapshots", hidden=True, help="Simulate only the first N snapshots."),
    normalization: str = typer.Option("global", "--normalization", help=NORMALIZATION_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
) -> None:
    """A damped 10 × 10 spring mesh with its top row pinned (nn-benchmark "springmesh-10-perturball").

    Fields px, py (momentum) and qx, qy (position) of each particle at t = 0 … 6.28 (805 steps of
    0.00781) on a 10 (y) × 10 (x) grid: row y = 9 is the pinned row (DYffusion's grid is the transpose).
    Conditioning: cond_fixed (pinned particles).
    """
    def workflow() -> dict:
        from dyfcli.sources.spring_mesh import prepare_spring_mesh

        return prepare_spring_mesh(out, source=source, counts=_counts(trajectories), ood=ood, seed=seed,
                                   device=device, overwrite=overwrite, snapshots=snapshots, substeps=substeps,
                                   normalization=normalization)

    run_command("prepare spring-mesh", workflow, _render)
