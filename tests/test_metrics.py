"""Ensemble scores: identities, oracles (properscoring, scoringrules), calibration, streaming."""

import math

import numpy as np
import properscoring
import pytest
import scoringrules
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dyfcli.metrics import METRICS, ScoreAccumulator, crps_ensemble, lead_mean, truth_rank


def _members_last(ens: torch.Tensor) -> np.ndarray:
    return np.moveaxis(ens.numpy().astype(np.float64), 0, -1)


@settings(max_examples=25, deadline=None)
@given(members=st.integers(1, 12), points=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_crps_matches_properscoring(members, points, seed):
    generator = torch.Generator().manual_seed(seed)
    ens = torch.randn(members, points, generator=generator, dtype=torch.float64) * 3 + 5
    truth = torch.randn(points, generator=generator, dtype=torch.float64) * 3 + 5
    expected = properscoring.crps_ensemble(truth.numpy(), _members_last(ens))
    np.testing.assert_allclose(crps_ensemble(ens, truth).numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("members", [2, 5, 50])
def test_crps_matches_scoringrules_standard_and_fair(members):
    generator = torch.Generator().manual_seed(members)
    ens = torch.randn(members, 4, 7, generator=generator, dtype=torch.float64)
    truth = torch.randn(4, 7, generator=generator, dtype=torch.float64)
    standard = scoringrules.crps_ensemble(truth.numpy(), _members_last(ens), estimator="nrg")
    fair = scoringrules.crps_ensemble(truth.numpy(), _members_last(ens), estimator="fair")
    np.testing.assert_allclose(crps_ensemble(ens, truth).numpy(), standard, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(crps_ensemble(ens, truth, fair=True).numpy(), fair, rtol=1e-10, atol=1e-12)


def test_one_member_crps_is_absolute_error_and_fair_is_undefined():
    ens = torch.tensor([[1.0, -2.0, 3.5]])
    truth = torch.tensor([0.5, 0.0, 3.5])
    assert torch.allclose(crps_ensemble(ens, truth), torch.tensor([0.5, 2.0, 0.0]))
    assert torch.isnan(crps_ensemble(ens, truth, fair=True)).all()


def test_crps_is_exact_for_large_offsets_in_float32():
    """Centring on the truth avoids cancellation in the pair term (SST in kelvin ~ 300)."""
    generator = torch.Generator().manual_seed(0)
    ens64 = 300 + torch.randn(50, 1000, generator=generator, dtype=torch.float64) * 0.3
    truth64 = 300 + torch.randn(1000, generator=generator, dtype=torch.float64) * 0.3
    exact = properscoring.crps_ensemble(truth64.numpy(), _members_last(ens64))
    result = crps_ensemble(ens64.float(), truth64.float()).double().numpy()
    np.testing.assert_allclose(result, exact, atol=2e-5)


def test_fair_crps_is_unbiased_for_exchangeable_members():
    """E[fair CRPS of M members] = E[CRPS of an infinite ensemble]; the standard one is biased by E|X-X'|/(2M)."""
    generator = torch.Generator().manual_seed(1)
    points, members = 200_000, 4
    truth = torch.randn(points, generator=generator, dtype=torch.float64)
    ens = torch.randn(members, points, generator=generator, dtype=torch.float64)
    # The CRPS of the forecast N(0, 1) against y in closed form: y (2 Phi(y) - 1) + 2 phi(y) - 1/sqrt(pi)
    normal = torch.distributions.Normal(0.0, 1.0)
    closed = truth * (2 * normal.cdf(truth) - 1) + 2 * normal.log_prob(truth).exp() - 1 / math.sqrt(math.pi)
    target = float(closed.mean())
    fair = float(crps_ensemble(ens, truth, fair=True).mean())
    standard = float(crps_ensemble(ens, truth).mean())
    standard_error = float(crps_ensemble(ens, truth, fair=True).std()) / math.sqrt(points)
    assert abs(fair - target) < 4 * standard_error
    bias = (2 / math.sqrt(math.pi)) / (2 * members)  # E|X - X'| = 2/sqrt(pi) for N(0,1)
    assert abs(standard - target - bias) < 4 * standard_error
    assert standard - target > 10 * standard_error


def test_ssr_near_one_for_calibrated_ensemble_and_unbiased_version_corrects_small_m():
    generator = torch.Generator().manual_seed(2)
    points, members = 100_000, 5
    centre = torch.randn(points, generator=generator, dtype=torch.float64) * 4
    truth = centre + torch.randn(points, generator=generator, dtype=torch.float64)
    ens = centre + torch.randn(members, points, generator=generator, dtype=torch.float64)
    acc = ScoreAccumulator(leads=1, members=members)
    acc.update(ens.unsqueeze(1), truth.unsqueeze(0), torch.ones(points, dtype=torch.bool))
    scores = acc.result()
    # ddof 0 under-estimates: E[ssr^2] = (M-1)/M * M/(M+1) = (M-1)/(M+1)
    assert scores["ssr"].item() == pytest.approx(math.sqrt((members - 1) / (members + 1)), abs=0.02)
    assert scores["ssr_unbiased"].item() == pytest.approx(1.0, abs=0.02)
    under = ScoreAccumulator(leads=1, members=members)
    under.update((centre + 0.3 * (ens - centre)).unsqueeze(1), truth.unsqueeze(0), torch.ones(points, dtype=torch.bool))
    assert under.result()["ssr_unbiased"].item() < 0.5


def test_accumulator_matches_direct_formulas_with_mask():
    generator = torch.Generator().manual_seed(3)
    ens = torch.randn(6, 3, 5, 4, generator=generator)
    truth = torch.randn(3, 5, 4, generator=generator)
    mask = torch.rand(5, 4, generator=generator) > 0.3
    ens[:, :, ~mask] = float("nan")
    truth[:, ~mask] = float("nan")
    acc = ScoreAccumulator(leads=3, members=6)
    acc.update(ens, truth, mask)
    scores = acc.result()
    for lead in range(3):
        e = ens[:, lead][:, mask].double().numpy()
        y = truth[lead][mask].double().numpy()
        crps = properscoring.crps_ensemble(y, e.T).mean()
        mse = ((e.mean(0) - y) ** 2).mean()
        spread = math.sqrt(e.var(0).mean())
        assert scores["crps"][lead].item() == pytest.approx(crps, rel=1e-6)
        assert scores["mse"][lead].item() == pytest.approx(mse, rel=1e-6)
        assert scores["spread"][lead].item() == pytest.approx(spread, rel=1e-6)
        assert scores["ssr"][lead].item() == pytest.approx(spread / math.sqrt(mse), rel=1e-6)
        assert scores["count"][lead].item() == mask.sum().item()
        assert scores["rank_histogram"][lead].sum().item() == mask.sum().item()
    assert not any(torch.isnan(scores[m]).any() for m in METRICS)


def test_streaming_over_blocks_and_lead_slices_equals_all_at_once():
    generator = torch.Generator().manual_seed(4)
    blocks = [(torch.randn(8, 5, 6, 6, generator=generator), torch.randn(5, 6, 6, generator=generator),
               torch.rand(6, 6, generator=generator) > 0.2) for _ in range(4)]
    streamed = ScoreAccumulator(leads=5, members=8)
    for ens, truth, mask in blocks:
        streamed.update(ens[:, :2], truth[:2], mask, lead_start=0)
        streamed.update(ens[:, 2:], truth[2:], mask, lead_start=2)
    at_once = ScoreAccumulator(leads=5, members=8)
    ens = torch.stack([b[0] for b in blocks], dim=2)  # (M, L, block, Y, X)
    truth = torch.stack([b[1] for b in blocks], dim=1)
    mask = torch.stack([b[2] for b in blocks]).unsqueeze(0).expand(5, -1, -1, -1)
    at_once.update(ens, truth, mask)
    a, b = streamed.result(), at_once.result()
    for metric in METRICS:
        torch.testing.assert_close(a[metric], b[metric], rtol=1e-6, atol=1e-9)  # float32 point values
    assert torch.equal(a["rank_histogram"], b["rank_histogram"])  # continuous data: no ties


def test_rank_ties_are_spread_uniformly():
    ens = torch.zeros(4, 20_000)
    truth = torch.zeros(20_000)
    counts = torch.bincount(truth_rank(ens, truth, torch.Generator().manual_seed(0)), minlength=5)
    assert counts.shape == (5,)
    assert (counts.float() / 20_000 - 0.2).abs().max() < 0.02


def test_rank_histogram_flat_for_calibrated_and_u_shaped_for_underdispersed():
    generator = torch.Generator().manual_seed(5)
    truth = torch.randn(1, 50_000, generator=generator)
    calibrated = ScoreAccumulator(leads=1, members=9)
    calibrated.update(torch.randn(9, 1, 50_000, generator=generator), truth, torch.ones(50_000, dtype=torch.bool))
    frequency = calibrated.result()["rank_histogram"][0].double() / 50_000
    assert (frequency - 0.1).abs().max() < 0.01
    narrow = ScoreAccumulator(leads=1, members=9)
    narrow.update(0.2 * torch.randn(9, 1, 50_000, generator=generator), truth, torch.ones(50_000, dtype=torch.bool))
    edges = narrow.result()["rank_histogram"][0].double() / 50_000
    assert edges[0] > 0.3 and edges[-1] > 0.3


def test_lead_mean_is_plain_mean_of_per_lead_values():
    assert lead_mean(torch.tensor([1.0, 2.0, float("nan"), 6.0], dtype=torch.float64)) == pytest.approx(3.0)
    assert math.isnan(lead_mean(torch.tensor([float("nan")])))


def test_mismatched_shapes_are_rejected():
    acc = ScoreAccumulator(leads=2, members=3)
    with pytest.raises(ValueError):
        acc.update(torch.zeros(3, 2, 4), torch.zeros(2, 5), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError):
        acc.update(torch.zeros(3, 2, 4), torch.zeros(2, 4), torch.ones(3, dtype=torch.bool))
