"""DYffusionModel: tiny real networks bound to the DYffusion maths (channels, freezing, MC dropout, losses,
sampling and its call counts)."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from dyfcli import dyffusion
from dyfcli.config import RunConfig
from dyfcli.model import DYffusionModel, DYffusionSettings, forecaster_channels, interpolator_channels
from dyfcli.networks import build_network
from dyfcli.noise import MemberNoise

FIELDS, CONDITIONS, GRID = 2, 1, (6, 5)


def tiny_model(forward_conditioning="data", conditions=CONDITIONS, with_forecaster=True, **settings):
    torch.manual_seed(0)
    interpolator = build_network("cnn", **interpolator_channels(FIELDS, conditions), dim=8,
                                 kernel_sizes=(3, 3), dropout=0.3)
    forecaster = build_network("cnn", **forecaster_channels(FIELDS, conditions, forward_conditioning), dim=8,
                               kernel_sizes=(3, 3), dropout=0.2) if with_forecaster else None
    options = dict(horizon=3, extra_steps=2, forward_conditioning=forward_conditioning) | settings
    return DYffusionModel(interpolator, forecaster, DYffusionSettings(**options))


def batch(size=4, conditions=CONDITIONS, horizon=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {"dynamics": torch.randn(size, horizon + 1, FIELDS, *GRID, generator=generator),
            "condition": torch.randn(size, conditions, *GRID, generator=generator)}


def test_channel_counts_for_each_forward_conditioning():
    assert interpolator_channels(3, 2) == {"in_channels": 6, "cond_channels": 2, "out_channels": 3}
    assert forecaster_channels(3, 2, "none")["cond_channels"] == 2
    assert forecaster_channels(3, 2, "data")["cond_channels"] == 5
    assert forecaster_channels(3, 2, "data+noise") == {"in_channels": 3, "cond_channels": 5, "out_channels": 3}


def test_settings_from_run_config():
    config = RunConfig()
    settings = DYffusionSettings.from_config(config)
    assert settings.horizon == config.data.horizon
    assert settings.forward_conditioning == config.forecaster.forward_conditioning
    assert settings.schedule == config.sampling.schedule
    with pytest.raises(ValueError, match="time_encoding"):
        DYffusionSettings(horizon=3, time_encoding="seconds")
    with pytest.raises(ValueError, match="schedule"):
        DYffusionSettings(horizon=3, schedule="every0")


def test_stage_one_interpolator_loss_trains_the_interpolator():
    model = tiny_model(with_forecaster=False)
    model.interpolator.train()
    loss = model.interpolator_loss(batch(), torch.Generator().manual_seed(0))
    assert loss.shape == ()
    loss.backward()
    assert all(p.grad is not None for p in model.interpolator.parameters())
    assert model.interpolator.training
    with pytest.raises(RuntimeError, match="no forecaster"):
        model.sample_window(batch()["dynamics"][:, 0], None, None)


def test_interpolator_loss_targets_the_drawn_lead():
    model = tiny_model(with_forecaster=False, conditions=0)
    seen = []
    model.interpolator.register_forward_hook(lambda module, args, out: seen.append(args[1].clone()))
    data = batch(size=64, conditions=0)
    generator = torch.Generator().manual_seed(3)
    model.interpolator_loss(data, generator)
    expected = dyffusion.draw_interpolation_times(64, 3, torch.Generator().manual_seed(3))
    assert torch.equal(seen[0], expected.float())
    assert set(expected.tolist()) == {1, 2}


def test_forecaster_stage_freezes_the_interpolator_but_passes_gradients_through_it():
    model = tiny_model()
    assert not any(p.requires_grad for p in model.interpolator.parameters())
    assert not model.interpolator.training
    data = batch()
    x0, xh = data["dynamics"][:, 0], data["dynamics"][:, -1].clone().requires_grad_()
    out = model.interpolate(x0, xh, torch.full((4,), 1.5), None, data["condition"])
    out.sum().backward()
    assert xh.grad is not None and xh.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.interpolator.parameters())


def test_forecaster_loss_updates_only_the_forecaster():
    model = tiny_model(forward_conditioning="data+noise")
    model.forecaster.train()
    loss = model.forecaster_loss(batch(), torch.Generator().manual_seed(0))
    assert loss.total.shape == loss.forward.shape == loss.lookahead.shape == ()
    loss.total.backward()
    assert all(p.grad is not None for p in model.forecaster.parameters())
    assert all(p.grad is None for p in model.interpolator.parameters())
    assert not model.interpolator.training and model.forecaster.training


def test_forecaster_loss_refuses_a_trainable_interpolator():
    model = tiny_model()
    model.interpolator.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        model.forecaster_loss(batch())


def test_wrong_window_length_is_rejected():
    with pytest.raises(ValueError, match="horizon"):
        tiny_model().forecaster_loss(batch(horizon=4))


def test_interpolator_mc_dropout_follows_member_noise():
    model = tiny_model()
    data = batch()
    x0, xh, cond = data["dynamics"][:, 0], data["dynamics"][:, -1], data["condition"]
    time = torch.full((4,), 1.0)
    noise = MemberNoise.for_members(0, [0, 1, 2, 3])
    first = model.interpolate(x0, xh, time, noise, cond)
    assert torch.equal(first, model.interpolate(x0, xh, time, noise, cond))
    assert not torch.allclose(first, model.interpolate(x0, xh, time, noise.fold(1), cond))
    alone = model.interpolate(x0[2:3], xh[2:3], time[2:3], noise[2:3], cond[2:3])
    torch.testing.assert_close(alone, first[2:3], rtol=1e-5, atol=1e-6)


def test_interpolate_keeps_a_training_interpolator_in_train_mode_afterwards():
    model = tiny_model(with_forecaster=False)
    model.interpolator.train()
    data = batch()
    model.interpolate_window(data["dynamics"][:, 0], data["dynamics"][:, -1], data["condition"],
                             MemberNoise.for_members(0, range(4)))
    assert model.interpolator.training


def test_interpolate_window_gives_every_intermediate_lead():
    model = tiny_model(with_forecaster=False, horizon=4, extra_steps=0)
    data = batch(horizon=4)
    out = model.interpolate_window(data["dynamics"][:, 0], data["dynamics"][:, -1], data["condition"],
                                   MemberNoise.for_members(0, range(4)))
    assert out.shape == (4, 3, FIELDS, *GRID)
    assert not torch.allclose(out[:, 0], out[:, 1])


@pytest.mark.parametrize("forward_conditioning", ["none", "data", "data+noise"])
@pytest.mark.parametrize("conditions", [0, 2])
def test_sample_window_shapes_and_member_batch_invariance(forward_conditioning, conditions):
    model = tiny_model(forward_conditioning, conditions=conditions)
    data = batch(size=3, conditions=conditions)
    x0, cond = data["dynamics"][:, 0], data["condition"]
    noise = MemberNoise.for_members(11, [4, 0, 9])
    together = model.sample_window(x0, cond, noise)
    assert together.shape == (3, 3, FIELDS, *GRID) and torch.isfinite(together).all()
    alone = torch.cat([model.sample_window(x0[b:b + 1], cond[b:b + 1], noise[b:b + 1]) for b in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert not together.requires_grad


def test_sample_window_output_times_and_refine():
    model = tiny_model(refine=False)
    data = batch(size=2)
    x0, cond = data["dynamics"][:, 0], data["condition"]
    noise = MemberNoise.for_members(0, [0, 1])
    out = model.sample_window(x0, cond, noise, schedule="only_dynamics", refine=True, output_times=(0.5, 1.5, 3))
    assert out.shape == (2, 3, FIELDS, *GRID)
    plain = model.sample_window(x0, cond, noise, schedule="only_dynamics")
    torch.testing.assert_close(out[:, -1], plain[:, -1])  # lead h is the final forecast either way


class CallCounter:
    def __init__(self, net):
        self.count = 0
        net.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.count += 1


@pytest.mark.parametrize("schedule,refine,cold_last_step", [
    (None, None, False), ("every2", True, False), ("only_dynamics", False, True), ("first1", True, True),
])
def test_network_calls_match_what_sampling_calls(schedule, refine, cold_last_step):
    model = tiny_model(cold_last_step=cold_last_step)
    forecaster_calls, interpolator_calls = CallCounter(model.forecaster), CallCounter(model.interpolator)
    data = batch(size=2)
    model.sample_window(data["dynamics"][:, 0], data["condition"], MemberNoise.for_members(0, [0, 1]),
                        schedule=schedule, refine=refine)
    assert model.network_calls(schedule, refine) == (forecaster_calls.count, interpolator_calls.count)


class TimeRecorder(nn.Module):
    """A stand-in forecaster with the network call signature, recording its time input."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.times = []

    def forward(self, x, time, cond):
        self.times.append(time.clone())
        return self.scale * x


@pytest.mark.parametrize("encoding,expected", [
    ("dynamics", [0.0, 1 / 3, 2 / 3, 1.0, 2.0]),
    ("discrete", [0.0, 1.0, 2.0, 3.0, 4.0]),
    ("normalized", [0.0, 0.2, 0.4, 0.6, 0.8]),
])
def test_time_encodings(encoding, expected):
    model = tiny_model(forward_conditioning="none")
    model.forecaster = TimeRecorder()
    model.settings = DYffusionSettings(horizon=3, extra_steps=2, forward_conditioning="none", time_encoding=encoding)
    data = batch(size=2)
    model.sample_window(data["dynamics"][:, 0], data["condition"], MemberNoise.for_members(0, [0, 1]))
    assert [t[0].item() for t in model.forecaster.times] == pytest.approx(expected)


# ------------------------------------------------------------------------------ built from a config / checkpoint

def _forecaster_checkpoint(config, interpolator, forecaster, conditions=CONDITIONS):
    from dyfcli.checkpoint import Checkpoint

    common = dict(method="dyffusion", config=config.to_dict(), fields=["u", "v"][:FIELDS], grid=GRID,
                  cond_names=[f"cond_{i}" for i in range(conditions)], normalizer={}, store={})
    inner = Checkpoint(kind="interpolator", state_dict=interpolator.state_dict(), **common)
    return Checkpoint(kind="forecaster", state_dict=forecaster.state_dict(), interpolator=inner, **common)


def test_dyffusion_from_checkpoint_restores_both_networks_and_the_settings():
    from dyfcli.config import load_config
    from dyfcli.model import build_forecaster, build_interpolator, dyffusion_from_checkpoint

    config = load_config("tiny")
    torch.manual_seed(0)
    interpolator, forecaster = build_interpolator(config, FIELDS, CONDITIONS), build_forecaster(config, FIELDS,
                                                                                               CONDITIONS)
    model = dyffusion_from_checkpoint(_forecaster_checkpoint(config, interpolator, forecaster), "cpu")
    assert model.horizon == config.data.horizon and model.settings == DYffusionSettings.from_config(config)
    assert not model.forecaster.training and not model.interpolator.training
    for built, restored in ((interpolator, model.interpolator), (forecaster, model.forecaster)):
        assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), restored.state_dict().values()))


def test_dyffusion_from_checkpoint_refuses_weights_that_do_not_fit():
    from dyfcli.config import load_config
    from dyfcli.errors import CheckpointError
    from dyfcli.model import build_forecaster, build_interpolator, dyffusion_from_checkpoint

    config = load_config("tiny")
    other = build_forecaster(config, FIELDS + 1, CONDITIONS)  # trained on another number of fields
    checkpoint = _forecaster_checkpoint(config, build_interpolator(config, FIELDS, CONDITIONS), other)
    with pytest.raises(CheckpointError, match="forecaster weights do not fit"):
        dyffusion_from_checkpoint(checkpoint, "cpu")
    with pytest.raises(CheckpointError, match="embeds no interpolator"):
        dyffusion_from_checkpoint(replace(checkpoint, interpolator=None), "cpu")
