"""Backbones: exact parameter counts of the paper's networks, any-grid shapes, time and condition inputs,
and MC dropout that is reproducible per member whatever the batching."""

import math

import pytest
import torch

from dyfcli.networks import (KINDS, MemberDropout, SinusoidalEmbedding, build_network, count_parameters,
                             hyperparameters, mc_dropout)
from dyfcli.noise import MemberNoise


# Tiny versions for behaviour tests (full-size nets are only built to count parameters).
TINY = {
    "unet": dict(dim=8, dim_mults=(1, 2, 4), attn_heads=2, attn_dim_head=8),
    "unet-ns": dict(dim=8, resample_size=(64, 64)),
    "cnn": dict(dim=16),
}
DROPOUT = {
    "unet": dict(block_dropout=0.6, block_dropout1=0.2, attn_dropout=0.6),
    "unet-ns": dict(dropout=0.15),
    "cnn": dict(dropout=0.3),
}


def tiny(kind, *, in_channels=3, cond_channels=2, out_channels=2, with_time=True, dropout=False, **extra):
    torch.manual_seed(0)
    hyper = {**TINY[kind], **(DROPOUT[kind] if dropout else {}), **extra}
    return build_network(kind, in_channels=in_channels, cond_channels=cond_channels, out_channels=out_channels,
                         with_time=with_time, **hyper)


def inputs(batch=2, in_channels=3, cond_channels=2, grid=(13, 7), seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, *grid, generator=generator)
    cond = torch.randn(batch, cond_channels, *grid, generator=generator)
    time = torch.arange(1, batch + 1, dtype=torch.float32)
    return x, time, cond


@pytest.mark.parametrize(("kind", "in_channels", "cond_channels", "out_channels", "with_time", "expected"), [
    ("unet", 2, 0, 1, True, 9_479_681),  # SST interpolator [x_0, x_h]
    ("unet", 1, 1, 1, True, 9_479_681),  # SST DYffusion forecaster
    ("unet", 7, 1, 7, False, 8_962_183),  # SST DDPM (reference ran it without time embedding)
    ("unet", 7, 1, 7, True, 9_498_887),  # SST MCVD
    ("unet-ns", 6, 2, 3, True, 10_270_339),  # NS interpolator
    ("unet-ns", 3, 2, 3, True, 10_270_147),  # NS forecaster and Dropout baseline
    ("unet-ns", 48, 5, 48, True, 10_319_344),  # NS DDPM/MCVD
    ("cnn", 8, 1, 4, True, 478_532),  # spring-mesh interpolator
    ("cnn", 4, 5, 4, True, 478_532),  # spring-mesh forecaster (x_0 + mask as condition)
    ("cnn", 4, 1, 4, True, 457_796),  # spring-mesh Dropout baseline: WITH the time embedding
    ("cnn", 536, 5, 536, False, 3_180_120),  # spring-mesh DDPM/MCVD (time embedding off in the reference)
])
def test_parameter_counts_match_the_reference(kind, in_channels, cond_channels, out_channels, with_time,
                                              expected):
    net = build_network(kind, in_channels=in_channels, cond_channels=cond_channels, out_channels=out_channels,
                        with_time=with_time)
    assert count_parameters(net) == expected


def test_dropout_baseline_count_needs_the_time_embedding():
    # 457,796 is reached only with the time path; without it the same channels give 366,916.
    net = build_network("cnn", in_channels=4, cond_channels=1, out_channels=4, with_time=False)
    assert count_parameters(net) == 366_916


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grid", [(13, 7), (60, 60), (42, 221), (1, 1)])
def test_output_shape_on_any_grid(kind, grid):
    net = tiny(kind).eval()
    x, time, cond = inputs(grid=grid)
    with torch.no_grad():
        out = net(x, time, cond)
    assert out.shape == (2, 2, *grid)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("pad_mode", ["replicate", "zeros"])
def test_unet_padding_modes_crop_back(pad_mode):
    net = tiny("unet", pad_mode=pad_mode).eval()
    x, time, cond = inputs(grid=(13, 7))
    with torch.no_grad():
        assert net(x, time, cond).shape == (2, 2, 13, 7)


def test_unet_on_a_multiple_of_four_needs_no_padding():
    net = tiny("unet").eval()
    x, time, cond = inputs(grid=(12, 8))
    with torch.no_grad():
        replicate = net(x, time, cond)
        net.pad_mode = "zeros"
        zeros = net(x, time, cond)
    torch.testing.assert_close(replicate, zeros, rtol=0, atol=0)


def test_sinusoidal_embedding_formula():
    time = torch.tensor([0.0, 1.0, 2.5])
    features = SinusoidalEmbedding(8)(time)
    frequencies = torch.tensor([math.exp(-j * math.log(10000) / 3) for j in range(4)])
    angles = time[:, None] * frequencies[None, :]
    torch.testing.assert_close(features, torch.cat((angles.sin(), angles.cos()), dim=1))


@pytest.mark.parametrize("kind", KINDS)
def test_time_changes_the_output_and_fractional_time_works(kind):
    net = tiny(kind).eval()
    x, _, cond = inputs()
    with torch.no_grad():
        at_one = net(x, torch.tensor([1.0, 1.0]), cond)
        at_fraction = net(x, torch.tensor([1.25, 1.25]), cond)
        scalar = net(x, 1.25, cond)
    assert not torch.allclose(at_one, at_fraction)
    torch.testing.assert_close(scalar, at_fraction)


@pytest.mark.parametrize("kind", KINDS)
def test_without_time_the_time_input_is_ignored(kind):
    net = tiny(kind, with_time=False).eval()
    assert count_parameters(net) < count_parameters(tiny(kind))
    x, _, cond = inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(x, None, cond), net(x, torch.tensor([3.0, 4.0]), cond))


@pytest.mark.parametrize("kind", KINDS)
def test_condition_channels_are_used(kind):
    net = tiny(kind).eval()
    x, time, cond = inputs()
    with torch.no_grad():
        assert not torch.allclose(net(x, time, cond), net(x, time, cond + 1.0))


@pytest.mark.parametrize(("kind", "cond_first"), [("unet", True), ("unet-ns", False), ("cnn", False)])
def test_condition_is_concatenated_on_the_documented_side(kind, cond_first):
    net = tiny(kind).eval()
    first_conv = net.blocks[0].conv if kind == "cnn" else net.init_conv
    cond_slice = slice(0, 2) if cond_first else slice(3, 5)
    with torch.no_grad():
        first_conv.weight[:, cond_slice] = 0.0  # cut the condition's input channels only
        x, time, cond = inputs()
        torch.testing.assert_close(net(x, time, cond), net(x, time, cond + 1.0))
        assert not torch.allclose(net(x, time, cond), net(x + 1.0, time, cond))


@pytest.mark.parametrize("kind", KINDS)
def test_no_condition_network_accepts_none_or_empty_condition(kind):
    net = tiny(kind, cond_channels=0).eval()
    x, time, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(x, time, None), net(x, time, x[:, :0]))


def test_input_errors_name_the_problem():
    net = tiny("cnn").eval()
    x, time, cond = inputs()
    with pytest.raises(ValueError, match="condition channels"):
        net(x, time, None)
    with pytest.raises(ValueError, match="pass time"):
        net(x, None, cond)
    with pytest.raises(ValueError, match=r"shape \(B, 3, Y, X\)"):
        net(x[:, :1], time, cond)
    with pytest.raises(ValueError, match="unknown network kind"):
        build_network("resnet", in_channels=1, cond_channels=0, out_channels=1)
    with pytest.raises(ValueError, match="no hyperparameter widht"):
        build_network("cnn", in_channels=1, cond_channels=0, out_channels=1, widht=3)
    with pytest.raises(ValueError, match="multiples of 64"):
        build_network("unet-ns", in_channels=1, cond_channels=0, out_channels=1, resample_size=(100, 100))


def test_hyperparameters_list_the_paper_defaults():
    assert hyperparameters("unet")["dim_mults"] == (1, 2, 4)
    assert hyperparameters("unet-ns")["resample_size"] == (256, 256)
    assert hyperparameters("cnn")["kernel_sizes"] == (9, 7, 5, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_eval_mode_outside_mc_dropout_is_deterministic(kind):
    net = tiny(kind, dropout=True).eval()
    x, time, cond = inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(x, time, cond), net(x, time, cond), rtol=0, atol=0)
        with mc_dropout(net, None):
            assert not torch.allclose(net(x, time, cond), net(x, time, cond))
        # The context restores plain eval behaviour on exit.
        torch.testing.assert_close(net(x, time, cond), net(x, time, cond), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_member_masks_do_not_depend_on_batching(kind):
    net = tiny(kind, dropout=True).eval()
    members = [3, 11, 12, 40, 7]
    x, time, cond = inputs(batch=1)
    batch_x, batch_time, batch_cond = x.expand(5, -1, -1, -1), time.expand(5), cond.expand(5, -1, -1, -1)
    with torch.no_grad():
        with mc_dropout(net, MemberNoise.for_members(5, members)):
            batched = net(batch_x, batch_time, batch_cond)
        with mc_dropout(net, MemberNoise.for_members(5, [members[2]])):
            alone = net(x, time, cond)
        with mc_dropout(net, MemberNoise.for_members(5, [members[2]])):
            again = net(x, time, cond)
    torch.testing.assert_close(alone[0], batched[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone, again, rtol=0, atol=0)
    assert not torch.allclose(batched[0], batched[1], atol=1e-3)  # different members, different masks


@pytest.mark.parametrize("kind", ["unet-ns", "cnn"])
def test_mc_dropout_keeps_batch_norm_in_eval_mode(kind):
    net = tiny(kind, dropout=True).eval()
    statistics = {name: b.clone() for name, b in net.named_buffers()}
    x, time, cond = inputs()
    with torch.no_grad(), mc_dropout(net, MemberNoise.for_members(0, [0, 1])):
        net(x, time, cond)
    assert not net.training
    for name, buffer in net.named_buffers():
        torch.testing.assert_close(buffer, statistics[name], rtol=0, atol=0)


def test_folded_noise_gives_independent_calls():
    net = tiny("cnn", dropout=True).eval()
    x, time, cond = inputs()
    noise = MemberNoise.for_members(1, [0, 1])
    with torch.no_grad():
        with mc_dropout(net, noise):
            same_first, same_second = net(x, time, cond), net(x, time, cond)
        with mc_dropout(net, noise.fold(0)):
            first = net(x, time, cond)
        with mc_dropout(net, noise.fold(1)):
            second = net(x, time, cond)
    torch.testing.assert_close(same_first, same_second, rtol=0, atol=0)
    assert not torch.allclose(first, second)


def test_member_dropout_mask_rate_scale_and_layer_independence():
    layers = [MemberDropout(0.25) for _ in range(2)]
    for layer_id, layer in enumerate(layers):
        layer.layer_id = layer_id
    x = torch.ones(4, 8, 32, 32)
    noise = MemberNoise.for_members(9, [0, 1, 2, 3])
    with mc_dropout(torch.nn.ModuleList(layers), noise):
        first, second = layers[0](x), layers[1](x)
        repeated = layers[0](x)
    assert set(first.unique().tolist()) == {0.0, torch.tensor(1 / 0.75).item()}
    assert abs((first == 0).float().mean().item() - 0.25) < 0.02
    torch.testing.assert_close(first, repeated, rtol=0, atol=0)
    assert ((first == 0) != (second == 0)).float().mean() > 0.3  # layers draw different masks
    assert ((first[0] == 0) != (first[1] == 0)).float().mean() > 0.3  # and so do members


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6])
def test_bernoulli_keep_rate_and_independence_of_the_packed_draws(p):
    """Four 16-bit draws share one hash: the rate is 1 - p and neighbours (same hash) are independent."""
    noise = MemberNoise.for_members(3, list(range(8)))
    keep = noise.bernoulli_keep((7, 101, 13), p).float()  # an odd element count: the last hash is cut
    assert keep.shape == (8, 7, 101, 13)
    flat = keep.reshape(8, -1)
    n = flat.numel()
    assert abs(flat.mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    for lag in (1, 2, 3, 4):  # lags 1-3 compare draws of the same hash, lag 4 the next hash
        a, b = flat[:, :-lag] - (1 - p), flat[:, lag:] - (1 - p)
        correlation = (a * b).mean() / (p * (1 - p))
        assert abs(correlation.item()) < 4 / a.numel() ** 0.5
    alone = MemberNoise.for_members(3, [5]).bernoulli_keep((7, 101, 13), p)
    assert torch.equal(alone[0], keep[5].bool())  # a member's mask does not depend on the batch
    assert noise.bernoulli_keep((5,), 0.0).all() and not noise.bernoulli_keep((5,), 1 - 2**-17).any()


def test_mc_dropout_noise_rows_must_match_the_batch():
    net = tiny("cnn", dropout=True).eval()
    x, time, cond = inputs(batch=2)
    with mc_dropout(net, MemberNoise.for_members(0, [0, 1, 2])), pytest.raises(ValueError, match="3 rows"):
        net(x, time, cond)


def test_dropout_layer_ids_are_fixed_and_distinct():
    net = tiny("unet", dropout=True)
    ids = [m.layer_id for m in net.modules() if isinstance(m, MemberDropout)]
    assert ids == list(range(len(ids)))
    no_dropout = tiny("unet")
    assert [m.layer_id for m in no_dropout.modules() if isinstance(m, MemberDropout)] == ids


def test_training_mode_dropout_uses_torch_rng():
    net = tiny("cnn", dropout=True).train()
    x, time, cond = inputs()
    torch.manual_seed(4)
    first = net(x, time, cond)
    torch.manual_seed(4)
    second = net(x, time, cond)
    torch.testing.assert_close(first, second)
    assert not torch.allclose(first, net(x, time, cond))


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_reaches_every_parameter(kind):
    net = tiny(kind, dropout=True).train()
    x, time, cond = inputs(batch=3, grid=(10, 10))
    noise = MemberNoise.for_members(2, [0, 1, 2])
    with mc_dropout(net, noise):
        loss = net(x, time, cond).square().mean()
    loss.backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for p in net.parameters())
