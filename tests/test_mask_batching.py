"""MC-dropout masks drawn together (issue 11): `KeepBatch` and the mask plan of `mc_dropout` give every
layer the very mask it drew alone before (bit for bit, for the three backbones, any batch and grid, bf16
autocast, gradients), fall back to a layer's own mask when a shape differs from the plan, cost a fraction
of the operations, and leave a fixed-seed `dyf forecast` unchanged."""

import functools
import json

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dyfcli import forecast, model, networks
from dyfcli.forecast_store import open_forecast
from dyfcli.networks import MemberDropout, build_network, mc_dropout
from dyfcli.noise import KeepBatch, MemberNoise
from dyfcli.store import open_store
from storefactory import make_store, make_untrained_checkpoint

TINY = {
    "unet": dict(dim=8, dim_mults=(1, 2, 4), attn_heads=2, attn_dim_head=8, block_dropout=0.6, block_dropout1=0.2,
                 attn_dropout=0.1),
    "unet-ns": dict(dim=8, resample_size=(64, 64), dropout=0.15),
    "cnn": dict(dim=16, dropout=0.3),
}


def _network(kind):
    torch.manual_seed(0)
    return build_network(kind, in_channels=3, cond_channels=2, out_channels=2, with_time=True, **TINY[kind]).eval()


def _inputs(batch, grid, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, *grid, generator=generator)
    cond = torch.randn(batch, 2, *grid, generator=generator)
    return x, torch.arange(1, batch + 1, dtype=torch.float32), cond


def _call(net, noise, inputs, batch_masks=True):
    with torch.no_grad(), mc_dropout(net, noise, batch_masks=batch_masks):
        return net(*inputs)


class _Draws:
    """Counts masks drawn together (`KeepBatch.draw`) and masks drawn alone (`MemberNoise.bernoulli_keep`)."""

    def __init__(self, monkeypatch):
        self.together = self.alone = 0
        draw, alone = KeepBatch.draw, MemberNoise.bernoulli_keep

        def counted_draw(batch, noise):
            self.together += 1
            return draw(batch, noise)

        def counted_alone(noise, shape, p):
            self.alone += 1
            return alone(noise, shape, p)

        monkeypatch.setattr(KeepBatch, "draw", counted_draw)
        monkeypatch.setattr(MemberNoise, "bernoulli_keep", counted_alone)

    def take(self) -> tuple[int, int]:
        counts = (self.together, self.alone)
        self.together = self.alone = 0
        return counts


# ------------------------------------------------------------------------------------------------ KeepBatch

@pytest.mark.parametrize("rows", [1, 3, 8])
def test_keep_batch_equals_each_mask_drawn_alone(rows):
    noise = MemberNoise.for_members(3, [m * 7 + 1 for m in range(rows)])
    specs = [(0, (3, 5, 7), 0.1), (4, (1,), 0.3), (7, (), 0.5), (-1, (16, 8, 8), 0.0), (3, (5, 3), 0.6),
             (0, (3, 5, 7), 0.1), (11, (2, 1, 13), 1 - 2**-16)]  # odd sizes (cut words), a repeat, p at the edge
    masks = KeepBatch(specs).masks(noise)
    assert len(masks) == len(specs)
    for (salt, shape, p), mask in zip(specs, masks):
        alone = noise.fold(salt).bernoulli_keep(shape, p)
        assert mask.shape == alone.shape == (rows, *shape) and torch.equal(mask, alone)


def test_keep_batch_rejects_a_rate_that_keeps_nothing():
    assert KeepBatch.keeps_any(1 - 2**-16) and not KeepBatch.keeps_any(1 - 2**-17)
    with pytest.raises(AssertionError):
        KeepBatch([(0, (4,), 1 - 2**-17)])


# ------------------------------------------------------------------------------------------------ the mask plan

@pytest.mark.parametrize("kind", ["unet", "unet-ns", "cnn"])
def test_batched_masks_equal_the_per_layer_masks_for_every_backbone(kind, monkeypatch):
    net = _network(kind)
    draws = _Draws(monkeypatch)
    layers = sum(isinstance(m, MemberDropout) for m in net.modules())
    for rows, grid in ((2, (13, 7)), (5, (16, 16)), (1, (9, 12)), (2, (13, 7))):
        inputs = _inputs(rows, grid)
        noise = MemberNoise.for_members(5, [10 + m for m in range(rows)])
        draws.take()
        per_layer = _call(net, noise, inputs, batch_masks=False)
        assert draws.take() == (0, layers)
        for _ in range(2):  # the first call with a new shape may learn the plan; later ones draw together
            assert torch.equal(_call(net, noise, inputs), per_layer)
        draws.take()
        assert torch.equal(_call(net, noise, inputs), per_layer)
        assert draws.take() == (1, 0)  # every mask of the call from one draw
        other = _call(net, noise.fold(3), inputs)  # fresh noise: fresh masks from the same plan
        assert not torch.equal(other, per_layer) and torch.equal(other, _call(net, noise.fold(3), inputs, False))


def test_a_member_gets_the_same_output_alone_and_in_a_batch():
    net = _network("unet")
    inputs = _inputs(4, (12, 12))
    noise = MemberNoise.for_members(2, [0, 1, 2, 3])
    together = [_call(net, noise, inputs) for _ in range(2)][-1]
    alone = [_call(net, noise[2:3], tuple(t[2:3] for t in inputs)) for _ in range(2)][-1]
    torch.testing.assert_close(alone, together[2:3], rtol=1e-4, atol=1e-5)  # conv kernels round per batch size
    assert torch.equal(alone, _call(net, noise[2:3], tuple(t[2:3] for t in inputs), batch_masks=False))


class _ShapeShifter(torch.nn.Module):
    """Two dropout layers; the second sees `width` channels, which can change between calls."""

    def __init__(self):
        super().__init__()
        self.first, self.second = MemberDropout(0.3), MemberDropout(0.5)
        networks._number_dropout_layers(self)
        self.width = 3

    def forward(self, x):
        return self.first(x).sum(1, keepdim=True) + self.second(x[:, :self.width]).sum(1, keepdim=True)


def test_a_layer_whose_shape_differs_from_the_plan_draws_its_own_mask(monkeypatch):
    net = _ShapeShifter()
    x = torch.randn(4, 5, 6, 6)
    noise = MemberNoise.for_members(8, [0, 1, 2, 3])
    draws = _Draws(monkeypatch)

    def call(batch_masks=True):
        with mc_dropout(net, noise, batch_masks=batch_masks):
            return net(x)

    call(), draws.take()  # learns the plan: both masks of a call together
    assert torch.equal(call(), call(False)) and draws.take() == (1, 2)
    net.width = 2  # the plan's first mask still fits, its second no longer does
    assert torch.equal(call(), call(False)) and draws.take() == (1, 3)
    assert torch.equal(call(), call(False))  # the new shape learnt: drawn together, still the same masks
    assert draws.take() == (2, 2)
    net.width = 3
    assert torch.equal(call(), call(False))


def test_a_context_gives_the_same_masks_on_every_call_and_calls_of_other_shapes():
    net = _network("cnn")
    small, large = _inputs(3, (8, 8)), _inputs(3, (10, 11))
    noise = MemberNoise.for_members(1, [0, 1, 2])
    with torch.no_grad(), mc_dropout(net, noise):
        first = [net(*small), net(*large), net(*small), net(*small)]
    with torch.no_grad(), mc_dropout(net, noise):
        second = [net(*small), net(*large), net(*small)]
    assert torch.equal(first[0], first[2]) and torch.equal(first[2], first[3]) and torch.equal(first[0], second[2])
    assert torch.equal(first[1], second[1])
    with torch.no_grad(), mc_dropout(net, noise, batch_masks=False):
        assert torch.equal(net(*small), second[0]) and torch.equal(net(*large), second[1])


def test_bf16_autocast_masks_are_the_same_bit_for_bit():
    """Under autocast some dropout layers see bfloat16 and others float32: each gets its dtype's mask."""
    net = _network("unet")
    inputs = _inputs(3, (12, 12))
    noise = MemberNoise.for_members(4, [0, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_layer = _call(net, noise, inputs, batch_masks=False)
        batched = [_call(net, noise, inputs) for _ in range(3)]
    assert per_layer.dtype == torch.bfloat16
    assert all(torch.equal(out, per_layer) for out in batched)


def test_gradients_through_batched_masks_equal_the_per_layer_ones():
    """Stage 2 trains through the frozen interpolator's MC dropout; plans learnt in inference mode serve too."""
    net = _network("unet").requires_grad_(False)
    inputs = _inputs(2, (8, 8))
    noise = MemberNoise.for_members(6, [0, 1])
    with torch.inference_mode():
        _call(net, noise, inputs), _call(net, noise, inputs)
    grads = []
    for batch_masks in (True, False, True):
        x = inputs[0].clone().requires_grad_(True)
        with mc_dropout(net, noise, batch_masks=batch_masks):
            net(x, *inputs[1:]).square().sum().backward()
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[2], grads[1])


def test_without_noise_dropout_follows_the_torch_rng_as_before():
    net = _network("cnn")
    inputs = _inputs(2, (8, 8))
    outputs = []
    for batch_masks in (True, False):
        torch.manual_seed(3)
        outputs.append(_call(net, None, inputs, batch_masks))
    assert torch.equal(*outputs)


class _AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_batched_masks_cost_a_fraction_of_the_operations():
    """The point of it: per layer a view and the multiplication instead of about thirty operations."""
    net = _network("unet")
    inputs = _inputs(4, (8, 8))
    noise = MemberNoise.for_members(0, [0, 1, 2, 3])
    layers = sum(isinstance(m, MemberDropout) for m in net.modules())
    counts = {}
    for name, run in (("plain", lambda: net(*inputs)), ("alone", lambda: _call(net, noise, inputs, False)),
                      ("together", lambda: _call(net, noise, inputs))):
        with torch.no_grad():
            run(), run()
            ops = _AtenOps()
            with ops:
                run()
        counts[name] = ops.count
    assert counts["alone"] - counts["plain"] > 25 * layers
    assert counts["together"] - counts["plain"] < 2 * layers + 40


# ------------------------------------------------------------------------------------------------ forecasts

def test_fixed_seed_forecast_is_the_one_of_per_layer_masks(dyf, tmp_path, monkeypatch):
    """`dyf forecast` (masks drawn together) writes exactly the forecast of masks drawn layer by layer."""
    store = open_store(make_store(tmp_path / "data.zarr", series=2, steps=16))
    checkpoint = make_untrained_checkpoint(store, tmp_path / "model.pt")
    common = ["forecast", "--ckpt", str(checkpoint), "--data", str(store.path), "--horizon", "6",
              "--ensemble", "7", "--seed", "9", "--device", "cpu"]
    summary = json.loads(dyf("--json", *common, "--out", str(tmp_path / "dyf.zarr"),
                             env={"OMP_NUM_THREADS": "1"}).stdout)
    assert summary["windows"] >= 1
    monkeypatch.setattr(model, "mc_dropout", functools.partial(mc_dropout, batch_masks=False))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        forecast.run_forecast(forecast.ForecastRequest(checkpoint=checkpoint, out=tmp_path / "alone.zarr", horizon=6,
                                                       ensemble=7, data=store.path, seed=9, device="cpu"))
    finally:
        torch.set_num_threads(before)
    together, alone = open_forecast(tmp_path / "dyf.zarr").ds, open_forecast(tmp_path / "alone.zarr").ds
    for field in ("u", "v"):
        a, b = together[field].values, alone[field].values
        assert np.isfinite(a).any() and np.array_equal(a, b, equal_nan=True)
    assert np.nanstd(together["u"].values, axis=2).mean() > 0  # members differ: MC dropout is on


def test_a_large_call_draws_its_masks_a_few_layers_at_a_time(monkeypatch):
    """Within the word budget per draw (bounded temporaries on large grids), still the per-layer masks."""
    monkeypatch.setattr(networks, "_SEGMENT_WORDS", {"cpu": 300})
    net = _network("unet")
    draws = _Draws(monkeypatch)
    inputs = _inputs(2, (16, 16))
    noise = MemberNoise.for_members(7, [0, 1])
    per_layer = _call(net, noise, inputs, batch_masks=False)
    _call(net, noise, inputs), draws.take()
    assert torch.equal(_call(net, noise, inputs), per_layer)
    together, alone = draws.take()
    layers = sum(isinstance(m, MemberDropout) for m in net.modules())
    assert alone == 0 and 1 < together < layers
