"""The paper's skill comparison at an equal training budget, on the simulated spring mesh.

    .venv/bin/python benchmarks/skill.py --trajectories 12,2,3 --steps 300 --horizon 804 --ensemble 50 \
        [--methods dyffusion,dropout,perturbation,ddpm] [--dim 64] [--device auto] [--dir /tmp/skill]

Runs the real `dyf` commands (prepare, train-interpolator, train-forecaster, forecast, evaluate) with the
`spring-mesh` preset (h = 134, the paper's CNN) and prints one table: CRPS, MSE, SSR (means over lead
times, paper conventions), network evaluations per member and forecast wall time.

Equal budget: every network gets `--steps` optimiser steps; DYffusion trains two networks (interpolator and
forecaster), so each baseline gets 2 x `--steps` steps, the same number of optimiser steps in total.
Baseline settings follow the paper: Dropout uses dropout 0.05 in the forecaster network (kept on at
inference); Perturbation uses the deterministic network (dropout 0) and `--sigma` on the initial
condition; DDPM samples with DDIM over `--ddpm-sampling-steps` of its 1000 noise levels.
Small runs are far from converged; they show the machinery and relative behaviour, not the paper's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def dyf(*args: str, log: Path) -> dict:
    """Run `dyf --json ...`; its stderr goes to `log`; returns the JSON summary."""
    command = [sys.executable, "-m", "dyfcli", "--json", *args]
    with open(log, "a") as handle:
        handle.write(f"\n$ dyf {' '.join(args)}\n")
        handle.flush()
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=handle, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"dyf {' '.join(args[:2])} failed with exit {proc.returncode}; see {log}")
    return json.loads(proc.stdout)


def common_sets(args) -> list[str]:
    sets = ["data.num_workers=0", f"data.batch_size={args.batch_size}", f"training.validate_every={max(args.steps // 2, 1)}",
            "training.val_max_batches=2", "training.val_ensemble=10", "training.log_every=50",
            f"forecaster.network.hyper.dim={args.dim}", f"interpolator.network.hyper.dim={args.dim}"]
    return [part for item in sets for part in ("--set", item)]


def method_sets(method: str, args) -> list[str]:
    budget = {"dyffusion": args.steps}.get(method, 2 * args.steps)
    sets = [f"forecaster.max_steps={budget}"]
    if method == "dropout":
        sets.append("forecaster.network.dropout.dropout=0.05")
    if method == "perturbation":
        sets.append(f"baseline.perturbation_sigma={args.sigma}")
    if method == "ddpm":
        sets += ["baseline.diffusion_steps=1000", f"baseline.sampling_steps={args.ddpm_sampling_steps}"]
    return [part for item in sets for part in ("--set", item)]


def run_method(method: str, store: Path, folder: Path, args, log: Path) -> dict:
    model = folder / f"{method}.pt"
    started = time.perf_counter()
    if method == "dyffusion":
        interpolator = folder / "interpolator.pt"
        if not interpolator.exists():
            dyf("train-interpolator", "--data", str(store), "--preset", "spring-mesh", *common_sets(args),
                "--set", f"interpolator.max_steps={args.steps}", "--device", args.device,
                "--out", str(interpolator), log=log)
        train = ["--interpolator", str(interpolator)]
    else:
        train = ["--method", method, "--preset", "spring-mesh"]
    if not model.exists():
        dyf("train-forecaster", "--data", str(store), *train, *common_sets(args), *method_sets(method, args),
            "--device", args.device, "--out", str(model), log=log)
    train_seconds = time.perf_counter() - started
    forecast = folder / f"{method}.forecast.zarr"
    summary = dyf("forecast", "--ckpt", str(model), "--data", str(store), "--split", "test",
                  "--horizon", str(args.horizon), "--ensemble", str(args.ensemble), "--device", args.device,
                  "--out", str(forecast), "--overwrite", log=log)
    scores = dyf("evaluate", str(forecast), "--out", str(folder / f"{method}.scores.csv"), log=log)
    fields = scores["fields"]
    mean = lambda metric: sum(scores["scores"][f][metric]["mean"] for f in fields) / len(fields)  # noqa: E731
    return {"method": method, "crps": mean("crps"), "mse": mean("mse"), "ssr": mean("ssr"),
            "network_calls": summary["network_calls_per_member"], "forecast_s": summary["seconds"],
            "train_s": train_seconds, "persistence_crps": sum(
                scores["baselines"]["persistence"][f]["crps"]["mean"] for f in fields) / len(fields)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", default="12,2,3", help="train,val,test trajectories to simulate")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per network")
    parser.add_argument("--horizon", type=int, default=804, help="lead times to forecast (804: full test rollouts)")
    parser.add_argument("--ensemble", type=int, default=50)
    parser.add_argument("--methods", default="dyffusion,dropout,perturbation")
    parser.add_argument("--dim", type=int, default=64, help="CNN width (64: the paper's)")
    parser.add_argument("--batch-size", type=int, default=64, help="training windows per step (64: the paper's)")
    parser.add_argument("--sigma", type=float, default=0.05, help="Perturbation's noise (normalised units)")
    parser.add_argument("--ddpm-sampling-steps", type=int, default=50)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (kept; re-running reuses models)")
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="dyf-skill-"))
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "log.txt"
    store = folder / "spring-mesh.zarr"
    if not store.exists():
        dyf("prepare", "spring-mesh", "--out", str(store), "--trajectories", args.trajectories, "--device", "cpu",
            log=log)
    rows = []
    for method in args.methods.split(","):
        print(f"[{time.strftime('%H:%M:%S')}] {method} ...", file=sys.stderr, flush=True)
        rows.append(run_method(method, store, folder, args, log))
    print(f"spring mesh, {args.trajectories} trajectories, {args.steps} steps per network "
          f"(baselines {2 * args.steps}), batch {args.batch_size}, dim {args.dim}, horizon {args.horizon}, {args.ensemble} members, "
          f"device {args.device}, {os.cpu_count()} cores; work folder {folder}")
    header = f"{'method':<13}{'CRPS':>10}{'MSE':>12}{'SSR':>8}{'net evals':>11}{'forecast s':>12}{'train s':>9}"
    print(header)
    for row in rows:
        print(f"{row['method']:<13}{row['crps']:>10.4f}{row['mse']:>12.3e}{row['ssr']:>8.3f}"
              f"{row['network_calls']:>11}{row['forecast_s']:>12.1f}{row['train_s']:>9.0f}")
    print(f"{'persistence':<13}{rows[0]['persistence_crps']:>10.4f}")


if __name__ == "__main__":
    main()
