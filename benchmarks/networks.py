"""Time one training step (forward + backward) and one MC-dropout inference pass per paper backbone.

    .venv/bin/python benchmarks/networks.py [--device cpu] [--batch 4] [--repeats 3] [--kinds unet,cnn] [--threads 1]

Prints, per backbone at its paper grid and channels: parameters, median seconds for forward+backward in
training mode (torch-RNG dropout), for a no-grad forward under `mc_dropout` with per-member noise, and for
a no-grad forward in eval mode without dropout (so the cost of the counter-based masks shows).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dyfcli.networks import build_network, count_parameters, mc_dropout
from dyfcli.noise import MemberNoise

# kind -> (channels in, cond, out, grid, hyperparameters): the paper's interpolators.
PAPER = {
    "unet": (2, 0, 1, (60, 60), dict(block_dropout=0.6, block_dropout1=0.2, attn_dropout=0.6)),
    "unet-ns": (6, 2, 3, (221, 42), dict(dropout=0.15)),
    "cnn": (8, 1, 4, (10, 10), dict(dropout=0.05)),
}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark(kind: str, device: torch.device, batch: int, repeats: int) -> dict[str, float]:
    in_channels, cond_channels, out_channels, grid, hyper = PAPER[kind]
    net = build_network(kind, in_channels=in_channels, cond_channels=cond_channels, out_channels=out_channels,
                        **hyper).to(device)
    x = torch.randn(batch, in_channels, *grid, device=device)
    cond = torch.randn(batch, cond_channels, *grid, device=device) if cond_channels else None
    time_input = torch.rand(batch, device=device) * 5
    noise = MemberNoise.for_members(0, list(range(batch)), device=device)

    def train_step():
        net.train()
        net.zero_grad(set_to_none=True)
        net(x, time_input, cond).square().mean().backward()

    def mc_forward():
        net.eval()
        with torch.no_grad(), mc_dropout(net, noise):
            net(x, time_input, cond)

    def eval_forward():
        net.eval()
        with torch.no_grad():
            net(x, time_input, cond)

    return {"parameters": count_parameters(net),
            "train_step_s": _median_seconds(train_step, device, repeats),
            "mc_forward_s": _median_seconds(mc_forward, device, repeats),
            "eval_forward_s": _median_seconds(eval_forward, device, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(PAPER))
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device={device} batch={args.batch} repeats={args.repeats} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}")
    print(f"{'kind':8} {'grid':>8} {'params':>11} {'train fwd+bwd s':>16} {'mc fwd s':>9} {'eval fwd s':>10}")
    for kind in args.kinds.split(","):
        figures = benchmark(kind, device, args.batch, args.repeats)
        grid = "x".join(map(str, PAPER[kind][3]))
        print(f"{kind:8} {grid:>8} {figures['parameters']:>11,} {figures['train_step_s']:>16.3f} "
              f"{figures['mc_forward_s']:>9.3f} {figures['eval_forward_s']:>10.3f}")


if __name__ == "__main__":
    main()
