"""Ensemble scores for probabilistic forecasts, as streaming accumulators.

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
- `ssr_per_series` (only when the accumulator is told the number of series): the paper's protocol for the
  physical systems: spread / rmse per series (trajectory) and lead, then the plain mean over series.
- `rank_histogram`: counts of the truth's rank among the members, M + 1 bins; rank = number of members
  strictly below the truth, plus a uniform random integer in [0, number of members equal to it] (ties
  broken at random with the accumulator's generator, so a constant ensemble equal to the truth spreads
  its counts evenly instead of piling them into one bin).

Aggregation follows the paper: every score is computed per lead time over all valid points of all blocks
(samples, pixels); the mean over leads is the plain mean of the per-lead values (a mean of MSEs, of
RMSEs, of SSRs). Point-wise values are computed in the input precision (float32 forecasts stay float32:
centring on the truth keeps them accurate) and summed in float64 per lead time, so feeding the data in
blocks gives the same result as scoring it all at once, to rounding.

Optional point weights (area weights) turn every mean over points into a weighted mean, sum(w v) / sum(w),
and every rank-histogram count into a sum of weights. Optional point scales (1 / std, to score
standardised fields) multiply the point-wise errors: every score here is a function of the members minus
the truth, of degree 1 (CRPS, errors) or 2 (variances), so scaling the errors is scaling those values.

Two kernels compute the point-wise values: numpy on the CPU (`np.sort` of many short rows is an order of
magnitude faster than `torch.sort` there) and torch for tensors on a GPU; the float64 sums are numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

METRICS = ("crps", "crps_fair", "mse", "rmse", "spread", "ssr", "ssr_unbiased")
SERIES_METRICS = ("ssr_per_series",)
SUMS = ("crps", "crps_fair", "squared_error", "variance", "variance_ddof1")


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
    return torch.from_numpy(_break_ties(below.cpu().numpy(), ties.cpu().numpy(), generator))


def _break_ties(below: np.ndarray, ties: np.ndarray, generator: torch.Generator | None) -> np.ndarray:
    """below + a uniform integer in [0, ties] where ties > 0; the draws come from `generator` in row-major
    order of the tied points, so both kernels give the same ranks."""
    tied = ties > 0
    if not tied.any():  # draw only where needed: ties are rare for continuous forecasts
        return below.astype(np.int64)
    uniform = torch.rand(int(tied.sum()), generator=generator, dtype=torch.float64).numpy()
    ranks = below.astype(np.int64)
    ranks[tied] += np.floor(uniform * (ties[tied] + 1)).astype(np.int64)
    return ranks


def truth_rank(ens: torch.Tensor, truth: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rank 0..M of `truth` (...) among the members of `ens` (M, ...), ties broken uniformly at random."""
    return _rank_from_sorted(_sorted_error(ens, truth), generator)


@dataclass
class PointValues:
    """Point-wise values of one slice (l, P), numpy: mean |error|, the pair term sum_i (2i-M-1) e_(i), mean
    error, ensemble variance (ddof 0), members below the truth and members equal to it."""

    skill: np.ndarray
    pair: np.ndarray
    mean_error: np.ndarray
    variance: np.ndarray
    below: np.ndarray
    ties: np.ndarray


def point_values(ens, truth) -> PointValues:
    """`ens` (M, l, ...), `truth` (l, ...) -> PointValues (l, P): the torch kernel for a tensor on a GPU, the
    numpy one otherwise. A pure function, so callers may run it in worker threads."""
    m, leads = ens.shape[0], ens.shape[1]
    if torch.is_tensor(ens) and ens.device.type != "cpu":
        return torch_point_values(ens, torch.as_tensor(truth, device=ens.device))
    ens, truth = _as_numpy(ens), _as_numpy(truth)
    return numpy_point_values(ens.reshape(m, leads, -1), truth.reshape(leads, -1))


# Points per pass of the CPU kernel, as bytes of one members-last working array: the kernel's three
# working arrays (~0.75 MiB) stay in a core's L2 cache through the dozen passes over them, where whole
# slices went through main memory on every pass. 50 members x 4 x 16 384 points, float32: 13.5 ms of CPU
# instead of 17-22 (np.sort is 10 of them); 128 KiB-1 MiB all within 1 ms of each other.
KERNEL_BLOCK_BYTES = 256 * 1024


def numpy_point_values(ens: np.ndarray, truth: np.ndarray) -> PointValues:
    """`ens` (M, l, P), `truth` (l, P) -> PointValues (l, P), in the precision of `ens` (float32 stays).

    The points go through in blocks that fit a core's L2 cache (`KERNEL_BLOCK_BYTES`): the truth is
    subtracted members first (contiguous), the errors are copied members last (a transposing copy, ~3x
    cheaper than a transposing subtraction) and sorted in place once; every value comes from that one
    sorted array. Member sums are `einsum` products with a constant vector: single-threaded SIMD loops,
    as fast as BLAS gemv on one core and free of BLAS threads that spin-wait on a busy machine (10x slower
    there). Each point's values depend on its own members only, so the blocking changes no bit.
    """
    m, leads, points = ens.shape
    dtype = np.dtype(ens.dtype if ens.dtype == np.float64 else np.float32)
    members, truth = ens.reshape(m, -1), truth.reshape(-1)
    if m == 1:
        return _one_member_values(members[0], truth, dtype, (leads, points))
    size = members.shape[1]
    rows = max(1, min(size, KERNEL_BLOCK_BYTES // (m * dtype.itemsize)))
    values = PointValues(*(np.empty(size, dtype) for _ in range(4)), np.empty(size, np.int64),
                         np.empty(size, np.int64))
    kernel = _RowKernel(m, rows, dtype)
    for start in range(0, size, rows):
        kernel(members[:, start:start + rows], truth[start:start + rows], values, start)
    shape = (leads, points)
    return PointValues(*(getattr(values, name).reshape(shape) for name in POINT_VALUES))


POINT_VALUES = ("skill", "pair", "mean_error", "variance", "below", "ties")


def _one_member_values(member: np.ndarray, truth: np.ndarray, dtype: np.dtype,
                       shape: tuple[int, int]) -> PointValues:
    """`numpy_point_values` of a one-member ensemble (the persistence and climatology references) point by
    point, without sorting rows of one: each member sum of the general kernel is then 0 + one product,
    which these expressions give bit for bit (tests/test_evaluate_speed.py)."""
    error = np.subtract(member, truth, dtype=dtype)
    with np.errstate(invalid="ignore"):  # NaN where the error is not finite, as the general kernel gives
        mean_error = error + 0  # 0 + e * 1
        deviation = error - mean_error
        values = (np.abs(error), error * 0 + 0, mean_error, deviation * deviation,  # pair weight 2 - 1 - 1 = 0
                  (error < 0).astype(np.int64), (error == 0).astype(np.int64))
    return PointValues(*(value.reshape(shape) for value in values))


class _RowKernel:
    """`numpy_point_values` of one block of rows, into slices of the output arrays; holds the block's
    working arrays (reused from block to block) and the constant member weights."""

    def __init__(self, members: int, rows: int, dtype: np.dtype):
        m = members
        self.m, self.dtype = m, dtype
        self.first = np.empty((m, rows), dtype)  # errors, members first
        self.error = np.empty((rows, m), dtype)  # errors, members last, sorted
        self.work = np.empty((rows, m), dtype)
        self.mean = np.full(m, 1.0 / m).astype(dtype)
        self.pair = (2 * np.arange(1, m + 1) - m - 1).astype(dtype)  # sum_i (2i - M - 1) e_(i)
        self.ones = np.ones(m, dtype)

    def __call__(self, members: np.ndarray, truth: np.ndarray, out: PointValues, start: int) -> None:
        rows = members.shape[1]
        first, error, work = self.first[:, :rows], self.error[:rows], self.work[:rows]
        part = slice(start, start + rows)
        np.subtract(members, truth[None], out=first, dtype=self.dtype)
        error[...] = first.T
        error.sort(axis=-1)
        np.abs(error, out=work)
        np.einsum("ij,j->i", work, self.mean, out=out.skill[part])
        mean_error = np.einsum("ij,j->i", error, self.mean, out=out.mean_error[part])
        np.subtract(error, mean_error[:, None], out=work)
        variance = np.einsum("ij,ij->i", work, work, out=out.variance[part])
        variance /= self.m
        np.einsum("ij,j->i", error, self.pair, out=out.pair[part])
        np.less(error, 0, out=work, casting="unsafe")  # 1.0 where a member is below the truth
        below = out.below[part]
        below[...] = np.einsum("ij,j->i", work, self.ones)  # exact small integers
        out.ties[part] = _ties(error, below)


def _ties(sorted_error: np.ndarray, below: np.ndarray) -> np.ndarray:
    """Members equal to the truth per row: zero unless the first member not below it is exactly 0."""
    rows, m = sorted_error.shape
    first = sorted_error.reshape(-1)[np.arange(rows) * m + np.minimum(below, m - 1)]
    maybe = (below < m) & (first == 0)
    ties = np.zeros(below.shape, dtype=np.int64)
    if maybe.any():
        ties[maybe] = np.count_nonzero(sorted_error[maybe] == 0, axis=-1)
    return ties


def torch_point_values(ens: torch.Tensor, truth: torch.Tensor) -> PointValues:
    """The torch kernel (for tensors on a GPU): the same values as `numpy_point_values`, moved to numpy."""
    m, leads = ens.shape[0], ens.shape[1]
    dtype = ens.dtype if ens.dtype == torch.float64 else torch.float32
    error = _sorted_error(ens.reshape(m, leads, -1).to(dtype), truth.reshape(leads, -1).to(dtype))  # (l, P, M)
    mean_error = error.mean(dim=-1)
    zero = torch.zeros((*error.shape[:-1], 1), dtype=error.dtype, device=error.device)
    below = torch.searchsorted(error, zero, side="left").squeeze(-1)
    ties = torch.searchsorted(error, zero, side="right").squeeze(-1) - below
    values = (error.abs().mean(dim=-1), _pair_term(error), mean_error,
              (error - mean_error.unsqueeze(-1)).square().mean(dim=-1), below, ties)
    return PointValues(*(value.cpu().numpy() for value in values))


# ------------------------------------------------------------------------------------- streaming sums

def _as_numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)


def _per_lead(value, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A mask, weight or scale shaped like the truth (l, ...) or like one lead (...) -> (l, P)."""
    value = _as_numpy(value)
    if value.shape == shape[1:]:
        value = np.broadcast_to(value[None], shape)
    if value.shape != shape:
        raise ValueError(f"{what} {value.shape} fits neither the truth {shape} nor one lead")
    return value.reshape(shape[0], -1)


@dataclass
class ScoreAccumulator:
    """Per-lead sums over blocks of one field; `result()` turns them into the scores.

    `update(ens (M, l, ...), truth (l, ...), mask, lead_start=0, weight=None, scale=None, series=None)` adds
    leads lead_start..lead_start+l-1 (so a long block can be fed in slices of leads); numpy arrays or
    tensors (a CUDA tensor is scored by the torch kernel). `mask` is bool, True at valid points, `weight`
    (area weights, needs `weighted=True`) and `scale` (multiplies the errors) are floats; each is shaped
    like `truth` or like its trailing dims. Points where the mask is False are ignored entirely (their
    values may be NaN). With `series` > 0, `update(..., series=s)` also keeps sums per series for
    `ssr_per_series`.
    """

    leads: int
    members: int
    seed: int = 0
    weighted: bool = False
    series: int = 0
    count: np.ndarray = field(init=False)
    points: np.ndarray = field(init=False)
    sums: dict[str, np.ndarray] = field(init=False)
    series_sums: dict[str, np.ndarray] = field(init=False)
    rank_counts: np.ndarray = field(init=False)
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.count = np.zeros(self.leads)  # sum of weights (the number of valid points when unweighted)
        self.points = np.zeros(self.leads)
        self.sums = {name: np.zeros(self.leads) for name in SUMS}
        self.series_sums = {name: np.zeros((self.series, self.leads)) for name in ("count", "squared_error",
                                                                                   "variance")}
        self.rank_counts = np.zeros((self.leads, self.members + 1), dtype=np.float64 if self.weighted else np.int64)
        self.generator = torch.Generator().manual_seed(self.seed)

    def update(self, ens, truth, mask, lead_start: int = 0, *, weight=None, scale=None,
               series: int | None = None) -> None:
        m = ens.shape[0]
        if m != self.members or tuple(ens.shape[1:]) != tuple(truth.shape):
            raise ValueError(f"ensemble {tuple(ens.shape)} and truth {tuple(truth.shape)} do not fit an "
                             f"accumulator for {self.members} members")
        self.add(point_values(ens, truth), tuple(truth.shape), mask, lead_start, weight=weight, scale=scale,
                 series=series)

    def add(self, values: PointValues, shape: tuple[int, ...], mask, lead_start: int = 0, *, weight=None,
            scale=None, series: int | None = None) -> None:
        """`update` with the point values already computed (`point_values`, e.g. in a worker thread) for a
        truth of `shape` (l, ...)."""
        self.add_sums(slice_sums(values, shape, mask, self.members, weight=weight, scale=scale), lead_start,
                      series=series)

    def add_sums(self, sums: SliceSums, lead_start: int = 0, series: int | None = None) -> None:
        """Add one slice's sums (`slice_sums`, computed anywhere: a thread, another process) at `lead_start`.
        Adding the same sums in the same order gives the same result bit for bit; ties are broken here,
        with this accumulator's generator, in the order the slices arrive."""
        leads, bins = sums.ranks.shape
        if lead_start + leads > self.leads or bins != self.members + 1:
            raise ValueError(f"sums of {leads} leads and {bins - 1} members from lead {lead_start} do not fit an "
                             f"accumulator for {self.members} members and {self.leads} leads")
        if sums.weighted != self.weighted:
            raise ValueError("pass a weight with every update of a weighted accumulator, and only then")
        part = slice(lead_start, lead_start + leads)
        self.count[part] += sums.totals["count"]
        self.points[part] += sums.totals["points"]
        for name in SUMS:
            self.sums[name][part] += sums.totals[name]
        if self.series:
            if series is None:
                raise ValueError("an accumulator with per-series sums needs the series of every update")
            for name in self.series_sums:
                self.series_sums[name][series, part] += sums.totals[name]
        self.rank_counts[part] += sums.ranks.astype(self.rank_counts.dtype) + self._tied_counts(sums)

    def _tied_counts(self, sums: SliceSums) -> np.ndarray:
        """Histogram (l, M + 1) of the tied points, each at its rank drawn uniformly among its ties."""
        leads, bins = sums.ranks.shape
        if not sums.tied_lead.size:  # draw only where needed: ties are rare for continuous forecasts
            return np.zeros((leads, bins), dtype=self.rank_counts.dtype)
        ranks = _break_ties(sums.tied_below, sums.tied_ties, self.generator)
        flat = (sums.tied_lead * bins + ranks)[sums.tied_valid]
        weights = None if sums.tied_weight is None else sums.tied_weight[sums.tied_valid]
        counts = np.bincount(flat, weights=weights, minlength=leads * bins)
        return counts.reshape(leads, bins).astype(self.rank_counts.dtype)

    def merge(self, other: ScoreAccumulator) -> None:
        """Add another accumulator's sums (another process, or another field for a mean over fields)."""
        self.count += other.count
        self.points += other.points
        for name in self.sums:
            self.sums[name] += other.sums[name]
        for name in self.series_sums:
            self.series_sums[name] += other.series_sums[name]
        self.rank_counts += other.rank_counts

    def result(self) -> dict[str, torch.Tensor]:
        """Scores per lead: each metric of METRICS -> (L,) float64 (plus `ssr_per_series` with per-series
        sums), `rank_histogram` (L, M + 1) (int64; float64 sums of weights when weighted), `count` (L,) the
        valid points. Leads without valid points give NaN."""
        count = np.where(self.count > 0, self.count, np.nan)
        m = self.members
        mse = self.sums["squared_error"] / count
        rmse = np.sqrt(mse)
        spread = np.sqrt(self.sums["variance"] / count)
        nan = np.full_like(mse, np.nan)
        if m > 1:
            crps_fair = self.sums["crps_fair"] / count
            ssr_unbiased = math.sqrt((m + 1) / m) * np.sqrt(self.sums["variance_ddof1"] / count) / rmse
        else:
            crps_fair, ssr_unbiased = nan, nan
        scores = {"crps": self.sums["crps"] / count, "crps_fair": crps_fair, "mse": mse, "rmse": rmse,
                  "spread": spread, "ssr": spread / rmse, "ssr_unbiased": ssr_unbiased}
        if self.series:
            scores["ssr_per_series"] = self._ssr_per_series()
        result = {name: torch.from_numpy(np.asarray(value, dtype=np.float64)) for name, value in scores.items()}
        result["rank_histogram"] = torch.from_numpy(self.rank_counts.copy())
        result["count"] = torch.from_numpy(self.points.copy())
        return result

    def _ssr_per_series(self) -> np.ndarray:
        """Spread / RMSE of each series and lead, then the plain mean over the series that have valid points."""
        sums = self.series_sums
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.sqrt(sums["variance"] / sums["count"]) / np.sqrt(sums["squared_error"] / sums["count"])
        ratio = np.where(sums["count"] > 0, ratio, np.nan)
        scored = (sums["count"] > 0).sum(axis=0)
        with np.errstate(invalid="ignore"):
            return np.where(scored > 0, np.nansum(ratio, axis=0) / np.maximum(scored, 1), np.nan)


@dataclass
class SliceSums:
    """What one slice of l leads adds to an accumulator: per-lead float64 `totals` (SUMS, `count` = the sum
    of weights, `points`, and `squared_error`/`variance` again for per-series sums), the rank histogram
    (l, M + 1) of the valid points without ties, and every tied point (row-major order, valid or not, as
    the generator draws for them). Small and picklable: ranks of a cluster send these."""

    totals: dict[str, np.ndarray]
    ranks: np.ndarray
    weighted: bool
    tied_lead: np.ndarray
    tied_below: np.ndarray
    tied_ties: np.ndarray
    tied_valid: np.ndarray
    tied_weight: np.ndarray | None


def slice_sums(values: PointValues, shape: tuple[int, ...], mask, members: int, *, weight=None,
               scale=None) -> SliceSums:
    """The sums of one slice's point values for a truth of `shape` (l, ...): `mask` bool, `weight` (area
    weights) and `scale` (multiplies the errors) shaped like the truth or one lead. Pure."""
    leads, m = shape[0], members
    if values.skill.shape != (leads, math.prod(shape[1:])):
        raise ValueError(f"point values {values.skill.shape} do not fit a truth {shape}")
    valid = _per_lead(mask, shape, "mask").astype(bool)
    weights = None if weight is None else _per_lead(weight, shape, "weight").astype(np.float64)
    skill, pair, mean_error, variance = values.skill, values.pair, values.mean_error, values.variance
    if scale is not None:
        factor = _per_lead(scale, shape, "scale").astype(skill.dtype)
        skill, pair, mean_error, variance = skill * factor, pair * factor, mean_error * factor, variance * factor ** 2
    total = lambda v: _masked_sum(v, valid, weights)  # noqa: E731
    totals = {"count": total(np.ones(valid.shape, dtype=np.float32)), "points": valid.sum(axis=1).astype(np.float64),
              "crps": total(skill - pair / (m * m)), "squared_error": total(mean_error ** 2),
              "variance": total(variance), "crps_fair": np.zeros(leads), "variance_ddof1": np.zeros(leads)}
    if m > 1:
        totals["crps_fair"] = total(skill - pair / (m * (m - 1)))
        totals["variance_ddof1"] = total(variance * (m / (m - 1)))
    tied = values.ties > 0
    plain = valid & ~tied
    bins = m + 1
    flat = (np.arange(leads)[:, None] * bins + values.below)[plain]
    ranks = np.bincount(flat, weights=None if weights is None else weights[plain], minlength=leads * bins)
    return SliceSums(totals, ranks.reshape(leads, bins), weights is not None, np.nonzero(tied)[0],
                     values.below[tied], values.ties[tied], valid[tied], None if weights is None else weights[tied])


def _masked_sum(values: np.ndarray, valid: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Per-lead float64 sum of `values` (l, P) over valid points, weighted when `weights` are given."""
    kept = np.where(valid, values, 0)
    if weights is None:
        return kept.sum(axis=1, dtype=np.float64)
    return np.einsum("lp,lp->l", kept.astype(np.float64), np.where(valid, weights, 0.0))


def lead_mean(per_lead) -> float:
    """The paper's average over the horizon: the plain mean of per-lead values (NaN leads skipped)."""
    values = np.asarray(_as_numpy(per_lead), dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan
