"""The paper's skill comparison at an equal training budget, with error bars over seeds, CPU-sized.

    .venv/bin/python benchmarks/skill.py --dir /tmp/skill                  # spring mesh, 1 seed
    .venv/bin/python benchmarks/skill.py --dir /tmp/skill --seeds 3        # mean ± std over 3 seeds
    .venv/bin/python benchmarks/skill.py --dir /tmp/skill --methods dyffusion --last-step cold,direct   # item 3
    .venv/bin/python benchmarks/skill.py --dir /tmp/ns --dataset navier-stokes
    .venv/bin/python benchmarks/skill.py --dir /tmp/skill --budget per-network    # reuses DYffusion's models

Runs the real `dyf` commands (prepare, train-interpolator, train-forecaster, forecast, evaluate) and prints
one table like the paper's (docs/paper-notes.md §8): CRPS, MSE, SSR (means over fields and lead times,
physical units, as `dyf evaluate` reports them; with `--seeds N` the mean ± standard deviation over N seeds),
network evaluations per member, forecast and training wall time, the paper's numbers beside ours, rows for
persistence and climatology, the CRPS per forecast window and the spread at window boundaries.

Seeds: seed i trains every network with `training.seed` = preset seed + i and forecasts with `--seed i`
(the data and the test initial conditions stay the same), so the ± covers training and sampling.

Data sets (`--dataset`):
  spring-mesh    simulated, 20 train / 2 val / 3 test trajectories of 805 steps (`dyf prepare spring-mesh
                 --trajectories 20,2,3`; paper 100 / 3 / 15); preset presets/spring-mesh-small.yaml: the
                 paper's SimpleConvNet at width 32 (paper 64), 32-step windows (paper h = 134), lr 4e-4, batch
                 64; 128 lead times (4 windows; paper 804 = 6 windows of 134). Paper: spring-mesh table.
  navier-stokes  simulated, 8 train / 2 val / 3 test trajectories of 65 snapshots on the paper's 221 x 42 grid
                 (`dyf prepare navier-stokes --trajectories 8,2,3`; paper: the nn-benchmark's 80 / 2 / 5 ...);
                 preset presets/navier-stokes-small.yaml: the NS UNet at width 16 resampled to 64 x 64 (paper
                 64 at 256 x 256), h = 16 as the paper, MCVD h = 4 as the paper; 64 lead times from the first
                 snapshot (the paper's full test trajectories), batch 16. Paper: Table 1's Navier-Stokes columns.

Budget (`--budget total`, default): DYffusion trains two networks, interpolator and forecaster, STEPS
optimiser steps each; every baseline trains its single network for 2 x STEPS steps, so every method gets the
same number of optimiser steps of the same batch size. `--budget per-network`: STEPS each (as the paper,
where each network trains the same number of epochs). The checkpoint kept is the best of the validations
every STEPS/2 steps and at the end (2 batches of 16 validation windows, 10 members), for every method alike.

Methods (`--methods`, in order):
  dyffusion     the preset's DYffusion settings. `--last-step cold,direct` adds one row per choice of the last
                sampling step (Algorithm 2's cold update, or x^_h returned directly; the presets return x^_h
                since the official code's October 2024 change): the network is trained once, with the first
                choice, and the other variants are the same weights with `forecaster.cold_last_step` switched
                (a sampling-only setting), so the rows differ in the last step alone.
  dropout       the time-conditioned forecaster with dropout `--dropout` (default: the official time-conditioned
                config's, 0.05 spring mesh, 0.2 Navier-Stokes), MC dropout at inference.
  perturbation  the same network trained with dropout 0; in the first window every member and lead starts from
                its own x0 + sigma * N(0, 1) (normalised units; the official mechanism, dyf's default
                `baseline.perturbation_noise`), sigma chosen on the VALIDATION split from `--sigma-grid`
                (`--sigma auto`).
  mcvd          `--method mcvd` (dyfcli/mcvd.py): the h future frames denoised jointly, linear betas, T = 1000,
                sampled over all 1000 levels + 1 denoise call per window (`--mcvd-sampling-steps` fewer).
  ddpm          cosine betas, T = 1000, DDIM (eta 1) over `--ddpm-sampling-steps` levels. Not in the default
                methods: at these budgets its samples diverge (the paper: DDPM "did not converge" on the mesh).
  persistence and climatology rows come from `dyf evaluate` (1-member references: CRPS = MAE, no SSR).

Spread at window boundaries: DYffusion (and every method that restarts from its own forecast each window)
forecasts window k + 1 from one state per member; the spread and SSR drop at its first lead, a saw-tooth of
period h. The figure printed is the mean over boundaries and fields of spread(first lead of a window) /
spread(last lead of the window before), and the SSR at both (1.0 = no drop).

The `train s` column is wall time on a possibly shared machine: compare steps, not seconds, across methods.
Small runs are far from converged; they show relative behaviour at this budget, not the paper's numbers.
The work folder keeps the stores and the models (their names carry the settings that shape them), so
re-running with other flags in the same `--dir` reuses whatever it can.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("dyffusion", "dropout", "perturbation", "mcvd", "ddpm")
LAST_STEPS = ("cold", "direct")
METRICS = ("crps", "mse", "ssr")


@dataclass(frozen=True)
class Dataset:
    """How one data set is made and forecast in this benchmark, and the paper's numbers for it."""

    prepare: str  # `dyf prepare` subcommand
    trajectories: str
    preset: Path
    window: int  # DYffusion's (and the other baselines') h
    mcvd_window: int  # MCVD's h (the paper trained MCVD on shorter windows for Navier-Stokes)
    horizon: int
    dim: int
    batch_size: int
    dropout: float  # the Dropout baseline's dropout in the official time-conditioned config
    paper_caption: str
    paper: dict[str, tuple[float, float, float]]  # method -> (CRPS, MSE, SSR)


DATASETS = {
    "spring-mesh": Dataset(
        "spring-mesh", "20,2,3", REPO / "presets" / "spring-mesh-small.yaml", window=32, mcvd_window=32,
        horizon=128, dim=32, batch_size=64, dropout=0.05,
        paper_caption="paper: spring-mesh table, test split, h = 134, 804 lead times; DDPM and MCVD did not converge",
        paper={"dropout": (0.0138, 7.27e-4, 1.01), "dyffusion": (0.0103, 4.20e-4, 1.13)}),
    "navier-stokes": Dataset(
        "navier-stokes", "8,2,3", REPO / "presets" / "navier-stokes-small.yaml", window=16, mcvd_window=4,
        horizon=64, dim=16, batch_size=16, dropout=0.2,
        paper_caption="paper: Table 1, Navier-Stokes, 64 lead times; h = 16 (MCVD 4, DDPM 1)",
        paper={"perturbation": (0.090, 0.028, 0.448), "dropout": (0.078, 0.027, 0.715),
               "ddpm": (0.180, 0.105, 0.573), "mcvd": (0.154, 0.070, 0.524), "dyffusion": (0.067, 0.022, 0.877)}),
}


# ================================================================================================ running dyf

def dyf(*args: str, log: Path) -> dict:
    """Run `dyf --json ...`; its stderr goes to `log`; returns the JSON summary."""
    command = [sys.executable, "-m", "dyfcli", "--json", *args]
    with open(log, "a") as handle:
        handle.write(f"\n[{time.strftime('%H:%M:%S')}] $ dyf {' '.join(args)}\n")
        handle.flush()
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=handle, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"dyf {' '.join(args[:2])} failed with exit {proc.returncode}; see {log}")
    return json.loads(proc.stdout)


def as_sets(items: list[str]) -> list[str]:
    return [part for item in items for part in ("--set", item)]


def window_of(method: str, args) -> int:
    return args.mcvd_window if method == "mcvd" else args.window


def common_sets(args, steps: int, window: int, seed: int) -> list[str]:
    """Settings every training run shares (the preset holds the rest)."""
    items = [f"data.horizon={window}", f"data.batch_size={args.batch_size}",
             f"forecaster.network.hyper.dim={args.dim}", f"interpolator.network.hyper.dim={args.dim}",
             f"training.validate_every={max(steps // 2, 1)}"]
    if seed:  # seed 0 keeps the preset's training seed (and the model names of runs without --seeds)
        items.append(f"training.seed={args.preset_seed + seed}")
    return as_sets(items)


def baseline_steps(args) -> int:
    return 2 * args.steps if args.budget == "total" else args.steps


def method_sets(method: str, args, steps: int) -> list[str]:
    sets = [f"forecaster.max_steps={steps}"]
    if method == "dropout":
        sets.append(f"forecaster.network.dropout.dropout={args.dropout}")
    if method in ("perturbation", "ddpm", "mcvd"):
        sets.append("forecaster.network.dropout.dropout=0.0")
    if method == "ddpm":
        sets += ["baseline.diffusion_steps=1000", f"baseline.sampling_steps={args.ddpm_sampling_steps}"]
    if method == "mcvd":
        sets += ["baseline.diffusion_steps=1000", f"baseline.sampling_steps={args.mcvd_sampling_steps}"]
    return as_sets(sets)


def model_name(method: str, args, steps: int, seed: int) -> str:
    """The file stem of a trained model: every setting that shapes its weights or its sampler."""
    extra = {"dropout": f"_p{args.dropout}", "ddpm": f"_S{args.ddpm_sampling_steps}",
             "mcvd": f"_S{args.mcvd_sampling_steps}"}.get(method, "")
    if method == "dyffusion" and args.last_step[0] == "cold":
        extra = "_cold"
    seed_tag = f"_seed{seed}" if seed else ""
    return f"{method}_h{window_of(method, args)}_dim{args.dim}_bs{args.batch_size}_steps{steps}{extra}{seed_tag}"


def recorded_train_seconds(model: Path) -> float | None:
    """Wall seconds of the run that trained `model`, from its run log (`<model>.run/metrics.jsonl`: the
    `started` and `finished` events), so a reused model reports its training time, not 0."""
    events = model.with_name(model.name + ".run") / "metrics.jsonl"
    if not events.exists():
        return None
    times = {}
    for line in events.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") in ("started", "finished"):
            times.setdefault(record["event"], record["time"])  # the first start, the first finish
    return times["finished"] - times["started"] if len(times) == 2 else None


def train(method: str, store: Path, folder: Path, args, seed: int, log: Path) -> tuple[Path, float]:
    """The trained model of `method` (trained now unless the folder has it) and its training seconds
    (DYffusion: interpolator + forecaster), as recorded by the runs that trained them."""
    started = time.perf_counter()
    window = window_of(method, args)
    interpolator = None
    if method == "dyffusion":
        seed_tag = f"_seed{seed}" if seed else ""
        shape = f"h{window}_dim{args.dim}_bs{args.batch_size}"
        interpolator = folder / f"interpolator_{shape}_steps{args.steps}{seed_tag}.pt"
        if not interpolator.exists():
            dyf("train-interpolator", "--data", str(store), "--preset", str(args.preset),
                *common_sets(args, args.steps, window, seed),
                "--set", f"interpolator.max_steps={args.steps}", "--device", args.device,
                "--out", str(interpolator), log=log)
        steps, source = args.steps, ["--interpolator", str(interpolator)]
        last_step = as_sets([f"forecaster.cold_last_step={str(args.last_step[0] == 'cold').lower()}"])
    else:
        steps, source = baseline_steps(args), ["--method", method, "--preset", str(args.preset)]
        last_step = []
    model = folder / f"{model_name(method, args, steps, seed)}.pt"
    if not model.exists():
        dyf("train-forecaster", "--data", str(store), *source, *common_sets(args, steps, window, seed),
            *method_sets(method, args, steps), *last_step, "--device", args.device, "--out", str(model), log=log)
    recorded = [recorded_train_seconds(path) for path in (interpolator, model) if path is not None]
    return model, (sum(recorded) if None not in recorded else time.perf_counter() - started)


def with_config(model: Path, section: str, key: str, value, tag: str) -> Path:
    """A copy of `model` whose config has `section.key = value`, for a setting that changes sampling only
    (the weights do not depend on it). Saved through dyf's checkpoint module, which records fresh checksums:
    a checkpoint edited by hand fails its checksums at load."""
    import copy as copying
    import dataclasses

    from dyfcli.checkpoint import load_checkpoint, save_checkpoint

    copy = model.with_name(f"{model.stem}_{tag}.pt")
    if not copy.exists():
        checkpoint = load_checkpoint(model)
        config = copying.deepcopy(checkpoint.config)
        config[section][key] = value
        save_checkpoint(copy, dataclasses.replace(checkpoint, config=config))
    return copy


# ================================================================================================ scoring

def field_mean(table: dict, fields: list[str], metric: str, part: str = "mean"):
    """A score averaged over fields: a number (`mean`) or a per-lead list (`per_lead`)."""
    if part == "mean":
        return sum(table[f][metric]["mean"] for f in fields) / len(fields)
    return [sum(values) / len(fields) for values in zip(*(table[f][metric]["per_lead"] for f in fields))]


def window_means(per_lead: list[float], window: int) -> list[float]:
    return [sum(chunk) / len(chunk) for chunk in (per_lead[s:s + window] for s in range(0, len(per_lead), window))]


def boundary_drop(scores: dict, fields: list[str], window: int) -> dict[str, float] | None:
    """Spread and SSR at the first lead of each window (2nd onwards) against the lead before it.

    Leads are 1-based: window k covers (k-1)h+1 .. kh, so the pairs are (lead kh, lead kh+1), k = 1, 2, ...
    Returns the mean over pairs and fields of spread(first)/spread(before), and the mean SSR at both;
    None when the forecast has a single window."""
    leads = len(scores[fields[0]]["spread"]["per_lead"])
    pairs = [(k * window - 1, k * window) for k in range(1, (leads - 1) // window + 1)]  # 0-based indices
    if not pairs:
        return None
    ratios, ssr_first, ssr_before = [], [], []
    for field in fields:
        spread, ssr = scores[field]["spread"]["per_lead"], scores[field]["ssr"]["per_lead"]
        for before, first in pairs:
            if spread[before] > 0:
                ratios.append(spread[first] / spread[before])
            ssr_first.append(ssr[first])
            ssr_before.append(ssr[before])
    return {"spread_ratio": statistics.fmean(ratios) if ratios else float("nan"),
            "ssr_first": statistics.fmean(ssr_first), "ssr_before": statistics.fmean(ssr_before),
            "boundaries": len(pairs)}


def summarize(scores: dict, window: int, crps_window: int) -> dict:
    """The benchmark's numbers from a `dyf evaluate --json` document (fields averaged; an `all` row skipped)."""
    fields = [f for f in scores["fields"] if f != "all"]
    table, references = scores["scores"], scores["baselines"]
    row = {metric: field_mean(table, fields, metric) for metric in METRICS}
    row["crps_per_window"] = window_means(field_mean(table, fields, "crps", "per_lead"), crps_window)
    row["boundary"] = boundary_drop(table, fields, window)
    row["references"] = {name: {metric: field_mean(references[name], fields, metric) for metric in ("crps", "mse")}
                         for name in ("persistence", "climatology") if name in references}
    return row


def finished_forecast(forecast: Path, model: Path, args, seed: int) -> dict | None:
    """`dyf forecast`'s numbers for a finished store made from this very checkpoint with the same seed,
    horizon and ensemble (so re-running in the same --dir only re-evaluates it), else None. Its seconds
    are the store's creation-to-completion time."""
    import hashlib
    from datetime import datetime

    from dyfcli.forecast_store import read_attrs

    attrs = read_attrs(forecast) if forecast.exists() else None
    if not attrs or not attrs.get("dyf_complete"):
        return None
    decoded = {key: json.loads(value) if isinstance(value, str) and value[:1] in "{[" else value
               for key, value in attrs.items()}
    wanted = {"checkpoint_sha256": hashlib.sha256(model.read_bytes()).hexdigest(), "seed": seed,
              "horizon": args.horizon, "ensemble": args.ensemble}
    if any(decoded.get("dyf_identity", {}).get(key) != value for key, value in wanted.items()):
        return None
    seconds = datetime.fromisoformat(decoded["dyf_completed"]) - datetime.fromisoformat(decoded["dyf_created"])
    return {"network_calls_per_member": decoded["dyf_network_calls"]["per_member"],
            "seconds": seconds.total_seconds()}


def score(model: Path, store: Path, split: str, args, seed: int, window: int, log: Path) -> dict:
    """Forecast `split` from its first steps with `--seed seed` (unless done before) and score it."""
    forecast = model.with_name(f"{model.stem}.{split}.h{args.horizon}.m{args.ensemble}.seed{seed}.zarr")
    summary = finished_forecast(forecast, model, args, seed) or dyf(
        "forecast", "--ckpt", str(model), "--data", str(store), "--split", split, "--horizon", str(args.horizon),
        "--ensemble", str(args.ensemble), "--seed", str(seed), "--device", args.device, "--out", str(forecast),
        "--overwrite", log=log)
    scores = dyf("evaluate", str(forecast), "--out", str(forecast.with_suffix(".scores.csv")), "--overwrite",
                 log=log)
    return {**summarize(scores, window, args.window), "network_calls": summary["network_calls_per_member"],
            "forecast_s": summary["seconds"]}


def choose_sigma(model: Path, store: Path, args, seed: int, log: Path) -> tuple[float, dict[float, float]]:
    """Perturbation's sigma: the value of the grid with the lowest validation CRPS (or the fixed --sigma)."""
    if args.sigma != "auto":
        return float(args.sigma), {}
    val_crps = {sigma: score(with_config(model, "baseline", "perturbation_sigma", float(sigma), f"sigma{sigma:g}"),
                             store, "val", args, seed, args.window, log)["crps"]
                for sigma in args.sigma_grid}
    return min(val_crps, key=val_crps.get), val_crps


def run_method(method: str, store: Path, folder: Path, args, seed: int, log: Path) -> list[dict]:
    """One row per variant of `method` (DYffusion: one per `--last-step` choice) for one seed."""
    model, train_seconds = train(method, store, folder, args, seed, log)
    base = {"method": method, "seed": seed, "train_s": train_seconds,
            "train_steps": 2 * args.steps if method == "dyffusion" else baseline_steps(args)}
    window = window_of(method, args)
    if method == "perturbation":
        sigma, val_crps = choose_sigma(model, store, args, seed, log)
        base["sigma"], base["sigma_val_crps"] = sigma, val_crps
        print(f"  perturbation sigma {sigma:g} (validation CRPS by sigma: "
              f"{', '.join(f'{s:g}: {c:.4f}' for s, c in val_crps.items()) or 'fixed'})", file=sys.stderr, flush=True)
        return [{**base, "label": "perturbation",
                 **score(with_config(model, "baseline", "perturbation_sigma", sigma, f"sigma{sigma:g}"),
                         store, "test", args, seed, window, log)}]
    if method != "dyffusion":
        return [{**base, "label": method, **score(model, store, "test", args, seed, window, log)}]
    rows = []
    for index, last_step in enumerate(args.last_step):
        variant = model if index == 0 else with_config(model, "forecaster", "cold_last_step", last_step == "cold",
                                                       f"last{last_step}")
        label = f"dyffusion {last_step}" if len(args.last_step) > 1 else "dyffusion"
        rows.append({**base, "label": label, "last_step": last_step,
                     **score(variant, store, "test", args, seed, window, log)})
    return rows


# ================================================================================================ the table

def aggregate(rows: list[dict]) -> list[dict]:
    """Rows of the same label (one per seed) -> one row: mean and standard deviation (ddof 1) per score."""
    labels = list(dict.fromkeys(row["label"] for row in rows))
    out = []
    for label in labels:
        group = [row for row in rows if row["label"] == label]
        merged = {"label": label, "method": group[0]["method"], "seeds": len(group)}
        for key in (*METRICS, "forecast_s", "train_s"):
            values = [row[key] for row in group]
            merged[key] = statistics.fmean(values)
            merged[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        merged["network_calls"] = group[0]["network_calls"]
        merged["train_steps"] = group[0]["train_steps"]
        merged["crps_per_window"] = [statistics.fmean(v) for v in zip(*(row["crps_per_window"] for row in group))]
        boundaries = [row["boundary"] for row in group if row["boundary"]]
        merged["boundary"] = ({key: statistics.fmean(b[key] for b in boundaries) for key in boundaries[0]}
                              if boundaries else None)
        if "sigma" in group[0]:
            merged["sigmas"] = [row["sigma"] for row in group]
        out.append(merged)
    return out


def with_error(mean: float, std: float, seeds: int, digits: str) -> str:
    return f"{mean:{digits}}" + (f"±{std:{digits}}" if seeds > 1 else "")


def print_table(rows: list[dict], args, folder: Path, wall_s: float) -> None:
    dataset = DATASETS[args.dataset]
    seeds = rows[0]["seeds"]
    print(f"{args.dataset}, trajectories {args.trajectories} (train,val,test), window h={args.window}"
          f"{f' (mcvd {args.mcvd_window})' if args.mcvd_window != args.window else ''}, dim {args.dim}, "
          f"batch {args.batch_size}, budget {args.budget}: DYffusion {args.steps}+{args.steps} steps, baselines "
          f"{baseline_steps(args)} steps; {args.horizon} lead times, {args.ensemble} members, "
          f"{seeds} seed{'s' if seeds > 1 else ''} (mean{' ± std' if seeds > 1 else ''}), device {args.device}, "
          f"{os.cpu_count()} cores; work folder {folder}")
    print(f"{'method':<22}{'CRPS':>17}{'MSE':>21}{'SSR':>13}{'net evals':>10}{'fcst s':>8}{'train steps':>12}"
          f"{'train s':>8}   {'paper CRPS':>10}{'MSE':>9}{'SSR':>6}")
    for row in rows:
        name = row["label"] + (f" s={','.join(f'{s:g}' for s in row['sigmas'])}" if "sigmas" in row else "")
        paper = dataset.paper.get(row["method"])
        paper_text = f"   {paper[0]:>10.4g}{paper[1]:>9.3g}{paper[2]:>6.3g}" if paper else "   " + f"{'-':>10}"
        print(f"{name:<22}{with_error(row['crps'], row['crps_std'], seeds, '.4f'):>17}"
              f"{with_error(row['mse'], row['mse_std'], seeds, '.3e'):>21}"
              f"{with_error(row['ssr'], row['ssr_std'], seeds, '.3f'):>13}{row['network_calls']:>10}"
              f"{row['forecast_s']:>8.0f}{row['train_steps']:>12}{row['train_s']:>8.0f}{paper_text}")
    references = rows[0].get("references", {})
    for name, values in references.items():
        print(f"{name:<22}{values['crps']:>17.4f}{values['mse']:>21.3e}{'-':>13}{1:>10}")
    print(f"  ({dataset.paper_caption})")
    print(f"CRPS by forecast window of {args.window} lead times:")
    for row in rows:
        print(f"  {row['label']:<20}" + "".join(f"{value:>9.4f}" for value in row["crps_per_window"]))
    print("spread at window boundaries (mean over boundaries and fields; first lead of a window vs the lead "
          "before it):")
    for row in rows:
        drop = row["boundary"]
        if drop:
            print(f"  {row['label']:<20} spread ratio {drop['spread_ratio']:.3f}   SSR {drop['ssr_before']:.3f} -> "
                  f"{drop['ssr_first']:.3f}   ({drop['boundaries']:.0f} boundaries of period "
                  f"{args.mcvd_window if row['method'] == 'mcvd' else args.window})")
    by_label = {row["label"]: row for row in rows}
    dyffusion = next((row for row in rows if row["method"] == "dyffusion"), None)
    if dyffusion and "dropout" in by_label:
        gain = 1 - dyffusion["crps"] / by_label["dropout"]["crps"]
        paper = dataset.paper.get("dyffusion"), dataset.paper.get("dropout")
        paper_gain = f"{100 * (1 - paper[0][0] / paper[1][0]):.1f}% below" if all(paper) else "n/a"
        print(f"{dyffusion['label']}'s CRPS is {100 * abs(gain):.1f}% {'below' if gain >= 0 else 'ABOVE'} "
              f"Dropout's (paper: {paper_gain})")
    print(f"wall time {wall_s:.0f} s ({wall_s / 60:.1f} min)")


# ================================================================================================ main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    parser.add_argument("--dataset", choices=tuple(DATASETS), default="spring-mesh", help="data set to simulate")
    parser.add_argument("--trajectories", default=None, help="train,val,test trajectories (default: per data set)")
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps per DYffusion network (see --budget)")
    parser.add_argument("--budget", choices=("total", "per-network"), default="total",
                        help="total: baselines get 2 x STEPS (same total steps); per-network: STEPS each")
    parser.add_argument("--seeds", type=int, default=1, help="training and sampling seeds (mean ± std over them)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seed index to start from (to spread seeds over processes; a --seeds run reuses them)")
    parser.add_argument("--window", type=int, default=None, help="training window h (default: per data set)")
    parser.add_argument("--mcvd-window", type=int, default=None, help="MCVD's window (default: per data set)")
    parser.add_argument("--horizon", type=int, default=None, help="lead times to forecast (default: per data set)")
    parser.add_argument("--ensemble", type=int, default=50, help="members per initial condition")
    parser.add_argument("--methods", default="dyffusion,dropout,perturbation,mcvd",
                        help=f"comma-separated, in order, of {', '.join(METHODS)}")
    parser.add_argument("--last-step", default=None,
                        help="DYffusion's last sampling step: cold, direct, or cold,direct for both "
                             "(default: the preset's forecaster.cold_last_step)")
    parser.add_argument("--dim", type=int, default=None, help="network width (default: per data set)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="training windows per step (default: per data set; paper: 64 spring mesh, 32 x 2 NS)")
    parser.add_argument("--dropout", type=float, default=None,
                        help="Dropout baseline's dropout (default: the official per data set, 0.05 spring mesh, 0.2 NS)")
    parser.add_argument("--sigma", default="auto", help="Perturbation's noise (normalised units), or 'auto'")
    parser.add_argument("--sigma-grid", default="0.01,0.03,0.1,0.3,1,3",
                        type=lambda text: [float(v) for v in text.split(",")], help="sigmas tried by --sigma auto")
    parser.add_argument("--mcvd-sampling-steps", type=int, default=1000, help="MCVD's sampled levels of 1000")
    parser.add_argument("--ddpm-sampling-steps", type=int, default=50, help="DDIM steps of DDPM's 1000")
    parser.add_argument("--preset", type=Path, default=None, help="preset YAML (default: per data set)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (kept; re-running reuses models)")
    args = parser.parse_args(argv)
    return resolve_defaults(args, parser)


def resolve_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill the per-data-set defaults and check the method list and the last-step choice."""
    from dyfcli.config import load_config

    dataset = DATASETS[args.dataset]
    if args.mcvd_window is None:  # MCVD's own window only where the paper gave it one
        args.mcvd_window = dataset.mcvd_window if dataset.mcvd_window != dataset.window else args.window
    for key in ("trajectories", "window", "mcvd_window", "horizon", "dim", "batch_size", "dropout", "preset"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(dataset, key))
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    config = load_config(str(args.preset))
    args.preset_seed = config.training.seed
    if args.last_step is None:
        args.last_step = ["cold" if config.forecaster.cold_last_step else "direct"]
    else:
        args.last_step = args.last_step.split(",")
        if not set(args.last_step) <= set(LAST_STEPS) or len(set(args.last_step)) != len(args.last_step):
            parser.error(f"--last-step {','.join(args.last_step)}: choose cold, direct or cold,direct")
    if args.seeds < 1 or args.first_seed < 0:
        parser.error("--seeds: at least 1; --first-seed: 0 or more")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="dyf-skill-"))
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "log.txt"
    store = folder / f"{args.dataset}_{args.trajectories.replace(',', '-')}.zarr"
    if not store.exists():
        dyf("prepare", DATASETS[args.dataset].prepare, "--out", str(store), "--trajectories", args.trajectories,
            "--device", "cpu", log=log)
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for method in args.methods.split(","):
            print(f"[{time.strftime('%H:%M:%S')}] {method}, seed {seed} ...", file=sys.stderr, flush=True)
            for row in run_method(method, store, folder, args, seed, log):
                rows.append(row)
                print(f"  {row['label']}: CRPS {row['crps']:.4f}, MSE {row['mse']:.3e}, SSR {row['ssr']:.3f}, "
                      f"train {row['train_s']:.0f} s, forecast {row['forecast_s']:.1f} s", file=sys.stderr,
                      flush=True)
    table = aggregate(rows)
    table[0]["references"] = rows[0]["references"]
    wall_s = time.perf_counter() - started
    (folder / f"results_{args.dataset}_{args.budget}_steps{args.steps}_seeds{args.first_seed}-"
              f"{args.first_seed + args.seeds - 1}.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "table": table,
                    "wall_s": wall_s}, indent=1))
    print_table(table, args, folder, wall_s)


if __name__ == "__main__":
    main()
