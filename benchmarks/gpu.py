"""GPU figures: bf16 + torch.compile speed-ups of training steps and of a 50-member SST forecast of the
11 boxes, with model FLOP utilisation (MFU).

    python benchmarks/gpu.py [--parts forecast,train] [--modes fp32,bf16,bf16+compile] [--device cuda]
        [--boxes 11] [--inits 4] [--members 50] [--stages interpolator,forecaster] [--batch 64] [--steps 20]
        [--peak-tflops 989.4] [--json F]

Forecast: a synthetic SST-shaped data store (`--boxes` series of 60x60 daily fields, dated, land in one
corner, per-pixel statistics) and an untrained checkpoint of the `sst` preset (the paper's Unet, 9.48 M
parameters, h = 7, k = 25: 32 forecaster and 31 interpolator calls per member and window; untrained
weights cost the same FLOPs as trained ones). Per mode, the `dyf forecast` workflow (`prepare_job`, the
block loop, the background writer into the Zarr store) loads and compiles the model once, runs the first
block untimed (cuDNN autotuning, compilation) and then times the other `boxes x inits - 1` blocks.

Training: one optimiser step (loss, backward, AdamW) of each DYffusion stage with the `sst` networks on a
batch of `--batch` random 8-step windows, timed over `--steps` steps after warm-up steps, in each mode.

Modes: `fp32` (TF32 matmuls and convolutions, as `dyf` sets on CUDA), `bf16` (bfloat16 autocast),
`bf16+compile` (and the networks compiled: `dyf forecast --bf16 --compile`, `training.bf16/compile`).
MFU = FLOPs counted by torch.utils.flop_counter (convolutions and matmuls of one fp32 call/step) x calls /
time / peak, the peak being the dense bf16 rate of the card (`--peak-tflops`; 989.4 for H100/H200 SXM by
the datasheet). Prints one line per measurement and, with `--json`, writes them all.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(call) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        call()
    return counter.get_total_flops()


class Results(list):
    """The figures so far; with a path, rewritten after each one (a run stopped by a time limit keeps them)."""

    def __init__(self, path: Path | None, header: dict):
        super().__init__()
        self.path, self.header = path, header

    def add(self, **figures) -> None:
        self.append(figures)
        print("  ".join(f"{key}={value}" for key, value in figures.items()), flush=True)
        if self.path is not None:
            self.path.write_text(json.dumps({**self.header, "results": list(self)}, indent=2))


# ------------------------------------------------------------------------------------------------ forecast

def forecast_part(args, device: torch.device, results: Results, folder: Path) -> None:
    from dyfcli import forecast
    from dyfcli.checkpoint import load_checkpoint
    from dyfcli.model import dyffusion_from_checkpoint
    from dyfcli.noise import MemberNoise
    from dyfcli.store import open_store
    from storefactory import make_store, make_untrained_checkpoint

    ny = nx = args.grid
    steps = 3 * (args.inits + 7)  # the test split (the last third) holds `inits` initial times with 7 leads
    store = open_store(make_store(folder / "sst.zarr", fields=("sst",), series=args.boxes, steps=steps,
                                  grid=(ny, nx), dated=True, land=True, normalization="pixel"))
    ckpt = make_untrained_checkpoint(store, folder / "sst.pt", preset="sst")
    model = dyffusion_from_checkpoint(load_checkpoint(ckpt), device)
    calls = model.network_calls()
    members = args.members
    x = torch.randn(members, 1, ny, nx, device=device)
    noise = MemberNoise.for_members(0, list(range(members)), device=device)
    t = torch.full((members,), 3.0, device=device)
    with torch.no_grad():
        flops_i = count_flops(lambda: model.interpolate(x, x, t, noise, None))
        flops_f = count_flops(lambda: model.forecast(x, t, t, x, noise, None))
    flops_per_block = calls.interpolator * flops_i + calls.forecaster * flops_f
    del model
    peak = peak_tflops(device, args.peak_tflops)
    base = None
    for mode in args.modes:
        request = forecast.ForecastRequest(checkpoint=ckpt, out=folder / f"{mode}.zarr", horizon=7, ensemble=members,
                                           data=store.path, seed=0, device=str(device), overwrite=True,
                                           bf16="bf16" in mode, compile="compile" in mode)
        warm, seconds, blocks = _time_forecast(forecast, request, device)
        base = base or seconds
        figures = dict(part="forecast", mode=mode, boxes=args.boxes, members=members, blocks=blocks,
                       grid=f"{ny}x{nx}", seconds=round(seconds, 3), s_per_block=round(seconds / blocks, 4),
                       member_forecasts_per_s=round(blocks * members / seconds, 1),
                       speedup_vs_first_mode=round(base / seconds, 3), warmup_block_s=round(warm, 2),
                       gflop_per_block=round(flops_per_block / 1e9, 1),
                       achieved_tflops=round(blocks * flops_per_block / seconds / 1e12, 2))
        if peak:
            figures["mfu"] = round(blocks * flops_per_block / seconds / (peak * 1e12), 4)
        results.add(**figures)


def _time_forecast(forecast, request, device: torch.device) -> tuple[float, float, int]:
    """The `dyf forecast` workflow with its model loaded (and compiled) once: (seconds of the first block,
    which warms up cuDNN and compiles; seconds of all other blocks, written to the store; their number)."""
    from dyfcli import forecast_store
    from dyfcli.runtime import Ranks

    job = forecast.prepare_job(request)
    done = forecast.prepare_output(job.out, job.layout, overwrite=True, resume=False, ranks=Ranks())
    blocks = [(s, i) for s in range(done.shape[0]) for i in range(done.shape[1])]
    seconds = []
    for part in (blocks[:1], blocks[1:]):
        started = time.perf_counter()
        with forecast_store.BackgroundWriter(forecast_store.BlockWriter(job.out)) as writer:
            forecast.run_blocks(job.collaborators, writer, part, job.init, job.plan, job.window_valid_time,
                                seed=request.seed, members=request.ensemble, member_batch=request.ensemble)
        sync(device)
        seconds.append(time.perf_counter() - started)
    return seconds[0], seconds[1], len(blocks) - 1


# ------------------------------------------------------------------------------------------------ training

def train_part(args, device: torch.device, results: Results, folder: Path) -> None:
    from dyfcli.checkpoint import load_checkpoint
    from dyfcli.config import load_config
    from dyfcli.store import open_store
    from dyfcli.train import build_method
    from storefactory import make_store, make_untrained_checkpoint

    config = load_config("sst", [])
    horizon = config.data.horizon
    store = open_store(make_store(folder / "small.zarr", fields=("sst",), series=1, steps=24,
                                  grid=(args.grid, args.grid)))
    interpolator = load_checkpoint(make_untrained_checkpoint(store, folder / "stage1.pt", preset="sst")).interpolator
    batch = {"dynamics": torch.randn(args.batch, horizon + 1, 1, args.grid, args.grid, device=device),
             "condition": torch.zeros(args.batch, 0, args.grid, args.grid, device=device)}
    peak = peak_tflops(device, args.peak_tflops)
    for stage in ("dyffusion" if name == "forecaster" else name for name in args.stages):
        base = None
        for mode in args.modes:
            torch.manual_seed(0)
            method = build_method(stage, config, 1, 0, interpolator if stage == "dyffusion" else None)
            method.to(device)
            network = method.network
            network.train()
            optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-4,
                                          betas=(0.9, 0.99))

            def step(autocast) -> None:
                with autocast:
                    loss, _ = method.loss(batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            flops = count_flops(lambda: step(torch.autocast(device.type, enabled=False))) if base is None else flops
            if "compile" in mode:
                network.compile()
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in mode)
            started = time.perf_counter()
            for _ in range(args.warmup):
                step(autocast)
            sync(device)
            warm = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(args.steps):
                step(autocast)
            sync(device)
            seconds = (time.perf_counter() - started) / args.steps
            base = base or seconds
            figures = dict(part="train", stage="interpolator" if stage == "interpolator" else "forecaster",
                           mode=mode, batch=args.batch, grid=f"{args.grid}x{args.grid}",
                           ms_per_step=round(1e3 * seconds, 2), speedup_vs_first_mode=round(base / seconds, 3),
                           warmup_s=round(warm, 2), gflop_per_step=round(flops / 1e9, 1),
                           achieved_tflops=round(flops / seconds / 1e12, 2))
            if peak:
                figures["mfu"] = round(flops / seconds / (peak * 1e12), 4)
            results.add(**figures)
            del method, network, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="forecast,train")
    parser.add_argument("--modes", default="fp32,bf16,bf16+compile")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--grid", type=int, default=60)
    parser.add_argument("--boxes", type=int, default=11)
    parser.add_argument("--inits", type=int, default=4, help="initial times per box in the timed forecast")
    parser.add_argument("--members", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64, help="training batch (the sst preset's)")
    parser.add_argument("--stages", default="interpolator,forecaster", help="training stages to time")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps per mode")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    args.stages = [stage.strip() for stage in args.stages.split(",") if stage.strip()]

    from dyfcli.runtime import configure_device, resolve_device, setup_logging

    setup_logging()
    device = resolve_device(args.device)
    configure_device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, modes {args.modes}", flush=True)
    results = Results(args.json, {"device": name, "torch": torch.__version__})
    with tempfile.TemporaryDirectory(prefix="dyf-gpu-") as tmp:
        for part in args.parts.split(","):
            {"forecast": forecast_part, "train": train_part}[part](args, device, results, Path(tmp))


if __name__ == "__main__":
    main()
