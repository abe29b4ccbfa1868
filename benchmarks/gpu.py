"""GPU figures: bf16 + torch.compile speed-ups of training steps and of a 50-member SST forecast of the
11 boxes, with model FLOP utilisation (MFU), a profile of one forecast pack and the data loader's rate.

    python benchmarks/gpu.py [--parts forecast,train,loader] [--modes fp32,bf16,bf16+compile] [--device cuda]
        [--boxes 11] [--inits 4] [--members 50] [--pack 4] [--profile] [--stages interpolator,forecaster]
        [--batch 64] [--steps 20] [--preset sst] [--grid 60] [--peak-tflops 989.4] [--json F]

Forecast: a synthetic SST-shaped data store (`--boxes` series of 60x60 daily fields, dated, land in one
corner, per-pixel statistics) and an untrained checkpoint of the `sst` preset (the paper's Unet, 9.48 M
parameters, h = 7, k = 25: 32 forecaster and 31 interpolator calls per member and window; untrained
weights cost the same FLOPs as trained ones). Per mode, the `dyf forecast` workflow (`prepare_job`, the
block loop, the background writer into the Zarr store) loads and compiles the model once, runs the first
pack of `--pack` blocks untimed (cuDNN autotuning, compilation) and then times the other blocks
(`dyf forecast --pack`: `--pack` blocks x `--members` rows per network call; keep `boxes x inits` a multiple
of `--pack`, or the short last pack compiles once more). The paper's SST test set (11 boxes x 359 initial
dates) is projected from the measured time per block. `--profile` then runs one more pack under
torch.profiler and prints its top kernels (self device time), the kernels launched per network call, the
device's busy share of the pack's wall time (the rest: CPU launch gaps, waiting for the host) and the
share of the int64 hashing kernels of the per-member dropout masks (`noise.MemberNoise`).

Training: one optimiser step (loss, backward, AdamW) of each DYffusion stage with the `sst` networks on a
batch of `--batch` random 8-step windows, timed over `--steps` steps after warm-up steps, in each mode.

Modes: `fp32` (TF32 matmuls and convolutions, as `dyf` sets on CUDA), `bf16` (bfloat16 autocast),
`bf16+compile` (and the networks compiled: `dyf forecast --bf16 --compile`, `training.bf16/compile`),
`bf16+compile:MODE` (forecast only: `--compile-mode MODE`, e.g. reduce-overhead, CUDA graphs).
MFU = FLOPs counted by torch.utils.flop_counter (convolutions and matmuls of one fp32 call/step) x calls /
time / peak, the peak being the dense bf16 rate of the card (`--peak-tflops`; 989.4 for H100/H200 SXM by
the datasheet). Loader: windows/s of the training DataLoader (`WindowDataset`, 8-step windows of a synthetic
60x60 SST-shaped store, the preset's workers) against the windows/s the timed training steps consume.
Prints one line per measurement and, with `--json`, writes them all. On CPU (`--device cpu`, small sizes,
`--preset tiny`) every part runs as a dry run of this script (`scripts/gpu_checks.sh --cpu-smoke`).
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
    horizon = model_horizon(args.preset)
    steps = 3 * (args.inits + horizon)  # the test split (the last third) holds `inits` initial times
    store = open_store(make_store(folder / "sst.zarr", fields=("sst",), series=args.boxes, steps=steps,
                                  grid=(ny, nx), dated=True, land=True, normalization="pixel"))
    ckpt = make_untrained_checkpoint(store, folder / "sst.pt", preset=args.preset)
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
        request = forecast.ForecastRequest(checkpoint=ckpt, out=folder / f"{mode.replace(':', '-')}.zarr",
                                           horizon=horizon,
                                           ensemble=members, data=store.path, seed=0, device=str(device),
                                           overwrite=True, bf16="bf16" in mode, compile="compile" in mode,
                                           compile_mode=mode.partition(":")[2] or "default", pack=args.pack)
        warm, seconds, blocks, job = _time_forecast(forecast, request, device)
        base = base or seconds
        figures = dict(part="forecast", mode=mode, boxes=args.boxes, members=members, pack=args.pack, blocks=blocks,
                       grid=f"{ny}x{nx}", seconds=round(seconds, 3), s_per_block=round(seconds / blocks, 4),
                       projected_sst_test_set_min=round(SST_TEST_BLOCKS * seconds / blocks / 60, 1),
                       member_forecasts_per_s=round(blocks * members / seconds, 1),
                       speedup_vs_first_mode=round(base / seconds, 3), warmup_pack_s=round(warm, 2),
                       gflop_per_block=round(flops_per_block / 1e9, 1),
                       achieved_tflops=round(blocks * flops_per_block / seconds / 1e12, 2))
        if peak:
            figures["mfu"] = round(blocks * flops_per_block / seconds / (peak * 1e12), 4)
        results.add(**figures)
        if args.profile and mode == args.modes[0]:
            results.add(mode=mode, **profile_pack(forecast, job, request, device, calls.total))
        del job


# The paper's SST test set: 11 boxes x 359 initial dates (2019-2020, 7-day horizon) = 3949 blocks.
SST_TEST_BLOCKS = 11 * 359


def model_horizon(preset: str) -> int:
    from dyfcli.config import load_config

    return load_config(preset, []).data.horizon


def _run_pack(forecast, job, request, blocks) -> None:
    from dyfcli import forecast_store

    with forecast_store.BackgroundWriter(forecast_store.BlockWriter(job.out)) as writer:
        forecast.run_blocks(job.collaborators, writer, blocks, job.init, job.plan, job.window_valid_time,
                            seed=request.seed, members=request.ensemble, member_batch=request.ensemble,
                            pack=request.pack)


def _time_forecast(forecast, request, device: torch.device):
    """The `dyf forecast` workflow with its model loaded (and compiled) once: (seconds of the first pack,
    which warms up cuDNN and compiles; seconds of all other blocks, written to the store; their number;
    the job)."""
    from dyfcli.runtime import Ranks

    job = forecast.prepare_job(request)
    done = forecast.prepare_output(job.out, job.layout, overwrite=True, resume=False, ranks=Ranks())
    blocks = [(s, i) for s in range(done.shape[0]) for i in range(done.shape[1])]
    first = min(request.pack, len(blocks) - 1)
    seconds = []
    for part in (blocks[:first], blocks[first:]):
        started = time.perf_counter()
        _run_pack(forecast, job, request, part)
        sync(device)
        seconds.append(time.perf_counter() - started)
    return seconds[0], seconds[1], len(blocks) - first, job


# kernels of the counter-based hash (SplitMix64 on int64: shifts, and, xor, multiply) behind dropout masks
# (CUDA: BitwiseXorFunctor, rshift kernels; compiled: triton_..._fused_bitwise_...; CPU: aten::bitwise_and)
_HASH_KERNEL = ("bitwise", "xor", "shift")


def profile_pack(forecast, job, request, device: torch.device, calls_per_window: int) -> dict:
    """One pack of `request.pack` blocks under torch.profiler: where the time of a block goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    blocks = [(s, i) for s in range(job.layout.mask.shape[0]) for i in range(len(job.init.time_indices))]
    pack = blocks[:request.pack]
    sync(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        _run_pack(forecast, job, request, pack)
        sync(device)
        wall = time.perf_counter() - started
    kernels = _kernel_events(prof, device)
    busy = _union_seconds(kernels)
    rows, _ = forecast.call_rows(request.ensemble, request.ensemble, len(pack), device)
    network_calls = calls_per_window * job.plan.windows * -(-len(pack) * request.ensemble // rows)
    by_name: dict[str, list[float]] = {}
    for event in kernels:
        by_name.setdefault(event[0], []).append(event[2] - event[1])
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:12]
    hashing = sum(sum(times) for name, times in by_name.items() if any(key in name.lower() for key in _HASH_KERNEL))
    launches = [e for e in prof.events() if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch")]
    return dict(part="profile", blocks=len(pack), wall_s=round(wall, 3),
                s_per_block=round(wall / len(pack), 4), kernels=len(kernels),
                kernels_per_network_call=round(len(kernels) / max(network_calls, 1), 1),
                device_busy_share=round(busy / wall, 3), launch_gap_share=round(1 - busy / wall, 3),
                mask_hash_share_of_kernel_time=round(hashing / max(sum(e[2] - e[1] for e in kernels), 1e-12), 3),
                cpu_launch_calls=len(launches),
                top_kernels_ms={name[:60]: [len(times), round(1e3 * sum(times), 2)] for name, times in top})


def _kernel_events(prof, device: torch.device) -> list[tuple[str, float, float]]:
    """(name, start s, end s) of the device kernels (CUDA), or of the CPU's aten operations without children
    (the work a CPU does per operation) in a CPU dry run."""
    events = []
    for event in prof.events():
        on_device = getattr(event, "device_type", None) is not None and "CUDA" in str(event.device_type)
        if device.type == "cuda" and not on_device:
            continue
        if device.type != "cuda" and (not event.name.startswith("aten::") or event.cpu_children):
            continue
        events.append((event.name, event.time_range.start / 1e6, event.time_range.end / 1e6))
    return events


def _union_seconds(intervals: list[tuple[str, float, float]]) -> float:
    """Time covered by at least one interval (kernels on several streams overlap)."""
    total, end = 0.0, float("-inf")
    for _, start, stop in sorted(intervals, key=lambda e: e[1]):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


# ------------------------------------------------------------------------------------------------ training

def train_part(args, device: torch.device, results: Results, folder: Path) -> None:
    from dyfcli.checkpoint import load_checkpoint
    from dyfcli.config import load_config
    from dyfcli.runtime import cuda_speedups
    from dyfcli.store import open_store
    from dyfcli.train import build_method
    from storefactory import make_store, make_untrained_checkpoint

    config = load_config(args.preset, [])
    horizon = config.data.horizon
    store = open_store(make_store(folder / "small.zarr", fields=("sst",), series=1, steps=24,
                                  grid=(args.grid, args.grid)))
    interpolator = load_checkpoint(make_untrained_checkpoint(store, folder / "stage1.pt",
                                                             preset=args.preset)).interpolator
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
            # dyf's policy (`runtime.cuda_speedups`): bf16 and compile on CUDA only (a CPU dry run skips both)
            bf16 = cuda_speedups([network], device, bf16="bf16" in mode, compile="compile" in mode,
                                 action="training in float32")
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
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
                           windows_per_s=round(args.batch / seconds, 1),
                           warmup_s=round(warm, 2), gflop_per_step=round(flops / 1e9, 1),
                           achieved_tflops=round(flops / seconds / 1e12, 2))
            if peak:
                figures["mfu"] = round(flops / seconds / (peak * 1e12), 4)
            results.add(**figures)
            del method, network, optimizer


# ------------------------------------------------------------------------------------------------ loader

def loader_part(args, device: torch.device, results: Results, folder: Path) -> None:
    """Windows/s of the training DataLoader on an SST-shaped store, against what the timed steps consume."""
    from torch.utils.data import DataLoader

    from dyfcli.config import load_config
    from dyfcli.data import WindowDataset
    from storefactory import make_store

    config = load_config(args.preset, [])
    workers = args.loader_workers if args.loader_workers is not None else config.data.num_workers
    store = make_store(folder / "loader.zarr", fields=("sst",), series=11, steps=args.loader_days,
                       grid=(args.grid, args.grid), dated=True, land=True)
    dataset = WindowDataset(store, "train", config.data.horizon + 1)
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    batches = iter(loader)
    next(batches)  # workers started, first batch in
    started, windows = time.perf_counter(), 0
    for _ in range(args.loader_batches):
        batch = next(batches, None)
        if batch is None:
            break
        windows += batch["dynamics"].shape[0]
    seconds = time.perf_counter() - started
    rate = windows / seconds
    steps = list(results)
    if args.step_json is not None and args.step_json.exists():  # the train part's figures, from an earlier run
        steps += json.loads(args.step_json.read_text())["results"]
    consumed = max((r["windows_per_s"] for r in steps if r.get("part") == "train"), default=None)
    results.add(part="loader", workers=workers, batch=args.batch, windows=windows, windows_per_s=round(rate, 1),
                fastest_step_windows_per_s=consumed,
                loader_over_step=round(rate / consumed, 2) if consumed else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="forecast,train")
    parser.add_argument("--modes", default="fp32,bf16,bf16+compile")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--grid", type=int, default=60)
    parser.add_argument("--boxes", type=int, default=11)
    parser.add_argument("--inits", type=int, default=4, help="initial times per box in the timed forecast")
    parser.add_argument("--members", type=int, default=50)
    parser.add_argument("--pack", type=int, default=4, help="blocks per network batch (`dyf forecast --pack`)")
    parser.add_argument("--profile", action="store_true", help="profile one pack after the first forecast mode")
    parser.add_argument("--preset", default="sst", help="networks of this preset (tiny for a CPU dry run)")
    parser.add_argument("--loader-workers", type=int, default=None, help="DataLoader workers (default: preset's)")
    parser.add_argument("--loader-days", type=int, default=1000, help="days per box of the loader's store")
    parser.add_argument("--loader-batches", type=int, default=30, help="timed loader batches")
    parser.add_argument("--step-json", type=Path, default=None,
                        help="the train part's --json: the loader is compared with its fastest step")
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
            {"forecast": forecast_part, "train": train_part, "loader": loader_part}[part](
                args, device, results, Path(tmp))


if __name__ == "__main__":
    main()
