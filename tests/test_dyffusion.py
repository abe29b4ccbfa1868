"""DYffusion maths against analytic stand-ins: on a trajectory linear in time, an exact linear interpolator
and a forecaster that returns the truth make every sampler variant reproduce every lead time exactly."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional

from dyfcli import dyffusion
from dyfcli.dyffusion import count_network_calls, make_schedule, sample, step_to_time
from dyfcli.noise import MemberNoise

KINDS = ["full", "only_dynamics", "every2", "every3rd", "first2", "first0.5", "only_dynamics_plus3",
         "only_dynamics_plus2_discrete"]
SHAPE = (2, 3, 4)  # C, Y, X


class Trajectory:
    """x_t = a + t b with random a, b of shape (B, C, Y, X), in float64 so equalities are tight."""

    def __init__(self, batch=3, horizon=4, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.a = torch.randn(batch, *SHAPE, generator=generator, dtype=torch.float64)
        self.b = torch.randn(batch, *SHAPE, generator=generator, dtype=torch.float64)
        self.horizon = horizon

    def leads(self, times):
        return torch.stack([self.a + t * self.b for t in times], dim=1)

    @property
    def x0(self):
        return self.a

    @property
    def xh(self):
        return self.a + self.horizon * self.b


def linear_interpolator(horizon, spread=0.0):
    """I(x0, xh, i) = x0 + (i/h)(xh - x0) (+ spread * noise): exact on a linear trajectory."""

    def interpolate(x0, xh, time, noise, condition):
        out = x0 + (time.view(-1, 1, 1, 1).to(x0.dtype) / horizon) * (xh - x0)
        if spread:
            out = out + spread * noise.normal(tuple(x0.shape[1:]), dtype=x0.dtype)
        return out

    return interpolate


def truth_forecaster(xh):
    def forecast(x, time, step, x0, noise, condition):
        return xh.clone()

    return forecast


def truth_from_condition(horizon):
    """The truth x_h = a + h b when the static condition carries b (the losses subset it with the rows)."""

    def forecast(x, time, step, x0, noise, condition):
        return x0 + horizon * condition[:, :SHAPE[0]] + condition[:, SHAPE[0]:]

    return forecast


class Counter:
    """Wraps a callable, recording every call's arguments."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args):
        self.calls.append(args)
        return self.fn(*args)


# ------------------------------------------------------------------------------------------- schedules

def test_step_to_time_before_t1_only_mapping():
    # SST: h = 7, k = 25, T = 32: d = 26..31 -> 1..6, d = 1..25 -> d / 26.
    assert step_to_time(0, 25) == 0
    assert step_to_time(13, 25) == 0.5
    assert step_to_time(26, 25) == 1 and step_to_time(31, 25) == 6
    steps = torch.tensor([0, 13, 26, 31])
    assert torch.equal(step_to_time(steps, 25), torch.tensor([0.0, 0.5, 1.0, 6.0]))
    assert step_to_time(3, 0) == 3


def test_schedule_tables():
    assert make_schedule(7, 25).steps == tuple(float(d) for d in range(32))
    assert make_schedule(7, 25, "only_dynamics").steps == (0, 26, 27, 28, 29, 30, 31)
    assert make_schedule(4, 5, "every2").steps == (0, 1, 3, 5, 6, 7, 8)
    assert make_schedule(4, 5, "first2").steps == (0, 1, 2, 6, 7, 8)
    assert make_schedule(4, 5, "first0.5").steps == (0, 1, 2, 3, 6, 7, 8)  # ceil(0.5 * 5) = 3
    plus = make_schedule(4, 5, "only_dynamics_plus3")
    assert plus.steps == (0, 1.5, 3, 4.5, 6, 7, 8) and plus.times == (0, 0.25, 0.5, 0.75, 1, 2, 3)
    assert make_schedule(4, 0, "every2").steps == (0, 1, 2, 3)  # k = 0: nothing to drop
    assert make_schedule(4, 0, "only_dynamics_plus1").times == (0, 0.5, 1, 2, 3)


@pytest.mark.parametrize("kind", ["sometimes", "every0", "first0", "first1.5", "only_dynamics_plus"])
def test_unknown_schedule_kind_raises(kind):
    with pytest.raises(ValueError, match="schedule"):
        make_schedule(4, 3, kind)


def test_horizon_below_two_raises():
    with pytest.raises(ValueError, match="horizon >= 2"):
        make_schedule(1, 0)


kinds = st.one_of(
    st.sampled_from(["full", "only_dynamics"]),
    st.integers(1, 12).map(lambda n: f"every{n}"),
    st.integers(1, 12).map(lambda n: f"first{n}"),
    st.floats(0.01, 0.99).map(lambda f: f"first{f:.2f}"),
    st.integers(1, 6).map(lambda n: f"only_dynamics_plus{n}"),
    st.integers(1, 6).map(lambda n: f"only_dynamics_plus{n}_discrete"),
)


@settings(max_examples=150, deadline=None)
@given(horizon=st.integers(2, 12), extra_steps=st.integers(0, 30), kind=kinds)
def test_schedule_properties(horizon, extra_steps, kind):
    schedule = make_schedule(horizon, extra_steps, kind)
    full = make_schedule(horizon, extra_steps)
    last = horizon + extra_steps - 1
    assert schedule.num_diffusion_steps == last + 1
    assert schedule.steps[0] == 0 and schedule.steps[-1] == last
    assert all(a < b for a, b in zip(schedule.steps, schedule.steps[1:]))
    assert all(a < b for a, b in zip(schedule.times, schedule.times[1:]))
    dynamical = {float(d) for d in range(extra_steps + 1, last + 1)}
    assert dynamical <= set(schedule.steps)
    assert [t for t in schedule.times if t >= 1] == [float(i) for i in range(1, horizon)]
    assert all(0 <= t <= horizon - 1 for t in schedule.times)
    assert all(0 <= s <= last for s in schedule.steps)
    if not kind.startswith("only_dynamics_plus") or kind.endswith("_discrete"):
        assert set(schedule.steps) <= set(full.steps)
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.steps = ()


# ------------------------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("extra_steps", [0, 5])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cold_last_step", [False, True])
@pytest.mark.parametrize("refine", [False, True])
def test_cold_sampling_reproduces_linear_trajectory(extra_steps, kind, cold_last_step, refine):
    trajectory = Trajectory(horizon=4)
    schedule = make_schedule(4, extra_steps, kind)
    out = sample(linear_interpolator(4), truth_forecaster(trajectory.xh), trajectory.x0, schedule, None,
                 cold_last_step=cold_last_step, refine=refine)
    assert out.shape == (3, 4, *SHAPE)
    torch.testing.assert_close(out, trajectory.leads([1, 2, 3, 4]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["full", "every2", "only_dynamics_plus3"])
def test_naive_sampling_reproduces_linear_trajectory(kind):
    trajectory = Trajectory(horizon=5)
    out = sample(linear_interpolator(5), truth_forecaster(trajectory.xh), trajectory.x0,
                 make_schedule(5, 3, kind), None, naive=True)
    torch.testing.assert_close(out, trajectory.leads([1, 2, 3, 4, 5]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("extra_steps", [0, 3])
def test_refined_fractional_output_times_follow_the_trajectory(extra_steps):
    trajectory = Trajectory(horizon=4)
    times = (0.5, 1.0, 2.25, 3.5, 4.0)  # includes lead h, which the reference fails on with k > 0
    out = sample(linear_interpolator(4), truth_forecaster(trajectory.xh), trajectory.x0,
                 make_schedule(4, extra_steps), None, refine=True, output_times=times)
    torch.testing.assert_close(out, trajectory.leads(times), rtol=0, atol=1e-12)


def test_integer_output_times_select_leads_without_refine():
    trajectory = Trajectory(horizon=4)
    out = sample(linear_interpolator(4), truth_forecaster(trajectory.xh), trajectory.x0, make_schedule(4, 2),
                 None, output_times=(2, 4))
    torch.testing.assert_close(out, trajectory.leads([2, 4]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("times,refine,message", [
    ((0.5, 1.0), False, "need refinement"),
    ((0.0, 1.0), True, r"in \(0, 4\]"),
    ((1.0, 4.5), True, r"in \(0, 4\]"),
    ((), True, "non-empty"),
])
def test_bad_output_times_raise(times, refine, message):
    trajectory = Trajectory(horizon=4)
    with pytest.raises(ValueError, match=message):
        sample(linear_interpolator(4), truth_forecaster(trajectory.xh), trajectory.x0, make_schedule(4, 0),
               None, refine=refine, output_times=times)


def _state_dependent_forecaster(x, time, step, x0, noise, condition):
    return 1.5 * x - 0.25 * x0 + time.view(-1, 1, 1, 1).to(x.dtype)


@pytest.mark.parametrize("naive", [False, True])
@pytest.mark.parametrize("cold_last_step", [False, True])
def test_updates_follow_algorithm_2_with_a_state_dependent_forecaster(naive, cold_last_step):
    # With I linear, the cold update x - I(x0, f, i_n) + I(x0, f, i_{n+1}) is x + (i_{n+1} - i_n)/h (f - x0);
    # the naive one is I(x0, f, i_{n+1}). A forecaster depending on the state makes the two differ.
    horizon, schedule = 3, make_schedule(3, 2, "full")
    x0 = Trajectory(horizon=3).x0
    x, expected = x0, []
    pairs = list(zip(schedule.times, schedule.times[1:]))
    for time, time_next in pairs:
        f = _state_dependent_forecaster(x, torch.full((3,), time), None, x0, None, None)
        x = x0 + time_next / horizon * (f - x0) if naive else x + (time_next - time) / horizon * (f - x0)
        if float(time_next).is_integer():
            expected.append(x)
    f = _state_dependent_forecaster(x, torch.full((3,), 2.0), None, x0, None, None)
    expected.append(x + (f - x0) / horizon if cold_last_step and not naive else f)
    out = sample(linear_interpolator(horizon), _state_dependent_forecaster, x0, schedule, None, naive=naive,
                 cold_last_step=cold_last_step)
    # times reach the callables as float32 tensors, hence the float32-level tolerance
    torch.testing.assert_close(out, torch.stack(expected, dim=1), rtol=1e-5, atol=1e-6)


def test_refine_interpolates_from_the_final_forecast():
    horizon, schedule = 3, make_schedule(3, 1)
    x0 = Trajectory(horizon=3).x0
    plain = sample(linear_interpolator(horizon), _state_dependent_forecaster, x0, schedule, None)
    refined = sample(linear_interpolator(horizon), _state_dependent_forecaster, x0, schedule, None, refine=True)
    xh_hat = plain[:, -1]
    torch.testing.assert_close(refined[:, -1], xh_hat)
    for lead in (1, 2):
        torch.testing.assert_close(refined[:, lead - 1], x0 + lead / horizon * (xh_hat - x0))
    assert not torch.allclose(refined[:, 0], plain[:, 0])


def test_forecaster_sees_interpolation_time_and_diffusion_step():
    trajectory = Trajectory(horizon=4)
    schedule = make_schedule(4, 3, "only_dynamics_plus2")
    forecast = Counter(truth_forecaster(trajectory.xh))
    sample(linear_interpolator(4), forecast, trajectory.x0, schedule, None)
    assert [call[1][0].item() for call in forecast.calls] == pytest.approx(schedule.times)
    assert [call[2][0].item() for call in forecast.calls] == pytest.approx(schedule.steps)
    assert torch.equal(forecast.calls[0][0], trajectory.x0)  # x~_0 = x0


# ------------------------------------------------------------------------------------------- call counts

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("extra_steps", [0, 4])
@pytest.mark.parametrize("options", [
    dict(), dict(cold_last_step=True), dict(naive=True), dict(refine=True),
    dict(refine=True, output_times=(0.5, 2, 4)), dict(refine=True, cold_last_step=True, output_times=(1.5,)),
])
def test_sampler_calls_match_count_network_calls(kind, extra_steps, options):
    trajectory = Trajectory(horizon=4)
    schedule = make_schedule(4, extra_steps, kind)
    interpolate = Counter(linear_interpolator(4))
    forecast = Counter(truth_forecaster(trajectory.xh))
    sample(interpolate, forecast, trajectory.x0, schedule, MemberNoise.for_members(0, [0, 1, 2]), **options)
    expected = count_network_calls(schedule, **options)
    assert (len(forecast.calls), len(interpolate.calls)) == tuple(expected)
    # every network call draws from its own stream
    keys = [tuple(call[4].keys.tolist()) for call in forecast.calls]
    keys += [tuple(call[3].keys.tolist()) for call in interpolate.calls]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("horizon,extra_steps,refine,forecaster,interpolator", [
    (7, 25, False, 32, 61),      # SST
    (16, 0, False, 16, 29),      # Navier-Stokes
    (16, 0, True, 16, 29 + 15),
    (134, 0, False, 134, 265),   # spring mesh
    (134, 0, True, 134, 265 + 133),
])
def test_reference_call_counts(horizon, extra_steps, refine, forecaster, interpolator):
    schedule = make_schedule(horizon, extra_steps)
    assert count_network_calls(schedule, refine=refine) == (forecaster, interpolator)
    assert count_network_calls(schedule, refine=refine).total == forecaster + interpolator


def test_reference_call_counts_by_sampling():
    trajectory = Trajectory(batch=1, horizon=7)
    interpolate = Counter(linear_interpolator(7))
    forecast = Counter(truth_forecaster(trajectory.xh))
    sample(interpolate, forecast, trajectory.x0, make_schedule(7, 25), None)
    assert (len(forecast.calls), len(interpolate.calls)) == (32, 61)


# ------------------------------------------------------------------------------------------- randomness

@pytest.mark.parametrize("options", [dict(), dict(refine=True, output_times=(0.5, 1, 3)), dict(naive=True)])
def test_members_sampled_alone_equal_members_sampled_together(options):
    trajectory = Trajectory(batch=4, horizon=3)
    members = [3, 8, 0, 5]
    schedule = make_schedule(3, 2)
    interpolate = linear_interpolator(3, spread=0.3)

    def forecast(x, time, step, x0, noise, condition):
        return x + 0.1 * noise.normal(tuple(x.shape[1:]), dtype=x.dtype)

    together = sample(interpolate, forecast, trajectory.x0, schedule, MemberNoise.for_members(7, members),
                      **options)
    alone = torch.cat([sample(interpolate, forecast, trajectory.x0[b:b + 1], schedule,
                              MemberNoise.for_members(7, [m]), **options) for b, m in enumerate(members)])
    assert torch.equal(together, alone)
    again = sample(interpolate, forecast, trajectory.x0, schedule, MemberNoise.for_members(7, members), **options)
    assert torch.equal(together, again)
    other_seed = sample(interpolate, forecast, trajectory.x0, schedule, MemberNoise.for_members(8, members),
                        **options)
    assert not torch.allclose(together, other_seed)


def test_the_two_interpolator_calls_of_a_cold_update_are_independent_draws():
    trajectory = Trajectory(batch=2, horizon=3)
    interpolate = Counter(linear_interpolator(3, spread=1.0))
    sample(interpolate, truth_forecaster(trajectory.xh), trajectory.x0, make_schedule(3, 0),
           MemberNoise.for_members(0, [0, 1]))
    # s = 0: one call at i = 1; s = 1: I(x0, x^, 2) then I(x0, x^, 1), with different streams.
    second, third = interpolate.calls[1], interpolate.calls[2]
    assert second[2][0] == 2 and third[2][0] == 1
    assert not torch.equal(second[3].keys, third[3].keys)


# ------------------------------------------------------------------------------------------- conditioning

def test_forward_condition_kinds():
    x0 = torch.randn(3, *SHAPE)
    step = torch.tensor([0.0, 2.0, 4.0])
    noise = MemberNoise.for_members(0, [0, 1, 2])
    assert dyffusion.forward_condition("none", x0, step, 5, noise) is None
    assert dyffusion.forward_condition("data", x0, step, 5, noise) is x0
    blend = dyffusion.forward_condition("data+noise", x0, step, 5, noise)
    eps = noise.normal(SHAPE)
    torch.testing.assert_close(blend[0], eps[0])                    # tau = 0 at step 0: pure noise
    torch.testing.assert_close(blend[1], 0.5 * x0[1] + 0.5 * eps[1])  # tau = t / (T-1), not i / h
    torch.testing.assert_close(blend[2], x0[2])                     # tau = 1 at step T-1
    fresh = dyffusion.forward_condition("data+noise", x0, step, 5, noise.fold(1))
    assert not torch.allclose(fresh[0], blend[0])
    torch.manual_seed(0)
    global_rng = dyffusion.forward_condition("data+noise", x0, step, 5, None)
    torch.testing.assert_close(global_rng[2], x0[2])
    with pytest.raises(ValueError, match="forward conditioning"):
        dyffusion.forward_condition("noise", x0, step, 5, noise)


# ------------------------------------------------------------------------------------------- losses

def test_interpolator_loss_is_mse_and_zero_for_the_exact_interpolator():
    trajectory = Trajectory(horizon=4)
    times = torch.tensor([1, 3, 2])
    target = trajectory.a + times.view(-1, 1, 1, 1) * trajectory.b
    exact = dyffusion.interpolator_loss(linear_interpolator(4), trajectory.x0, trajectory.xh, target, times)
    assert exact.shape == () and exact.item() == pytest.approx(0, abs=1e-20)
    shifted = dyffusion.interpolator_loss(lambda x0, xh, t, noise, c: linear_interpolator(4)(x0, xh, t, noise, c) + 0.5,
                                          trajectory.x0, trajectory.xh, target, times)
    assert shifted.item() == pytest.approx(0.25)


def test_draws_cover_their_ranges():
    generator = torch.Generator().manual_seed(0)
    times = dyffusion.draw_interpolation_times(2000, 4, generator)
    assert set(times.tolist()) == {1, 2, 3}
    steps = dyffusion.draw_diffusion_steps(2000, 6, generator)
    assert set(steps.tolist()) == set(range(6))


def _loss(forecast, interpolate, trajectory, steps, extra_steps=2, bias=None, **kwargs):
    """The forecaster loss on the trajectory; the condition carries b and a per-row forecast error `bias`."""
    bias = torch.zeros(len(steps), dtype=torch.float64) if bias is None else torch.tensor(bias, dtype=torch.float64)
    condition = torch.cat([trajectory.b, bias.view(-1, 1, 1, 1).expand(-1, 1, *SHAPE[1:])], dim=1)
    return dyffusion.forecaster_loss(interpolate, forecast, trajectory.x0, trajectory.xh, torch.tensor(steps),
                                     horizon=trajectory.horizon, extra_steps=extra_steps, condition=condition,
                                     **kwargs)


def test_forecaster_loss_is_zero_for_the_truth_and_has_scalar_terms():
    trajectory = Trajectory(horizon=4)
    loss = _loss(truth_from_condition(4), linear_interpolator(4), trajectory, [0, 3, 5])
    assert loss.total.shape == loss.forward.shape == loss.lookahead.shape == ()
    assert loss.total.item() == 0


def test_forecaster_loss_terms_are_l1_and_lookahead_averages_its_subset_only():
    trajectory = Trajectory(horizon=4)
    # T = 6; row 2 at t = T-1 has no look-ahead, so the second term averages rows 0 and 1 only.
    loss = _loss(truth_from_condition(4), linear_interpolator(4), trajectory, [0, 3, 5], bias=[0.0, 1.0, 2.0],
                 lambda_forward=0.3, lambda_lookahead=0.7)
    assert loss.forward.item() == pytest.approx(1.0)
    assert loss.lookahead.item() == pytest.approx(0.5)
    assert loss.total.item() == pytest.approx(0.3 * 1.0 + 0.7 * 0.5)


def test_every_call_of_the_forecaster_loss_sees_the_whole_batch():
    # Shapes never depend on the drawn steps (cuDNN autotuning and compiled graphs are per shape).
    trajectory = Trajectory(horizon=4)
    for steps in ([0, 0, 0], [0, 4, 0], [5, 5, 5], [0, 2, 5]):
        interpolate = Counter(linear_interpolator(4))
        forecast = Counter(truth_from_condition(4))
        _loss(forecast, interpolate, trajectory, steps)
        assert len(interpolate.calls) == len(forecast.calls) == 2
        assert all(call[0].shape == trajectory.x0.shape for call in interpolate.calls + forecast.calls)


def test_step_zero_rows_take_x0_in_place_of_their_interpolation():
    trajectory = Trajectory(horizon=4)
    interpolate = Counter(linear_interpolator(4))
    forecast = Counter(truth_from_condition(4))
    _loss(forecast, interpolate, trajectory, [0, 4, 0], lambda_lookahead=0.0)
    (x0, xh, time, noise, condition), = interpolate.calls
    assert time[1].item() == 2.0 and noise is None  # i(4) = 4 - 2 with k = 2
    first_input = forecast.calls[0][0]
    assert torch.equal(first_input[[0, 2]], trajectory.x0[[0, 2]])
    torch.testing.assert_close(first_input[1], trajectory.a[1] + 2 * trajectory.b[1])


def test_lookahead_uses_the_next_step_and_leaves_out_the_last_step():
    trajectory = Trajectory(horizon=4)
    interpolate = Counter(linear_interpolator(4))
    forecast = Counter(truth_from_condition(4))
    # T = 6: rows at t = T-1 have no next step; their errors (bias 3) must not reach the look-ahead term.
    loss = _loss(forecast, interpolate, trajectory, [5, 5, 5], bias=[3.0, 3.0, 3.0])
    assert loss.forward.item() == pytest.approx(3.0) and loss.lookahead.item() == 0
    interpolate.calls.clear(), forecast.calls.clear()
    _loss(forecast, interpolate, trajectory, [0, 2, 5])
    lookahead_interpolation = interpolate.calls[-1]
    assert lookahead_interpolation[2].tolist()[:2] == pytest.approx([1 / 3, 1.0])  # i(1), i(3) with k = 2
    assert forecast.calls[-1][2].tolist()[:2] == [1.0, 3.0]


class Scale(torch.nn.Module):
    """F(x, i) = w * x + c: a forecaster with two parameters."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.tensor(0.1, dtype=torch.float64))

    def forward(self, x, time, step, x0, noise, condition):
        return self.w * x + self.c


def _lookahead_gradient(detach):
    trajectory = Trajectory(horizon=4)
    forecaster = Scale()
    exact = linear_interpolator(4)
    seen = []

    def interpolate(x0, xh, time, noise, condition):
        seen.append(xh.requires_grad)
        return exact(x0, xh.detach() if detach else xh, time, noise, condition)

    loss = _loss(forecaster, interpolate, trajectory, [0, 1, 3], lambda_forward=0.0, lambda_lookahead=1.0)
    loss.total.backward()
    return forecaster.w.grad.item(), seen


def test_lookahead_gradient_flows_through_the_interpolator_into_the_first_forecast():
    through, seen = _lookahead_gradient(detach=False)
    detached, _ = _lookahead_gradient(detach=True)
    assert seen == [False, True]  # x~_t from data needs no graph; the look-ahead input x^_h carries one
    assert through != 0 and detached != 0
    assert through != pytest.approx(detached)


def _subset_forecaster_loss(interpolate, forecast, x0, xh, steps, horizon, extra_steps):
    """The official formulation: the network calls see only the rows that need them."""

    def time(step):
        return step_to_time(step, extra_steps)

    x_t = x0.clone()
    moved = steps > 0
    with torch.no_grad():
        x_t[moved] = interpolate(x0[moved], xh[moved], time(steps[moved]), None, None)
    xh_hat = forecast(x_t, time(steps), steps.float(), x0, None, None)
    ahead = steps <= horizon + extra_steps - 2
    step_next = steps[ahead] + 1
    x_next = interpolate(x0[ahead], xh_hat[ahead], time(step_next), None, None)
    lookahead = functional.l1_loss(forecast(x_next, time(step_next), step_next.float(), x0[ahead], None, None),
                                   xh[ahead])
    return 0.5 * functional.l1_loss(xh_hat, xh) + 0.5 * lookahead


def test_whole_batch_loss_and_gradients_equal_the_subset_formulation():
    trajectory = Trajectory(batch=6, horizon=4)
    exact = linear_interpolator(4)

    def interpolate(x0, xh, time, noise, condition):  # nonlinear in its inputs, so gradients are not trivial
        return torch.tanh(exact(x0, xh, time, noise, condition))

    steps = torch.tensor([0, 2, 5, 3, 0, 5])
    gradients = []
    for loss_of in (
        lambda f: dyffusion.forecaster_loss(interpolate, f, trajectory.x0, trajectory.xh, steps, horizon=4,
                                            extra_steps=2).total,
        lambda f: _subset_forecaster_loss(interpolate, f, trajectory.x0, trajectory.xh, steps, 4, 2),
    ):
        forecaster = Scale()
        loss = loss_of(forecaster)
        loss.backward()
        gradients.append((loss.item(), forecaster.w.grad.item(), forecaster.c.grad.item()))
    assert gradients[0] == pytest.approx(gradients[1], rel=1e-12)
