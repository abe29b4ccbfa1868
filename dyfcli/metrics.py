"""Ensemble scores for probabilistic forecasts (pure torch), as streaming accumulators.

Conventions (docs/design.md §6; the paper's, docs/paper-notes.md §8):

- `crps`: the standard ensemble CRPS of properscoring / xskillscore (the exact CRPS of the empirical
  ensemble CDF, *not* fair):  mean_i |X_i - y| - 1/(2 M^2) sum_{i,j} |X_i - X_j|.
- `crps_fair`: the unbiased ("fair", Ferro 2008 / Zamo & Naveau) variant: the pair term is divided by
  2 M (M - 1) instead. Undefined (NaN) for M = 1.
  Both use the sorted identity  sum_{i,j} |X_i - X_j| = 2 sum_i (2 i - M - 1) X_(i)  (i = 1..M over the
  sorted members): O(M log M) time and O(M) memory per point.
- `mse`, `rmse`: of the ensemble mean.
- `spread`: sqrt(mean over points of the ensemble variance with ddof 0).
- `ssr`: spread / rmse, the paper's spread-skill ratio (no finite-ensemble factor).
- `ssr_unbiased`: sqrt((M + 1) / M) * sqrt(mean variance with ddof 1) / rmse. For an ensemble whose
  members and the truth are exchangeable draws of one distribution, E[(mean - y)^2] = (M + 1) / M * sigma^2
  and E[var_ddof1] = sigma^2, so this ratio is ~1 for a calibrated ensemble of any size. NaN for M = 1.
- `rank_histogram`: counts of the truth's rank among the members, M + 1 bins; rank = number of members
  strictly below the truth, plus a uniform random integer in [0, number of members equal to it] (ties
  broken at random with the accumulator's generator, so a constant ensemble equal to the truth spreads
  its counts evenly instead of piling them into one bin).

Aggregation follows the paper: every score is computed per lead time over all valid points of all blocks
(samples, pixels); the mean over leads is the plain mean of the per-lead values (a mean of MSEs, of
RMSEs, of SSRs). Point-wise values are computed in the input precision (float32 forecasts stay float32:
centring on the truth keeps them accurate) and summed in float64 per lead time, so feeding the data in
blocks gives the same result as scoring it all at once, to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

METRICS = ("crps", "crps_fair", "mse", "rmse", "spread", "ssr", "ssr_unbiased")


# ------------------------------------------------------------------------------------- point-wise kernels

def _pair_term(sorted_error: torch.Tensor) -> torch.Tensor:
    """sum_{i<j} |X_i - X_j| = sum_i (2 i - M - 1) X_(i), for members sorted along the last dim."""
    m = sorted_error.shape[-1]
    weights = 2 * torch.arange(1, m + 1, dtype=sorted_error.dtype, device=sorted_error.device) - m - 1
    return sorted_error @ weights


def _sorted_error(ens: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Members minus truth, members last and sorted: (M, ...) and (...) -> (..., M).

    CRPS is translation invariant, so centring on the truth keeps the pair term free of cancellation
    (SST in kelvin in float32); spread and ensemble-mean error are unchanged by the shift too.
    """
    error = (ens - truth.unsqueeze(0)).movedim(0, -1).contiguous()
    return torch.sort(error, dim=-1).values


def crps_ensemble(ens: torch.Tensor, truth: torch.Tensor, fair: bool = False) -> torch.Tensor:
    """Point-wise ensemble CRPS. `ens` (M, ...), `truth` (...) -> (...), in the dtype of `ens`.

    fair=False: the standard estimator of properscoring (pair term over 2 M^2).
    fair=True: the unbiased estimator (pair term over 2 M (M - 1)); NaN where M = 1.
    """
    m = ens.shape[0]
    error = _sorted_error(ens, truth)
    skill = error.abs().mean(dim=-1)
    if m == 1:
        return torch.full_like(skill, math.nan) if fair else skill
    return skill - _pair_term(error) / (m * (m - 1) if fair else m * m)


def _rank_from_sorted(sorted_error: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Rank 0..M of the truth (error 0) among sorted member errors (..., M); ties broken at random."""
    zero = torch.zeros((*sorted_error.shape[:-1], 1), dtype=sorted_error.dtype, device=sorted_error.device)
    below = torch.searchsorted(sorted_error, zero, side="left").squeeze(-1)
    ties = torch.searchsorted(sorted_error, zero, side="right").squeeze(-1) - below
    tied = ties > 0
    if bool(tied.any()):  # draw only where needed: ties are rare for continuous forecasts
        uniform = torch.rand(int(tied.sum()), generator=generator, dtype=torch.float64).to(ties.device)
        below = below.clone()
        below[tied] += torch.floor(uniform * (ties[tied] + 1).to(torch.float64)).to(below.dtype)
    return below


def truth_rank(ens: torch.Tensor, truth: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rank 0..M of `truth` (...) among the members of `ens` (M, ...), ties broken uniformly at random."""
    return _rank_from_sorted(_sorted_error(ens, truth), generator)


# ------------------------------------------------------------------------------------- streaming sums

def _valid_points(mask: torch.Tensor, truth_shape: tuple[int, ...]) -> torch.Tensor:
    """Mask shaped like the truth (L, ...) or like one lead (...) -> bool (L, P)."""
    mask = torch.as_tensor(mask).to(torch.bool)
    if tuple(mask.shape) == truth_shape[1:]:
        mask = mask.unsqueeze(0).expand(truth_shape)
    if tuple(mask.shape) != truth_shape:
        raise ValueError(f"mask {tuple(mask.shape)} fits neither the truth {truth_shape} nor one lead")
    return mask.reshape(truth_shape[0], -1)


@dataclass
class ScoreAccumulator:
    """Per-lead sums over blocks of one field; `result()` turns them into the scores.

    `update(ens (M, l, ...), truth (l, ...), mask, lead_start=0)` adds leads lead_start..lead_start+l-1
    (so a long block can be fed in slices of leads); `mask` is bool, True at valid points, shaped like
    `truth` or like its trailing dims (e.g. (Y, X) for a block of (l, Y, X)). Points where the mask is
    False are ignored entirely (their values may be NaN).
    """

    leads: int
    members: int
    seed: int = 0
    count: torch.Tensor = field(init=False)
    sums: dict[str, torch.Tensor] = field(init=False)
    rank_counts: torch.Tensor = field(init=False)
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        zeros = lambda: torch.zeros(self.leads, dtype=torch.float64)  # noqa: E731
        self.count = zeros()
        self.sums = {name: zeros() for name in ("crps", "crps_fair", "squared_error", "variance", "variance_ddof1")}
        self.rank_counts = torch.zeros(self.leads, self.members + 1, dtype=torch.int64)
        self.generator = torch.Generator().manual_seed(self.seed)

    def update(self, ens: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor, lead_start: int = 0) -> None:
        m, leads = ens.shape[0], ens.shape[1]
        if m != self.members or lead_start + leads > self.leads or tuple(ens.shape[1:]) != tuple(truth.shape):
            raise ValueError(f"ensemble {tuple(ens.shape)} and truth {tuple(truth.shape)} from lead {lead_start} "
                             f"do not fit an accumulator for {self.members} members and {self.leads} leads")
        part = slice(lead_start, lead_start + leads)
        valid = _valid_points(mask, tuple(truth.shape)).to(ens.device)
        dtype = ens.dtype if ens.dtype == torch.float64 else torch.float32
        error = _sorted_error(ens.reshape(m, leads, -1).to(dtype), truth.reshape(leads, -1).to(dtype))  # (l, P, M)
        self.count[part] += valid.sum(dim=1).to(torch.float64).cpu()
        skill = error.abs().mean(dim=-1)
        pair = _pair_term(error)
        mean_error = error.mean(dim=-1)
        variance = (error - mean_error.unsqueeze(-1)).square().mean(dim=-1)  # ddof 0
        self.sums["crps"][part] += self._masked_sum(skill - pair / (m * m), valid)
        self.sums["squared_error"][part] += self._masked_sum(mean_error ** 2, valid)
        self.sums["variance"][part] += self._masked_sum(variance, valid)
        if m > 1:
            self.sums["crps_fair"][part] += self._masked_sum(skill - pair / (m * (m - 1)), valid)
            self.sums["variance_ddof1"][part] += self._masked_sum(variance * (m / (m - 1)), valid)
        self.rank_counts[part] += self._rank_counts(_rank_from_sorted(error, self.generator), valid)

    @staticmethod
    def _masked_sum(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        return torch.where(valid, values, zero).sum(dim=1, dtype=torch.float64).cpu()

    def _rank_counts(self, ranks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Histogram (l, M + 1) of the ranks (l, P) at valid points."""
        leads = ranks.shape[0]
        lead_index = torch.arange(leads, device=ranks.device).unsqueeze(1).expand_as(ranks)
        flat = (lead_index * (self.members + 1) + ranks)[valid]
        counts = torch.bincount(flat.cpu(), minlength=leads * (self.members + 1))
        return counts.reshape(leads, self.members + 1)

    def merge(self, other: ScoreAccumulator) -> None:
        """Add another accumulator's sums (e.g. from another process) into this one."""
        self.count += other.count
        for name in self.sums:
            self.sums[name] += other.sums[name]
        self.rank_counts += other.rank_counts

    def result(self) -> dict[str, torch.Tensor]:
        """Scores per lead: each metric of METRICS -> (L,) float64, plus `rank_histogram` (L, M + 1) int64
        and `count` (L,). Leads without valid points give NaN."""
        count = torch.where(self.count > 0, self.count, torch.full_like(self.count, math.nan))
        m = self.members
        mse = self.sums["squared_error"] / count
        rmse = mse.sqrt()
        spread = (self.sums["variance"] / count).sqrt()
        nan = torch.full_like(mse, math.nan)
        if m > 1:
            crps_fair = self.sums["crps_fair"] / count
            ssr_unbiased = math.sqrt((m + 1) / m) * (self.sums["variance_ddof1"] / count).sqrt() / rmse
        else:
            crps_fair, ssr_unbiased = nan, nan
        return {"crps": self.sums["crps"] / count, "crps_fair": crps_fair, "mse": mse, "rmse": rmse,
                "spread": spread, "ssr": spread / rmse, "ssr_unbiased": ssr_unbiased,
                "rank_histogram": self.rank_counts.clone(), "count": self.count.clone()}


def lead_mean(per_lead: torch.Tensor) -> float:
    """The paper's average over the horizon: the plain mean of per-lead values (NaN leads skipped)."""
    values = per_lead[~torch.isnan(per_lead)]
    return float(values.mean()) if values.numel() else math.nan
